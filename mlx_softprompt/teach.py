"""The `teach` stage: guard verdicts + base-model teacher samples and top-k log-probs -> teacher cache.

One model is in memory at a time. Input moderation (default):

  1. guard verdicts u(x) for every prompt (guard loaded, then released);
  2. the base is loaded; per shard: K teacher samples y ~ p_f(.|x) per prompt (batched,
     mlx-lm's BatchGenerator with one sampler per sample), with the base's top-k
     log-probs along each sample read off the same decoding steps; the shard is written.
     A base whose log-probs come in less than float32 (bfloat16 weights) gets them
     recomputed in float32 by batched forwards over (prompt, sample) instead.

Output moderation: samples and log-probs first (written as partial shards), then the
guard scores each (prompt, sample) pair and the final shards are written.

Resumable: a shard (a fixed range of prompts) is the unit of work, its seeds depend only
on (seed, prompt index, sample index), and its batches only on its own content, so a run
killed at any moment and started again with the same arguments skips finished shards and
ends with the same cache as an uninterrupted run.
"""

from __future__ import annotations

import gc
import hashlib
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import mlx.core as mx
import numpy as np

from . import __version__, data, guards
from . import teacher_cache as tc
from . import checks
from .errors import UserError
from .progress import Bar

PARTIAL = "partial-{:05d}.safetensors"
# Shards are written one by one (a stopped run resumes at the next), but the models run over
# a group of shards of up to this many rows (prompts x samples) at a time, sorted by length: a
# shard's prompts batched alone pad short prompts to long ones (the demo's wrapped prompts run
# to 900 tokens beside 30-token ones).
GROUP_PROMPTS = 1024


@dataclass
class TeachConfig:
    base: str
    guard: str
    data: str
    out: str
    guard_model: Optional[str] = None
    mode: str = "input"
    samples_per_prompt: int = 1
    max_tokens: int = 256
    top_k: int = 64
    refusal: str = guards.DEFAULT_REFUSAL
    hard_guard: bool = False
    seed: int = 0
    batch_size: int = 8
    skip_bad: bool = False
    shard_size: int = 64
    temp: float = 1.0
    top_p: float = 1.0
    guard_date: Optional[str] = None  # YYYY-MM-DD printed by guard templates that show today's date


def _check(cfg: TeachConfig) -> None:
    if cfg.mode not in guards.MODES:
        raise UserError(f"--mode must be one of {', '.join(guards.MODES)}, got {cfg.mode!r}")
    for name, v in (("--samples-per-prompt", cfg.samples_per_prompt), ("--max-tokens", cfg.max_tokens),
                    ("--top-k", cfg.top_k), ("--batch-size", cfg.batch_size), ("--shard-size", cfg.shard_size)):
        checks.number(v, name, lo=1, hi=2**31 - 1, integer=True)
    checks.sampling(cfg.temp, cfg.top_p)
    checks.seed(cfg.seed)
    checks.text(cfg.refusal, "--refusal", allow_empty=False, max_chars=10_000)
    checks.output_dir(cfg.out, "--out", resumable=True)
    guards.parse_date(cfg.guard_date)


MAX_CHARS_PER_TOKEN = 32  # a prompt longer than context x this is refused without tokenizing it


def _preflight(cfg: TeachConfig, examples: list, skipped: int) -> tuple:
    """Refuse what would fail late (after the guard's pass) or hang: --top-k over the vocabulary,
    prompts longer than the base's context. Reads the base's config and tokenizer only."""
    from mlx_lm.utils import load_tokenizer

    from .models import read_config, resolve_model_path

    path = resolve_model_path(cfg.base)
    config = read_config(path)
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    if isinstance(vocab, int) and cfg.top_k > vocab:
        raise UserError(f"--top-k {cfg.top_k} is larger than the base's vocabulary ({vocab})")
    limit = checks.context_length(config)
    if limit is None:
        return examples, skipped
    tok = None
    lines = _line_numbers(cfg.data) if not skipped else None
    kept = []
    for i, ex in enumerate(examples):
        where = f"{cfg.data}:{lines[i]}" if lines and i < len(lines) else f"{cfg.data}: prompt {i + 1}"
        chars = len(ex.prompt) + sum(len(str(m.get("content", ""))) for m in ex.context)
        why = None
        if chars > limit * MAX_CHARS_PER_TOKEN:
            why = f"{chars:,} characters, far more than the base's context of {limit} tokens"
        else:
            tok = tok or load_tokenizer(path)
            n = len(_prompt_ids(tok, ex))
            if n >= limit:
                why = f"{n} tokens, more than the base's context of {limit} tokens"
        if why is None:
            kept.append(ex)
        elif cfg.skip_bad:
            skipped += 1
        else:
            raise UserError(f"{where}: the prompt is {why} (fix it, or pass --skip-bad to skip such lines)")
    if not kept:
        raise UserError(f"{cfg.data}: no prompts fit the base's context")
    return kept, skipped


