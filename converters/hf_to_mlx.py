"""Hugging Face checkpoint -> MLX model directory, on top of mlx-lm's converter.

``mlx_lm.convert.convert`` does the work: load with the architecture's
``sanitize``, cast, quantize, save weights, config and tokenizer. This module
adds what it leaves to the caller: one-line refusals (non-empty target,
pickled weights, no config.json, an architecture mlx-lm does not know),
safetensors only and never remote code, the checkpoint's own dtype as the
default (also under transformers 5's ``dtype`` key), and an atomic write: the
model is built in a temporary directory next to the target, then renamed.

transformers 5 writes RoPE settings only under ``rope_parameters`` and the
local/global attention layout only as ``layer_types``; mlx-lm 0.32 reads most
architectures' ``rope_theta``/``rope_scaling`` and Gemma 3's
``sliding_window_pattern`` from the top level and would silently fall back to
its defaults (Qwen2: theta 1e6 instead of the checkpoint's). ``legacy_fields``
restores the top-level fields in a staged copy of config.json before mlx-lm
reads it; the converted model's config.json keeps both forms.
"""

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

from mlx_softprompt.errors import UserError, read_json_object
from mlx_softprompt.models import resolve_model_path
from mlx_softprompt.prompt_file import _check_header, as_if_created

DTYPES = ("float16", "bfloat16", "float32")
Q_BITS = (4, 8)
Q_GROUP_SIZES = (32, 64, 128)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _check_target(mlx_path: Path) -> None:
    if mlx_path.exists() and (not mlx_path.is_dir() or any(mlx_path.iterdir())):
        raise UserError(f"{mlx_path}: --mlx-path already exists and is not empty; "
                        "choose a new path or delete it first")


def _read_config(src: Path, name: str) -> dict:
    path = src / "config.json"
    if not path.is_file():
        raise UserError(f"{name}: no config.json (not a Hugging Face model checkpoint)")
    return read_json_object(path)


def _check_weights(src: Path, name: str) -> None:
    # mlx-lm reads exactly model*.safetensors (single file or shards)
    files = sorted(src.glob("model*.safetensors"))
    for f in files:  # an interrupted download fails here, in one line, before any work
        _check_header(f)
    if files:
        return
    pickled = sorted(p.name for p in src.iterdir() if p.suffix in PICKLE_SUFFIXES)
    found = f" (found {', '.join(pickled[:3])})" if pickled else ""
    raise UserError(f"{name}: no model*.safetensors weights{found}; only safetensors are read; "
                    "convert the checkpoint to safetensors first")


def _check_architecture(config: dict, name: str) -> None:
    from mlx_lm import __version__ as mlx_lm_version
    from mlx_lm.utils import _get_classes

    if "model_file" in config:
        raise UserError(f"{name}: config.json asks to run custom model code ({config['model_file']!r}); "
                        "remote code is never run")
    model_type = config.get("model_type")
    if not model_type:
        raise UserError(f"{name}: config.json has no model_type")
    try:
        _get_classes(config)
    except ValueError:
        raise UserError(f"{name}: model_type {model_type!r} is not supported by mlx-lm {mlx_lm_version}")


def _lift_rope(config: dict) -> None:
    rp = config.get("rope_parameters")
    if not isinstance(rp, dict):
        return
    if "full_attention" in rp or "sliding_attention" in rp:  # per layer type (Gemma 3 style)
        full, local = rp.get("full_attention") or {}, rp.get("sliding_attention") or {}
        if "rope_theta" in local:
            config.setdefault("rope_local_base_freq", local["rope_theta"])
        rp = full
    if "rope_theta" in rp:
        config.setdefault("rope_theta", rp["rope_theta"])
    if "partial_rotary_factor" in rp:
        config.setdefault("partial_rotary_factor", rp["partial_rotary_factor"])
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type != "default" and not config.get("rope_scaling"):
        scaling = {k: v for k, v in rp.items() if k not in ("rope_theta", "partial_rotary_factor")}
        config["rope_scaling"] = {**scaling, "type": rope_type, "rope_type": rope_type}


def _lift_layer_types(config: dict) -> None:
    types = config.get("layer_types")
    if not isinstance(types, list) or "full_attention" not in types or "sliding_window_pattern" in config:
        return
    p = types.index("full_attention") + 1
    if all((t == "full_attention") == ((i + 1) % p == 0) for i, t in enumerate(types)):
        config["sliding_window_pattern"] = p


def legacy_fields(config: dict) -> dict:
    """A copy of `config` with transformers-5 fields also under the legacy top-level names mlx-lm reads."""
    config = json.loads(json.dumps(config))
    for c in (config, config.get("text_config")):
        if isinstance(c, dict):
            _lift_rope(c)
            _lift_layer_types(c)
    return config


def _stage(src: Path, config: dict, stage: Path) -> Path:
    """`src` as symlinks, except a normalised config.json: what mlx-lm converts from."""
    stage.mkdir()
    for p in src.iterdir():
        if p.name != "config.json":
            (stage / p.name).symlink_to(p.resolve())
    (stage / "config.json").write_text(json.dumps(legacy_fields(config), indent=2))
    return stage


def default_dtype(config: dict) -> Optional[str]:
    """The checkpoint's own dtype: torch_dtype (transformers 4), dtype (5), or text_config's."""
    text = config.get("text_config") or {}
    for value in (config.get("torch_dtype"), config.get("dtype"), text.get("torch_dtype"), text.get("dtype")):
        if value in DTYPES:
            return value
    return None


def convert(hf_path: str, mlx_path, quantize: bool = False, q_bits: int = 4, q_group_size: int = 64,
            dtype: Optional[str] = None) -> Path:
    """Convert `hf_path` (local dir or hub id) into a new MLX model directory `mlx_path`."""
    from mlx_lm.convert import convert as mlx_lm_convert

    mlx_path = Path(mlx_path)
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    if quantize and q_bits not in Q_BITS:
        raise UserError(f"--q-bits {q_bits}: expected 4 or 8")
    if quantize and q_group_size not in Q_GROUP_SIZES:
        raise UserError(f"--q-group-size {q_group_size}: expected one of {', '.join(map(str, Q_GROUP_SIZES))}")
    _check_target(mlx_path)

    local = Path(hf_path).expanduser()
    if local.is_dir() and not (local / "config.json").exists():
        raise UserError(f"{hf_path}: no config.json (not a Hugging Face model checkpoint)")
    src = resolve_model_path(hf_path)  # a local dir, or the hub snapshot (json + safetensors only)
    config = _read_config(src, hf_path)
    _check_weights(src, hf_path)
    _check_architecture(config, hf_path)
    dtype = dtype or default_dtype(config)

    mlx_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=mlx_path.parent, prefix=f".{mlx_path.name}.", suffix=".tmp"))
    as_if_created(tmp, directory=True)  # 0755 under umask 022, as mkdir would make it
    try:
        out = tmp / "model"
        staged = _stage(src, config, tmp / "source")
        # mlx-lm reports its stages on stdout; keep stdout for our own result line
        with contextlib.redirect_stdout(sys.stderr):
            try:
                mlx_lm_convert(str(staged), out, quantize=quantize, q_group_size=q_group_size if quantize else None,
                               q_bits=q_bits if quantize else None, dtype=dtype, trust_remote_code=False)
            except (ValueError, KeyError, OSError, RuntimeError) as e:  # bad files, not our bugs
                raise UserError(f"{hf_path}: cannot convert: {e}".splitlines()[0])
        _check_target(mlx_path)  # still free (an empty directory is replaced by the rename)
        os.replace(out, mlx_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return mlx_path
