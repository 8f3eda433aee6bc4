"""The bundle: what ships to a device, a directory that `chat` and `serve` open directly.

    DIR/bundle.json               parts and their sha256, base fingerprint, prompt metadata
    DIR/README.md                 the model card (model_card.py: YAML metadata, a warning, the eval table)
    DIR/model/                    the MLX base as bundled (optionally quantized by mlx-lm)
    DIR/prompt.safetensors        the prompt file, byte for byte
    DIR/prompt_cache.safetensors  P's key/value cache (mlx-lm's prompt-cache format),
                                  computed on the base as bundled, so P costs no prefill
    DIR/eval_report.json          the eval report, when one was given

The directory is built next to its target and renamed into place, so a reader
never sees half a bundle. Opening checks that the parts belong together: every
hash, the bundled base against its recorded fingerprint, the prompt file
against the base, and the cache's layer count, types and offset (== n).
"""

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx

from . import __version__, models, prompt_file as pf
from .errors import UserError, read_json_object
from .model_card import model_card

FORMAT = "mlx-softprompt-bundle/1"
MANIFEST = "bundle.json"
MODEL_DIR = "model"
PROMPT = "prompt.safetensors"
CACHE = "prompt_cache.safetensors"
CARD = "README.md"
REPORT = "eval_report.json"
# prompt-file metadata worth repeating in the manifest and the model card
PROMPT_KEYS = ("method", "num_virtual_tokens", "placement", "objective", "guard", "refusal",
               "data_hash", "library_version")


@dataclass
class BundleConfig:
    base: str
    prompt_file: Path
    out: Path
    quantize: bool = False
    q_bits: int = 4
    q_group_size: int = 64
    eval_report: Optional[Path] = None


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _public_fingerprint(fp: dict) -> dict:
    return {k: fp[k] for k in ("architecture", "hidden_size", "vocab_size", "embedding_hash")}


def compact(cache) -> list:
    """Drop the unused tail of KVCache buffers (mlx-lm allocates 256 positions at a time)
    so the file holds n positions, not 256; generation grows the buffer again as needed."""
    from mlx_lm.models.cache import KVCache

    for c in cache:
        if type(c) is KVCache and c.keys is not None and c.keys.shape[2] > c.offset:
            c.keys, c.values = c.keys[..., :c.offset, :], c.values[..., :c.offset, :]
    mx.eval([x for c in cache for x in (getattr(c, "keys", None), getattr(c, "values", None))
             if isinstance(x, mx.array)])
    return cache


def _cache_info(cache) -> dict:
    return {"layers": len(cache), "types": [type(c).__name__ for c in cache],
            "offset": int(getattr(cache[0], "offset", -1))}


def make_bundle(cfg: BundleConfig, log=print) -> Path:
    """Write the bundle directory for `cfg` (atomically) and return its path."""
    from mlx_lm.models.cache import save_prompt_cache
    from mlx_lm.utils import quantize_model, save_config, save_model

    out = Path(cfg.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: --out already exists and is not empty; choose a new path or delete it first")
    if cfg.quantize and cfg.q_bits not in (2, 3, 4, 5, 6, 8):
        raise UserError(f"--q-bits {cfg.q_bits}: expected one of 2, 3, 4, 5, 6, 8")
    if cfg.quantize and cfg.q_group_size not in (32, 64, 128):
        raise UserError(f"--q-group-size {cfg.q_group_size}: expected 32, 64 or 128")
    report = read_json_object(cfg.eval_report) if cfg.eval_report else None
    file = pf.load(cfg.prompt_file)
    if file.method != "softprompt":
        raise UserError(f"{cfg.prompt_file}: a {file.method!r} file; only soft prompts are bundled")

    model, tok, config = models.load(cfg.base, lazy=True)
    file.check_base(model, config)
    quantization = None
    if cfg.quantize:
        if "quantization" in config:
            raise UserError(f"{cfg.base}: already quantized; bundle it without -q")
        log(f"quantizing to {cfg.q_bits} bits (group size {cfg.q_group_size})")
        model, config = quantize_model(model, config, cfg.q_group_size, cfg.q_bits)
        quantization = {"bits": cfg.q_bits, "group_size": cfg.q_group_size}
    elif "quantization" in config:
        q = config["quantization"]
        quantization = {"bits": q.get("bits"), "group_size": q.get("group_size")}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    pf.as_if_created(tmp, directory=True)
    try:
        mdir = tmp / MODEL_DIR
        save_model(mdir, model, donate_model=True)
        save_config(dict(config), mdir / "config.json")
        tok.save_pretrained(str(mdir))
        src = models.resolve_model_path(cfg.base)
        if (src / "generation_config.json").is_file():
            shutil.copy(src / "generation_config.json", mdir)
        del model
        shutil.copyfile(cfg.prompt_file, tmp / PROMPT)
        if report is not None:
            shutil.copyfile(cfg.eval_report, tmp / REPORT)

        # P's cache on the base exactly as bundled: reload what was just written
        bundled, _, bconfig = models.load(str(mdir))
        fp = models.fingerprint(bundled, bconfig)
        log(f"computing the key/value cache of {file.prompt.shape[0]} virtual tokens")
        cache = compact(models.prefix_cache(bundled, file.prompt))
        prompt_sha = sha256(tmp / PROMPT)
        save_prompt_cache(str(tmp / CACHE), cache, metadata={
            "format": FORMAT, "prompt_sha256": prompt_sha, "base_embedding_hash": fp["embedding_hash"],
            "num_virtual_tokens": str(file.prompt.shape[0]),
        })

        parts = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {
            "format": FORMAT,
            "name": out.name,
            "library_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "base": {"source": str(cfg.base), "quantization": quantization,
                     "fingerprint": _public_fingerprint(fp)},
            "prompt": {k: file.metadata[k] for k in PROMPT_KEYS if k in file.metadata},
            "cache": _cache_info(cache),
            "eval_report": REPORT if report is not None else None,
            "files": {p.relative_to(tmp).as_posix(): {"sha256": sha256(p), "bytes": p.stat().st_size}
                      for p in parts},
        }
        model_card(manifest, report, REPORT, prompt_sha, PROMPT).save(tmp / CARD)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        for p in [tmp / CARD, tmp / MANIFEST]:
            with open(p, "rb+") as f:
                os.fsync(f.fileno())
        if out.exists():
            out.rmdir()  # empty (checked above); rename needs the name free
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_manifest(path) -> dict:
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise UserError(f"{path}: not a bundle (no {MANIFEST})")
    manifest = read_json_object(mpath)
    if manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise UserError(f"{mpath}: not an mlx-softprompt bundle manifest (format={got!r})")
    for key in ("files", "base", "cache"):
        if not isinstance(manifest.get(key), dict):
            raise UserError(f"{mpath}: field {key!r} missing or not an object")
    return manifest