def _line_numbers(path) -> list:
    """1-based line numbers of the non-blank lines (the examples read_jsonl returns, in order)."""
    with open(path, "rb") as f:
        return [i for i, raw in enumerate(f, 1) if raw.strip()]


# ---------------------------------------------------------------- manifest


def _fp(model, config) -> dict:
    from .models import fingerprint

    from .models import encode_probes

    fp = fingerprint(model, config)
    out = {k: v for k, v in fp.items() if k not in ("sketch", "probes")}
    out["probes"] = encode_probes(fp["probes"])  # lets train tell a quantized copy from another model
    return out


def _same_model(a: dict, b: dict) -> bool:
    keys = ("architecture", "hidden_size", "vocab_size", "embedding_hash")
    return all(str(a.get(k)) == str(b.get(k)) for k in keys)


def _header(cfg: TeachConfig, examples, skipped: int, spec: guards.GuardSpec, guard_path: str) -> dict:
    settings = {k: getattr(cfg, k) for k in ("mode", "samples_per_prompt", "max_tokens", "top_k", "refusal",
                                             "hard_guard", "seed", "batch_size", "shard_size", "temp", "top_p",
                                             "guard_date")}
    return {
        "format": tc.FORMAT,
        "library_version": __version__,
        "inputs": {"data": str(cfg.data), "data_hash": data.dataset_hash(examples), "num_prompts": len(examples),
                   "skipped_bad_lines": skipped},
        "settings": settings,
        "guard": {"spec": spec.id, "spec_digest": spec.digest(), "path": guard_path},
        "base": {"path": str(cfg.base)},
        "num_shards": math.ceil(len(examples) / cfg.shard_size),
        "shards": [],
        "verdicts": {},
        "partials": {},
        "phases": {},
        "complete": False,
    }


def _mismatch(old: dict, new: dict) -> Optional[str]:
    if old["inputs"]["data_hash"] != new["inputs"]["data_hash"]:
        return "the prompts differ (data hash)"
    for k, v in new["settings"].items():
        if old["settings"].get(k) != v:
            return f"setting {k} was {old['settings'].get(k)!r}, now {v!r}"
    if old["guard"]["spec_digest"] != new["guard"]["spec_digest"]:
        return f"the guard format differs (spec {old['guard']['spec']!r} vs {new['guard']['spec']!r})"
    return None


def _open_out(out: Path, header: dict) -> dict:
    if (out / tc.MANIFEST).exists():
        old = tc.read_manifest(out)
        started = old.get("shards") or old.get("verdicts") or old.get("partials") or any(
            isinstance(old.get(k), dict) and old[k].get("fingerprint") for k in ("base", "guard"))
        if not started:  # a run that failed before loading a model: start it again, as now asked
            tc.write_manifest(out, header)
            return header
        why = _mismatch(old, header)
        if why:
            raise UserError(f"{out}: a teacher cache made with other inputs or settings is there ({why}); "
                            "use a new --out, or the original arguments to resume it")
        return old
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: exists and is not a teacher cache; choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    tc.write_manifest(out, header)
    return header


def _clean_tmp(out: Path) -> None:
    """Remove half-written files a killed run left behind (atomic writes never expose them)."""
    for p in out.glob(".*.tmp*"):
        p.unlink(missing_ok=True)


