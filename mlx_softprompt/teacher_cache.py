"""The teacher cache: what `teach` computed once, for every training run to read.

Layout (a directory):

    manifest.json            inputs' hash, base and guard fingerprints, settings, the
                             refusal's token ids, shards with sha256, per-phase time/memory
    shard-00000.safetensors  records of prompts [start, end) (all their samples)
    ...

A shard holds, for its n records (flattened, with offsets):

    prompt_ids [sum P] int32, prompt_offsets [n+1] int64
    response_ids [sum T] int32, response_offsets [n+1] int64
    topk_ids [sum T, k] int32, topk_logprobs [sum T, k] float32, tail_mass [sum T] float32
    u [n] float32 (as used: 0/1 under --hard-guard), u_raw [n] float32 (the guard's P(unsafe))
    prompt_index [n] int32, sample_index [n] int32
    metadata: labels, categories (JSON lists)

Row t of a record's top-k arrays is the base's distribution predicting response_ids[t]
(full-vocabulary log-probs; tail_mass = 1 - sum exp(topk), clipped at 0). A record whose
u is exactly 1 has no teacher sample (T = 0): its only target is the refusal.

Shards are written atomically and only appended; the manifest names each with its sha256,
and opening a cache verifies them all, so a truncated or altered file is caught.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional

import numpy as np

from . import checks
from .errors import UserError

FORMAT = "mlx-softprompt-teacher-cache/1"
MANIFEST = "manifest.json"


@dataclass
class Record:
    prompt_ids: list  # chat-templated prompt (context turns + generation prompt), no P
    response_ids: list  # teacher sample y from the base, EOS included when the base stopped
    u: float  # guard P(unsafe); 0/1 under --hard-guard
    topk_ids: np.ndarray  # [T, k] int32: base's top-k ids predicting response_ids[t]
    topk_logprobs: np.ndarray  # [T, k] float32, full-vocabulary-normalised
    tail_mass: np.ndarray  # [T] float32: 1 - sum exp(topk_logprobs), >= 0
    label: str  # data label or ""
    prompt_index: int
    sample_index: int
    category: str = ""


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _flat(lists) -> tuple:
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(x) for x in lists])
    flat = np.array([t for x in lists for t in x], dtype=np.int32)
    return flat, offsets


def write_shard(path, records: List[Record], k: int, u_raw: Optional[List[float]] = None) -> str:
    """Write records as one safetensors file, atomically; returns its sha256."""
    from .files import atomic_write

    p_flat, p_off = _flat([r.prompt_ids for r in records])
    r_flat, r_off = _flat([r.response_ids for r in records])
    T = int(r_off[-1])
    for r in records:
        if r.topk_ids.shape != (len(r.response_ids), k) or r.topk_logprobs.shape != (len(r.response_ids), k) \
                or r.tail_mass.shape != (len(r.response_ids),):
            raise ValueError(f"record {r.prompt_index}/{r.sample_index}: top-k arrays do not match its response")
    cat = (lambda xs, shape, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(shape, dt))
    tensors = {
        "prompt_ids": p_flat, "prompt_offsets": p_off,
        "response_ids": r_flat, "response_offsets": r_off,
        "topk_ids": cat([r.topk_ids for r in records], (0, k), np.int32).reshape(T, k),
        "topk_logprobs": cat([r.topk_logprobs for r in records], (0, k), np.float32).reshape(T, k),
        "tail_mass": cat([r.tail_mass for r in records], (0,), np.float32).reshape(T),
        "u": np.array([r.u for r in records], dtype=np.float32),
        "u_raw": np.array(u_raw if u_raw is not None else [r.u for r in records], dtype=np.float32),
        "prompt_index": np.array([r.prompt_index for r in records], dtype=np.int32),
        "sample_index": np.array([r.sample_index for r in records], dtype=np.int32),
    }
    meta = {
        "format": FORMAT,
        "labels": json.dumps([r.label for r in records]),
        "categories": json.dumps([r.category for r in records]),
    }
    data = safetensors_bytes(tensors, meta)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    return sha256_file(path)


_ST_DTYPES = {np.dtype(np.int32): "I32", np.dtype(np.int64): "I64", np.dtype(np.float32): "F32"}


def safetensors_bytes(tensors: dict, metadata: dict) -> bytes:
    """A safetensors file whose bytes depend only on its content: tensors and metadata keys in sorted
    order (the safetensors library writes metadata in hash-map order, different from run to run)."""
    header, blobs, offset = {"__metadata__": dict(sorted(metadata.items()))}, [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        raw = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _ST_DTYPES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * (-len(h) % 8)
    return len(h).to_bytes(8, "little") + h + b"".join(blobs)


def read_shard(path, expect_sha: Optional[str] = None) -> List[Record]:
    """Records of one shard; a damaged shard is a UserError naming it."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: teacher-cache shard is missing")
    if expect_sha is not None and sha256_file(path) != expect_sha:
        raise UserError(f"{path}: teacher-cache shard is corrupt or truncated (sha256 differs from the manifest); "
                        "run teach again with a new --out")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            t = {name: f.get_tensor(name) for name in f.keys()}
        labels = json.loads(meta.get("labels", "[]"))
        cats = json.loads(meta.get("categories", "[]"))
        p_flat, p_off, r_flat, r_off = t["prompt_ids"], t["prompt_offsets"], t["response_ids"], t["response_offsets"]
        out = []
        for i in range(len(t["u"])):
            a, b = int(r_off[i]), int(r_off[i + 1])
            out.append(Record(
                prompt_ids=p_flat[int(p_off[i]):int(p_off[i + 1])].tolist(),
                response_ids=r_flat[a:b].tolist(),
                u=float(t["u"][i]),
                topk_ids=t["topk_ids"][a:b], topk_logprobs=t["topk_logprobs"][a:b], tail_mass=t["tail_mass"][a:b],
                label=labels[i] if i < len(labels) else "",
                prompt_index=int(t["prompt_index"][i]), sample_index=int(t["sample_index"][i]),
                category=cats[i] if i < len(cats) else "",
            ))
        return out
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path}: teacher-cache shard is unreadable ({type(e).__name__}: {e})".splitlines()[0])


