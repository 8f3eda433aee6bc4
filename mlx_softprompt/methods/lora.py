"""LoRA: mlx-lm's low-rank adapters (``LoRALinear``) on the base's projections.

Which projections get adapters is mlx-lm's choice
(``mlx_lm.tuner.utils.linear_to_lora_layers``) for a rank, a number of
(last) layers and optional target keys; the adapters are trained by the same
loop and objectives as every method. Applying them never changes the base:
``bind`` swaps the projections for LoRA wrappers for the duration of a
``with`` block and puts the originals back on exit.
"""

from contextlib import contextmanager
from dataclasses import dataclass
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import UserError
from .base import Method, Options, decoder_layers, get_module, nest, option, set_module


@dataclass
class LoRAOptions(Options):
    rank: int = option(8, "LoRA rank (mlx-lm's default 8).")
    layers: int = option(16, "Adapt the last N decoder blocks (mlx-lm's default 16).")
    keys: Optional[List[str]] = option(None, "Projections to adapt, e.g. self_attn.q_proj,self_attn.v_proj "
                                             "(default: mlx-lm's choice).")
    scale: float = option(20.0, "LoRA scale (mlx-lm's default 20).")

    def check(self):
        if int(self.rank) < 1 or int(self.layers) < 1:
            raise UserError(f"lora: rank and layers must be >= 1 (got rank={self.rank}, layers={self.layers})")
        if self.keys is not None and not self.keys:
            self.keys = None


def lora_linear(linear, a: mx.array, b: mx.array, scale: float):
    """mlx-lm's LoRALinear around `linear` with the given factors (no fresh random init, no RNG use)."""
    from mlx_lm.tuner.lora import LoRALinear

    m = LoRALinear.__new__(LoRALinear)
    nn.Module.__init__(m)
    m.linear = linear
    m.dropout = nn.Dropout(p=0.0)
    m.scale = scale
    m.lora_a = a
    m.lora_b = b
    return m


def adapted(params) -> List[str]:
    """The module paths a LoRA tree (or flat dict) adapts."""
    return sorted({k.rsplit(".", 1)[0] for k, _ in tree_flatten(params)})


def linear_dims(module) -> Optional[tuple]:
    """(input, output) sizes of a linear projection, quantized or not; None for any other module."""
    if type(module).__name__ == "LoRALinear":  # a base with LoRA bound: the projection it wraps
        module = module.linear
    if isinstance(module, nn.QuantizedLinear):
        out, packed = module.weight.shape
        return packed * 32 // module.bits, out
    if isinstance(module, nn.Linear):
        out, inp = module.weight.shape
        return inp, out
    return None


class LoRA(Method):
    """Low-rank adapters on the last `layers` blocks' projections (mlx-lm's LoRA layers)."""

    name = "lora"
    label = "LoRA"
    Options = LoRAOptions
    shorthands = {"lora_rank": "rank", "lora_layers": "layers", "lora_keys": "keys", "lora_scale": "scale"}

    def init(self, model, tokenizer=None, seed: int = 0) -> dict:
        """A random, B zero (mlx-lm's init), so training starts at the base."""
        from mlx_lm.tuner.lora import LoRALinear
        from mlx_lm.tuner.utils import linear_to_lora_layers

        o = self.options
        before = {k: m for k, m in model.named_modules()}
        config = {"rank": o.rank, "scale": o.scale, "dropout": 0.0}
        if o.keys:
            config["keys"] = list(o.keys)
        mx.random.seed(seed)
        try:
            linear_to_lora_layers(model, min(o.layers, len(decoder_layers(model))), config)
            made = [(k, m) for k, m in model.named_modules() if type(m).__name__.startswith(("LoRA", "DoRA"))]
        finally:
            for k, m in model.named_modules():
                if type(m).__name__.startswith(("LoRA", "DoRA")) and k in before:
                    set_module(model, k, before[k])
        if not made:
            raise UserError(f"lora: no projection matched keys {o.keys} in the last {o.layers} layers")
        odd = [k for k, m in made if not isinstance(m, LoRALinear)]
        if odd:
            raise UserError(f"lora: only linear projections are supported; {odd[0]} is a "
                            f"{type(dict(made)[odd[0]]).__name__} (choose keys among the attention/MLP projections)")
        flat = {}
        for k, m in made:
            flat[f"{k}.lora_a"] = m.lora_a.astype(mx.float32)
            flat[f"{k}.lora_b"] = m.lora_b.astype(mx.float32)
        mx.eval(flat)
        return nest(flat)

    @contextmanager
    def bind(self, model, params):
        flat = dict(tree_flatten(params))
        originals = {}
        try:
            for p in adapted(params):
                orig = get_module(model, p)
                originals[p] = orig
                set_module(model, p, lora_linear(orig, flat[f"{p}.lora_a"], flat[f"{p}.lora_b"],
                                                 float(self.options.scale)))
            yield
        finally:
            for p, orig in originals.items():
                set_module(model, p, orig)

    def check_params(self, params, model, path) -> None:
        flat = dict(tree_flatten(params))
        for p in adapted(params):
            try:
                module = get_module(model, p)
            except (AttributeError, IndexError, KeyError, ValueError, TypeError):
                raise UserError(f"{path}: adapter for {p!r}, which this base model does not have")
            if f"{p}.lora_a" not in flat or f"{p}.lora_b" not in flat:
                raise UserError(f"{path}: adapter {p!r} lacks lora_a or lora_b")
            dims = linear_dims(module)
            if dims is None:
                raise UserError(f"{path}: adapter for {p!r}, a {type(module).__name__} in this base model, "
                                "not a linear projection")
            a, b = flat[f"{p}.lora_a"], flat[f"{p}.lora_b"]
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != dims[0] or b.shape[1] != dims[1] or a.shape[1] != b.shape[0]:
                raise UserError(f"{path}: adapter {p!r} has lora_a {list(a.shape)} and lora_b {list(b.shape)}, but the "
                                f"base's projection maps {dims[0]} -> {dims[1]} (lora_a [in, r], lora_b [r, out])")

    @classmethod
    def options_from_metadata(cls, meta: dict, path):
        if "method_options" in meta:
            return super().options_from_metadata(meta, path)
        import json  # files written before method_options kept lora_* keys

        try:
            return cls.Options(rank=int(meta.get("lora_rank", 8)), layers=int(meta.get("lora_layers", 16)),
                               scale=float(meta.get("lora_scale", 20.0)),
                               keys=json.loads(meta["lora_keys"]) if "lora_keys" in meta else None)
        except (TypeError, ValueError):
            raise UserError(f"{path}: malformed LoRA metadata (lora_scale/lora_rank/lora_layers/lora_keys)")
