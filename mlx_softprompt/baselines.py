"""The baselines of the paper's table, as methods of methods.METHODS (DESIGN.md section 3).

- ``lora``: mlx-lm's LoRA layers (``LoRALinear``) on the projections that
  ``mlx_lm.tuner.utils.linear_to_lora_layers`` picks for a rank, a number of
  (last) layers and optional target keys; trained by the same loop and objectives.
- ``steer-opt``: one learned vector v (d), added to the output of one decoder
  layer at every position; trained by the same loop (tv / kl).
- ``steer-dom``: the difference-of-means refusal direction of Arditi et al. 2024
  ("Refusal in Language Models Is Mediated by a Single Direction"): the mean
  residual activation at a layer's output at the last prompt position over
  harmful training prompts minus the same over harmless ones, added as alpha * v
  at every position; fitted, not trained, with the layer and alpha chosen on the
  validation split (:func:`select_steer_dom`), never on the test split.

The textual system prompt and the dual system need no method file: evaluate.py
builds them directly (``system_prompt_system``, ``dual_system``).

Applying a method never changes the base: ``bind`` swaps modules (LoRA) or a
layer's class (steering) for the duration of a ``with`` block and puts the
originals back on exit, so outside it the model is bitwise the base again.

Method options (rank, layers, ...) come from the training arguments
(``lora_rank``, ``lora_layers``, ``lora_keys``, ``lora_scale``, ``steer_layer``,
read with defaults when absent) and are written into the method file's metadata,
from which ``load`` restores them.
"""

import json
from contextlib import contextmanager
from typing import Dict, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from . import models, prompt_file
from .errors import UserError
from .methods import METHODS, Method

LORA_DEFAULTS = {"rank": 8, "layers": 16, "keys": None, "scale": 20.0}  # mlx-lm's lora defaults
STEER_ALPHAS = (0.5, 1.0, 2.0, 4.0, 8.0)


# ---------------------------------------------------------------- module paths


def decoder_layers(model) -> list:
    """The list of decoder blocks, found as mlx-lm finds it (model.layers, model.model.layers, ...)."""
    for path in ("layers", "model.layers", "language_model.model.layers", "language_model.layers"):
        node = model
        try:
            for k in path.split("."):
                node = getattr(node, k)
        except AttributeError:
            continue
        if isinstance(node, list) and node:
            return node
    raise UserError(f"{type(model).__module__}: cannot find the decoder layers (model.layers)")


def _get(root, path: str):
    node = root
    for k in path.split("."):
        node = node[int(k)] if isinstance(node, list) else getattr(node, k)
    return node


def _set(root, path: str, module) -> None:
    *parents, last = path.split(".")
    node = _get(root, ".".join(parents)) if parents else root
    if isinstance(node, list):
        node[int(last)] = module
    else:
        setattr(node, last, module)


def _nest(flat: Dict[str, mx.array]) -> dict:
    """{"a.b.0.c": x} -> {"a": {"b": {"0": {"c": x}}}}: dicts only, so train.py's path assignment works."""
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        *parents, last = path.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = v
    return tree


# ---------------------------------------------------------------- LoRA


def _lora_linear(linear, a: mx.array, b: mx.array, scale: float):
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


