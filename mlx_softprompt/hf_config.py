"""A Hugging Face config.json as mlx-lm's model classes read it.

mlx-lm builds each architecture from a ``ModelArgs`` dataclass filled with the
top-level fields of config.json of the same name. Checkpoints saved by
transformers 5 often do not have those fields there: RoPE settings live only
under ``rope_parameters`` (and ``rope_scaling`` became an alias of it),
local/global attention layouts only as ``layer_types``, some fields were
renamed (``num_experts`` -> ``num_local_experts``, ``n_ctx`` -> ``n_positions``)
and fields equal to the config class's default are not written at all. mlx-lm
0.32 then fails with a traceback or, worse, silently uses its own default (a
Llama checkpoint with RoPE theta 5e5 runs with 1e4).

``mlx_lm_config`` fills, for every field the architecture's ``ModelArgs``
takes and config.json lacks, the value transformers itself would use: it
loads the config through transformers' own config class for that
``model_type`` (never remote code), and reads

1. RoPE fields and the window pattern from ``rope_parameters`` and
   ``layer_types`` (``RULES``), since transformers' attribute of the same name
   may mean something else (``rope_scaling``);
2. otherwise the attribute itself (attribute maps, properties and class
   defaults included);
3. otherwise the same quantity under the name transformers uses for it
   (``SYNONYMS``), derived by transformers' own rule (``DERIVED``), from a
   multimodal checkpoint's ``text_config``, or a fact of transformers'
   modeling code that its config does not carry (``MODELING_FACTS``).

Values that mean another thing to mlx-lm are renamed (``VALUE_NAMES``). A
text-only checkpoint of a multimodal family ("qwen3_5_text") is read with
mlx-lm's model for the family ("qwen3_5"), its text arguments filled too. Fields
present in config.json win, unless of another kind than mlx-lm's annotation
(EXAONE 4's int window pattern where mlx-lm wants "LLLG"), so a directory
already converted (by us, mlx_lm.convert or anyone) reads as before. A field
the architecture requires and nothing provides is refused in one line naming
the architecture and the field.
"""

import contextlib
import copy
import io
import inspect
import typing
from typing import Any, Callable, Dict, Optional

from .errors import UserError

_MISSING = object()


# ---------------------------------------------------------------- reading the source config


class Source:
    """config.json's fields, then transformers' config object for its model_type (if transformers knows it)."""

    def __init__(self, config: dict, hf=None):
        self.config, self.hf = config, hf

    def get(self, name: str, default: Any = _MISSING) -> Any:
        if name in self.config:
            return self.config[name]
        if self.hf is not None:
            try:
                return _plain(getattr(self.hf, name))
            except AttributeError:
                pass
        return default

    def attribute(self, name: str) -> Any:
        """Only what transformers' config object has under `name` (its attribute maps and defaults)."""
        if self.hf is None:
            return _MISSING
        try:
            return _plain(getattr(self.hf, name))
        except AttributeError:
            return _MISSING


def _plain(value):
    """JSON-like values: sub-configs as dicts."""
    if hasattr(value, "to_dict") and callable(value.to_dict):
        return value.to_dict()
    return value


def decode_special_floats(obj):
    """transformers writes inf/nan as {"__float__": "Infinity"}; mlx-lm wants the float."""
    if isinstance(obj, dict):
        if set(obj) == {"__float__"} and obj["__float__"] in ("Infinity", "-Infinity", "NaN"):
            return float(obj["__float__"].replace("Infinity", "inf"))
        return {k: decode_special_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_special_floats(v) for v in obj]
    return obj


def transformers_config(config: dict):
    """transformers' own config object for `config` (built-in classes only), or None."""
    model_type = config.get("model_type")
    try:
        import transformers
        from transformers import CONFIG_MAPPING
    except ImportError:  # transformers is optional at run time: explicit fields only
        return None
    if model_type not in CONFIG_MAPPING:
        return None
    cls = CONFIG_MAPPING[model_type]
    fields = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config", "auto_map")}
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        return cls.from_dict(fields)
    except Exception:  # a config transformers' validation rejects: use config.json's fields alone
        return None
    finally:
        transformers.logging.set_verbosity(verbosity)


