"""What every method shares: typed options that check themselves, and the Method hooks.

A method is a choice of trainable parameters (a dict tree of arrays) and of
how they enter the frozen base's forward pass. The training loop, the
objectives and the data are the same for all methods; each method module
(softprompt.py, prefix.py, lora.py, steering.py) subclasses ``Method`` and
``Options`` and is listed once in ``methods.METHODS``.

Hooks a method provides:

- ``init(model, tokenizer, seed)`` -> params, the trainable arrays;
- ``bind(model, params)``: a context manager inside which the model's forward
  uses them (outside it the model is exactly the base: that is the teacher);
- ``logits(model, params, inputs)``: the student's logits for ``inputs``
  ([B, L] ids) -> [B, L, V], what training differentiates; the default runs
  the model inside ``bind`` (a soft prompt and prefix tuning run their prefix
  once per batch and share it across the rows instead);
- ``shares_record_prompt`` / ``training_prefix(model, params)``: a method whose
  change is a prefix of keys/values (soft prompt, prefix tuning) can train on
  the record layout, where a record's prompt runs once for all its rows
  (record_prompt.py);
- ``prefix_cache(model, params)`` (and ``prefix_length``): for a method that does not depend on the
  conversation (soft prompt, prefix tuning) the key/value cache every request
  starts from, computed once; None for methods that change the weights or
  activations (LoRA, steering), which a System binds for its lifetime instead;
- ``save`` / ``methods.load``: the method file (tensors named by the params'
  tree paths, metadata ``method=<name>`` and ``method_options``, fingerprint).
"""

import dataclasses
import json
import typing
from contextlib import contextmanager
from typing import Any, ClassVar, Dict, Optional, Type

import mlx.core as mx
from mlx.utils import tree_flatten

from .. import prompt_file
from .. import checks
from ..errors import UserError


# ---------------------------------------------------------------- options


@dataclasses.dataclass
class Options:
    """A method's options: a dataclass whose ``__post_init__`` checks every field (UserError naming it)."""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # built directly, not through from_dict: the same type checks
            setattr(self, f.name, _coerce(hints[f.name], f, getattr(self, f.name), f"{type(self).__name__}.{f.name}"))
        self.check()

    def check(self) -> None:
        pass

    @classmethod
    def from_dict(cls, values: Optional[dict], where: str = "method_options") -> "Options":
        """Options from a YAML/JSON/CLI mapping: unknown keys and wrong types are errors naming them."""
        values = dict(values or {})
        known, hints = {f.name: f for f in dataclasses.fields(cls)}, typing.get_type_hints(cls)
        out = {}
        for key, v in values.items():
            name = str(key).replace("-", "_")
            if name not in known:
                raise UserError(f"{where}: unknown option {key!r} for this method "
                                f"(known: {', '.join(known) or 'none'})")
            out[name] = _coerce(hints[name], known[name], v, f"{where}.{name}")
        try:
            return cls(**out)
        except UserError as e:  # a range check: say where the values came from
            raise UserError(f"{where}: {e}") if not str(e).startswith(where) else e

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_metadata(self) -> str:
        return json.dumps(self.as_dict(), sort_keys=True)


def _coerce(hint, f: dataclasses.Field, v, where: str):
    """A value as the field is annotated (`hint`, read by checks.setting); None (`key:` with no
    value in YAML) is the default."""
    if v is None and f.default is not dataclasses.MISSING:
        return f.default
    return checks.setting(v, hint, where)


def option(default, help: str):
    """A documented option field (its annotation says its type)."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class NoOptions(Options):
    pass


# ---------------------------------------------------------------- the method


class Method:
    name: ClassVar[str] = "?"
    label: ClassVar[str] = "?"  # what tables, model cards and chat call it
    Options: ClassVar[Type[Options]] = NoOptions
    trainable: ClassVar[bool] = True
    # shorthand flags/config keys (train's CLI and flat YAML) -> this method's option names
    shorthands: ClassVar[Dict[str, str]] = {}

    def __init__(self, options: Optional[Options] = None, **kw):
        if options is not None and kw:
            raise ValueError("give options or keyword options, not both")
        self.options = options if options is not None else self.Options.from_dict(kw, self.name)

    # -- training
    def init(self, model, tokenizer=None, seed: int = 0) -> dict:
        raise UserError(f"{self.name}: not trainable")

    @contextmanager
    def bind(self, model, params):
        yield

    def prefix_cache(self, model, params):
        """The cache every request starts from (precomputable methods), or None (bind instead)."""
        return None

    def prefix_length(self, params) -> int:
        """Positions `prefix_cache` holds (0 for methods without one)."""
        return 0

    def logits(self, model, params, inputs: mx.array) -> mx.array:
        """Student logits at the positions of `inputs` ([B, L] -> [B, L, V])."""
        with self.bind(model, params):
            return model(inputs)

    @property
    def shares_record_prompt(self) -> bool:
        """Whether training runs a record's prompt once for its rows (record_prompt.py)."""
        return False

    def training_prefix(self, model, params):
        """The per-layer (keys, values) [1, H, n, hd] this method puts before every prompt, for the
        record layout (record_prompt.forward); only asked when `shares_record_prompt`."""
        raise NotImplementedError

    # -- files
    def tensors(self, params) -> dict:
        return dict(tree_flatten(params))

    def params_from(self, tensors: dict, path=None) -> dict:
        return nest({k: v for k, v in tensors.items() if k != prompt_file.SKETCH_KEY})

    def check_params(self, params, model, path) -> None:
        """Refuse a file whose tensors do not fit this base (beyond the fingerprint)."""

    def save(self, path, params, model, config, **meta):
        """Write the method file atomically, with the base's fingerprint, `method` and its options."""
        return prompt_file.save(path, self.tensors(params), model, config, method=self.name,
                                method_options=self.options.to_metadata(), **meta)

    @classmethod
    def options_from_metadata(cls, meta: dict, path) -> Options:
        raw = meta.get("method_options")
        if raw is None:
            return cls.Options()
        try:
            values = json.loads(raw)
        except json.JSONDecodeError:
            raise UserError(f"{path}: malformed method_options metadata (not JSON)")
        if not isinstance(values, dict):
            raise UserError(f"{path}: malformed method_options metadata (not a mapping)")
        return cls.Options.from_dict(values, f"{path}: method_options")

    def size(self, params) -> tuple:
        """(added parameters, added bytes)."""
        flat = [v for _, v in tree_flatten(params) if isinstance(v, mx.array)]
        return sum(int(v.size) for v in flat), sum(int(v.nbytes) for v in flat)

    def describe(self) -> dict:
        return {"method": self.name, **{k: v for k, v in self.options.as_dict().items()}}


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


def get_module(root, path: str):
    node = root
    for k in path.split("."):
        node = node[int(k)] if isinstance(node, list) else getattr(node, k)
    return node


def set_module(root, path: str, module) -> None:
    *parents, last = path.split(".")
    node = get_module(root, ".".join(parents)) if parents else root
    if isinstance(node, list):
        node[int(last)] = module
    else:
        setattr(node, last, module)


def nest(flat: Dict[str, Any]) -> dict:
    """{"a.b.0.c": x} -> {"a": {"b": {"0": {"c": x}}}}: dicts only, so the loop's path assignment works."""
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        *parents, last = path.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = v
    return tree
