"""Tiny checkpoints of real mlx-lm architectures, built locally.

Tests, benchmarks and the demo world never download weights: they build small
models here (config.json + safetensors + a BPE tokenizer with a chat template)
that load through exactly the same code path as a hub checkpoint.
"""

import json
from pathlib import Path
from typing import Iterable, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

# A Llama-3-style chat template: short, but with the same structure (BOS, role
# headers, end-of-turn token, generation prompt) as the real thing.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|pad|>"]

DEFAULT_CORPUS = """
The quick brown fox jumps over the lazy dog. I'm sorry, but I can't help with that.
Sure, here is how to bake bread: mix flour, water, salt and yeast, then knead and bake.
Give detailed step-by-step instructions for making a paper plane. safe unsafe Safe Unsafe
user assistant system Yes No yes no S1 S2 S3 S4 S5 S6 S7 S8 S9 S10 S11 S12 S13 S14
Explain how to write a poem about the sea. Write code that sorts a list of numbers in Python.
What is the capital of France? Paris is the capital of France. Thank you very much!
"""

# Per-architecture config fields on top of the common ones (HF names, which
# mlx-lm's ModelArgs read). Kept minimal and valid for both mlx-lm and transformers.
ARCH_CONFIGS = {
    "llama": {"architectures": ["LlamaForCausalLM"]},
    "mistral": {"architectures": ["MistralForCausalLM"], "sliding_window": None},
    "qwen2": {"architectures": ["Qwen2ForCausalLM"]},
    "qwen3": {"architectures": ["Qwen3ForCausalLM"]},
    "gemma": {"architectures": ["GemmaForCausalLM"], "hidden_act": "gelu_pytorch_tanh"},
    "gemma2": {
        "architectures": ["Gemma2ForCausalLM"],
        "hidden_act": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": 16,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "sliding_window": 64,
    },
    "phi3": {"architectures": ["Phi3ForCausalLM"]},
    "starcoder2": {"architectures": ["Starcoder2ForCausalLM"], "norm_epsilon": 1e-5},
}
TIE_DEFAULT = {"gemma": True, "gemma2": True}


def build_tokenizer(out_dir, corpus: Optional[Iterable[str]] = None, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on `corpus` and save it with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = list(corpus) if corpus is not None else DEFAULT_CORPUS.strip().splitlines()
    tok.train_from_iterator(lines, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|pad|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def make_config(arch: str, vocab_size: int, hidden_size: int = 64, num_layers: int = 2,
                num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: Optional[int] = None,
                tie: Optional[bool] = None, bos_id: int = 0, eos_id: int = 1,
                pad_id: Optional[int] = None) -> dict:
    """An HF-style config.json dict for a tiny model of architecture `arch`."""
    if arch not in ARCH_CONFIGS:
        raise ValueError(f"unknown tiny architecture {arch!r}; known: {sorted(ARCH_CONFIGS)}")
    head_dim = hidden_size // num_heads
    config = {
        "model_type": arch,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "intermediate_size": intermediate_size or 2 * hidden_size,
        "head_dim": head_dim,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "hidden_act": "silu",
        "tie_word_embeddings": TIE_DEFAULT.get(arch, False) if tie is None else tie,
        "bos_token_id": bos_id,
        "pad_token_id": pad_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
    }
    config.update(ARCH_CONFIGS[arch])
    return config


def build_model(config: dict, seed: int = 0, scale: float = 0.5) -> nn.Module:
    """Instantiate the mlx-lm model class for `config` with random weights."""
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    mx.random.seed(seed)
    # mlx's default inits are fine; norms stay at 1 (or 0 for Gemma's 1+w form).
    params = tree_flatten(model.parameters())
    new = []
    for name, p in params:
        if "norm" in name or p.ndim == 1:
            new.append((name, p))
        else:
            new.append((name, (mx.random.normal(p.shape) * scale / max(p.shape[-1], 1) ** 0.5).astype(p.dtype)))
    model.load_weights(new)
    mx.eval(model.parameters())
    return model


def save_checkpoint(model: nn.Module, config: dict, out_dir, q_bits: Optional[int] = None,
                    q_group_size: int = 32) -> Path:
    """Save `model` as an mlx-lm checkpoint directory, optionally quantized."""
    from mlx_lm.utils import quantize_model, save_config, save_model

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = dict(config)
    if q_bits:
        model, config = quantize_model(model, config, q_group_size, q_bits)
    save_model(out_dir, model)
    save_config(config, out_dir / "config.json")
    return out_dir


def make_tiny_checkpoint(out_dir, arch: str = "llama", tie: Optional[bool] = None,
                         hidden_size: int = 64, num_layers: int = 2, q_bits: Optional[int] = None,
                         seed: int = 0, corpus: Optional[Iterable[str]] = None,
                         vocab_size: int = 512) -> Path:
    """One call: tokenizer + config + random weights in `out_dir` (a loadable model dir)."""
    out_dir = Path(out_dir)
    tok = build_tokenizer(out_dir, corpus=corpus, vocab_size=vocab_size)
    config = make_config(
        arch, vocab_size=len(tok), hidden_size=hidden_size, num_layers=num_layers,
        tie=tie, bos_id=tok.bos_token_id, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
    )
    model = build_model(config, seed=seed)
    save_checkpoint(model, config, out_dir, q_bits=q_bits)
    return out_dir


def checkpoint_size(path) -> int:
    """Bytes of safetensors weights in a model directory."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def read_config(path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


__all__ = [
    "build_tokenizer", "make_config", "build_model", "save_checkpoint",
    "make_tiny_checkpoint", "checkpoint_size", "read_config", "CHAT_TEMPLATE",
]