class LoRA(Method):
    """Low-rank adapters on the last `layers` blocks' projections (mlx-lm's LoRA layers)."""

    name = "lora"

    def __init__(self, rank: Optional[int] = None, layers: Optional[int] = None, keys=None,
                 scale: Optional[float] = None):
        self.rank = int(rank or LORA_DEFAULTS["rank"])
        self.layers = int(layers or LORA_DEFAULTS["layers"])
        self.keys = list(keys) if keys else None
        self.scale = float(scale if scale is not None else LORA_DEFAULTS["scale"])

    def _options(self, args) -> None:
        if args is None:
            return
        self.rank = int(getattr(args, "lora_rank", None) or self.rank)
        self.layers = int(getattr(args, "lora_layers", None) or self.layers)
        keys = getattr(args, "lora_keys", None)
        if keys:
            self.keys = [k.strip() for k in keys.split(",")] if isinstance(keys, str) else list(keys)
        scale = getattr(args, "lora_scale", None)
        self.scale = float(scale) if scale is not None else self.scale
        if self.rank < 1 or self.layers < 1:
            raise UserError(f"lora: rank and layers must be >= 1 (got rank={self.rank}, layers={self.layers})")

    def init(self, model, args=None, tokenizer=None) -> dict:
        """Which projections get adapters is mlx-lm's choice (linear_to_lora_layers); A random, B zero."""
        from mlx_lm.tuner.lora import LoRALinear
        from mlx_lm.tuner.utils import linear_to_lora_layers

        self._options(args)
        seed = getattr(args, "seed", 0) if args is not None else 0
        before = {k: m for k, m in model.named_modules()}
        config = {"rank": self.rank, "scale": self.scale, "dropout": 0.0}
        if self.keys:
            config["keys"] = self.keys
        mx.random.seed(seed)
        try:
            linear_to_lora_layers(model, min(self.layers, len(decoder_layers(model))), config)
            made = [(k, m) for k, m in model.named_modules() if type(m).__name__.startswith(("LoRA", "DoRA"))]
        finally:
            for k, m in model.named_modules():
                if type(m).__name__.startswith(("LoRA", "DoRA")) and k in before:
                    _set(model, k, before[k])
        if not made:
            raise UserError(f"lora: no projection matched keys {self.keys} in the last {self.layers} layers")
        odd = [k for k, m in made if not isinstance(m, LoRALinear)]
        if odd:
            raise UserError(f"lora: only linear projections are supported; {odd[0]} is a {type(dict(made)[odd[0]]).__name__} "
                            "(choose --lora-keys among the attention/MLP projections)")
        flat = {}
        for k, m in made:
            flat[f"{k}.lora_a"] = m.lora_a.astype(mx.float32)
            flat[f"{k}.lora_b"] = m.lora_b.astype(mx.float32)
        mx.eval(flat)
        return _nest(flat)

    @contextmanager
    def bind(self, model, params):
        paths = sorted({k.rsplit(".", 1)[0] for k, _ in tree_flatten(params)})
        flat = dict(tree_flatten(params))
        originals = {}
        try:
            for p in paths:
                orig = _get(model, p)
                originals[p] = orig
                _set(model, p, _lora_linear(orig, flat[f"{p}.lora_a"], flat[f"{p}.lora_b"], self.scale))
            yield
        finally:
            for p, orig in originals.items():
                _set(model, p, orig)

    def params_from(self, tensors: dict) -> dict:
        return _nest({k: v for k, v in tensors.items() if k != prompt_file.SKETCH_KEY})

    def save(self, path, params, model, config, **meta):
        meta = {**meta, "lora_rank": str(self.rank), "lora_layers": str(self.layers),
                "lora_scale": repr(self.scale), "lora_keys": json.dumps(self.keys)}
        return super().save(path, params, model, config, **meta)

    def load(self, path, model, config) -> dict:
        f = prompt_file.load(path)
        params = super().load(path, model, config)
        m = f.metadata
        try:
            self.scale = float(m.get("lora_scale", self.scale))
            self.rank = int(m.get("lora_rank", self.rank))
            self.layers = int(m.get("lora_layers", self.layers))
            self.keys = json.loads(m["lora_keys"]) if "lora_keys" in m else self.keys
        except (TypeError, ValueError, json.JSONDecodeError):
            raise UserError(f"{path}: malformed LoRA metadata (lora_scale/lora_rank/lora_layers/lora_keys)")
        for p in sorted({k.rsplit(".", 1)[0] for k, _ in tree_flatten(params)}):
            try:
                _get(model, p)
            except (AttributeError, IndexError, KeyError, ValueError):
                raise UserError(f"{path}: adapter for {p!r}, which this base model does not have")
        return params


