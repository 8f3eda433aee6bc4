"""Hugging Face checkpoint -> MLX model directory, on top of mlx-lm's converter.

``mlx_lm.convert.convert`` does the work: load with the architecture's
``sanitize``, cast, quantize, save weights, config and tokenizer. This module
adds what it leaves to the caller: one-line refusals (non-empty target,
pickled weights, no config.json, an architecture mlx-lm does not know),
safetensors only and never remote code, the checkpoint's own dtype as the
default (also under transformers 5's ``dtype`` key), and an atomic write: the
model is built in a temporary directory next to the target, then renamed.

Configs written by transformers 5 name many fields differently from what
mlx-lm's architectures read (see ``mlx_softprompt.hf_config``): mlx-lm converts
from a staged copy of the checkpoint whose config.json carries the translated
fields, so the converted model's config.json has both forms and loads with
plain mlx-lm too.
"""

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

from mlx_softprompt.checks import read_json_object
from mlx_softprompt.errors import UserError
from mlx_softprompt.hf_config import mlx_lm_config
from mlx_softprompt.models import resolve_model_path
from mlx_softprompt.files import as_if_created, check_safetensors

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
        check_safetensors(f)
    if files:
        return
    pickled = sorted(p.name for p in src.iterdir() if p.suffix in PICKLE_SUFFIXES)
    found = f" (found {', '.join(pickled[:3])})" if pickled else ""
    raise UserError(f"{name}: no model*.safetensors weights{found}; only safetensors are read; "
                    "convert the checkpoint to safetensors first")


def _stage(src: Path, config: dict, stage: Path) -> Path:
    """`src` as symlinks, except config.json as mlx-lm reads it: what mlx-lm converts from."""
    stage.mkdir()
    for p in src.iterdir():
        if p.name != "config.json":
            (stage / p.name).symlink_to(p.resolve())
    (stage / "config.json").write_text(json.dumps(config, indent=2))
    return stage


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception as one non-empty line (mlx-lm lists missing weights on the lines after its message)."""
    text = f"{type(e).__name__}: {' '.join(str(e).split())}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    config = mlx_lm_config(config, hf_path)  # refuses, in one line, what mlx-lm cannot build
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
            except Exception as e:  # mlx-lm cannot build or load this checkpoint: say what it said, in one line
                raise UserError(f"{hf_path}: mlx-lm cannot convert this {config['model_type']} checkpoint: "
                                f"{one_line(e)}")
        _check_target(mlx_path)  # still free (an empty directory is replaced by the rename)
        os.replace(out, mlx_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return mlx_path
