"""Steering vectors: alpha * v added to one decoder layer's output at every position.

- ``steer-opt``: one learned vector v (d), trained by the same loop and
  objectives as every method; it starts at zero (= the base).
- ``steer-dom``: the difference-of-means refusal direction of Arditi et al.
  2024 ("Refusal in Language Models Is Mediated by a Single Direction"): the
  mean residual activation at a layer's output at the last prompt position
  over harmful training prompts minus the same over harmless ones. Fitted
  (``fit_steer_dom``), not trained; bench chooses the layer and alpha on the
  validation split, never on the test split.

Applying a vector never changes the base: the layer's class is swapped for a
steered subclass for the duration of a ``with`` block and restored on exit.
"""

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Sequence

import mlx.core as mx

from .. import models
from ..errors import UserError
from .base import Method, Options, decoder_layers, option

STEER_ALPHAS = (0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass
class SteerOptions(Options):
    layer: Optional[int] = option(None, "Decoder layer whose output is steered (default: the middle one).")
    alpha: float = option(1.0, "Scale of the vector.")


class _Slot:
    """Plain holder (not an mlx parameter) for the vector being added."""

    def __init__(self):
        self.vector: Optional[mx.array] = None
        self.capture: Optional[list] = None


_STEER_CLASSES = {}


def _steer_class(cls):
    if cls not in _STEER_CLASSES:

        def __call__(self, *args, **kwargs):
            out = cls.__call__(self, *args, **kwargs)
            slot = self._steer
            h = out[0] if isinstance(out, tuple) else out
            if slot.capture is not None:
                slot.capture.append(h)
            if slot.vector is not None:
                h = h + slot.vector.astype(h.dtype)
                out = (h,) + tuple(out[1:]) if isinstance(out, tuple) else h
            return out

        _STEER_CLASSES[cls] = type(f"Steered{cls.__name__}", (cls,), {"__call__": __call__})
    return _STEER_CLASSES[cls]


@contextmanager
def hooked(model, layer: int, vector: Optional[mx.array] = None, capture: Optional[list] = None):
    """While active, decoder layer `layer` adds `vector` to its output (every position) and/or
    appends its output to `capture`. On exit the layer is exactly its own class again."""
    layers = decoder_layers(model)
    if not -len(layers) <= layer < len(layers):
        raise UserError(f"steering layer {layer} out of range: the model has {len(layers)} layers")
    blk = layers[layer]
    if hasattr(blk, "_steer"):
        raise ValueError(f"layer {layer} is already hooked")
    orig = type(blk)
    slot = _Slot()
    slot.vector, slot.capture = vector, capture
    blk._steer = slot
    blk.__class__ = _steer_class(orig)
    try:
        yield
    finally:
        blk.__class__ = orig
        del blk.__dict__["_steer"]


class Steer(Method):
    """A vector v (d) added, times alpha, to one decoder layer's output at every position."""

    name = "steer"
    Options = SteerOptions

    def layer(self, model) -> int:
        n = len(decoder_layers(model))
        layer = self.options.layer
        layer = n // 2 if layer is None else int(layer)  # the middle: where refusal directions live
        if not -n <= layer < n:
            raise UserError(f"steer layer {layer} out of range: the model has {n} layers")
        return layer % n

    @contextmanager
    def bind(self, model, params):
        with hooked(model, self.layer(model), float(self.options.alpha) * params["steer"]):
            yield

    def check_params(self, params, model, path) -> None:
        v = params.get("steer")
        d = models.hidden_size(model)
        if v is None or not hasattr(v, "ndim") or v.ndim != 1 or v.shape[0] != d:
            raise UserError(f"{path}: missing or malformed tensor 'steer' (expected [{d}])")
        self.layer(model)  # range check against this base

    @classmethod
    def options_from_metadata(cls, meta: dict, path):
        if "method_options" in meta:
            return super().options_from_metadata(meta, path)
        try:  # files written before method_options kept layer/alpha keys
            return cls.Options(layer=int(meta["layer"]), alpha=float(meta.get("alpha", "1.0")))
        except (KeyError, ValueError):
            raise UserError(f"{path}: steering file without a valid 'layer'/'alpha' in its metadata")


class SteerOpt(Steer):
    """One learned steering vector, trained by the same loop (tv / kl / ce); starts at zero (= the base)."""

    name = "steer-opt"
    label = "steering vector (optimised)"
    shorthands = {"steer_layer": "layer"}

    def init(self, model, tokenizer=None, seed: int = 0) -> dict:
        self.options.layer = self.layer(model)  # recorded in the file
        self.options.alpha = 1.0
        return {"steer": mx.zeros((models.hidden_size(model),), dtype=mx.float32)}


class SteerDom(Steer):
    """The difference-of-means refusal direction (Arditi et al. 2024): fitted, not trained."""

    name = "steer-dom"
    label = "steering vector (diff-of-means)"
    trainable = False

    def init(self, model, tokenizer=None, seed: int = 0) -> dict:
        raise UserError("steer-dom is fitted, not trained: use `mlx-softprompt bench` "
                        "(or methods.steering.fit_steer_dom and save_steer_dom)")


# ---------------------------------------------------------------- fitting steer-dom


def last_position_activations(model, prompts: Sequence[Sequence[int]], batch_size: int = 16) -> mx.array:
    """[L, N, d]: every decoder layer's output at each prompt's last position (float32).

    Rows are right-padded; causal attention keeps padding out of the real positions.
    """
    layers = decoder_layers(model)
    out = []
    for s in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[s:s + batch_size]]
        hi = max(len(p) for p in chunk)
        ids = mx.array([p + [0] * (hi - len(p)) for p in chunk])
        last = mx.array([len(p) - 1 for p in chunk])
        captures = [[] for _ in layers]
        hooks = [hooked(model, i, capture=captures[i]) for i in range(len(layers))]
        for h in hooks:
            h.__enter__()
        try:
            model(ids)
        finally:
            for h in reversed(hooks):
                h.__exit__(None, None, None)
        acts = mx.stack([mx.take_along_axis(c[0], last[:, None, None], axis=1)[:, 0] for c in captures])
        mx.eval(acts)
        out.append(acts.astype(mx.float32))
    return mx.concatenate(out, axis=1)


def fit_steer_dom(model, harmful: Sequence[Sequence[int]], harmless: Sequence[Sequence[int]],
                  batch_size: int = 16) -> mx.array:
    """[L, d] difference-of-means directions, one per layer: mean(harmful) - mean(harmless)."""
    if not harmful or not harmless:
        raise UserError(f"steer-dom needs harmful and harmless training prompts (got {len(harmful)} and {len(harmless)})")
    a = last_position_activations(model, harmful, batch_size).mean(axis=1)
    b = last_position_activations(model, harmless, batch_size).mean(axis=1)
    return a - b


def save_steer_dom(path, vector: mx.array, layer: int, alpha: float, model, config, **meta):
    m = SteerDom(SteerOptions(layer=int(layer), alpha=float(alpha)))
    return m.save(path, {"steer": mx.array(vector).astype(mx.float32)}, model, config, **meta)