# ---------------------------------------------------------------- steering


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

    def __init__(self, layer: Optional[int] = None, alpha: float = 1.0):
        self.layer = layer
        self.alpha = float(alpha)

    def _layer(self, model, args=None) -> int:
        n = len(decoder_layers(model))
        layer = getattr(args, "steer_layer", None) if args is not None else None
        layer = self.layer if layer is None else int(layer)
        layer = n // 2 if layer is None else layer  # the middle: where refusal directions live
        if not -n <= layer < n:
            raise UserError(f"steer layer {layer} out of range: the model has {n} layers")
        return layer % n

    @contextmanager
    def bind(self, model, params):
        if self.layer is None:
            self.layer = self._layer(model)
        with hooked(model, self.layer, self.alpha * params["steer"]):
            yield

    def save(self, path, params, model, config, **meta):
        meta = {**meta, "layer": str(self.layer), "alpha": repr(self.alpha)}
        return super().save(path, params, model, config, **meta)

    def load(self, path, model, config) -> dict:
        f = prompt_file.load(path)
        params = super().load(path, model, config)
        v = params.get("steer")
        if v is None or v.ndim != 1 or v.shape[0] != models.hidden_size(model):
            raise UserError(f"{path}: missing or malformed tensor 'steer' (expected [{models.hidden_size(model)}])")
        try:
            self.layer = int(f.metadata["layer"])
            self.alpha = float(f.metadata.get("alpha", "1.0"))
        except (KeyError, ValueError):
            raise UserError(f"{path}: steering file without a valid 'layer'/'alpha' in its metadata")
        self._layer(model)  # range check against this base
        return params


class SteerOpt(Steer):
    """One learned steering vector, trained by the same loop (tv / kl / ce); starts at zero (= the base)."""

    name = "steer-opt"

    def init(self, model, args=None, tokenizer=None) -> dict:
        self.layer = self._layer(model, args)
        self.alpha = 1.0
        return {"steer": mx.zeros((models.hidden_size(model),), dtype=mx.float32)}


class SteerDom(Steer):
    """The difference-of-means refusal direction (Arditi et al. 2024): fitted, not trained."""

    name = "steer-dom"

    def init(self, model, args=None, tokenizer=None) -> dict:
        raise UserError("steer-dom is fitted, not trained: use `mlx-softprompt bench` "
                        "(or baselines.fit_steer_dom + select_steer_dom)")


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


def steer_system(base, vector: mx.array, layer: int, alpha: float, name: str = "steer-dom"):
    """An evaluate.SystemUnderTest: the base with alpha * vector added at `layer`."""
    from .evaluate import SystemUnderTest

    v = mx.array(vector)
    return SystemUnderTest(name, "method", base.model, base.tokenizer, base.config,
                           bind=lambda: hooked(base.model, layer, alpha * v),
                           added_params=int(v.size), added_bytes=int(v.nbytes),
                           info={"method": name, "layer": str(layer), "alpha": repr(alpha)})


def select_steer_dom(base, directions: mx.array, val_examples, val_ref, layers: Optional[Sequence[int]] = None,
                     alphas: Sequence[float] = STEER_ALPHAS, max_tokens: int = 16, batch_size: int = 16,
                     refusal: Optional[str] = None) -> dict:
    """Choose (layer, alpha) on the validation split: highest agreement with the dual system,
    then lowest over-refusal, then the smallest alpha. Returns the choice and the whole grid."""
    from . import evaluate as ev

    refusal = refusal or ev.DEFAULT_REFUSAL
    if val_ref.dual is None:
        raise UserError("steer-dom selection needs the dual system's validation answers (a guard)")
    layers = list(range(directions.shape[0])) if layers is None else list(layers)
    dual = ev.judge([ev.Answer(**{k: getattr(a, k) for k in ("prompt", "label", "text", "tokens", "finished")})
                     for a in val_ref.dual], refusal)
    grid = []
    for layer in layers:
        for alpha in alphas:
            sut = steer_system(base, directions[layer], layer, alpha)
            answers = ev.judge(ev.generate_answers(sut, val_examples, max_tokens, batch_size,
                                                   desc=f"steer-dom layer {layer} alpha {alpha:g}"), refusal)
            m = ev.safety_metrics(answers, dual)
            grid.append({"layer": layer, "alpha": alpha, "agreement_with_dual": m["agreement_with_dual"],
                         "over_refusal": m["over_refusal"], "unsafe_compliance": m["unsafe_compliance"],
                         "n_val": len(val_examples)})
    best = max(grid, key=lambda g: (g["agreement_with_dual"] or 0.0, -(g["over_refusal"] or 0.0), -g["alpha"]))
    return {"layer": best["layer"], "alpha": best["alpha"], "grid": grid}


def save_steer_dom(path, vector: mx.array, layer: int, alpha: float, model, config, **meta):
    m = SteerDom(layer=layer, alpha=alpha)
    return m.save(path, {"steer": mx.array(vector).astype(mx.float32)}, model, config, **meta)


METHODS.update({LoRA.name: LoRA, SteerOpt.name: SteerOpt, SteerDom.name: SteerDom})
