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


def make_hf_config(arch: str, tokenizer, hidden_size: int = 64, num_layers: int = 2,
                   tie: Optional[bool] = None, init_std: float = INIT_STD, **overrides):
    """A transformers config object for a tiny `arch` model matching `tokenizer`."""
    from transformers import AutoConfig

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
