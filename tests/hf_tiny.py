"""Tiny random Hugging Face checkpoints, built with transformers for parity tests.

Same recipe as ``mlx_softprompt.tiny`` (its BPE tokenizer with a chat template
and its per-architecture config fields), but the model is instantiated and
saved by transformers (``save_pretrained``, safetensors), so the converter and
the PEFT interop are tested against exactly what users download from the hub.
"""

from pathlib import Path
from typing import Optional

from mlx_softprompt.tiny import build_tokenizer, make_config

# Weights ~ N(0, std). 0.2 makes "sharp" models: logits spread over a few units,
# peaked attention and activations in the non-linear range of GELU/SiLU, so
# parity tests see every op (at transformers' default 0.02 the models are
# nearly linear and, e.g., exact vs tanh GELU is invisible).
INIT_STD = 0.2
TRANSFORMERS_INIT_STD = 0.02

# Architectures mlx_softprompt.tiny does not build: (the tiny config to start from, HF fields).
EXTRA_ARCHS = {
    "gemma3_text": ("gemma", {
        "architectures": ["Gemma3ForCausalLM"], "query_pre_attn_scalar": 16, "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention"],
    }),
    # configs as transformers 5 writes them (rope_parameters, layer_types, ...)
    "granite": ("llama", {
        "architectures": ["GraniteForCausalLM"], "embedding_multiplier": 2.0, "residual_multiplier": 0.5,
        "attention_multiplier": 0.25, "logits_scaling": 4.0,
    }),
    "olmo2": ("llama", {"architectures": ["Olmo2ForCausalLM"]}),
    "smollm3": ("llama", {"architectures": ["SmolLM3ForCausalLM"], "no_rope_layers": [1, 0]}),
}


# Any architecture: transformers' own config class with every size field it has shrunk to these.
# Feed-forward widths are 4 x hidden, the ratio some mlx-lm models assume (GPT-NeoX, GPT-2); fewer
# positions than tokens (256 < 482), so the token table stays the model's largest embedding, as in real models.
TINY_SIZES = {
    "hidden_size": 64, "num_hidden_layers": 2, "num_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 256, "ffn_hidden_size": 256,
    "intermediate_size_mlp": 256, "max_position_embeddings": 256,
    # mixture of experts
    "num_experts": 4, "n_routed_experts": 4, "num_local_experts": 4, "moe_num_experts": 4, "num_experts_per_tok": 2,
    "moe_topk": 2, "n_group": 1, "topk_group": 1, "zero_expert_num": 2, "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32, "moe_shared_expert_intermediate_size": 32, "shared_intermediate_size": 32,
    "expert_ffn_hidden_size": 32, "moe_layer_end_index": 1, "max_window_layers": 2,
    # multi-head latent attention (DeepSeek, MiniCPM3, GLM-4.7 lite)
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "qk_head_dim": 16,
    "v_head_dim": 16, "index_head_dim": 16, "index_n_heads": 2, "index_topk": 8,
    # local attention, linear attention, state-space layers
    "sliding_window": 8, "attention_window_size": 8, "attention_chunk_size": 8, "linear_num_key_heads": 2,
    "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_head_dim": 16,
    "linear_num_heads": 4, "state_size": 16, "time_step_rank": 4, "mamba_d_state": 16, "mamba_n_heads": 8,
    "mamba_d_head": 16, "mamba_head_dim": 16, "mamba_num_heads": 8, "ssm_state_size": 16, "mamba_d_ssm": 128,
    "chunk_size": 16, "mamba_chunk_size": 16, "num_heads": 8, "mamba_dt_rank": 4, "lru_width": 64,
    # others
    "query_pre_attn_scalar": 16, "rotary_dim": 8, "block_size": 16, "hidden_size_per_layer_input": 16,
    "dim_model_base": 64,
}

# Fields a real checkpoint of the architecture has and a 2-layer copy of the class defaults would lose
# (scaled RoPE that mlx-lm's model assumes, a layout with both layer kinds).
TINY_EXTRAS = {
    # mlx-lm's LongRoPE applies the long factors at every length, transformers the short ones up to
    # original_max_position_embeddings: equal factors here, the difference is documented (docs/CONVERT.md)
    "minicpm3": {"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                                     "short_factor": [1.0, 1.5, 2.0, 2.5], "long_factor": [1.0, 1.5, 2.0, 2.5],
                                     "original_max_position_embeddings": 256}},
    "deepseek_v2": {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                        "original_max_position_embeddings": 128, "beta_fast": 32.0,
                                        "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707},
                    "topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 1, "num_experts_per_tok": 2},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    "qwen3_next": {"full_attention_interval": 2},
    "recurrent_gemma": {"block_types": ["recurrent", "attention"], "num_key_value_heads": 1},
    "lfm2": {"full_attn_idxs": [1]},
    "phimoe": {"attention_bias": True, "lm_head_bias": True},  # as Phi-3.5-MoE; mlx-lm's phimoe assumes them
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    "hunyuan_v1_dense": {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "alpha": 1000.0,
                                             "factor": 1.0}},
    "nemotron": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
    "dbrx": {"attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
             "ffn_config": {"hidden_size": 64, "ffn_hidden_size": 128, "moe_num_experts": 4, "moe_top_k": 2}},
}


