"""Soft prompt (prompt tuning): P (n x d) prepended as embeddings before every input token.

Placement follows HF PEFT's prompt tuning (virtual tokens before BOS), so
prompt files are interchangeable with PEFT adapters (peft_io.py). P does not
depend on the conversation, so its key/value cache is computed once and every
request starts from a copy of it: P costs no prefill at serving time.
"""

from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx
import numpy as np

from .. import models
from ..errors import UserError
from .base import Method, Options, option


@dataclass
class SoftPromptOptions(Options):
    num_tokens: int = option(16, "Soft-prompt length n (virtual tokens).")
    init: str = option("vocab", 'P init: text:"..." (its embedding rows), vocab (random rows) or random.')
    shared_prefix: bool = option(True, "Training: run P once per batch into shared KV caches (same loss as naive).")
    shared_record_prompt: bool = option(True, "Training: run [P; x] once for the rows of a record "
                                               "(record_prompt.py; same loss as naive).")

    def check(self):
        if int(self.num_tokens) < 1:
            raise UserError(f"num_tokens must be >= 1 (got {self.num_tokens})")
        check_init(self.init)


def check_init(how: str) -> None:
    if not (how.startswith("text:") or how in ("vocab", "random")):
        raise UserError(f"init {how!r}: use text:\"...\", vocab or random")


def initial_rows(model, n: int, how: str, seed: int, tokenizer=None) -> mx.array:
    """n embedding rows by `how`: "text:..." (the text's tokens, repeated/truncated to n),
    "vocab" (random vocabulary rows) or "random" (normal * the embedding's std)."""
    vocab = models.find_embedding(model).weight.shape[0]
    rng = np.random.default_rng(seed)
    if how.startswith("text:"):
        text = how[len("text:"):]
        if tokenizer is None:
            raise ValueError("text initialisation needs the tokenizer")
        ids = list(tokenizer.encode(text, add_special_tokens=False))
        if not ids:
            raise UserError(f"init {how!r}: the text has no tokens")
        return models.embed_rows(model, [ids[i % len(ids)] for i in range(n)])
    if how == "vocab":
        return models.embed_rows(model, rng.integers(0, vocab, n).tolist())
    if how == "random":
        sample = models.embed_rows(model, np.unique(rng.integers(0, vocab, min(vocab, 4096))).tolist())
        std = float(mx.std(sample.astype(mx.float32)).item())
        return mx.array(rng.standard_normal((n, sample.shape[-1])).astype(np.float32)) * std
    check_init(how)


@lru_cache(maxsize=None)
def _shared_cache_class():
    from mlx_lm.models.cache import KVCache  # mlx-lm imports take seconds: only when needed

    class SharedPrefixKVCache(KVCache):
        """A KV cache whose first n keys/values (batch 1 broadcast to B) serve every row.

        The rows' keys/values are concatenated after the prefix's (no preallocated
        buffer to slice-assign into), so gradients flow back to the prefix through
        the broadcast.
        """

        def update_and_fetch(self, keys, values):
            self.keys = mx.concatenate([self.keys, keys], axis=2)
            self.values = mx.concatenate([self.values, values], axis=2)
            self.offset += keys.shape[2]
            return self.keys, self.values

    return SharedPrefixKVCache


def shared_cache(prefix, batch_size: int) -> list:
    """Per-layer (keys, values) of a prefix ([1, H, n, hd] each) as caches shared by `batch_size` rows."""
    cls = _shared_cache_class()
    shared = []
    for k, v in prefix:
        s = cls()
        s.keys = mx.broadcast_to(k, (batch_size,) + k.shape[1:])
        s.values = mx.broadcast_to(v, (batch_size,) + v.shape[1:])
        s.offset = k.shape[2]
        shared.append(s)
    return shared


def supports_shared_prefix(model) -> bool:
    """Only plain KV caches (full causal attention) can be shared; sliding-window/recurrent layers cannot."""
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    return all(type(c) is KVCache for c in make_prompt_cache(model))


def prefix_pairs(model, prompt: mx.array) -> list:
    """P's per-layer (keys, values) [1, H, n, hd], computed once (differentiable in P)."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    n = prompt.shape[0]
    with models.injected(model, prompt):
        model(mx.full((1, n), models.PLACEHOLDER_ID, dtype=mx.int32), cache=cache)
    return [(c.keys[..., :n, :], c.values[..., :n, :]) for c in cache]


def shared_prefix_cache(model, prompt: mx.array, batch_size: int):
    """P's keys/values, computed once (batch 1), broadcast to `batch_size` rows; None if unsupported."""
    if not supports_shared_prefix(model):
        return None
    return shared_cache(prefix_pairs(model, prompt), batch_size)


class SoftPrompt(Method):
    """P (n x d) prepended as embeddings before every input token (HF PEFT prompt tuning).

    ``shared_prefix``: run P once per batch into per-layer KV caches shared by
    all rows (P does not depend on the input), instead of prepending P to
    every row; both give the same logits and gradients.
    """

    name = "softprompt"
    label = "soft prompt"
    Options = SoftPromptOptions
    shorthands = {"num_tokens": "num_tokens", "init": "init", "shared_prefix": "shared_prefix",
                  "shared_record_prompt": "shared_record_prompt"}

    def init(self, model, tokenizer=None, seed: int = 0) -> dict:
        o = self.options
        return {"soft_prompt": initial_rows(model, int(o.num_tokens), o.init, seed, tokenizer).astype(mx.float32)}

    @contextmanager
    def bind(self, model, params):
        with models.injected(model, params["soft_prompt"]):
            yield

    def logits(self, model, params, inputs: mx.array) -> mx.array:
        P = params["soft_prompt"]
        if self.options.shared_prefix:
            cache = shared_prefix_cache(model, P, inputs.shape[0])
            if cache is not None:
                return model(inputs, cache=cache)
        n = int(P.shape[0])
        with self.bind(model, params):
            return model(models.with_placeholders(inputs, n))[:, n:]

    @property
    def shares_record_prompt(self) -> bool:
        return bool(self.options.shared_record_prompt)

    def training_prefix(self, model, params):
        return prefix_pairs(model, params["soft_prompt"])

    def prefix_length(self, params) -> int:
        return int(params["soft_prompt"].shape[0])

    def prefix_cache(self, model, params):
        return models.prefix_cache(model, params["soft_prompt"])

    def params_from(self, tensors: dict, path=None) -> dict:
        return {"soft_prompt": tensors["soft_prompt"]}

    @classmethod
    def options_from_metadata(cls, meta: dict, path):
        if "method_options" in meta:
            return super().options_from_metadata(meta, path)
        # files written before method_options (and PEFT imports): n is the tensor's, init unknown
        return cls.Options(num_tokens=int(meta.get("num_virtual_tokens", 16) or 16))
