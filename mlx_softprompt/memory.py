"""Training memory savers: gradient checkpointing of the decoder blocks and a headless forward.

Backpropagation keeps every block's activations, so a step's memory grows
with the layers x the positions x the hidden (and MLP) width, and the
objective's [B, L, vocabulary] logits come on top (four such arrays for TV
and KL). Two savers, both exact (the same loss and gradients, up to fp32
rounding):

- ``grad_checkpoint(model)``: each decoder block keeps only its input and
  recomputes its activations in the backward pass (``--grad-checkpoint``, as
  mlx-lm's: about one extra forward per step). mlx-lm patches the block
  class for the rest of the process and passes only the block's trainable
  parameters into ``mx.checkpoint``; arrays that reach a block any other way
  would get no gradient. Here the class is patched only while the context
  is active, and the keys/values of a shared prefix (P's, in a
  ``methods.softprompt.shared_cache``; prefix tuning's too; a record's prompt's, in
  ``record_prompt.RecordKVCache``, a subclass rebuilt with its mask and offsets) are passed in
  explicitly, so the gradient through them is kept.
- ``headless(model)``: the forward returns the final hidden states and the
  LM head is given back as a function, so the loss can apply the head chunk
  by chunk over the sequence (``losses.chunked``, ``--loss-chunk``) and the
  whole [B, L, vocabulary] logits never exist. Models whose output is not
  ``head(hidden)`` (final logit soft-capping or scaling) are detected with
  a probe and keep the whole-logits path.
"""

import copy
from contextlib import contextmanager
from typing import Callable, Optional

import mlx.core as mx
import numpy as np

from . import models


def _shared_cache_class():
    from .methods.softprompt import _shared_cache_class as cls

    return cls()


def _checkpointed(fn):
    from .methods.base import get_module as _get, set_module as _set

    shared_cls = _shared_cache_class()

    def call(self, *args, **kwargs):
        caches = [a for a in list(args) + list(kwargs.values()) if a is not None and hasattr(a, "update_and_fetch")]
        if any(not isinstance(c, shared_cls) for c in caches):
            # a cache being filled (P's own forward, generation): its keys/values leave the block by a
            # side effect, which mx.checkpoint would cut from the gradient; P's forward is short anyway
            return fn(self, *args, **kwargs)
        # P's keys/values ride in as explicit inputs (a captured array would get no gradient)
        slots = [("a", i) for i, a in enumerate(args) if isinstance(a, shared_cls)]
        slots += [("k", k) for k, a in kwargs.items() if isinstance(a, shared_cls)]
        caches = [args[i] if where == "a" else kwargs[i] for where, i in slots]
        kv = [(c.keys, c.values) for c in caches]
        args = [None if ("a", i) in slots else a for i, a in enumerate(args)]
        kwargs = {k: None if ("k", k) in slots else a for k, a in kwargs.items()}
        # The backward pass recomputes the block after the loss has returned, when a method's
        # `bind` has already put the base's own modules back (LoRA): recompute with these ones.
        structure = sorted(((name, m) for name, m in self.named_modules() if name), key=lambda x: x[0].count("."))

        def inner(params, kv, *args, **kwargs):
            swapped = []
            for name, m in structure:
                now = _get(self, name)
                if now is not m:
                    _set(self, name, m)
                    swapped.append((name, now))
            try:
                self.update(params)
                args, kwargs = list(args), dict(kwargs)
                for (where, i), (k, v), proto in zip(slots, kv, caches):
                    c = copy.copy(proto)  # its class and state (offsets, a record cache's mask), these keys
                    c.keys, c.values = k, v
                    if where == "a":
                        args[i] = c
                    else:
                        kwargs[i] = c
                return fn(self, *args, **kwargs)
            finally:
                for name, now in reversed(swapped):
                    _set(self, name, now)

        return mx.checkpoint(inner)(self.trainable_parameters(), kv, *args, **kwargs)

    return call


@contextmanager
def grad_checkpoint(model, enabled: bool = True):
    """While active, every decoder block of `model` recomputes its activations in the backward pass."""
    if not enabled:
        yield
        return
    from .methods.base import decoder_layers

    classes = list(dict.fromkeys(type(layer) for layer in decoder_layers(model)))
    saved = {cls: cls.__dict__.get("__call__") for cls in classes}
    try:
        for cls in classes:
            cls.__call__ = _checkpointed(cls.__call__)
        yield
    finally:
        for cls, own in saved.items():
            if own is None:
                del cls.__call__
            else:
                cls.__call__ = own


def _identity(x):
    return x


@contextmanager
def _swapped_head(model):
    """Inside: lm_head and the tied embedding's as_linear are the identity; yields the real head."""
    lm_head = getattr(model, "lm_head", None)
    emb = models.find_embedding(model)
    head = lm_head if lm_head is not None else emb.as_linear
    if lm_head is not None:
        model.lm_head = _identity
    emb.as_linear = _identity  # an instance attribute over the class's method
    try:
        yield head
    finally:
        if lm_head is not None:
            model.lm_head = lm_head
        emb.__dict__.pop("as_linear", None)


def head_of(model) -> Optional[Callable]:
    """The LM head as a function if `model(ids) == head(hidden)` on a probe, else None."""
    ids = mx.array(np.arange(1, 5, dtype=np.int32)[None] % models.find_embedding(model).weight.shape[0])
    try:
        with models.disarmed(models.find_embedding(model)):
            full = model(ids)
            with _swapped_head(model) as head:
                hidden = model(ids)
            if hidden.shape[-1] != full.shape[-1] and bool(mx.allclose(head(hidden), full, rtol=1e-4,
                                                                          atol=1e-4).item()):
                return head
    except (AttributeError, TypeError, ValueError):
        pass
    return None


@contextmanager
def headless(model):
    """While active, the model returns its final hidden states; yields the head (hidden -> logits).

    Yields None (and changes nothing) when the model's logits are not head(hidden) (see head_of).
    """
    if head_of(model) is None:
        yield None
        return
    with _swapped_head(model) as head:
        yield head