def _shrunk(config_class, **fields) -> dict:
    """The size fields `config_class` has (its attribute maps included), shrunk; `fields` on top."""
    default = config_class()
    # a size left None means "off" (no window, no query LoRA), except the head sizes, which some
    # architectures leave None for their modeling code to derive
    out = {k: v for k, v in TINY_SIZES.items() if hasattr(default, k) and not isinstance(getattr(default, k), (dict, list))
           and (getattr(default, k) is not None or k in ("head_dim", "num_key_value_heads"))}
    if "qk_rope_head_dim" in out:  # MLA: transformers rotates head_dim = qk_rope_head_dim dims
        out["head_dim"] = out["qk_rope_head_dim"]
    types = getattr(default, "layer_types", None)
    settable = not (isinstance(getattr(config_class, "layer_types", None), property)
                    or "layer_types" in getattr(config_class, "attribute_map", {}))
    if settable and isinstance(types, list) and len(set(types)) > 1:  # one local/linear layer, one global
        kinds = list(dict.fromkeys(types))
        full = [t for t in kinds if t in ("full_attention", "attention")]
        other = [t for t in kinds if t not in full]
        out["layer_types"] = [other[0], full[0]] if full and other else kinds[:2]
    out.update({k: v for k, v in fields.items() if hasattr(default, k)})
    return out


def tiny_any_config(arch: str, tokenizer, init_std: float = INIT_STD, **overrides):
    """A tiny config of any architecture transformers knows, from its own config class."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[arch]
    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    fields = _shrunk(cls, **ids)
    default = cls()
    for sub in ("text_config", "vision_config", "audio_config"):  # multimodal: shrink every tower
        sub_config = getattr(default, sub, None)
        if sub_config is not None:
            sub_fields = {**sub_config.to_dict(), **_shrunk(type(sub_config), **ids)}
            if "layer_types" not in _shrunk(type(sub_config)):
                sub_fields.pop("layer_types", None)
            fields[sub] = sub_fields
    fields.update(TINY_EXTRAS.get(arch, {}), **overrides)
    config = cls(initializer_range=init_std, **fields)
    config.dtype = "float32"
    return config


def make_hf_config(arch: str, tokenizer, hidden_size: int = 64, num_layers: int = 2,
                   tie: Optional[bool] = None, init_std: float = INIT_STD, **overrides):
    """A transformers config object for a tiny `arch` model matching `tokenizer`."""
    from transformers import AutoConfig

    if overrides.pop("any_arch", False):
        return tiny_any_config(arch, tokenizer, init_std, **overrides)
    base, extra = EXTRA_ARCHS.get(arch, (arch, {}))
    fields = make_config(
        base, vocab_size=len(tokenizer), hidden_size=hidden_size, num_layers=num_layers, tie=tie,
        bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
    )
    fields.update(extra, **overrides)
    fields.pop("torch_dtype", None)
    fields.pop("model_type")
    config = AutoConfig.for_model(arch, initializer_range=init_std, **fields)
    config.dtype = "float32"
    return config


def _no_zero_matrices(model, std: float) -> None:
    """Some classes start a matrix at zero (AfMoE's router): every expert would tie, and two libraries
    break ties differently. Random weights there too, so a comparison sees the computation."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2 and not p.any():
                p.normal_(0.0, std)


def make_hf_checkpoint(out_dir, arch: str = "llama", tie: Optional[bool] = None, seed: int = 0,
                       hidden_size: int = 64, num_layers: int = 2, torch_dtype: str = "float32",
                       weights: str = "safetensors", init_std: float = INIT_STD, **overrides) -> Path:
    """Tokenizer + config.json + random weights saved by transformers in `out_dir`.

    ``overrides`` are extra config fields; ``weights="bin"`` saves a PyTorch
    pickle instead (to test that we refuse it).
    """
    import torch
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    tok = build_tokenizer(out_dir)
    config = make_hf_config(arch, tok, hidden_size=hidden_size, num_layers=num_layers, tie=tie,
                            init_std=init_std, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if overrides.get("any_arch"):
        _no_zero_matrices(model, init_std)
    model = model.to(getattr(torch, torch_dtype)).eval()
    if weights == "safetensors":
        model.save_pretrained(out_dir)
    else:  # what old hub checkpoints look like: a pickled state dict
        model.config.save_pretrained(out_dir)
        torch.save(model.state_dict(), out_dir / "pytorch_model.bin")
    return out_dir


def load_hf(path):
    """(transformers model in eval mode, fp32, CPU; its tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)