@contextmanager
def _phase(manifest: dict, name: str):
    mx.synchronize()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        mx.synchronize()
        ph = manifest.setdefault("phases", {}).setdefault(name, {"seconds": 0.0, "peak_memory_gb": 0.0})
        ph["seconds"] = round(ph["seconds"] + time.perf_counter() - t0, 3)
        ph["peak_memory_gb"] = round(max(ph["peak_memory_gb"], mx.get_peak_memory() / 1e9), 4)


def _release() -> None:
    gc.collect()
    mx.clear_cache()


# ---------------------------------------------------------------- sampling


def sample_seed(seed: int, prompt_index: int, sample_index: int, step: int) -> int:
    """The RNG seed of one token: a function of (seed, prompt, sample, position) only."""
    d = hashlib.sha256(f"{seed}:{prompt_index}:{sample_index}:{step}".encode()).digest()
    return int.from_bytes(d[:7], "little")


class _Sampler:
    """One sample's sampler for mlx-lm's BatchGenerator: its own key per generated token."""

    def __init__(self, seed: int, i: int, j: int, temp: float, top_p: float):
        self.seed, self.i, self.j, self.temp, self.top_p, self.t = seed, i, j, temp, top_p, 0

    def __call__(self, logprobs: mx.array) -> mx.array:
        key = mx.random.key(sample_seed(self.seed, self.i, self.j, self.t))
        self.t += 1
        if self.temp == 0:
            return mx.argmax(logprobs, axis=-1)
        if self.top_p < 1.0:
            from mlx_lm.sample_utils import apply_top_p

            logprobs = apply_top_p(logprobs, self.top_p)
        return mx.random.categorical(logprobs * (1.0 / self.temp), key=key)


def sample_responses(model, tokenizer, prompts: Sequence[List[int]], keys: Sequence[tuple], cfg: TeachConfig,
                     bar: Optional[Bar] = None, top_k: int = 0) -> tuple:
    """Teacher samples for (prompt ids, (prompt index, sample index)) rows; EOS kept when the base stopped.

    Returns (samples, top-k rows). With `top_k`, each sample's rows are those `topk_logprobs`
    gives, read off the log-probs the decoding steps computed anyway (no second forward
    over prompt + sample); a sample whose log-probs came in less than float32 gets None,
    for `topk_logprobs` to recompute. Without `top_k` the second item is None.
    """
    from mlx_lm.generate import BatchGenerator

    if not prompts:
        return [], ([] if top_k else None)
    gen = BatchGenerator(model, max_tokens=cfg.max_tokens, stop_tokens=[[t] for t in tokenizer.eos_token_ids],
                         completion_batch_size=cfg.batch_size, prefill_batch_size=cfg.batch_size)
    try:
        # Inserted shortest first so prefill batches hold prompts of like length; each sample's
        # own seed makes it the same in any order.
        order = sorted(range(len(prompts)), key=lambda n: (len(prompts[n]), n))
        samplers = [_Sampler(cfg.seed, *keys[n], cfg.temp, cfg.top_p) for n in order]
        got = gen.insert([list(prompts[n]) for n in order], [cfg.max_tokens] * len(prompts), samplers=samplers)
        uids = [0] * len(prompts)
        for n, uid in zip(order, got):
            uids[n] = uid
        out = {uid: [] for uid in uids}
        steps = {uid: [] for uid in uids} if top_k else None
        while responses := gen.next_generated():
            if top_k:
                _step_topk(responses, top_k, steps)
            for r in responses:
                out[r.uid].append(int(r.token))
                if r.finish_reason is not None and bar is not None:
                    bar.update(1, tokens=bar.postfix.get("tokens", 0) + len(out[r.uid]))
    finally:
        gen.close()
    if not top_k:
        return [out[uid] for uid in uids], None
    tks = []
    for uid in uids:
        rows = steps[uid]
        if any(r is None for r in rows):
            tks.append(None)
        elif not rows:
            tks.append(_empty(top_k))
        else:
            tks.append(_sorted_topk(np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])))
    return [out[uid] for uid in uids], tks


