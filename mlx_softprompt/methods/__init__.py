"""Methods: what is trained (or fitted) and how it is applied to the frozen base.

One module per method; a new method is its module plus one line in METHODS
(docs/ARCHITECTURE.md). Each module holds the method's options (a dataclass
that checks itself) and its hooks (base.py: init, bind, logits,
prefix_cache, save); the training loop, objectives, evaluation, bundles,
chat and serve work with any method through these hooks alone.
"""

from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Type

from .. import prompt_file
from ..errors import UserError
from .base import Method, Options, decoder_layers
from .lora import LoRA
from .prefix import PrefixTuning
from .softprompt import SoftPrompt, shared_prefix_cache, supports_shared_prefix
from .steering import SteerDom, SteerOpt

METHODS: Dict[str, Type[Method]] = {
    SoftPrompt.name: SoftPrompt,
    PrefixTuning.name: PrefixTuning,
    LoRA.name: LoRA,
    SteerOpt.name: SteerOpt,
    SteerDom.name: SteerDom,
}


def method_class(name: str) -> Type[Method]:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name]


def get(name: str, options: Optional[dict] = None, **kw) -> Method:
    """A method by name with its options (a mapping or keywords); unknown names/options are UserErrors."""
    cls = method_class(name)
    return cls(cls.Options.from_dict({**(options or {}), **kw}, f"method {name}"))


def trainable() -> list:
    return [n for n, c in METHODS.items() if c.trainable]


def label(name: str) -> str:
    """A method's name in tables, model cards and chat (the name itself if it is not a method)."""
    return METHODS[name].label if name in METHODS else name


def shorthand_keys() -> set:
    """Every flat key (CLI flag / YAML key) that fills some method's options."""
    return {k for c in METHODS.values() for k in c.shorthands}


def shorthand_type(name: str, key: str):
    """The annotation of the option that shorthand `key` fills for method `name`, so that text
    given for it is read as that option is (Any when it is not one of the method's)."""
    import typing

    cls = method_class(name)
    if key not in cls.shorthands:
        return typing.Any
    return typing.get_type_hints(cls.Options)[cls.shorthands[key]]


def options_from(name: str, options: Optional[dict] = None, shorthands: Optional[dict] = None,
                 where: str = "method_options") -> dict:
    """The validated options of method `name` as a plain dict: `options` (the block), then the
    shorthands that were given (None = not given). A shorthand of another method is an error."""
    cls = method_class(name)
    values = dict(options or {})
    for key, v in (shorthands or {}).items():
        if v is None:
            continue
        if key not in cls.shorthands:
            owners = [n for n, c in METHODS.items() if key in c.shorthands]
            if not owners:
                raise ValueError(f"unknown shorthand {key!r}")
            raise UserError(f"--{key.replace('_', '-')} is an option of {' / '.join(owners)}, "
                            f"not of --method {name}")
        values[cls.shorthands[key]] = v
    return cls.Options.from_dict(values, where).as_dict()


@dataclass
class Loaded:
    """A method file read and checked against a base: the method (with its options) and its params."""

    method: Method
    params: dict
    file: prompt_file.PromptFile

    @property
    def name(self) -> str:
        return self.method.name


def load(path, model, config, expect: Optional[Iterable[str]] = None) -> Loaded:
    """The one reader of method files: the file is whole, of a known method (one of `expect`
    when given), written for this base (fingerprint), and its tensors fit the base."""
    f = prompt_file.load(path)
    if f.method not in METHODS:
        raise UserError(f"{path}: unknown method {f.method!r} (this version knows {', '.join(METHODS)})")
    if expect is not None:
        expect = list(expect)
        if f.method not in expect:
            raise UserError(f"{path}: a {f.method!r} file, not {' or '.join(repr(e) for e in expect)}")
    f.check_base(model, config)
    method, params = parse(f, path)
    method.check_params(params, model, path)
    return Loaded(method, params, f)


def parse(f, path) -> tuple:
    """(method, params) of a loaded method file of a known method, before any base is at hand
    (load checks them against one; export-peft has none)."""
    cls = METHODS[f.method]
    method = cls(cls.options_from_metadata(f.metadata, path))
    try:
        return method, method.params_from(f.tensors, path)
    except KeyError as e:
        raise UserError(f"{path}: missing tensor {e}")


__all__ = ["METHODS", "Method", "Options", "Loaded", "get", "load", "parse", "method_class", "options_from", "trainable",
           "shorthand_keys", "label", "decoder_layers", "shared_prefix_cache", "supports_shared_prefix"]
