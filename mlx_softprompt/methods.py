"""Training methods: what is trainable and how it is applied to the frozen base.

A method is a choice of trainable parameters (a dict tree of arrays) and of how
they enter the base model's forward pass; the training loop (train.py), its
objectives (losses.py) and its data are the same for all. Register a new method
by subclassing ``Method`` and adding it to ``METHODS``:

- ``init(model, args, tokenizer)`` -> params, the trainable arrays;
- ``bind(model, params)``: a context manager inside which the model's forward
  uses them (outside it the model is exactly the base: that is the teacher);
- ``prefix_len(params)``: how many placeholder positions the inputs need
  (n for a soft prompt, 0 otherwise);
- ``logits(model, params, inputs)``: the student's logits for ``inputs``
  ([B, L] ids, no placeholders) -> [B, L, V]; the default binds the params
  and prepends ``prefix_len`` placeholders;
- ``save`` / ``load``: the method file, through prompt_file (tensors named by
  the params' tree paths, metadata ``method=<name>``, fingerprint checked).
"""

from contextlib import contextmanager
from functools import lru_cache
from typing import Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from . import models, prompt_file
from .errors import UserError


class Method:
    name = "?"

    def init(self, model, args, tokenizer=None) -> dict:
        raise NotImplementedError

    @contextmanager
    def bind(self, model, params):
        raise NotImplementedError
        yield

    def prefix_len(self, params) -> int:
        return 0

    def logits(self, model, params, inputs: mx.array) -> mx.array:
        """Student logits at the positions of `inputs` ([B, L] -> [B, L, V])."""
        n = self.prefix_len(params)
        with self.bind(model, params):
            if n == 0:
                return model(inputs)
            return model(models.with_placeholders(inputs, n))[:, n:]

    def tensors(self, params) -> dict:
        return dict(tree_flatten(params))

    def params_from(self, tensors: dict) -> dict:
        return tree_unflatten([(k, v) for k, v in tensors.items() if k != prompt_file.SKETCH_KEY])

    def save(self, path, params, model, config, **meta):
        """Write the method file atomically, with the base's fingerprint and `method=<name>`."""
        return prompt_file.save(path, self.tensors(params), model, config, method=self.name, **meta)

    def load(self, path, model, config) -> dict:
        """Read a method file written for this method and this base (else UserError)."""
        pf = prompt_file.load(path)
        if pf.method != self.name:
            raise UserError(f"{path}: a {pf.method!r} file, not {self.name!r}")
        pf.check_base(model, config)
        return self.params_from(pf.tensors)


@lru_cache(maxsize=None)
def _shared_cache_class():
    from mlx_lm.models.cache import KVCache  # mlx-lm imports take seconds: only when training

    class SharedPrefixKVCache(KVCache):
        """A KV cache whose first n keys/values (P's, batch 1 broadcast to B) serve every row.

        The rows' keys/values are concatenated after P's (no preallocated
        buffer to slice-assign into), so gradients flow back to P through
        the broadcast.
        """

        def update_and_fetch(self, keys, values):
            self.keys = mx.concatenate([self.keys, keys], axis=2)
            self.values = mx.concatenate([self.values, values], axis=2)
            self.offset += keys.shape[2]
            return self.keys, self.values

    return SharedPrefixKVCache


def shared_prefix_cache(model, prompt: mx.array, batch_size: int):
    """P's keys/values, computed once (batch 1), broadcast to `batch_size` rows; None if unsupported.

    Only plain KV caches (full causal attention) are shared; models with
    sliding-window or recurrent layers return None (use the naive path).
    """
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    cache = make_prompt_cache(model)
    if not all(type(c) is KVCache for c in cache):
        return None
    n = prompt.shape[0]
    with models.injected(model, prompt):
        model(mx.full((1, n), models.PLACEHOLDER_ID, dtype=mx.int32), cache=cache)
    cls = _shared_cache_class()
    shared = []
    for c in cache:
        k, v = c.keys[..., :n, :], c.values[..., :n, :]
        s = cls()
        s.keys = mx.broadcast_to(k, (batch_size,) + k.shape[1:])
        s.values = mx.broadcast_to(v, (batch_size,) + v.shape[1:])
        s.offset = n
        shared.append(s)
    return shared


def supports_shared_prefix(model) -> bool:
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    return all(type(c) is KVCache for c in make_prompt_cache(model))


class SoftPrompt(Method):
    """P (n x d) prepended as embeddings before every input token (HF PEFT prompt tuning).

    ``shared_prefix``: run P once per batch into per-layer KV caches shared by
    all rows (P does not depend on the input), instead of prepending P to
    every row; both give the same logits and gradients.
    """

    name = "softprompt"

    def __init__(self, shared_prefix: bool = True):
        self.shared_prefix = shared_prefix

    def init(self, model, args, tokenizer=None) -> dict:
        """P from args.init: "text:..." (the text's embedding rows, repeated/truncated to n),
        "vocab" (random embedding rows) or "random" (normal * the embedding's std)."""
        n, how = int(args.num_tokens), str(args.init)
        if n < 1:
            raise UserError(f"--num-tokens must be >= 1 (got {n})")
        vocab = models.find_embedding(model).weight.shape[0]
        rng = np.random.default_rng(args.seed)
        if how.startswith("text:"):
            text = how[len("text:"):]
            if tokenizer is None:
                raise ValueError("text initialisation needs the tokenizer")
            ids = list(tokenizer.encode(text, add_special_tokens=False))
            if not ids:
                raise UserError(f"--init {how!r}: the text has no tokens")
            P = models.embed_rows(model, [ids[i % len(ids)] for i in range(n)])
        elif how == "vocab":
            P = models.embed_rows(model, rng.integers(0, vocab, n).tolist())
        elif how == "random":
            sample = models.embed_rows(model, np.unique(rng.integers(0, vocab, min(vocab, 4096))).tolist())
            std = float(mx.std(sample.astype(mx.float32)).item())
            P = mx.array(rng.standard_normal((n, sample.shape[-1])).astype(np.float32)) * std
        else:
            raise UserError(f"--init {how!r}: use text:\"...\", vocab or random")
        return {"soft_prompt": P.astype(mx.float32)}

    @contextmanager
    def bind(self, model, params):
        with models.injected(model, params["soft_prompt"]):
            yield

    def prefix_len(self, params) -> int:
        return int(params["soft_prompt"].shape[0])

    def logits(self, model, params, inputs: mx.array) -> mx.array:
        if self.shared_prefix:
            cache = shared_prefix_cache(model, params["soft_prompt"], inputs.shape[0])
            if cache is not None:
                return model(inputs, cache=cache)
        return super().logits(model, params, inputs)


METHODS = {"softprompt": SoftPrompt}


def get(name: str, **options) -> Method:
    """A method by name (options go to its constructor; unknown options are ignored)."""
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    import inspect

    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in options.items() if k in accepted})


def file_method(path) -> str:
    """The method recorded in a method file (for loading without knowing it in advance)."""
    return prompt_file.load(path).method