def _step_topk(responses, k: int, steps: dict) -> None:
    """The top-k of one decoding step's float32 log-probs, one batched op for the step's samples."""
    exact = []
    for r in responses:
        lp = getattr(r, "logprobs", None)
        if lp is not None and lp.dtype == mx.float32:
            exact.append(r)
        else:
            steps[r.uid].append(None)
    if not exact:
        return
    lp = mx.stack([r.logprobs.reshape(-1) for r in exact])
    if k > lp.shape[-1]:
        raise UserError(f"--top-k {k} is larger than the base's vocabulary ({lp.shape[-1]})")
    idx = mx.argpartition(-lp, kth=k - 1, axis=-1)[:, :k]
    val = mx.take_along_axis(lp, idx, axis=-1)
    idx, val = np.array(idx), np.array(val)
    for b, r in enumerate(exact):
        steps[r.uid].append((idx[b], val[b]))


def _sorted_topk(ids: np.ndarray, vals: np.ndarray) -> tuple:
    """[T, k] top-k ids and log-probs -> sorted by log-prob (descending, ties by id), with the tail mass."""
    order = np.lexsort((ids, -vals), axis=-1)
    ids = np.take_along_axis(ids, order, axis=-1).astype(np.int32)
    vals = np.take_along_axis(vals, order, axis=-1).astype(np.float32)
    tail_mass = np.clip(1.0 - np.exp(vals.astype(np.float64)).sum(axis=-1), 0.0, None).astype(np.float32)
    return ids, vals, tail_mass


def topk_logprobs(model, rows: Sequence[tuple], k: int, batch_size: int, pad_id: int = 0,
                  bar: Optional[Bar] = None) -> List[tuple]:
    """For (prompt ids, response ids) rows: (topk ids [T,k], topk log-probs [T,k], tail mass [T]).

    Row t is the base's full-vocabulary distribution at the position that predicts
    response[t], in float32. Rows are batched by length; positions before the shortest
    prompt run through a KV cache only, so the output head sees just the ragged tail.
    """
    from mlx_lm.models.cache import make_prompt_cache

    out: List[Optional[tuple]] = [None] * len(rows)
    todo = [i for i, (_, r) in enumerate(rows) if len(r) > 0]
    for i, (_, r) in enumerate(rows):
        if not r:
            out[i] = _empty(k)
    todo.sort(key=lambda i: (len(rows[i][0]) + len(rows[i][1]), i))
    for s in range(0, len(todo), batch_size):
        chunk = todo[s:s + batch_size]
        seqs = [list(rows[i][0]) + list(rows[i][1][:-1]) for i in chunk]
        starts = [len(rows[i][0]) - 1 for i in chunk]  # position predicting response[0]
        lo, hi = min(starts), max(len(q) for q in seqs)
        cache = make_prompt_cache(model)
        if lo > 0:
            model(mx.array([q[:lo] for q in seqs]), cache=cache)
            mx.eval([c.state for c in cache])
        tail = mx.array([q[lo:] + [pad_id] * (hi - len(q)) for q in seqs])
        logits = model(tail, cache=cache).astype(mx.float32)
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if k > lp.shape[-1]:
            raise UserError(f"--top-k {k} is larger than the base's vocabulary ({lp.shape[-1]})")
        idx = mx.argpartition(-lp, kth=k - 1, axis=-1)[..., :k]
        val = mx.take_along_axis(lp, idx, axis=-1)
        mx.eval(idx, val)
        idx, val = np.array(idx), np.array(val)
        for b, i in enumerate(chunk):
            T = len(rows[i][1])
            a = starts[b] - lo
            out[i] = _sorted_topk(idx[b, a:a + T], val[b, a:a + T])
        if bar is not None:
            bar.update(len(chunk))
    return out