def read_manifest(root) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise UserError(f"{root}: not a teacher cache (no {MANIFEST})")
    m = checks.read_json(path, "teacher-cache manifest")
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise UserError(f"{path}: not a teacher-cache manifest (format={m.get('format') if isinstance(m, dict) else None!r})")
    check_manifest(m, path)
    tpath = Path(root) / TIMINGS
    if tpath.is_file():  # informative only: a damaged timings file is ignored
        try:
            t = json.loads(tpath.read_text(encoding="utf-8"))
            m.update({k: t[k] for k in VOLATILE if isinstance(t, dict) and isinstance(t.get(k), dict)})
        except (ValueError, UnicodeDecodeError, RecursionError):
            pass
    return m


def check_manifest(m: dict, path) -> None:
    """Every field the readers use, of the right type: a hand-edited or damaged manifest is one line."""
    f = checks.field
    for key in ("settings", "inputs", "guard", "base"):
        f(m, key, dict, str(path))
    f(m, "complete", bool, str(path), optional=True)
    f(m, "num_shards", int, str(path), optional=True)
    for key in ("verdicts", "partials", "phases"):
        f(m, key, dict, str(path), optional=True)
    f(m["inputs"], "data_hash", str, f"{path}: inputs")
    f(m["guard"], "spec_digest", str, f"{path}: guard", optional=True)
    fp = f(m["base"], "fingerprint", dict, f"{path}: base", optional=True)
    if fp is not None:
        for key, kind in (("architecture", str), ("hidden_size", int), ("vocab_size", int), ("embedding_hash", str)):
            f(fp, key, kind, f"{path}: base.fingerprint")
    ids = f(m, "refusal_ids", list, str(path), optional=True, default=[])
    for i, t in enumerate(ids):
        checks.number(checks.of_type(t, int, f"{path}: field 'refusal_ids'[{i}]"), f"{path}: refusal_ids[{i}]",
                      lo=0, integer=True)
    for i, s in enumerate(f(m, "shards", list, str(path), optional=True, default=[])):
        where = f"{path}: shards[{i}]"
        f(s, "index", int, where)
        name = f(s, "file", str, where)
        if Path(name).name != name or name.startswith("."):
            raise UserError(f"{where}: field 'file' must be a file name in the cache, got {name!r}")
        f(s, "sha256", str, where)
        checks.number(f(s, "records", int, where), f"{where}: field 'records'", lo=0)
        for key in ("bytes", "tokens", "flagged"):
            checks.number(f(s, key, int, where, optional=True, default=0), f"{where}: field {key!r}", lo=0)
        f(s, "u_sum", float, where, optional=True)
        pr = f(s, "prompts", list, where, optional=True, default=[0, 0])
        if len(pr) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in pr):
            raise UserError(f"{where}: field 'prompts' must be [start, end]")
    for key in ("verdicts", "partials"):
        for k, v in (m.get(key) or {}).items():
            if key == "partials":
                name = f(v, "file", str, f"{path}: partials[{k!r}]")
                f(v, "sha256", str, f"{path}: partials[{k!r}]")
                if Path(name).name != name or name.startswith("."):
                    raise UserError(f"{path}: partials[{k!r}]: field 'file' must be a file name in the cache")
            elif not isinstance(v, list):
                raise UserError(f"{path}: verdicts[{k!r}]: expected a list")


