"""Every architecture both the installed transformers and mlx-lm know, from a checkpoint saved by transformers.

For each model type that transformers builds as a causal LM and mlx-lm has a model for, a tiny
random checkpoint (hidden 64, 2 layers, the 482-token BPE tokenizer with a chat template) is built
from transformers' own config class and saved with ``save_pretrained``; then it is converted, and
either

- its fp32 logits on a chat-templated prompt match transformers' (max |difference| <= SWEEP_ATOL), and
  a soft prompt injected through the embedding layer gives the logits of the equivalent token
  sequence; or
- mlx-lm cannot run it, and the refusal is one line naming the architecture (``REFUSED``: the reason
  is mlx-lm's, stated); or
- mlx-lm runs it but computes something else than transformers (``DIFFERS``, a strict xfail: the
  day mlx-lm fixes it, this test says so).

Architectures transformers cannot build tiny are skipped with the reason (``UNBUILDABLE``). A model
type new to either library joins the sweep by itself and must pass or be listed here; the lists
are documented in docs/CONVERT.md.
"""

import mlx.core as mx
import numpy as np
import pytest
import torch

from converters.hf_to_mlx import convert
from mlx_softprompt import models
from mlx_softprompt.errors import UserError
from mlx_softprompt.generate import chat_ids

TEXT = "What is the capital of France? Explain how to bake bread."
# fp32: max |logit difference| over every position of a 33-token chat-templated prompt; measured
# <= 2.5e-5 on every passing architecture but qwen3_next (8.5e-5: its gated delta-rule recurrence
# sums in another order); the logits' spread is about 6.
SWEEP_ATOL = 2e-4
SOFT_ATOL = 1e-5  # soft prompt vs its token sequence: the same arithmetic, measured 0


def _architectures():
    import pkgutil

    import mlx_lm.models
    from mlx_lm.utils import MODEL_REMAPPING
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    mlx = {m.name for m in pkgutil.iter_modules(mlx_lm.models.__path__)}
    return sorted(t for t in CONFIG_MAPPING.keys()
                  if t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and MODEL_REMAPPING.get(t, t) in mlx)


# mlx-lm cannot build or load what transformers saves: (a phrase of the one-line refusal, why).
REFUSED = {
    "olmo": ("ai2-olmo", "mlx-lm's olmo model needs AI2's ai2-olmo package and reads AI2's original "
                         "checkpoint layout, not transformers' OlmoForCausalLM"),
    "gpt2": ("parameters not in model", "mlx-lm's gpt2 reads the original GPT-2 weight names (h.0...), "
                                        "not transformers' GPT2LMHeadModel ones (transformer.h.0...)"),
    "gpt_oss": ("parameters not in model", "transformers 5 stores the experts fused (gate_up_proj); "
                                           "mlx-lm's gpt_oss sanitize reads another layout"),
    "llama4_text": ("parameters not in model", "mlx-lm has llama4 only as the multimodal checkpoint "
                                               "(language_model.*), not Llama4ForCausalLM's layout"),
    "llama4": ("parameters not in model", "transformers' causal-LM class for llama4 saves the text model "
                                          "(llama4_text layout), which mlx-lm's llama4 does not read"),
    "nanochat": ("parameters not in model", "mlx-lm's nanochat reads the original nanochat weight names"),
    "olmo_hybrid": ("parameters not in model", "transformers saves OLMo-hybrid's original weight names "
                                               "(attention_layer_norm, q/k/v_conv1d), which its own loader renames; "
                                               "mlx-lm's olmo_hybrid reads the renamed ones"),
    "bitnet": ("Missing", "mlx-lm's bitnet reads packed ternary weights with weight_scale tensors, "
                          "not transformers' unpacked BitNet weights"),
    "minimax": ("parameters not in model", "mlx-lm's minimax has no lightning-attention (linear) layers"),
    "bailing_hybrid": ("group_norm_size", "mlx-lm reads the original (remote-code) config; transformers 5 "
                                          "has no group_norm_size"),
    "glm_moe_dsa": ("topk_method", "mlx-lm reads the original (remote-code) config; transformers 5 has no "
                                   "topk_method, scoring_func, moe_layer_freq"),
    "kimi_linear": ("linear_attn_config", "mlx-lm reads the original (remote-code) nested linear_attn_config; "
                                          "transformers 5 flattens it"),
    "longcat_flash": ("attention_method", "mlx-lm reads the original (remote-code) config; transformers 5 has "
                                          "no attention_method, zero_expert_type, mla_scale_*"),
    "mimo_v2_flash": ("hybrid_layer_pattern", "mlx-lm reads the original (remote-code) config; transformers 5 "
                                              "names its fields differently"),
    "qwen3_5_moe": ("parameters not in model", "mlx-lm reads the experts fused (experts.gate_up_proj), as "
                                               "Qwen3.5-MoE checkpoints store them; transformers saves its text-only "
                                               "model's experts one by one"),
}