# ---------------------------------------------------------------- RoPE and layer layout


def _rope(src: Source, layer_type: str = "full_attention") -> Optional[dict]:
    """The RoPE parameters of one layer type (transformers 5 may key them by layer type)."""
    rp = src.config.get("rope_parameters")
    if not isinstance(rp, dict):
        rp = src.attribute("rope_parameters")
    if not isinstance(rp, dict):
        return None
    if any(isinstance(v, dict) for v in rp.values()):
        return rp.get(layer_type) or rp.get("full_attention") or next(v for v in rp.values() if isinstance(v, dict))
    return rp


def _rope_field(key: str, default: Any = _MISSING, layer_type: str = "full_attention") -> Callable:
    def rule(src: Source):
        rp = _rope(src, layer_type)
        if rp is not None and key in rp:
            return rp[key]
        return default

    return rule


def _rope_scaling(src: Source):
    """The scaling part of rope_parameters, under both the old and new key for its type; None for plain RoPE."""
    rp = _rope(src)
    if rp is None:
        return _MISSING
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type == "default":
        return None
    scaling = {k: v for k, v in rp.items() if k not in ("rope_theta", "partial_rotary_factor")}
    return {**scaling, "type": rope_type, "rope_type": rope_type}


def _head_dim(src: Source):
    value = src.attribute("head_dim")
    if value not in (_MISSING, None):
        return value
    hidden, heads = src.get("hidden_size", None), src.get("num_attention_heads", None)
    return hidden // heads if hidden and heads else _MISSING  # transformers' own rule when head_dim is unset


def _rotary_dim(src: Source):
    head_dim = _head_dim(src)
    factor = _rope_field("partial_rotary_factor", 1.0)(src)
    return int(head_dim * factor) if head_dim is not _MISSING else _MISSING


def _expanded_intermediate(src: Source):
    """Mamba-style configs give the inner width as expand x hidden_size (transformers' modeling rule)."""
    expand, hidden = src.get("expand", None), src.get("hidden_size", None)
    return int(expand * hidden) if expand and hidden else _MISSING


def _sliding_window_pattern(src: Source, annotation=None):
    """transformers 5's layer_types as a window pattern: every p-th layer global (an int: Gemma 3,
    Cohere 2), or one letter per layer, L local and G global (a string: EXAONE 4)."""
    types = src.get("layer_types", None)
    if not isinstance(types, list) or not types:
        return _MISSING
    if _wants(annotation, str):
        return "".join("G" if t == "full_attention" else "L" for t in types)
    return _global_period(src)


def _global_period(src: Source):
    """p when every p-th layer of layer_types is a full-attention one (Qwen3-Next/3.5's full_attention_interval)."""
    types = src.get("layer_types", None)
    if not isinstance(types, list) or not types:
        return _MISSING
    if "full_attention" not in types:
        return len(types) + 1  # no global layer in this (short) stack
    p = types.index("full_attention") + 1
    if all((t == "full_attention") == ((i + 1) % p == 0) for i, t in enumerate(types)):
        return p
    return _MISSING


# mlx-lm field -> how to read it; these take precedence over transformers' attribute of the same
# name (in transformers 5 ``rope_scaling`` is an alias of the whole ``rope_parameters``).
RULES: Dict[str, Callable[[Source], Any]] = {
    "rope_theta": _rope_field("rope_theta"),
    "rotary_emb_base": _rope_field("rope_theta"),
    "rope_local_base_freq": _rope_field("rope_theta", layer_type="sliding_attention"),
    "swa_rope_theta": _rope_field("rope_theta", layer_type="sliding_attention"),
    "partial_rotary_factor": _rope_field("partial_rotary_factor", 1.0),
    "rotary_pct": _rope_field("partial_rotary_factor", 1.0),
    "rope_scaling": _rope_scaling,
    "rotary_dim": _rotary_dim,
    "head_dim": _head_dim,
    "sliding_window_pattern": _sliding_window_pattern,
    "full_attention_interval": _global_period,
}