TIMINGS = "timings.json"
VOLATILE = ("phases", "summary")  # time and memory of the runs: kept beside the manifest, not in it


def write_manifest(root, manifest: dict) -> None:
    """The manifest (its bytes depend only on the inputs and settings) and, apart, the runs' timings."""
    from .files import atomic_write

    stable = {k: v for k, v in manifest.items() if k not in VOLATILE}
    volatile = {k: manifest[k] for k in VOLATILE if k in manifest}
    data = json.dumps(stable, indent=1, sort_keys=False).encode("utf-8")
    if volatile:
        extra = json.dumps(volatile, indent=1).encode("utf-8")
        atomic_write(Path(root) / TIMINGS, lambda tmp: Path(tmp).write_bytes(extra))
    atomic_write(Path(root) / MANIFEST, lambda tmp: Path(tmp).write_bytes(data))


class TeacherCache:
    """A verified teacher cache; iterates its records shard by shard, in a fixed order."""

    def __init__(self, root, manifest: dict):
        self.root = Path(root)
        self.manifest = manifest
        self.refusal_ids: List[int] = [int(t) for t in manifest.get("refusal_ids", [])]

    @property
    def settings(self) -> dict:
        return self.manifest.get("settings", {})

    def __len__(self) -> int:
        return sum(int(s["records"]) for s in self.manifest["shards"])

    def __iter__(self) -> Iterator[Record]:
        for s in sorted(self.manifest["shards"], key=lambda s: s["index"]):
            yield from read_shard(self.root / s["file"], s["sha256"])

    def records(self) -> List[Record]:
        return list(self)


def open_cache(path, allow_incomplete: bool = False) -> TeacherCache:
    """Open a teacher cache, checking the manifest and every shard's sha256."""
    root = Path(path)
    m = read_manifest(root)
    if not m.get("complete") and not allow_incomplete:
        done = len(m.get("shards", []))
        raise UserError(f"{root}: teacher cache is incomplete ({done}/{m.get('num_shards', '?')} shards); "
                        "run the same `mlx-softprompt teach` command again to finish it")
    for s in m.get("shards", []):
        f = root / s["file"]
        if not f.is_file():
            raise UserError(f"{f}: teacher-cache shard is missing")
        if f.stat().st_size != s.get("bytes", f.stat().st_size) or sha256_file(f) != s["sha256"]:
            raise UserError(f"{f}: teacher-cache shard is corrupt or truncated (sha256 differs from the manifest); "
                            "run teach again with a new --out")
    return TeacherCache(root, m)
