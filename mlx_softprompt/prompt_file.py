"""The prompt file: the one reader/writer of trained soft prompts (and other method files).

A ``*.safetensors`` file with tensor ``soft_prompt`` [n, d] (other methods store
their own tensors, e.g. prefix keys/values, LoRA weights or a steering vector), a
tensor ``fingerprint_sketch`` and string metadata:

  format            "mlx-softprompt/1"
  method            a name of methods.METHODS (softprompt, prefix, lora, steer-opt, steer-dom)
  method_options    the method's options (JSON), read back by methods.load
  num_virtual_tokens, placement ("prepend-before-bos", as HF PEFT prompt tuning)
  base_architecture, base_hidden_size, base_vocab_size, base_embedding_hash
  objective, guard, refusal, data_hash, library_version, plus any extra string keys

Writes are atomic (temporary file, then rename). Loading checks the file is
whole and that it belongs to the base model it is applied to.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import mlx.core as mx
import numpy as np

from . import __version__
from . import checks
from .errors import UserError
from .files import as_if_created, atomic_write, check_safetensors, umask  # noqa: F401 (as_if_created, umask: re-exported)
from .models import decode_probes, encode_probes, fingerprint, fingerprint_mismatch, short

FORMAT = "mlx-softprompt/1"
PLACEMENT = "prepend-before-bos"
SKETCH_KEY = "fingerprint_sketch"
PROBES_KEY = "base_probes"  # the base's probes (models.fingerprint), one metadata string
CHECKSUM_KEY = "tensors_sha256"  # sha256 of every tensor (name, dtype, shape, bytes), verified on load
# metadata every save writes afresh for the base at hand (an import or a copy must not carry them over)
OWN_KEYS = ("format", "placement", "library_version", "num_virtual_tokens", "base_architecture",
            "base_hidden_size", "base_vocab_size", "base_embedding_hash", PROBES_KEY, CHECKSUM_KEY)


def tensors_sha256(tensors: Dict[str, mx.array]) -> str:
    """One digest of all tensors, independent of how the file lays them out."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        a = tensors[name]
        h.update(f"{name}|{str(a.dtype).replace('mlx.core.', '')}|{list(a.shape)}|".encode())
        h.update(np.array(a.reshape(-1).view(mx.uint8) if a.size else mx.zeros((0,), mx.uint8)).tobytes())
    return h.hexdigest()


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
        m, where = self.metadata, str(self.path or "prompt file")
        probes = m.get(PROBES_KEY)
        return {
            "architecture": m.get("base_architecture", "?"),
            "hidden_size": checks.int_string(m, "base_hidden_size", where, optional=True) or -1,
            "vocab_size": checks.int_string(m, "base_vocab_size", where, optional=True) or -1,
            "embedding_hash": m.get("base_embedding_hash", "?"),
            "sketch": np.array(self.tensors[SKETCH_KEY]) if SKETCH_KEY in self.tensors else np.zeros(0),
            "probes": decode_probes(probes, where) if probes is not None else None,
        }

    def check_base(self, model, config) -> None:
        """Refuse to apply this file to a base it was not trained for (a quantized copy of it is fine)."""
        ours = self.base_fingerprint()
        theirs = fingerprint(model, config)
        why = fingerprint_mismatch(ours, theirs)
        if why:
            raise UserError(f"{self.path or 'prompt file'}: trained for base {short(ours)}, but the model given "
                            f"is {short(theirs)}, not that base or a quantized copy: {why}")


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
        PROBES_KEY: encode_probes(fp["probes"]),
    }
    if "soft_prompt" in tensors:
        meta["num_virtual_tokens"] = str(tensors["soft_prompt"].shape[0])
    for k, v in metadata.items():
        if v is not None and k not in OWN_KEYS:
            meta[k] = v if isinstance(v, str) else json.dumps(v)
    arrays = dict(tensors)
    arrays[SKETCH_KEY] = mx.array(fp["sketch"])
    mx.eval(arrays)
    meta[CHECKSUM_KEY] = tensors_sha256(arrays)
    atomic_write(path, lambda tmp: mx.save_safetensors(tmp, arrays, metadata=meta))
    return path


def load(path) -> PromptFile:
    """Read a method file; any damage or a foreign file is a UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: " + ("is a directory, expected a prompt file (.safetensors)" if path.is_dir()
                                       else "no such prompt file"))
    check_safetensors(path)
    try:
        tensors, meta = mx.load(str(path), return_metadata=True)
    except Exception as e:
        raise UserError(f"{path}: cannot read safetensors ({e})".splitlines()[0])
    if meta.get("format") != FORMAT:
        raise UserError(f"{path}: not an mlx-softprompt file (format={meta.get('format')!r}); "
                        "for a PEFT adapter use `mlx-softprompt import-peft`")
    if CHECKSUM_KEY in meta and tensors_sha256(tensors) != meta[CHECKSUM_KEY]:
        raise UserError(f"{path}: tensor data does not match its checksum (the file was modified or damaged)")
    for key in ("base_hidden_size", "base_vocab_size", "num_virtual_tokens"):
        checks.int_string(meta, key, str(path), lo=1, optional=True)
    if meta.get("method", "softprompt") == "softprompt":
        P = tensors.get("soft_prompt")
        if P is None or P.ndim != 2:
            raise UserError(f"{path}: missing or malformed tensor 'soft_prompt'")
        if "num_virtual_tokens" in meta and int(meta["num_virtual_tokens"]) != P.shape[0]:
            raise UserError(f"{path}: soft_prompt has {P.shape[0]} rows != num_virtual_tokens "
                            f"{meta['num_virtual_tokens']}")
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