# mlx-lm field -> the names transformers uses for the same quantity (tried in order).
SYNONYMS: Dict[str, tuple] = {
    "n_ctx": ("n_positions", "max_position_embeddings"),
    "num_experts": ("num_local_experts", "n_routed_experts", "moe_num_experts"),
    "num_local_experts": ("num_experts", "n_routed_experts"),
    "n_routed_experts": ("num_local_experts", "num_experts"),
    "layer_norm_epsilon": ("layer_norm_eps", "rms_norm_eps", "norm_eps"),
    "layer_norm_eps": ("layer_norm_epsilon", "rms_norm_eps", "norm_eps"),
    "rms_norm_eps": ("layer_norm_epsilon", "layer_norm_eps", "norm_eps"),
    "norm_epsilon": ("layer_norm_epsilon", "layer_norm_eps", "rms_norm_eps"),
    "num_layers": ("num_hidden_layers",),
    "shared_intermediate_size": ("shared_expert_intermediate_size",),
    "moe_shared_expert_intermediate_size": ("shared_expert_intermediate_size",),
    "max_position_embeddings": ("n_positions", "max_seq_len"),
    "block_dim": ("hidden_size",),  # LFM2: transformers 5 dropped block_dim (= hidden_size)
    "block_ff_dim": ("intermediate_size",),
}


def _inner(src: Source):
    """GPT-2-style configs leave n_inner None for 4 x n_embd (transformers' modeling rule)."""
    width = src.get("n_embd", None) or src.get("hidden_size", None)
    return 4 * width if width else _MISSING


def _is_moe_layer(src: Source):
    """transformers 5's per-layer MLP kinds ("dense"/"sparse") as the per-layer flags mlx-lm reads."""
    kinds = src.get("mlp_layer_types", None)
    return [k == "sparse" for k in kinds] if isinstance(kinds, list) else _MISSING


# The same quantity derived from others by transformers' own rule.
DERIVED: Dict[str, Callable[[Source], Any]] = {
    "intermediate_size": _expanded_intermediate,
    "is_moe_layer": _is_moe_layer,
    "n_inner": _inner,
}

# Values that mean another thing to mlx-lm: (model_type, field) -> {transformers' value: mlx-lm's for the same}
# (applied to each item of a list).
VALUE_NAMES: Dict[tuple, Dict[Any, Any]] = {
    ("granitemoehybrid", "layer_types"): {"linear_attention": "mamba", "full_attention": "attention"},
    # transformers applies RoPE only for "rope" (its default None: none); mlx-lm for anything but "nope"
    ("granitemoehybrid", "position_embedding_type"): {None: "nope"},
}

# Facts of transformers' modeling code that its config does not carry, for fields mlx-lm requires:
# (model_type, field) -> value. Read from transformers' modeling_<type>.py.
MODELING_FACTS: Dict[tuple, Any] = {
    ("apertus", "mlp_bias"): False,  # ApertusMLP: nn.Linear(..., bias=False)
    ("apertus", "qk_norm"): True,  # ApertusAttention always has q_norm/k_norm
    ("apertus", "post_norm"): False,  # pre-norm only (attention_layernorm, feedforward_layernorm)
    ("minimax", "shared_intermediate_size"): 0,  # MiniMaxSparseMoeBlock: no shared expert
    ("minimax_m2", "shared_intermediate_size"): 0,
    ("solar_open", "first_k_dense_replace"): 0,  # SolarOpenDecoderLayer: every layer is a mixture of experts
    ("solar_open", "intermediate_size"): 0,  # so no dense MLP width (mlx-lm sizes dense layers with it)
}