# mlx-lm runs the checkpoint but computes something else than transformers (strict xfail).
DIFFERS = {
    "gemma2": "mlx-lm's gemma2 has no sliding window: every layer attends globally (differs past "
              "sliding_window tokens, 4096 in Gemma 2)",
    "mistral": "mlx-lm runs mistral as llama, which ignores sliding_window (differs past it)",
    "glm": "mlx-lm's glm rotates the whole head; transformers' GLM rotates partial_rotary_factor of it",
    "mamba2": "mlx-lm's gated RMSNorm normalises the whole width at once, transformers' each of n_groups "
              "groups (the same only when n_groups = 1; measured: n_groups=1 matches to 4e-6)",
    "ernie4_5_moe": "mlx-lm drops the router's e_score_correction_bias, which transformers adds to the "
                    "scores when choosing experts (the same only while that bias is zero)",
    "jamba": "mlx-lm's jamba router renormalises the softmax over the chosen experts; transformers' weights "
             "each chosen expert by its softmax over all experts",
}

# mlx-lm uses another GELU than transformers for these: transformers' is swapped for mlx-lm's before
# comparing, so the rest of the model is checked exactly (the GELU difference alone: <= 3e-3).
MLX_GELU = {"gemma": "exact", "gpt_neox": "tanh", "starcoder2": "exact", "gpt_bigcode": "exact"}

# transformers cannot build a tiny random model of these from its config class defaults.
UNBUILDABLE = {
    "dbrx": "DbrxConfig's sub-configs keep sizes of their own: the tiny model's router stays 2048 wide",
    "dots1": "Dots1 model init fails on a 2-layer config (torch.empty called with a tuple)",
    "gemma3n": "Gemma3n needs per-layer sizes for all 35 layers of its sub-configs",
    "gemma4": "Gemma4 configs refuse global access to per-layer attributes (head_dim)",
    "gemma4_text": "as gemma4",
    "gemma4_unified": "as gemma4",
    "deepseek_v32": "DeepseekV32 forward fails on a tiny config (indexer head sizes)",
}

ARCHS = _architectures()


def _gelu_as_mlx_lm(hf_model, kind):
    from transformers.activations import GELUActivation, GELUTanh, PytorchGELUTanh

    mine = torch.nn.GELU(approximate="tanh" if kind == "tanh" else "none")
    gelus = tuple(c for c in (GELUActivation, GELUTanh, PytorchGELUTanh, torch.nn.GELU) if c is not None)
    for module in list(hf_model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, gelus):
                setattr(module, name, mine)


def _hf_logits(path, ids, arch):
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if arch in MLX_GELU:
        _gelu_as_mlx_lm(hf_model, MLX_GELU[arch])
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float().numpy()


def _logits(model, ids, prompt=None):
    return np.array(models.forward(model, ids, prompt=prompt)[0].astype(mx.float32))


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_checkpoint_converts_or_is_refused_in_one_line(hf_tiny_model, tmp_path, arch):
    if arch in UNBUILDABLE:
        pytest.skip(f"transformers cannot build it tiny: {UNBUILDABLE[arch]}")
    hf = hf_tiny_model(arch, any_arch=True)
    out = tmp_path / "mlx"
    if arch in REFUSED:
        with pytest.raises(UserError) as refusal:
            convert(hf, out, dtype="float32")
        message = str(refusal.value)
        assert "\n" not in message and REFUSED[arch][0] in message, message
        assert not out.exists()
        return
    model, tok, _ = models.load(convert(hf, out, dtype="float32"))
    ids = chat_ids(tok, TEXT)
    ours, theirs = _logits(model, ids), _hf_logits(hf, ids, arch)
    assert ours.shape == theirs.shape
    difference = float(np.abs(ours - theirs).max())
    if arch in DIFFERS:
        assert difference > SWEEP_ATOL, f"{arch} now matches transformers: remove it from DIFFERS"
        pytest.xfail(DIFFERS[arch])
    assert difference <= SWEEP_ATOL
    # a soft prompt equal to the embeddings of 5 tokens gives the logits of those tokens
    tokens = ids[1:6]
    with_prompt = _logits(model, ids, prompt=models.embed_rows(model, tokens))
    assert np.abs(with_prompt - _logits(model, list(tokens) + ids)).max() <= SOFT_ATOL


def test_the_lists_name_only_architectures_in_the_sweep():
    assert set(REFUSED) | set(DIFFERS) | set(UNBUILDABLE) | set(MLX_GELU) <= set(ARCHS)


# RoPE variants as transformers 5 writes them (only under rope_parameters), on architectures that read them.
ROPE_VARIANTS = {
    "llama3": ("llama", {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "yarn": ("qwen3", {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 16}),
    "linear": ("llama", {"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0}),
    "per-layer-type": ("gemma3_text", {"full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
                                       "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    "longrope": ("phi3", {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0, 1.5, 2.0, 2.5] * 2,
                          "long_factor": [1.0, 1.5, 2.0, 2.5] * 2}),
}


@pytest.mark.parametrize("variant", sorted(ROPE_VARIANTS))
def test_rope_variants_written_by_transformers5(hf_tiny_model, tmp_path, variant):
    arch, rope = ROPE_VARIANTS[variant]
    extra = {"original_max_position_embeddings": 256} if variant == "longrope" else {}
    hf = hf_tiny_model(arch, any_arch=True, rope_parameters=rope, **extra)
    model, tok, _ = models.load(convert(hf, tmp_path / "mlx", dtype="float32"))
    ids = chat_ids(tok, TEXT)
    assert np.abs(_logits(model, ids) - _hf_logits(hf, ids, arch)).max() <= SWEEP_ATOL
