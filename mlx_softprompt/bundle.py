"""The bundle: what ships to a device, a directory that `chat` and `serve` open directly.

    DIR/bundle.json               parts and their sha256, base fingerprint, method metadata
    DIR/README.md                 the model card (model_card.py: YAML metadata, a warning, the eval table)
    DIR/model/                    the MLX base as bundled (optionally quantized by mlx-lm)
    DIR/prompt.safetensors        the method file (any method), byte for byte
    DIR/prompt_cache.safetensors  for a method that does not depend on the conversation (soft
                                  prompt, prefix tuning): its key/value cache (mlx-lm's
                                  prompt-cache format), computed on the base as bundled, so it
                                  costs no prefill; absent for LoRA and steering, which are
                                  bound to the model when the bundle is opened
    DIR/eval_report.json          the eval report, when one was given

The directory is built next to its target and renamed into place, so a reader
never sees half a bundle. Opening checks that the parts belong together: every
hash, the bundled base against its recorded fingerprint, the method file
against the base (methods.load), and the cache's layer count, types and offset.
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

from . import __version__, files, methods, models
from . import checks
from .checks import read_json_object
from .errors import UserError
from .model_card import model_card

FORMAT = "mlx-softprompt-bundle/1"
MANIFEST = "bundle.json"
MODEL_DIR = "model"
PROMPT = "prompt.safetensors"
CACHE = "prompt_cache.safetensors"
CARD = "README.md"
REPORT = "eval_report.json"
# method-file metadata worth repeating in the manifest and the model card
PROMPT_KEYS = ("method", "method_options", "num_virtual_tokens", "placement", "objective", "guard", "refusal",
               "data_hash", "library_version")


@dataclass
class BundleConfig:
    base: str
    prompt_file: Path  # any method file
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
    model, tok, config = models.load(cfg.base, lazy=True)
    file = methods.load(cfg.prompt_file, model, config).file  # any method, checked against the base
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
    files.as_if_created(tmp, directory=True)
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

        # the method's cache on the base exactly as bundled: reload what was just written
        bundled, _, bconfig = models.load(str(mdir))
        fp = models.fingerprint(bundled, bconfig)
        loaded = methods.load(tmp / PROMPT, bundled, bconfig)
        prompt_sha = sha256(tmp / PROMPT)
        cache = loaded.method.prefix_cache(bundled, loaded.params)
        if cache is not None:
            cache = compact(cache)
            n = _cache_info(cache)["offset"]
            log(f"computing the key/value cache of {n} prefix positions ({loaded.name})")
            save_prompt_cache(str(tmp / CACHE), cache, metadata={
                "format": FORMAT, "prompt_sha256": prompt_sha, "base_embedding_hash": fp["embedding_hash"],
                "num_virtual_tokens": str(n),
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
            "cache": _cache_info(cache) if cache is not None else None,
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
    for key in ("files", "base"):
        if not isinstance(manifest.get(key), dict):
            raise UserError(f"{mpath}: field {key!r} missing or not an object")
    if manifest.get("cache") is not None and not isinstance(manifest["cache"], dict):
        raise UserError(f"{mpath}: field 'cache' is not an object")
    fp = checks.field(manifest["base"], "fingerprint", dict, f"{mpath}: base")
    for key, kind in (("architecture", str), ("hidden_size", int), ("vocab_size", int), ("embedding_hash", str)):
        checks.field(fp, key, kind, f"{mpath}: base.fingerprint")
    checks.field(manifest, "name", str, str(mpath), optional=True)
    for rel, info in manifest["files"].items():
        where = f"{mpath}: files[{rel!r}]"
        checks.field(info, "sha256", str, where)
        checks.number(checks.field(info, "bytes", int, where), f"{where}: bytes", lo=0)
        parts = Path(rel).parts
        if Path(rel).is_absolute() or ".." in parts or not parts:
            raise UserError(f"{where}: not a path inside the bundle")
    return manifest


def verify_files(path, manifest: dict) -> None:
    """Every listed part is present with its recorded size and sha256."""
    path = Path(path)
    for rel, info in manifest["files"].items():
        p = path / rel
        if not p.is_file():
            raise UserError(f"{p}: bundle part missing")
        size, digest = info["bytes"], info["sha256"]
        if p.stat().st_size != size or sha256(p) != digest:
            raise UserError(f"{p}: bundle part does not match its recorded sha256 (modified or damaged)")
    needed = (f"{MODEL_DIR}/config.json", PROMPT) + ((CACHE,) if manifest.get("cache") is not None else ())
    for rel in needed:
        if rel not in manifest["files"]:
            raise UserError(f"{path / MANIFEST}: part {rel!r} is not listed")
    # What mlx-lm would also read: any file in model/ and any safetensors file must be listed,
    # or a file slipped into the bundle (an extra weights shard) would change the model unseen.
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        if not p.is_file() or rel in manifest["files"] or rel in (MANIFEST, CARD) or p.name == ".DS_Store":
            continue
        if rel.startswith(MODEL_DIR + "/") or p.suffix == ".safetensors":
            raise UserError(f"{p}: not listed in {MANIFEST} (a file added to the bundle); remove it")


def is_bundle(path) -> bool:
    """A bundle directory (or what is left of one: its parts without a model's config.json)."""
    path = Path(path)
    return path.is_dir() and ((path / MANIFEST).exists()
                              or ((path / MODEL_DIR).is_dir() and not (path / "config.json").exists()))


@dataclass
class Opened:
    """A bundle's parts, checked: the base, its method file (methods.Loaded) and the method's cache."""

    model: object
    tokenizer: object
    config: dict
    name: str
    path: Optional[Path]  # the method file
    loaded: Optional[object]  # methods.Loaded
    cache: Optional[list]  # the bundled prefix cache (None: computed by the method, or none)


def read_bundle(path, prompt_file_override: Optional[Path] = None) -> Opened:
    """Open a bundle after checking that its parts belong together (system.open_system's reader).

    With `prompt_file_override` the bundled base runs with another method file
    (checked against the base); its cache, if any, is then computed by the System.
    """
    from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache

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
        loaded = methods.load(prompt_file_override, model, config)
        return Opened(model, tok, config, name, Path(prompt_file_override), loaded, None)

    loaded = methods.load(path / PROMPT, model, config)
    if manifest.get("cache") is None:
        if loaded.method.prefix_length(loaded.params) > 0:
            raise UserError(f"{path / MANIFEST}: a {loaded.name} bundle without its key/value cache")
        return Opened(model, tok, config, name, path / PROMPT, loaded, None)

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
    n = loaded.method.prefix_length(loaded.params)
    offsets = {int(getattr(c, "offset", -1)) for c in cache}
    if offsets != {n}:
        raise UserError(f"{cpath}: cache offset {sorted(offsets)} != the method's {n} prefix positions")
    return Opened(model, tok, config, name, path / PROMPT, loaded, cache)


def inspect_bundle(path) -> dict:
    """The manifest (what `mlx-softprompt inspect DIR` prints), after checking the parts' hashes."""
    manifest = read_manifest(path)
    verify_files(path, manifest)
    return manifest