def _kinds(annotation) -> set:
    """The basic kinds a resolved ModelArgs annotation admits ({str}, {int, list}, ...); empty if unknown."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        return set().union(*(_kinds(a) for a in typing.get_args(annotation) if a is not type(None)))
    if origin in (list, tuple) or annotation in (list, tuple):
        return {list}
    if origin is dict or annotation is dict:
        return {dict}
    return {annotation} if annotation in (str, int, float, bool) else set()


def _wants(annotation, kind) -> bool:
    return kind in _kinds(annotation)


def _fits(value, annotation, default=None) -> bool:
    """False only when the value is plainly of another kind than the annotation: an int for a str,
    or None for a field that is neither Optional nor None by default (GPT-BigCode's n_inner: int)."""
    kinds = _kinds(annotation)
    if value is None:
        return not kinds or default is None or type(None) in typing.get_args(annotation)
    if not kinds:
        return True
    if isinstance(value, bool):
        return bool in kinds or int in kinds
    if isinstance(value, int) and float in kinds:
        return True
    if isinstance(value, tuple):
        return list in kinds
    return isinstance(value, tuple(kinds))


def _annotations(args_class) -> dict:
    try:
        return typing.get_type_hints(args_class)
    except Exception:  # an annotation that does not resolve: no type checks for that class
        return {}


def _derive(name: str, src: Source, model_type: str, annotation=None, allow_none: bool = True):
    """The first value a source gives for `name` (None counts only when `allow_none`)."""
    sources = []
    if name in RULES:
        rule = RULES[name]
        sources.append(lambda: rule(src, annotation) if name == "sliding_window_pattern" else rule(src))
    sources.append(lambda: src.attribute(name))
    sources += [lambda alias=alias: src.get(alias) for alias in SYNONYMS.get(name, ())]
    if name in DERIVED:
        sources.append(lambda: DERIVED[name](src))
    text = src.get("text_config", None)  # a multimodal wrapper that reads a text field at its top level
    sources.append(lambda: text.get(name, _MISSING) if isinstance(text, dict) else _MISSING)
    sources.append(lambda: MODELING_FACTS.get((model_type, name), _MISSING))
    for source in sources:
        value = source()
        if value is not _MISSING and (allow_none or value is not None):
            return value
    return _MISSING


# ---------------------------------------------------------------- the translation


def _versions() -> str:
    from mlx_lm import __version__ as mlx_lm_version

    try:
        from transformers import __version__ as transformers_version
    except ImportError:
        return f"mlx-lm {mlx_lm_version}"
    return f"mlx-lm {mlx_lm_version} / transformers {transformers_version}"


def model_classes(config: dict, name: str):
    """mlx-lm's (Model, ModelArgs) for `config`, or a one-line refusal."""
    from mlx_lm import __version__ as mlx_lm_version
    from mlx_lm.utils import _get_classes

    if "model_file" in config:
        raise UserError(f"{name}: config.json asks to run custom model code ({config['model_file']!r}); "
                        "remote code is never run")
    model_type = config.get("model_type")
    if not model_type or not isinstance(model_type, str):
        raise UserError(f"{name}: config.json has no model_type")
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            return _get_classes(config)
    except ValueError:
        raise UserError(f"{name}: model_type {model_type!r} is not supported by mlx-lm {mlx_lm_version}")
    except (ImportError, SystemExit) as e:  # mlx-lm's module for it needs a package (olmo: ai2-olmo)
        said = " ".join(printed.getvalue().split()) or f"{type(e).__name__}: {e}"
        raise UserError(f"{name}: mlx-lm {mlx_lm_version}'s {model_type} model cannot be loaded ({said})")


def _settable(hf, field: str) -> bool:
    """False for a read-only property of transformers' config class (Jamba's layers_block_type): written
    to config.json it would make transformers (and mlx-lm's tokenizer loading) refuse the file."""
    attr = inspect.getattr_static(type(hf), field, None) if hf is not None else None
    return not (isinstance(attr, property) and attr.fset is None)


def _translate(config: dict, args_class, name: str, hf=None, required: bool = True) -> dict:
    out = dict(config)
    src = Source(config, hf)
    model_type = config.get("model_type", "?")
    missing = []
    hints = _annotations(args_class)
    for field, param in inspect.signature(args_class).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        annotation = hints.get(field)
        value = config.get(field, _MISSING)
        if value is _MISSING or not _fits(value, annotation, param.default):  # absent, or meant otherwise (EXAONE
            derived = _derive(field, src, model_type, annotation, allow_none=value is _MISSING)  # 4's int pattern)
            if isinstance(derived, dict) and "model_type" in derived:
                derived = _MISSING  # a sub-model's config comes from the file, never from class defaults
            if derived is _MISSING:
                if value is _MISSING and param.default is param.empty:
                    missing.append(field)
                if value is _MISSING:
                    continue
            elif _settable(hf, field):
                value = out[field] = derived
            elif value is _MISSING:  # transformers computes it and refuses it in config.json: so must mlx-lm
                continue
        names = VALUE_NAMES.get((model_type, field))
        if names and isinstance(value, list):
            value = out[field] = [names.get(v, v) for v in value]
        elif names and isinstance(value, typing.Hashable) and value in names:
            value = out[field] = names[value]
        if isinstance(value, dict) and isinstance(value.get("model_type"), str):
            out[field] = _sub_config(value, name)  # text_config of a multimodal checkpoint
    if required and missing and not _builds(args_class, out):
        raise UserError(f"{name}: cannot build {model_type}: mlx-lm's {model_type} needs "
                        f"{', '.join(missing)}, which this config.json does not give under any name "
                        f"transformers uses ({_versions()})")
    return out


def _builds(args_class, config: dict) -> bool:
    """Whether the ModelArgs class fills its required fields itself (Qwen3.5's from_dict takes a
    text-only config as its text_config)."""
    try:
        args_class.from_dict(config)
        return True
    except Exception:
        return False


def _sub_config(config: dict, name: str) -> dict:
    """A nested config with an mlx-lm architecture of its own (gemma3's text_config) is translated too."""
    import importlib

    try:
        args_class = importlib.import_module(f"mlx_lm.models.{config['model_type']}").ModelArgs
    except (ImportError, AttributeError, SystemExit):
        return config
    return _translate(config, args_class, f"{name} ({config['model_type']})", transformers_config(config))


def _text_only(config: dict) -> dict:
    """transformers saves the text model of a multimodal family under "<family>_text" (Qwen3.5's
    Qwen3_5ForCausalLM: qwen3_5_text); mlx-lm reads such a checkpoint under the family's name."""
    import importlib.util

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type.endswith("_text"):
        return config
    known = lambda t: importlib.util.find_spec(f"mlx_lm.models.{t}") is not None  # noqa: E731
    family = model_type[: -len("_text")]
    if known(model_type) or not known(family):
        return config
    return {**config, "model_type": family}


def mlx_lm_config(config: dict, name: str) -> dict:
    """A copy of `config` with every field mlx-lm's ModelArgs for its model_type reads at the top level."""
    config = decode_special_floats(copy.deepcopy(config))
    hf = transformers_config(config)  # the config's own class, before any renaming for mlx-lm
    renamed = _text_only(config)
    _, args_class = model_classes(renamed, name)
    if renamed is not config:  # the family's model reads these fields with its text model's arguments
        import sys

        from mlx_lm.models.base import BaseModelArgs

        module = sys.modules[args_class.__module__]
        for text_args in vars(module).values():
            if isinstance(text_args, type) and issubclass(text_args, BaseModelArgs) and text_args is not args_class:
                renamed = _translate(renamed, text_args, name, hf, required=False)
    return _translate(renamed, args_class, name, hf)