def _topk_rows(model, tok, pids: dict, keys, ys, tks, cfg: TeachConfig, manifest: dict, bar: Bar) -> List[tuple]:
    """Every sample's top-k rows: those read during sampling, the rest (a less-than-float32 base's)
    recomputed in float32 by `topk_logprobs` (its own timed phase)."""
    redo = [n for n, t in enumerate(tks) if t is None]
    bar.update(len(tks) - len(redo))
    if redo:
        with _phase(manifest, "topk"):
            got = topk_logprobs(model, [(pids[keys[n][0]], ys[n]) for n in redo], cfg.top_k, cfg.batch_size,
                                _pad(tok), bar)
        tks = list(tks)
        for n, t in zip(redo, got):
            tks[n] = t
    return tks


# ---------------------------------------------------------------- the stage


def _shard_range(i: int, cfg: TeachConfig, n: int) -> range:
    return range(i * cfg.shard_size, min(n, (i + 1) * cfg.shard_size))


def _groups(cfg: TeachConfig, n: int, nshards: int) -> List[List[int]]:
    """Shard indices in fixed runs of up to GROUP_PROMPTS rows (at least one shard each): the
    models run over a group at a time, and the same groups in a resumed run as in one run."""
    per = max(1, GROUP_PROMPTS // (cfg.shard_size * cfg.samples_per_prompt))
    return [list(range(s, min(nshards, s + per))) for s in range(0, nshards, per)]


def _rows(shards: Sequence[int], cfg: TeachConfig, n: int, samples: Optional[int] = None) -> int:
    return sum(len(_shard_range(i, cfg, n)) for i in shards) * (cfg.samples_per_prompt if samples is None else samples)


def _used_u(u_raw: float, cfg: TeachConfig) -> float:
    return (1.0 if guards.refuses(u_raw) else 0.0) if cfg.hard_guard else float(np.float32(u_raw))


def _add_shard(manifest: dict, out: Path, i: int, records: List[tc.Record], u_raw: List[float], cfg) -> None:
    f = tc.shard_name(i)
    sha = tc.write_shard(out / f, records, cfg.top_k, u_raw)
    prompts = sorted({r.prompt_index for r in records})
    manifest["shards"] = [s for s in manifest["shards"] if s["index"] != i] + [{
        "index": i, "file": f, "sha256": sha, "bytes": (out / f).stat().st_size,
        "prompts": [prompts[0], prompts[-1] + 1] if prompts else [0, 0], "records": len(records),
        "tokens": sum(len(r.response_ids) for r in records),
        "flagged": sum(1 for u in u_raw if u >= guards.DEFAULT_THRESHOLD),
        "u_sum": float(sum(u_raw)),
    }]
    manifest["shards"].sort(key=lambda s: s["index"])


class _Models:
    """Loads each model once, on first use, and checks it against the manifest."""

    def __init__(self, cfg: TeachConfig, manifest: dict, out: Path, guard_path: str):
        self.cfg, self.manifest, self.out, self.guard_path = cfg, manifest, out, guard_path
        self.base = self.guard = None

    def get_base(self):
        if self.base is None:
            from .models import load

            model, tok, config = load(self.cfg.base)
            fp = _fp(model, config)
            if self.cfg.top_k > fp["vocab_size"]:
                raise UserError(f"--top-k {self.cfg.top_k} is larger than the base's vocabulary ({fp['vocab_size']})")
            self._check("base", fp)
            self.base = (model, tok)
            eos = getattr(tok, "eos_token_id", None)
            if eos is None:
                eos = sorted(tok.eos_token_ids)[0]
            self.manifest["refusal_ids"] = list(tok.encode(self.cfg.refusal, add_special_tokens=False)) + [int(eos)]
        return self.base

    def get_guard(self) -> guards.Guard:
        if self.guard is None:
            # A template that prints today's date keeps the date the cache was started with.
            date = self.cfg.guard_date or self.manifest["guard"].get("date")
            g = guards.load_guard(self.cfg.guard, self.guard_path, date=date)
            self._check("guard", _fp(g.model, g.config))
            self._check_template(g.template_info())
            self.guard = g
        return self.guard

    def _check_template(self, info: dict) -> None:
        """Record which template renders the guard's prompts; a resumed cache must keep it."""
        old = self.manifest["guard"].get("template_sha256")
        if old is not None and old != info["template_sha256"]:
            raise UserError(f"{self.out}: this cache was made with the guard's {self.manifest['guard']['template']} "
                            f"template (sha256 {old[:12]}), but {self.guard_path} renders with its "
                            f"{info['template']} template (sha256 {info['template_sha256'][:12]}); use a new --out")
        self.manifest["guard"].update(info)
        tc.write_manifest(self.out, self.manifest)

    def _check(self, which: str, fp: dict) -> None:
        old = self.manifest[which].get("fingerprint")
        if old is not None and not _same_model(old, fp):
            from .models import short

            given = self.cfg.base if which == "base" else self.guard_path
            raise UserError(f"{self.out}: this cache was made with {which} {short(old)}, but "
                            f"{given} is {short(fp)}; use a new --out")
        self.manifest[which]["fingerprint"] = fp
        tc.write_manifest(self.out, self.manifest)

    def drop_guard(self):
        if self.guard is not None:
            self.guard.release()
            self.guard = None
            _release()

    def drop_base(self):
        if self.base is not None:
            self.base = None
            _release()


def teach(cfg: TeachConfig) -> dict:
    """Run (or resume) the teach stage; returns the summary written into the manifest."""
    _check(cfg)
    examples, skipped = data.read_jsonl(cfg.data, skip_bad=cfg.skip_bad)
    if not examples:
        raise UserError(f"{cfg.data}: no prompts")
    examples, skipped = _preflight(cfg, examples, skipped)
    spec = guards.get_spec(cfg.guard)
    guard_path = cfg.guard_model or spec.hub_id
    if not guard_path:
        raise UserError(f"guard {spec.id}: no weights given; pass --guard-model (a model directory or hub id)")
    out = Path(cfg.out)
    manifest = _open_out(out, _header(cfg, examples, skipped, spec, str(guard_path)))
    _clean_tmp(out)
    n, nshards = len(examples), manifest["num_shards"]
    done = {s["index"] for s in manifest["shards"]}
    m = _Models(cfg, manifest, out, str(guard_path))
    t_start = time.perf_counter()
    try:
        # Models given by another path than the cache was made with must be the same weights.
        if manifest["base"].get("fingerprint") and str(cfg.base) != manifest["base"]["path"]:
            m.get_base()
            m.drop_base()
        if manifest["guard"].get("fingerprint") and str(guard_path) != manifest["guard"]["path"]:
            m.get_guard()
            m.drop_guard()
        if cfg.mode == "input":
            _input_mode(cfg, examples, manifest, out, m, done, nshards)
        else:
            _output_mode(cfg, examples, manifest, out, m, done, nshards)
    finally:
        m.drop_guard()
        m.drop_base()
    manifest["complete"] = len(manifest["shards"]) == nshards
    manifest["summary"] = _summary(manifest, n, time.perf_counter() - t_start)
    tc.write_manifest(out, manifest)
    return manifest["summary"]


def _input_mode(cfg, examples, manifest, out, m: _Models, done, nshards):
    n = len(examples)
    groups = _groups(cfg, n, nshards)
    # Verdicts are written a group at a time, so a group has all of them or none.
    need = [gr for gr in groups if any(i not in done and str(i) not in manifest["verdicts"] for i in gr)]
    if need:
        total = sum(_rows([i for i in gr if i not in done], cfg, n, 1) for gr in need)
        with _phase(manifest, "guard"), Bar(total=total, desc="guard verdicts", unit="prompt") as bar:
            g = m.get_guard()
            for group in need:
                shards = [i for i in group if i not in done]
                prompts = [p for i in shards for p in _shard_range(i, cfg, n)]
                convs = [guards.guard_messages(examples[p].prompt, examples[p].context) for p in prompts]
                verdicts = dict(zip(prompts, g.score(convs, "input", batch_size=cfg.batch_size, bar=bar)))
                for i in shards:
                    manifest["verdicts"][str(i)] = [[verdicts[p].u, verdicts[p].category]
                                                    for p in _shard_range(i, cfg, n)]
                tc.write_manifest(out, manifest)
        m.drop_guard()
    todo = [gr for gr in groups if any(i not in done for i in gr)]
    if not todo:
        return
    # A group's verdicts stay in the manifest until all its shards are written: a group a stopped
    # run left half written is sampled again whole, so its samples are the uninterrupted run's.
    rows_total = sum(_rows([i for i in gr if str(i) in manifest["verdicts"]], cfg, n) for gr in todo)
    sbar = Bar(total=rows_total, desc="teacher samples", unit="sample")
    kbar = Bar(total=rows_total, desc="top-k log-probs", unit="sample")
    try:
        for group in todo:
            members = [i for i in group if str(i) in manifest["verdicts"]]
            verdicts = {p: v for i in members for p, v in zip(_shard_range(i, cfg, n), manifest["verdicts"][str(i)])}
            prompts = sorted(verdicts)
            with _phase(manifest, "sample"):
                model, tok = m.get_base()
                pids = {p: _prompt_ids(tok, examples[p]) for p in prompts}
                keys = [(p, j) for p in prompts for j in range(cfg.samples_per_prompt)
                        if _used_u(verdicts[p][0], cfg) < 1.0]
                skipped = len(prompts) * cfg.samples_per_prompt - len(keys)
                sbar.update(skipped)
                ys, tk = sample_responses(model, tok, [pids[p] for p, _ in keys], keys, cfg, sbar, cfg.top_k)
            tk = _topk_rows(model, tok, pids, keys, ys, tk, cfg, manifest, kbar)
            kbar.update(skipped)
            got = {key: (y, t) for key, y, t in zip(keys, ys, tk)}
            for i in members:
                if i in done:
                    continue
                records, u_raw = [], []
                for p in _shard_range(i, cfg, n):
                    ur, cat = verdicts[p]
                    for j in range(cfg.samples_per_prompt):
                        y, t = got.get((p, j), ([], _empty(cfg.top_k)))
                        records.append(tc.Record(pids[p], list(y), _used_u(ur, cfg), t[0], t[1], t[2],
                                                 examples[p].label, p, j, cat))
                        u_raw.append(ur)
                _add_shard(manifest, out, i, records, u_raw, cfg)
                tc.write_manifest(out, manifest)
            for i in members:
                manifest["verdicts"].pop(str(i), None)
            tc.write_manifest(out, manifest)
    finally:
        sbar.close()
        kbar.close()


def _output_mode(cfg, examples, manifest, out, m: _Models, done, nshards):
    n = len(examples)
    groups = _groups(cfg, n, nshards)
    # Sampling: every shard not yet judged of a group with one still to sample, so that a group a
    # stopped run left half sampled is sampled again whole (the uninterrupted run's samples).
    need = [gr for gr in groups if any(i not in done and str(i) not in manifest["partials"] for i in gr)]
    if need:
        rows_total = sum(_rows([i for i in gr if i not in done], cfg, n) for gr in need)
        with Bar(total=rows_total, desc="teacher samples", unit="sample") as sbar, \
                Bar(total=rows_total, desc="top-k log-probs", unit="sample") as kbar:
            for group in need:
                members = [i for i in group if i not in done]
                prompts = [p for i in members for p in _shard_range(i, cfg, n)]
                with _phase(manifest, "sample"):
                    model, tok = m.get_base()
                    pids = {p: _prompt_ids(tok, examples[p]) for p in prompts}
                    keys = [(p, j) for p in prompts for j in range(cfg.samples_per_prompt)]
                    ys, tk = sample_responses(model, tok, [pids[p] for p, _ in keys], keys, cfg, sbar, cfg.top_k)
                tk = _topk_rows(model, tok, pids, keys, ys, tk, cfg, manifest, kbar)
                got = {key: (y, t) for key, y, t in zip(keys, ys, tk)}
                for i in members:
                    if str(i) in manifest["partials"]:
                        continue
                    records = [tc.Record(pids[p], list(got[p, j][0]), 0.0, *got[p, j][1], examples[p].label, p, j)
                               for p in _shard_range(i, cfg, n) for j in range(cfg.samples_per_prompt)]
                    f = PARTIAL.format(i)
                    sha = tc.write_shard(out / f, records, cfg.top_k)
                    manifest["partials"][str(i)] = {"file": f, "sha256": sha}
                    tc.write_manifest(out, manifest)
    todo = [gr for gr in groups if any(i not in done for i in gr)]
    if not todo:
        return
    base_tok = m.get_base()[1] if m.base is not None else None
    m.drop_base()
    if base_tok is None:
        from mlx_lm.utils import load_tokenizer

        from .models import resolve_model_path

        base_tok = load_tokenizer(resolve_model_path(cfg.base))
    # Judging: a group's partial files stay until all its shards are written, so a group a stopped
    # run left half judged is judged again whole (the uninterrupted run's verdicts).
    with _phase(manifest, "guard"), Bar(total=sum(_rows(gr, cfg, n) for gr in todo),
                                        desc="guard verdicts", unit="sample") as bar:
        g = m.get_guard()
        eos = set(base_tok.eos_token_ids)
        finished = {s["index"]: s for s in manifest["shards"]}
        for group in todo:
            parts = {i: manifest["partials"][str(i)] for i in group if str(i) in manifest["partials"]}
            shards = {i: tc.read_shard(out / parts[i]["file"], parts[i]["sha256"]) if i in parts
                      else tc.read_shard(out / finished[i]["file"], finished[i]["sha256"]) for i in group}
            convs = []
            for i in group:
                for r in shards[i]:
                    ex = examples[r.prompt_index]
                    y = [t for t in r.response_ids if t not in eos]
                    convs.append(guards.guard_messages(ex.prompt, ex.context, base_tok.decode(y)))
            verdicts = iter(g.score(convs, "output", batch_size=cfg.batch_size, bar=bar))
            for i in group:
                vs = [next(verdicts) for _ in shards[i]]
                if i not in parts or i in done:  # a finished shard stays as it is
                    continue
                for r, v in zip(shards[i], vs):
                    r.u, r.category = _used_u(v.u, cfg), v.category
                _add_shard(manifest, out, i, shards[i], [v.u for v in vs], cfg)
                tc.write_manifest(out, manifest)
            for i in parts:
                manifest["partials"].pop(str(i), None)
            tc.write_manifest(out, manifest)
            for part in parts.values():
                (out / part["file"]).unlink(missing_ok=True)


def _prompt_ids(tok, ex: data.Example) -> List[int]:
    from .generate import chat_ids

    return chat_ids(tok, list(ex.context) + [{"role": "user", "content": ex.prompt}])


def _pad(tok) -> int:
    pad = getattr(tok, "pad_token_id", None)
    return int(pad) if pad is not None else 0


def _empty(k: int):
    return np.zeros((0, k), np.int32), np.zeros((0, k), np.float32), np.zeros((0,), np.float32)


def _summary(manifest: dict, n: int, seconds: float) -> dict:
    shards = manifest["shards"]
    prompts = sum(s["prompts"][1] - s["prompts"][0] for s in shards)
    records = sum(s["records"] for s in shards)
    flagged = sum(s["flagged"] for s in shards)
    return {
        "prompts": n,
        "prompts_done": prompts,
        "records": records,
        "flagged_share": round(flagged / records, 4) if records else 0.0,
        "mean_u": round(sum(s["u_sum"] for s in shards) / records, 4) if records else 0.0,
        "response_tokens": sum(s["tokens"] for s in shards),
        "seconds_this_run": round(seconds, 2),
        "phases": manifest.get("phases", {}),
    }


def format_summary(summary: dict, out) -> str:
    lines = [f"teacher cache: {out}",
             f"  prompts {summary['prompts_done']}/{summary['prompts']}, records {summary['records']}, "
             f"flagged {100 * summary['flagged_share']:.1f}% (mean u {summary['mean_u']:.3f}), "
             f"response tokens {summary['response_tokens']}, this run {summary['seconds_this_run']:.1f}s"]
    for name, ph in summary["phases"].items():
        lines.append(f"  {name:7s} {ph['seconds']:8.1f}s  peak memory {ph['peak_memory_gb']:.3f} GB")
    return "\n".join(lines)


__all__ = ["TeachConfig", "teach", "sample_responses", "topk_logprobs", "sample_seed", "format_summary"]
