"""The prompt file: the one reader/writer of trained soft prompts (and other method files).

A ``*.safetensors`` file with tensor ``soft_prompt`` [n, d] (other methods store
their own tensors, e.g. LoRA weights or a steering vector), a tensor
``fingerprint_sketch`` and string metadata:

  format            "mlx-softprompt/1"
  method            softprompt | lora | steer-opt | steer-dom
  num_virtual_tokens, placement ("prepend-before-bos", as HF PEFT prompt tuning)
  base_architecture, base_hidden_size, base_vocab_size, base_embedding_hash
  objective, guard, refusal, data_hash, library_version, plus any extra string keys

Writes are atomic (temporary file, then rename). Loading checks the file is
whole and that it belongs to the base model it is applied to.
"""

import json
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import mlx.core as mx
import numpy as np

from . import __version__
from .errors import UserError
from .models import fingerprint, fingerprints_match, short

FORMAT = "mlx-softprompt/1"
PLACEMENT = "prepend-before-bos"
SKETCH_KEY = "fingerprint_sketch"


@dataclass
class PromptFile:
    tensors: Dict[str, mx.array]
    metadata: Dict[str, str] = field(default_factory=dict)
    path: Optional[Path] = None

    @property
    def method(self) -> str:
        return self.metadata.get("method", "softprompt")

    @property
    def prompt(self) -> Optional[mx.array]:
        return self.tensors.get("soft_prompt")

    def base_fingerprint(self) -> dict:
        m = self.metadata
        return {
            "architecture": m.get("base_architecture", "?"),
            "hidden_size": int(m.get("base_hidden_size", -1)),
            "vocab_size": int(m.get("base_vocab_size", -1)),
            "embedding_hash": m.get("base_embedding_hash", "?"),
            "sketch": np.array(self.tensors[SKETCH_KEY]) if SKETCH_KEY in self.tensors else np.zeros(0),
        }

    def check_base(self, model, config) -> None:
        """Refuse to apply this file to a base it was not trained for."""
        ours = self.base_fingerprint()
        theirs = fingerprint(model, config)
        if not fingerprints_match(ours, theirs):
            raise UserError(
                f"{self.path or 'prompt file'}: trained for base {short(ours)}, "
                f"but the model given is {short(theirs)}"
            )


def umask() -> int:
    """The process's umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_if_created(path, directory: bool = False) -> None:
    """Give a mkstemp/mkdtemp result (0600/0700) the mode open()/mkdir() would have given it:
    outputs are meant to be shared (0644/0755 under umask 022)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def atomic_write_bytes(path, write_fn) -> None:
    """Call write_fn(tmp_path) then rename over `path`: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    as_if_created(tmp)
    try:
        write_fn(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save(path, tensors: Dict[str, mx.array], model, config, **metadata) -> Path:
    """Write a method file for `model`: tensors + fingerprint + string metadata."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"{path}: prompt files end in .safetensors")
    fp = fingerprint(model, config)
    meta = {
        "format": FORMAT,
        "method": "softprompt",
        "placement": PLACEMENT,
        "library_version": __version__,
        "base_architecture": fp["architecture"],
        "base_hidden_size": str(fp["hidden_size"]),
        "base_vocab_size": str(fp["vocab_size"]),
        "base_embedding_hash": fp["embedding_hash"],
    }
    if "soft_prompt" in tensors:
        meta["num_virtual_tokens"] = str(tensors["soft_prompt"].shape[0])
    for k, v in metadata.items():
        if v is not None:
            meta[k] = v if isinstance(v, str) else json.dumps(v)
    arrays = dict(tensors)
    arrays[SKETCH_KEY] = mx.array(fp["sketch"])
    mx.eval(arrays)
    atomic_write_bytes(path, lambda tmp: mx.save_safetensors(tmp, arrays, metadata=meta))
    return path


def _check_header(path: Path) -> None:
    """Validate the safetensors framing ourselves so a damaged file gives one clear line."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{path}: not a safetensors file (truncated: {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise UserError(f"{path}: truncated or corrupt safetensors header")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{path}: corrupt safetensors header (not JSON)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            raise UserError(f"{path}: corrupt safetensors header (tensor {name!r})")
    if 8 + n + end != size:
        raise UserError(f"{path}: truncated or corrupt ({size} bytes, header expects {8 + n + end})")


def load(path) -> PromptFile:
    """Read a method file; any damage or a foreign file is a UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such prompt file")
    _check_header(path)
    try:
        tensors, meta = mx.load(str(path), return_metadata=True)
    except Exception as e:
        raise UserError(f"{path}: cannot read safetensors ({e})".splitlines()[0])
    if meta.get("format") != FORMAT:
        raise UserError(f"{path}: not an mlx-softprompt file (format={meta.get('format')!r}); "
                        "for a PEFT adapter use `mlx-softprompt import-peft`")
    if meta.get("method", "softprompt") == "softprompt":
        P = tensors.get("soft_prompt")
        if P is None or P.ndim != 2:
            raise UserError(f"{path}: missing or malformed tensor 'soft_prompt'")
        if int(meta.get("base_hidden_size", P.shape[1])) != P.shape[1]:
            raise UserError(f"{path}: soft_prompt width {P.shape[1]} != base_hidden_size {meta['base_hidden_size']}")
        if not bool(mx.all(mx.isfinite(P)).item()):
            raise UserError(f"{path}: soft_prompt holds NaN or infinite values")
    return PromptFile(tensors=tensors, metadata=dict(meta), path=path)


def inspect(path) -> dict:
    """Metadata plus tensor shapes, JSON-ready."""
    pf = load(path)
    out = dict(pf.metadata)
    out["tensors"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("mlx.core.", "")}
                      for k, v in pf.tensors.items() if k != SKETCH_KEY}
    return out