def verify_files(path, manifest: dict) -> None:
    """Every listed part is present with its recorded size and sha256."""
    path = Path(path)
    for rel, info in manifest["files"].items():
        p = path / rel
        if not p.is_file():
            raise UserError(f"{p}: bundle part missing")
        try:
            size, digest = int(info["bytes"]), str(info["sha256"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path / MANIFEST}: malformed entry for part {rel!r}")
        if p.stat().st_size != size or sha256(p) != digest:
            raise UserError(f"{p}: bundle part does not match its recorded sha256 (modified or damaged)")
    for rel in (f"{MODEL_DIR}/config.json", PROMPT, CACHE):
        if rel not in manifest["files"]:
            raise UserError(f"{path / MANIFEST}: part {rel!r} is not listed")


def open_bundle(path, prompt_file_override: Optional[Path] = None):
    """A session.System from a bundle, after checking that its parts belong together.

    With `prompt_file_override` the bundled base runs with another soft prompt
    (checked against the base); its cache is then computed here, once.
    """
    from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache

    from .session import System

    path = Path(path)
    manifest = read_manifest(path)
    verify_files(path, manifest)
    model, tok, config = models.load(str(path / MODEL_DIR))
    want = manifest["base"].get("fingerprint", {})
    fp = models.fingerprint(model, config)
    if _public_fingerprint(fp) != want:
        raise UserError(f"{path / MODEL_DIR}: base is {models.short(fp)}, "
                        f"but {MANIFEST} records {want.get('embedding_hash', '?')}")
    name = manifest.get("name") or path.name

    if prompt_file_override is not None:
        file = pf.load(prompt_file_override)
        if file.method != "softprompt":
            raise UserError(f"{prompt_file_override}: a {file.method!r} file, not a soft prompt")
        file.check_base(model, config)
        return System(model, tok, config, file.prompt, file, models.prefix_cache(model, file.prompt), name=name)

    file = pf.load(path / PROMPT)
    if file.method != "softprompt":
        raise UserError(f"{path / PROMPT}: a {file.method!r} file, not a soft prompt")
    file.check_base(model, config)
    n = int(file.prompt.shape[0])

    cpath = path / CACHE
    try:
        cache, meta = load_prompt_cache(str(cpath), return_metadata=True)
    except Exception as e:
        raise UserError(f"{cpath}: not a readable prompt cache ({type(e).__name__}: {e})".splitlines()[0])
    mx.eval([c.state for c in cache])  # read now: lazy loads are tied to this thread's stream
    if meta.get("prompt_sha256") != manifest["files"][PROMPT]["sha256"]:
        raise UserError(f"{cpath}: computed for another prompt file than {PROMPT}")
    if meta.get("base_embedding_hash") != fp["embedding_hash"]:
        raise UserError(f"{cpath}: computed on another base than {MODEL_DIR}/")
    expected = [type(c).__name__ for c in make_prompt_cache(model)]
    got = [type(c).__name__ for c in cache]
    if got != expected:
        raise UserError(f"{cpath}: {len(got)} layers {sorted(set(got))}, "
                        f"the base needs {len(expected)} {sorted(set(expected))}")
    offsets = {int(getattr(c, "offset", -1)) for c in cache}
    if offsets != {n}:
        raise UserError(f"{cpath}: cache offset {sorted(offsets)} != the prompt's {n} virtual tokens")
    return System(model, tok, config, file.prompt, file, cache, name=name)


def inspect_bundle(path) -> dict:
    """The manifest (what `mlx-softprompt inspect DIR` prints), after checking the parts' hashes."""
    manifest = read_manifest(path)
    verify_files(path, manifest)
    return manifest
