"""Prefix tuning: trained key/value prefixes in every attention layer (PEFT's PREFIX_TUNING).

Each decoder layer l gets n trainable keys K_l and values V_l ([kv heads, n,
head dim]) that every query attends to before the conversation's own tokens,
exactly as if n extra tokens had been run through the model, but without the
constraint that they come from embeddings: where a soft prompt learns the
input of the first layer, prefix tuning learns what every layer sees. The
keys are stored as the cache holds them (rotary position already applied, as
PEFT's ``past_key_values``), and the conversation starts at position n.

PEFT keeps the same numbers as one embedding [n, layers x 2 x kv heads x head
dim] (no ``prefix_projection``); here they are one tensor per layer and kind,
named ``prefix.<layer>.keys`` / ``prefix.<layer>.values``.

Serving: the prefix *is* a key/value cache, so a request starts from a copy
of it: no prefill, like a soft prompt's cache. Models whose layers keep
sliding-window or recurrent caches cannot hold a fixed prefix: refused.
"""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import numpy as np

from .. import models
from ..errors import UserError
from .base import Method, Options, option
from .softprompt import check_init, shared_cache


@dataclass
class PrefixOptions(Options):
    num_tokens: int = option(16, "Prefix length n (key/value pairs per layer).")
    init: str = option("vocab", 'Init: text:"..." or vocab (the keys/values of those tokens), or random.')
    shared_record_prompt: bool = option(True, "Training: run each record's prompt once for its rows "
                                               "(record_prompt.py; same loss as naive).")

    def check(self):
        if int(self.num_tokens) < 1:
            raise UserError(f"num_tokens must be >= 1 (got {self.num_tokens})")
        check_init(self.init)


def _require_kv(model) -> None:
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    kinds = {type(c).__name__ for c in make_prompt_cache(model)}
    if kinds != {KVCache.__name__}:
        raise UserError(f"prefix tuning needs plain key/value caches in every layer; "
                        f"{type(model).__module__.split('.')[-1]} uses {', '.join(sorted(kinds))}")


def _dtype(model):
    return models.embed_rows(model, [0]).dtype


def token_prefix(model, ids) -> dict:
    """The keys/values the base itself computes for `ids` at positions 0..n-1, per layer."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    model(mx.array([list(ids)], dtype=mx.int32), cache=cache)
    n = len(ids)
    return {str(l): {"keys": c.keys[0, :, :n, :].astype(mx.float32),
                     "values": c.values[0, :, :n, :].astype(mx.float32)} for l, c in enumerate(cache)}


def check_layout(layers: dict, path, want: Optional[int] = None) -> None:
    """A prefix's layout, without a base: layers "0".."L-1" (L = `want` when given), each with
    keys and values [kv heads, n, head dim] of one n."""
    n_layers = len(layers) if want is None else want
    ok = bool(layers) and sorted(layers, key=lambda s: int(s) if s.isdigit() else -1) == [str(i) for i in range(n_layers)]
    ok = ok and all(isinstance(layers[k], dict) and set(layers[k]) == {"keys", "values"} for k in layers)
    if not ok:
        raise UserError(f"{path}: prefix tensors for {len(layers)} layers, the base has {want}" if want is not None
                        else f"{path}: malformed prefix tensors (expected prefix.<layer>.keys/values for layers 0..L-1)")
    n = {layers[k][kind].shape[1] for k in layers for kind in ("keys", "values")}
    if len(n) != 1 or any(layers[k][kind].ndim != 3 for k in layers for kind in ("keys", "values")):
        raise UserError(f"{path}: malformed prefix tensors (expected [kv heads, n, head dim] per layer)")


class PrefixTuning(Method):
    """n key/value pairs per layer, trained; served as the prefix cache itself."""

    name = "prefix"
    label = "prefix tuning"
    Options = PrefixOptions
    shorthands = {"num_tokens": "num_tokens", "init": "init", "shared_record_prompt": "shared_record_prompt"}

    def init(self, model, tokenizer=None, seed: int = 0) -> dict:
        """Start from real activations (Li & Liang 2021): the keys/values of n tokens of
        text or of random vocabulary rows; "random": normal noise at those activations' scale."""
        _require_kv(model)
        n, how = int(self.options.num_tokens), self.options.init
        vocab = models.find_embedding(model).weight.shape[0]
        rng = np.random.default_rng(seed)
        if how.startswith("text:"):
            if tokenizer is None:
                raise ValueError("text initialisation needs the tokenizer")
            ids = list(tokenizer.encode(how[len("text:"):], add_special_tokens=False))
            if not ids:
                raise UserError(f"init {how!r}: the text has no tokens")
            ids = [ids[i % len(ids)] for i in range(n)]
        else:
            ids = rng.integers(0, vocab, n).tolist()
        prefix = token_prefix(model, ids)
        if how == "random":
            for layer in prefix.values():
                for k, v in layer.items():
                    std = float(mx.std(v).item()) or 1.0
                    layer[k] = mx.array(rng.standard_normal(v.shape).astype(np.float32)) * std
        mx.eval(prefix)
        return {"prefix": prefix}

    def _pairs(self, model, params):
        dt = _dtype(model)
        layers = params["prefix"]
        return [(layers[str(l)]["keys"][None].astype(dt), layers[str(l)]["values"][None].astype(dt))
                for l in range(len(layers))]

    def logits(self, model, params, inputs: mx.array) -> mx.array:
        return model(inputs, cache=shared_cache(self._pairs(model, params), inputs.shape[0]))

    @property
    def shares_record_prompt(self) -> bool:
        return bool(self.options.shared_record_prompt)

    def training_prefix(self, model, params):
        return self._pairs(model, params)

    def prefix_length(self, params) -> int:
        return int(params["prefix"]["0"]["keys"].shape[1])

    def prefix_cache(self, model, params):
        from mlx_lm.models.cache import KVCache

        _require_kv(model)
        cache = []
        for k, v in self._pairs(model, params):
            c = KVCache()
            c.keys, c.values, c.offset = k, v, k.shape[2]
            cache.append(c)
        mx.eval([c.state for c in cache])
        return cache

    def check_params(self, params, model, path) -> None:
        from mlx_lm.models.cache import make_prompt_cache

        _require_kv(model)
        layers = params.get("prefix", {})
        check_layout(layers, path, want=len(make_prompt_cache(model)))
        # shapes per layer must match what the base computes
        ref = token_prefix(model, [0])
        for k in layers:
            for kind in ("keys", "values"):
                a, b = layers[k][kind].shape, ref[k][kind].shape
                if (a[0], a[2]) != (b[0], b[2]):
                    raise UserError(f"{path}: layer {k} {kind} {list(a)} do not fit the base's "
                                    f"{b[0]} heads x {b[2]} dims")
