"""The one training loop: any method (methods/) x any objective (losses.py), from a teacher cache.

Data. Each teacher record (prompt x, teacher sample y, guard verdict u) gives
two rows: [x; r] weighted u (target: the refusal r) and [x; y] weighted 1-u
(target: the base's distributions q_t along y, or y itself for ``ce``);
zero-weight rows are skipped. Rows are right-padded with a mask and cut to
--max-seq-length tokens (P's positions come on top). A held-out share of the
prompts (--val-split, chosen by a seeded hash of the prompt index, so all
samples of a prompt fall on one side) gives the validation loss.

Order. Rows are bucketed by length (batching.py: little padding), and the
batches of epoch e are drawn by a generator seeded with (seed, e) alone;
global micro-batch m is a function of (seed, m). So the data position is just
the number of batches consumed, and a resumed run sees the same batches.

Layout. With a soft prompt or prefix tuning, the rows of a batch that start
with the same prompt run it once (record_prompt.py: the record layout, the
same loss and gradients) when the rows are at least 1.5 per distinct prompt.

Step. One compiled function (mx.compile over the trainable params, the
optimiser state and the RNG state, as mlx-lm's trainer) computes the summed
objective and its gradient for a micro-batch, accumulates --grad-accum of
them, sums them over machines (mx.distributed.all_sum), divides by the global
weighted token count (so 1 machine x batch B, 2 machines x B/2 and 2
micro-batches x B/2 all take the same step), clips the gradient norm and
applies AdamW (linear warm-up, then cosine decay).

Checkpoints. Every --save-every steps rank 0 writes, atomically, the method
file (the out path) and a training-state file (params, optimiser state with
its step, the RNG key, the data position, the settings); --resume continues
from it and ends with the same P as an uninterrupted run.

Machines. Under ``mlx.launch`` each rank reads its share (a contiguous block
of rows, so a record's rows stay on one machine: rank_share) of every global batch; rank 0 alone writes files and draws the progress bar.
"""

import hashlib
import json
import os
import time
import typing
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from . import batching, files, losses, memory, methods, models, record_prompt, reporting
from . import checks
from .errors import UserError
from .progress import Bar

STATE_FORMAT = "mlx-softprompt-train-state/1"

# Settings that shape the trajectory: a resumed run must use the same ones.
RESUME_KEYS = ("objective", "method", "method_options", "iters", "batch_size", "learning_rate",
               "weight_decay", "warmup", "grad_accum", "grad_clip", "max_seq_length", "val_split",
               "seed", "teacher_mode", "hard_guard")


@dataclass
class TrainArgs:
    """The loop's settings; the method's own options travel in `method_options` (checked by the method)."""

    base: Optional[str] = field(default=None, metadata={"help": "MLX base model dir (or hub id)."})
    teacher: Optional[str] = field(default=None, metadata={"help": "Teacher cache directory."})
    out: Optional[str] = field(default=None, metadata={"help": "Output method file (.safetensors)."})
    objective: str = field(default="tv", metadata={"help": "A row of losses.OBJECTIVES (tv | kl | ce)."})
    method: str = field(default="softprompt", metadata={"help": "What is trained (methods.METHODS)."})
    method_options: dict = field(default_factory=dict, metadata={"help": "The method's options (see its module)."})
    iters: int = field(default=200, metadata={"help": "Optimiser steps."})
    batch_size: int = field(default=8, metadata={"help": "Rows per global micro-batch."})
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = field(default=0, metadata={"help": "Linear warm-up steps, then cosine decay."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches per optimiser step."})
    grad_clip: float = field(default=1.0, metadata={"help": "Max global gradient norm (0: off)."})
    max_seq_length: int = 1024
    val_split: float = field(default=0.1, metadata={"help": "Share of prompts held out for validation."})
    val_every: int = 50
    val_batches: int = field(default=-1, metadata={"help": "Validation batches (-1: all)."})
    save_every: int = 100
    seed: int = 0
    teacher_mode: str = field(default="cache", metadata={"help": "cache (top-k) | online (base without P)."})
    hard_guard: bool = field(default=False, metadata={"help": "Weights 1[u >= threshold] instead of u."})
    steps_per_report: int = 10
    metrics: Optional[str] = field(default=None, metadata={"help": "JSONL path (default: out + .metrics.jsonl)."})
    resume: bool = False
    overwrite: bool = False
    compile: bool = True
    grad_checkpoint: bool = field(default=False, metadata={"help": "Recompute blocks in the backward pass (memory.py)."})
    loss_chunk: int = field(default=0, metadata={"help": "Loss over chunks of N positions, 0: whole (losses.chunked)."})
    report_to: Optional[str] = field(default=None, metadata={"help": "tensorboard and/or wandb (comma-separated)."})
    project_name: Optional[str] = field(default=None, metadata={"help": "W&B project (default mlx-softprompt)."})

    def check(self) -> None:
        """Every field in range, or a UserError naming the flag."""
        for name in ("base", "teacher", "out"):
            if not getattr(self, name):
                raise UserError(f"--{name} is required (flag or config key)")
        if not str(self.out).endswith(".safetensors"):
            raise UserError(f"--out {self.out}: method files end in .safetensors")
        if self.objective not in losses.OBJECTIVES:
            raise UserError(f"--objective {self.objective!r}: unknown; choose one of {', '.join(losses.OBJECTIVES)}")
        if self.method not in methods.METHODS or not methods.METHODS[self.method].trainable:
            raise UserError(f"--method {self.method!r}: trainable methods: {', '.join(methods.trainable())}")
        self.method_options = methods.options_from(self.method, self.method_options)
        if self.teacher_mode not in ("cache", "online"):
            raise UserError(f"--teacher-mode {self.teacher_mode!r}: use cache or online")
        for name in ("iters", "batch_size", "grad_accum", "max_seq_length", "val_every", "save_every",
                     "steps_per_report"):
            checks.number(getattr(self, name), f"--{name.replace('_', '-')}", lo=1, hi=2**31 - 1, integer=True)
        checks.number(self.max_seq_length, "--max-seq-length", lo=2, integer=True)
        checks.number(self.val_split, "--val-split", lo=0, hi=1, hi_open=True)
        checks.number(self.warmup, "--warmup", lo=0, hi=self.iters, hi_open=True, integer=True)
        checks.number(self.val_batches, "--val-batches", lo=-1, integer=True)
        checks.number(self.loss_chunk, "--loss-chunk", lo=0, integer=True)
        checks.number(self.learning_rate, "--learning-rate", lo=0, lo_open=True, hi=1e3)
        checks.number(self.grad_clip, "--grad-clip", lo=0)
        checks.number(self.weight_decay, "--weight-decay", lo=0)
        checks.seed(self.seed)
        if self.resume and self.overwrite:
            raise UserError("give --resume or --overwrite, not both")
        reporting.parse(self.report_to)

    @property
    def state_path(self) -> Path:
        out = Path(self.out)
        return out.with_name(out.name[: -len(".safetensors")] + ".train-state.safetensors")

    @property
    def metrics_path(self) -> Path:
        return Path(self.metrics) if self.metrics else Path(str(self.out) + ".metrics.jsonl")


def _field_names() -> dict:
    return {f.name: f for f in fields(TrainArgs)}


def known_keys() -> set:
    """Every key a training config may hold: TrainArgs fields and the methods' shorthands."""
    return set(_field_names()) | methods.shorthand_keys()


def load_config(path) -> dict:
    """A YAML (or JSON) mapping of TrainArgs keys (dashes or underscores), a `method_options`
    mapping, and the methods' shorthand keys (num_tokens, lora_rank, ...); unknown keys are errors."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}:" if mark else ""
        raise UserError(f"{path}:{where} invalid YAML ({getattr(e, 'problem', e)})")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a config file is a mapping of keys to values")
    known = known_keys()
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in known or name in ("resume", "overwrite"):
            shown = ", ".join(sorted(k for k in known if k not in ("resume", "overwrite")))
            raise UserError(f"{path}: unknown key {key!r} (known: {shown})")
        if name == "method_options" and not isinstance(value, (dict, type(None))):
            raise UserError(f"{path}: method_options must be a mapping of option names to values")
        out[name] = value
    return out


def make_args(config: Optional[str] = None, **flags) -> TrainArgs:
    """Defaults, then the config file, then the flags that were given (None = not given).

    Shorthands (num_tokens, init, lora_rank, ...) fill `method_options` of the chosen method."""
    values = load_config(config) if config else {}
    known, shorts = known_keys(), methods.shorthand_keys()
    for k, v in flags.items():
        if k not in known:
            raise ValueError(f"unknown training argument {k!r}")
        if v is not None:
            values[k] = v
    given = {k: values.pop(k) for k in list(values) if k in shorts}
    args, hints = TrainArgs(), typing.get_type_hints(TrainArgs)
    for k, v in values.items():
        where = f"{config}: {k}" if config and flags.get(k) is None else f"--{k.replace('_', '-')}"
        if k == "method_options":
            args.method_options = {} if v is None else dict(checks.setting(v, dict, where))
            continue
        setattr(args, k, checks.setting(v, hints[k], where))
    if args.method in methods.METHODS:
        args.method_options = methods.options_from(args.method, args.method_options, given)
    try:
        args.check()
    except UserError as e:  # a value from the config file: name the file and its key
        msg = str(e)
        key = msg.split(":", 1)[0].lstrip("-").replace("-", "_")
        if config and key in values and flags.get(key) is None:
            raise UserError(f"{config}: key {key}{msg[len(key) + 2:]}") from None
        raise
    return args


def parse_mapping(text: Optional[str], where: str) -> Optional[dict]:
    """A YAML/JSON flow mapping given as text (a -c file's mapping arrives as its repr): dict or UserError."""
    if text is None:
        return None
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if not isinstance(value, dict):
        raise UserError(f"{where}: expected a mapping like '{{rank: 4, layers: 2}}', got {text!r}")
    return value


# ---------------------------------------------------------------- data


@dataclass
class TeacherData:
    """What training reads from a teacher cache (or builds in memory)."""

    records: list
    refusal_ids: List[int]
    manifest: dict = field(default_factory=dict)


def manifest_value(manifest: dict, key: str):
    """A teacher-cache setting, top level first, then under "settings" (teach writes it there)."""
    alias = {"k": "top_k"}
    if key in manifest and not isinstance(manifest[key], dict):
        return manifest[key]
    settings = manifest.get("settings") or {}
    return settings.get(key, settings.get(alias.get(key, key)))


def manifest_base(manifest: dict) -> Optional[dict]:
    """The base fingerprint the cache was made with (teach stores it under base.fingerprint)."""
    base = manifest.get("base")
    if isinstance(base, dict):
        fp = base.get("fingerprint", base)
        if isinstance(fp, dict) and "embedding_hash" in fp:
            return fp
    return None


def manifest_guard(manifest: dict) -> Optional[str]:
    g = manifest.get("guard")
    if isinstance(g, dict):
        return g.get("spec") or g.get("id") or g.get("path")
    return g


def manifest_guard_template(manifest: dict) -> Optional[str]:
    """Which template rendered the guard's prompts: "model|spec sha256:<hex>[ date:<YYYY-MM-DD>]"."""
    g = manifest.get("guard")
    if not isinstance(g, dict) or not g.get("template_sha256"):
        return None
    date = f" date:{g['date']}" if g.get("date") else ""
    return f"{g.get('template', 'spec')} sha256:{g['template_sha256']}{date}"


def open_teacher(path) -> TeacherData:
    from . import teacher_cache

    cache = teacher_cache.open_cache(path)
    return TeacherData(list(cache), list(cache.refusal_ids), dict(cache.manifest))


@dataclass
class Row:
    prompt: List[int]
    target: List[int]
    weight: float
    soft: bool
    prompt_index: int
    topk_ids: Optional[np.ndarray] = None  # [T, k] for the target tokens (soft rows, cache mode)
    topk_logprobs: Optional[np.ndarray] = None
    tail_mass: Optional[np.ndarray] = None

    def length(self, max_seq_length: int) -> int:
        return min(len(self.prompt) + len(self.target), max_seq_length)


def build_rows(data: TeacherData, objective: str, hard_guard: bool = False, topk: bool = False) -> List[Row]:
    """Two rows per record ([x; r] weight u, [x; y] weight 1-u); zero-weight rows dropped."""
    rows = []
    r = list(data.refusal_ids)
    if not r:
        raise UserError("teacher cache: empty refusal (no refusal_ids)")
    soft_rows = losses.needs_teacher(objective)
    for rec in data.records:
        u = float(rec.u)
        if not 0.0 <= u <= 1.0 or u != u:
            raise UserError(f"teacher record prompt {rec.prompt_index} sample {rec.sample_index}: u={u} not in [0, 1]")
        w_ref, w_resp = losses.row_weights(objective, u, hard_guard)
        prompt = [int(t) for t in rec.prompt_ids]
        if w_ref > 0:
            rows.append(Row(prompt, r, w_ref, False, int(rec.prompt_index)))
        y = [int(t) for t in rec.response_ids]
        if w_resp > 0 and y:
            row = Row(prompt, y, w_resp, soft_rows, int(rec.prompt_index))
            if soft_rows and topk:
                ids, lps, tail = (np.asarray(rec.topk_ids), np.asarray(rec.topk_logprobs),
                                  np.asarray(rec.tail_mass))
                if ids.ndim != 2 or ids.shape[0] != len(y) or lps.shape != ids.shape or tail.shape != (len(y),):
                    raise UserError(f"teacher record prompt {rec.prompt_index} sample {rec.sample_index}: "
                                    f"top-k arrays {ids.shape}/{lps.shape}/{tail.shape} do not match "
                                    f"{len(y)} response tokens")
                row.topk_ids, row.topk_logprobs, row.tail_mass = ids, lps, tail
            rows.append(row)
    return rows


def is_val(prompt_index: int, seed: int, fraction: float) -> bool:
    """Seeded hash of the prompt index: all samples of one prompt land on the same side."""
    h = hashlib.sha256(f"{seed}:{int(prompt_index)}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64 < fraction


def collate(rows: List[Row], max_seq_length: int, topk_k: int = 0, share_prompts: bool = False):
    """Right-padded arrays for a list of rows -> (batch dict, real token count).

    inputs[b, j] predicts targets[b, j]; mask marks the target tokens (r or y).
    With topk_k > 0 the soft rows' cached top-k teacher log-probs are laid out
    at their target positions (zeros elsewhere, masked or ignored).
    share_prompts: the record layout instead (record_prompt.collate: each distinct
    prompt once, the rows' continuations apart).
    """
    if share_prompts:
        return record_prompt.collate(rows, max_seq_length, topk_k)
    lens = [row.length(max_seq_length) - 1 for row in rows]
    L = batching.padded_length(max(lens), max_seq_length - 1)
    inputs = np.zeros((len(rows), L), np.int32)
    a = batching.target_arrays(len(rows), L, topk_k)
    for b, (row, n) in enumerate(zip(rows, lens)):
        tokens = (row.prompt + row.target)[: n + 1]
        inputs[b, :n] = tokens[:-1]
        a["targets"][b, :n] = tokens[1:]
        start = len(row.prompt) - 1
        a["mask"][b, start:n] = 1.0
        batching.put_teacher(a, b, row, start, n - start)
    batch = batching.to_batch({}, inputs, a, rows)
    return batch, int(sum(n + 1 for n in lens))


def data_hash(data: TeacherData) -> str:
    h = hashlib.sha256(json.dumps(list(data.refusal_ids)).encode())
    for rec in data.records:
        h.update(f"{rec.prompt_index},{rec.sample_index},{float(rec.u)!r},{len(rec.prompt_ids)},"
                 f"{len(rec.response_ids)};".encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- state


def _assign(tree, flat: dict) -> None:
    """Set tree[path] = value in place for "a.b.0.c"-style paths (compile needs the same containers)."""
    for path, value in flat.items():
        node, keys = tree, path.split(".")
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node[k]
        last = keys[-1]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value


def _rng_key() -> mx.array:
    return mx.array(mx.random.state[0])


def _set_rng_key(key) -> None:
    """mx.random.seed(s) sets the key to [s >> 32, s & 0xffffffff]: any saved key is restorable."""
    k = np.asarray(key).astype(np.uint64)
    mx.random.seed(int((int(k[0]) << 32) | int(k[1])))


def save_state(path, params, optimizer, step: int, micro_batch: int, args: TrainArgs, extra: dict) -> None:
    tensors = {f"params.{k}": v for k, v in tree_flatten(params)}
    tensors.update({f"optimizer.{k}": v for k, v in tree_flatten(optimizer.state)})
    tensors["rng"] = _rng_key()
    meta = {
        "format": STATE_FORMAT,
        "step": str(step),
        "micro_batch": str(micro_batch),
        "settings": json.dumps({k: getattr(args, k) for k in RESUME_KEYS}),
        **{k: str(v) for k, v in extra.items()},
    }
    mx.eval(tensors)
    files.atomic_write(path, lambda tmp: mx.save_safetensors(tmp, tensors, metadata=meta))


def load_state(path, args: TrainArgs, expect: dict, say=None):
    """(params, optimizer state, rng key, step, micro_batch) of a state file that matches `args`.

    Only --iters may grow: a run (finished or not) is extended to the new step count, with
    the learning-rate schedule recomputed for it from the saved optimizer step."""
    path = Path(path)
    try:
        tensors, meta = mx.load(str(path), return_metadata=True)
    except Exception as e:
        raise UserError(f"{path}: cannot read training state ({e})".splitlines()[0])
    if meta.get("format") != STATE_FORMAT:
        raise UserError(f"{path}: not an mlx-softprompt training-state file")
    saved = json.loads(meta.get("settings", "{}"))
    if isinstance(saved.get("method_options"), dict) and saved.get("method") == args.method:
        try:  # options added since the file was written take their defaults
            saved["method_options"] = methods.options_from(args.method, saved["method_options"])
        except UserError:
            pass
    for k in RESUME_KEYS:
        if k == "iters" and k in saved and isinstance(saved[k], int) and args.iters > saved[k]:
            if say is not None:
                say(f"extending the run from {saved[k]} to {args.iters} steps: the learning-rate schedule "
                    f"(warm-up, cosine decay to 0) is recomputed for {args.iters} steps")
            continue
        if k in saved and saved[k] != getattr(args, k):
            raise UserError(f"{path}: written with {k}={saved[k]!r}, now {k}={getattr(args, k)!r}; "
                            "resume with the same settings (or start afresh without --resume)")
    for k, v in expect.items():
        if meta.get(k) != str(v):
            raise UserError(f"{path}: written for {k}={meta.get(k)}, now {v}; the teacher data or base changed")
    params = {k[len("params."):]: v for k, v in tensors.items() if k.startswith("params.")}
    opt = {k[len("optimizer."):]: v for k, v in tensors.items() if k.startswith("optimizer.")}
    return params, opt, tensors["rng"], int(meta["step"]), int(meta["micro_batch"])


# ---------------------------------------------------------------- the loop


def make_schedule(args: TrainArgs):
    decay = optim.cosine_decay(args.learning_rate, args.iters - args.warmup, 0.0)
    if args.warmup == 0:
        return decay
    warm = optim.linear_schedule(0.0, args.learning_rate, args.warmup)
    return optim.join_schedules([warm, decay], [args.warmup])


def make_loss(model, method, objective: str, teacher_mode: str, loss_chunk: int = 0,
              grad_checkpoint: bool = False):
    """loss(params, batch) -> (weighted sum of token terms, weighted token count).

    loss_chunk > 0: the objective in chunks of that many positions (losses.chunked), when the
    model's logits are head(hidden) (memory.headless); else over the whole logits.
    grad_checkpoint: the decoder blocks recompute their activations in the backward pass.
    """
    loss = _make_loss(model, method, objective, teacher_mode, loss_chunk)
    if not grad_checkpoint:
        return loss

    def checkpointed(params, batch):
        with memory.grad_checkpoint(model):
            return loss(params, batch)

    return checkpointed


def _make_loss(model, method, objective: str, teacher_mode: str, loss_chunk: int):
    objective_fn = losses.objective(objective)
    needs = objective_fn.needs_teacher
    if loss_chunk > 0 and memory.head_of(model) is not None:
        return _chunked_loss(model, method, objective_fn, needs and teacher_mode == "online", needs, loss_chunk)

    def loss(params, batch):
        logits = student_outputs(model, method, params, batch)
        teacher = None
        if needs and teacher_mode == "online":
            # q_t: the base itself (outside bind), one extra forward, no gradient
            teacher = losses.Teacher(logprobs=mx.stop_gradient(losses.log_softmax(base_outputs(model, batch))))
        elif needs:
            teacher = losses.Teacher(topk_ids=batch["topk_ids"], topk_logprobs=batch["topk_logprobs"],
                                     tail_mass=batch["tail_mass"])
        return objective_fn(logits, batch["targets"], batch["mask"], batch["weight"], batch["soft"], teacher)

    return loss


def student_outputs(model, method, params, batch) -> mx.array:
    """The method's outputs at the batch's positions: plain rows, or the record layout (record_prompt)."""
    if "prompts" in batch:
        return record_prompt.forward(model, batch, method.training_prefix(model, params))
    return method.logits(model, params, batch["inputs"])


def base_outputs(model, batch) -> mx.array:
    """The base's own outputs at the same positions (the online teacher)."""
    if "prompts" in batch:
        return record_prompt.forward(model, batch)
    return model(batch["inputs"])


def _chunked_loss(model, method, objective_fn, online: bool, needs: bool, chunk: int):
    def loss(params, batch):
        with memory.headless(model) as head:
            hidden = student_outputs(model, method, params, batch)  # headless: the final hidden states
            teacher_hidden = mx.stop_gradient(base_outputs(model, batch)) if online else None
        teacher = None
        if needs and not online:
            teacher = losses.Teacher(topk_ids=batch["topk_ids"], topk_logprobs=batch["topk_logprobs"],
                                     tail_mass=batch["tail_mass"])
        return losses.chunked(objective_fn, head, hidden, batch["targets"], batch["mask"], batch["weight"],
                              batch["soft"], teacher, teacher_hidden, chunk)

    return loss


def make_step(model, loss, params, optimizer, grad_clip: float, world_size: int, compile: bool = True):
    """step(batch, acc, do_update): a micro-batch's gradient, accumulated; on update, the AdamW step."""
    state = [params, optimizer.state, mx.random.state]
    value_and_grad = mx.value_and_grad(loss)

    def step(batch, acc, do_update):
        (lsum, ntok), grads = value_and_grad(params, batch)
        if acc is not None:
            grads = tree_map(lambda a, b: a + b, grads, acc[0])
            lsum, ntok = lsum + acc[1], ntok + acc[2]
        if not do_update:
            return (grads, lsum, ntok)
        if world_size > 1:
            grads = tree_map(lambda g: mx.distributed.all_sum(g), grads)
            lsum, ntok = mx.distributed.all_sum(lsum), mx.distributed.all_sum(ntok)
        grads = tree_map(lambda g: g / mx.maximum(ntok, 1e-12), grads)
        if grad_clip > 0:
            grads, norm = optim.clip_grad_norm(grads, grad_clip)
        else:
            norm = mx.sqrt(sum((g.astype(mx.float32) ** 2).sum() for _, g in tree_flatten(grads)))
        _assign(params, dict(tree_flatten(optimizer.apply_gradients(grads, params))))
        return lsum, ntok, norm

    if compile:
        step = partial(mx.compile, inputs=state, outputs=state)(step)
    return step, state


def evaluate_rows(loss, params, rows: List[Row], args: TrainArgs, topk_k: int, rank: int = 0, size: int = 1,
                  max_batches: int = -1, share_prompts: bool = False) -> float:
    """The objective (per weighted target token) over rows; each rank takes its rank_share of each batch."""
    total, count = mx.array(0.0), mx.array(0.0)
    nb = -(-len(rows) // args.batch_size)
    if max_batches > 0:
        nb = min(nb, max_batches)
    for i in range(nb):
        share = rank_share(rows[i * args.batch_size:(i + 1) * args.batch_size], rank, size)
        if not share:
            continue
        batch, _ = collate(share, args.max_seq_length, topk_k, share_prompts)
        s, c = loss(params, batch)
        total, count = total + s, count + c
        mx.eval(total, count)
    if size > 1:
        total, count = mx.distributed.all_sum(total, stream=mx.cpu), mx.distributed.all_sum(count, stream=mx.cpu)
    return float(total.item()) / max(float(count.item()), 1e-12)


def _broadcast_from_rank0(arrays: dict, rank: int) -> dict:
    """Rank 0's arrays on every rank: all_sum with zeros elsewhere (exact)."""
    out = {}
    for k, v in arrays.items():
        x = v if rank == 0 else mx.zeros_like(v)
        out[k] = mx.distributed.all_sum(x, stream=mx.cpu)
    mx.eval(out)
    return out


class Metrics:
    """JSONL metrics on rank 0 (and --report-to's reporters); a resumed run drops the lines past
    its checkpoint."""

    def __init__(self, path: Path, enabled: bool, resume_step: Optional[int], reporters: Sequence = ()):
        self.path, self.enabled, self.reporters = path, enabled, list(reporters)
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and path.exists():
            for line in path.read_text().splitlines():
                try:
                    if int(json.loads(line).get("step", 0)) <= resume_step:
                        kept.append(line)
                except (json.JSONDecodeError, AttributeError, ValueError):
                    continue
        files.write_text(path, "".join(line + "\n" for line in kept))  # a crash here keeps the old file

    def write(self, **record) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            for r in self.reporters:
                r.log(int(record.get("step", 0)), {k: v for k, v in record.items() if k != "step"})

    def close(self) -> None:
        for r in self.reporters:
            r.close()


def rank_share(batch: Sequence, rank: int, size: int) -> Sequence:
    """This machine's rows of a global batch: a contiguous block (a record's rows are adjacent in a
    batch, batching.Order, and stay on one machine, where they share their prompt: record_prompt)."""
    per = -(-len(batch) // size)
    return batch[rank * per:(rank + 1) * per]


def iterate_batches(rows: List[Row], args: TrainArgs, topk_k: int, start: int = 0, rank: int = 0, size: int = 1,
                    share_prompts: bool = False):
    """(batch, real token count) for global micro-batches start, start+1, ...: this rank's share.

    Rows are bucketed by length (batching.Order) and global micro-batch m is a
    function of (seed, m), so the data position is the number of micro-batches
    consumed and a resumed run sees the same batches. Another batching scheme
    plugs into `loop` in its place. share_prompts: the record layout (collate).
    """
    order = batching.Order([r.length(args.max_seq_length) for r in rows], args.batch_size, args.seed,
                           args.grad_accum, records=[r.prompt_index for r in rows])
    m = start
    while True:
        idx = order.batch(m)
        yield collate([rows[i] for i in rank_share(idx, rank, size)], args.max_seq_length, topk_k, share_prompts)
        m += 1


class TrainingCallback:
    """What the loop reports (mlx-lm's callback shape): train-loss windows and validation losses."""

    def on_train_loss_report(self, info: dict) -> None:
        pass

    def on_val_loss_report(self, info: dict) -> None:
        pass


class Reporter(TrainingCallback):
    """Metrics JSONL (rank 0) and the progress bar."""

    def __init__(self, metrics: "Metrics", bar: Bar):
        self.metrics, self.bar = metrics, bar

    def on_train_loss_report(self, info: dict) -> None:
        self.metrics.write(**info)
        self.bar.set(loss=info["loss"], tok_s=round(info["tokens_per_second"]), pad=f"{info['padding_share']:.0%}",
                     mem_gb=round(info["peak_memory_gb"], 3))

    def on_val_loss_report(self, info: dict) -> None:
        self.metrics.write(**info)
        self.bar.set(val=info["val_loss"])


def loop(params, optimizer, step, state, batches, args: TrainArgs, start: int = 0,
         validate: Optional[Callable[[int], Optional[float]]] = None, checkpoint: Optional[Callable[[int], None]] = None,
         callback: Optional[TrainingCallback] = None, size: int = 1, tick: Optional[Callable[[], None]] = None) -> dict:
    """Steps start+1 .. args.iters: `batches` yields (batch, tokens) micro-batches, `step` (make_step)
    takes them; `callback` gets the reports, `validate`/`checkpoint` run on their schedules."""
    callback = callback or TrainingCallback()
    win_loss = win_tok = 0.0
    win_tokens, win_time, trained = 0, 0.0, 0
    win_pad = np.zeros(2, np.int64)  # [computed positions, real positions] since the last report
    last_loss, val_loss = float("nan"), None
    tic0 = time.perf_counter()
    for it in range(start + 1, args.iters + 1):
        tic = time.perf_counter()
        acc, n_tokens = None, 0
        for a in range(args.grad_accum):
            batch, toks = next(batches)
            n_tokens += toks
            win_pad += record_prompt.positions(batch, toks)  # computed, real (a row of t tokens: t-1)
            out = step(batch, acc, a == args.grad_accum - 1)
            if a < args.grad_accum - 1:
                acc = out
                mx.eval(acc)
        lsum, ntok, norm = out
        mx.eval(state, lsum, ntok, norm)
        win_time += time.perf_counter() - tic
        win_loss += float(lsum.item())
        win_tok += float(ntok.item())
        win_tokens += n_tokens
        if it % args.steps_per_report == 0 or it == args.iters:
            tokens, pad = win_tokens, win_pad
            if size > 1:
                tokens = int(mx.distributed.all_sum(mx.array(win_tokens), stream=mx.cpu).item())
                pad = np.array(mx.distributed.all_sum(mx.array(win_pad), stream=mx.cpu))
            trained += tokens
            last_loss = win_loss / max(win_tok, 1e-12)
            callback.on_train_loss_report(dict(
                step=it, loss=last_loss, learning_rate=float(optimizer.learning_rate.item()),
                grad_norm=float(norm.item()), tokens_per_second=tokens / max(win_time, 1e-9),
                trained_tokens=trained, padding_share=batching.padding_share(pad[0], int(pad[1])),
                peak_memory_gb=mx.get_peak_memory() / 1e9,
                elapsed=time.perf_counter() - tic0))
            win_loss = win_tok = 0.0
            win_tokens, win_time = 0, 0.0
            win_pad[:] = 0
        if validate is not None and (it % args.val_every == 0 or it == args.iters):
            v = validate(it)
            if v is not None:
                val_loss = v
                callback.on_val_loss_report(dict(step=it, val_loss=v))
        if checkpoint is not None and (it % args.save_every == 0 or it == args.iters):
            checkpoint(it)
        if tick is not None:
            tick()
    return {"train_loss": last_loss, "val_loss": val_loss, "seconds": time.perf_counter() - tic0}


class CallbackList(TrainingCallback):
    """Several callbacks as one (None entries skipped)."""

    def __init__(self, *callbacks):
        self.callbacks = [c for c in callbacks if c is not None]

    def on_train_loss_report(self, info: dict) -> None:
        for c in self.callbacks:
            c.on_train_loss_report(info)

    def on_val_loss_report(self, info: dict) -> None:
        for c in self.callbacks:
            c.on_val_loss_report(info)


def restore(args: TrainArgs, params, optimizer, expect: dict, rank: int = 0, size: int = 1, say=print) -> int:
    """The step to start from: with --resume, rank 0 reads the training state (params, optimiser
    state, RNG key) into place; on several machines every rank then takes rank 0's."""
    start = 0
    state_path = args.state_path
    if args.resume:
        found = state_path.exists() if rank == 0 else False
        if size > 1:
            found = bool(_broadcast_from_rank0({"f": mx.array(int(found))}, rank)["f"].item())
        if found:
            if rank == 0:
                p, o, key, start, micro = load_state(state_path, args, expect, say)
                if micro != start * args.grad_accum:
                    raise UserError(f"{state_path}: inconsistent data position ({micro} batches at step {start})")
                _assign(params, p)
                _assign(optimizer.state, o)
                _set_rng_key(key)
            say(f"resuming from {state_path} at step {start}")
        else:
            say(f"--resume: no training state at {state_path}; starting at step 0")
    if size > 1:
        flat = {f"p.{k}": v for k, v in tree_flatten(params)}
        flat.update({f"o.{k}": v for k, v in tree_flatten(optimizer.state)})
        flat["rng"] = _rng_key()
        flat["start"] = mx.array(start, dtype=mx.int64)
        got = _broadcast_from_rank0(flat, rank)
        _assign(params, {k[2:]: v for k, v in got.items() if k.startswith("p.")})
        _assign(optimizer.state, {k[2:]: v for k, v in got.items() if k.startswith("o.")})
        _set_rng_key(got["rng"])
        start = int(got["start"].item())
    mx.eval(params, optimizer.state)
    return start


def make_method(args: TrainArgs) -> methods.Method:
    return methods.get(args.method, args.method_options)


def distributed_group():
    """mx.distributed's group (one machine without a launcher). A ring that cannot start, e.g.
    a port of `mlx.launch --starting-port` already in use (error 98) or a peer that never came
    up (111), is the user's setup, not a bug: one line naming the rank and the hosts file."""
    try:
        return mx.distributed.init()
    except RuntimeError as e:
        where = ", ".join(f"{k}={os.environ[k]}" for k in ("MLX_RANK", "MLX_HOSTFILE") if os.environ.get(k))
        raise UserError(f"the distributed group did not start ({where or 'no MLX_RANK/MLX_HOSTFILE'}): {e}; "
                        "if a port is in use, give mlx.launch another --starting-port") from None


def train(args: TrainArgs, data: Optional[TeacherData] = None, model_bundle=None, log=print,
          loss: Optional[Callable] = None, iterate_batches: Callable = iterate_batches,
          callback: Optional[TrainingCallback] = None) -> dict:
    """Train args.method with args.objective on the teacher data; write args.out. Returns a summary.

    The parts can be swapped, as in mlx-lm's trainer: `loss(params, batch) -> (sum, count)`
    (default: make_loss for the method and objective), `iterate_batches(rows, args, topk_k,
    start, rank, size)` and a TrainingCallback that receives the reports (besides the
    metrics file and the bar).
    """
    args.check()
    world = distributed_group()
    rank, size = world.rank(), world.size()
    if args.batch_size % size:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by the {size} machines")
    say = log if rank == 0 else (lambda *a, **k: None)
    if rank == 0:  # before any work: the outputs can be written, and nothing is replaced unasked
        checks.output_file(args.out, "--out", overwrite=args.overwrite, resume=args.resume,
                           hint="pass --resume to continue it or --overwrite to start afresh")
        checks.output_file(args.metrics_path, "--metrics", overwrite=True)
        checks.clean_stale(args.state_path)

    if data is None:
        data = open_teacher(args.teacher)
    model, tokenizer, config = model_bundle or models.load(args.base)
    n_virtual = int(args.method_options.get("num_tokens", 0) or 0)  # positions a prompt or prefix adds
    checks.fits_context(n_virtual, config, f"--num-tokens {n_virtual}")
    model.freeze()
    fp = models.fingerprint(model, config)
    _check_base(manifest_base(data.manifest), fp, args, say)
    use_topk = losses.needs_teacher(args.objective) and args.teacher_mode == "cache"
    topk_k = 0
    if use_topk:
        topk_k = int(manifest_value(data.manifest, "k") or 0) or next(
            (np.asarray(r.topk_ids).shape[-1] for r in data.records if np.asarray(r.topk_ids).ndim == 2), 0)
        if topk_k <= 0:
            raise UserError(f"{args.teacher}: the cache has no top-k log-probs; use --teacher-mode online")

    rows = build_rows(data, args.objective, args.hard_guard, topk=use_topk)
    too_long = [r for r in rows if len(r.prompt) >= args.max_seq_length]
    rows = [r for r in rows if len(r.prompt) < args.max_seq_length]
    val_rows = [r for r in rows if is_val(r.prompt_index, args.seed, args.val_split)]
    # by their prompt's longest row (little padding), a prompt's rows adjacent (one prompt run: record_prompt)
    val_longest = batching.record_lengths([r.length(args.max_seq_length) for r in val_rows],
                                          [r.prompt_index for r in val_rows])
    val_rows = [val_rows[i] for i in sorted(range(len(val_rows)),
                                            key=lambda i: (val_longest[i], val_rows[i].prompt_index))]
    train_rows = [r for r in rows if not is_val(r.prompt_index, args.seed, args.val_split)]
    if too_long:
        say(f"note: {len(too_long)} rows skipped: prompt longer than --max-seq-length {args.max_seq_length}")
    per_epoch = batching.Order([r.length(args.max_seq_length) for r in train_rows], args.batch_size, args.seed,
                               args.grad_accum).per_epoch
    longest = min(args.max_seq_length, max((len(r.prompt) + len(r.target) for r in rows), default=0))
    checks.fits_context(n_virtual + longest, config, f"--num-tokens {n_virtual} + the longest row ({longest} tokens)")
    checks.fits_memory(checks.attention_bytes(config, 1, n_virtual + longest),
                       f"one row of {n_virtual + longest} tokens (--num-tokens + the longest row)")

    method = make_method(args)
    params = method.init(model, tokenizer, args.seed)
    optimizer = optim.AdamW(learning_rate=make_schedule(args), weight_decay=args.weight_decay)
    optimizer.init(params)
    mx.random.seed(args.seed)
    dhash = data_hash(data)
    expect = {"data_hash": dhash, "base_embedding_hash": fp["embedding_hash"]}

    start = restore(args, params, optimizer, expect, rank, size, say)
    mx.eval(params, optimizer.state)

    share = method.shares_record_prompt and record_prompt.pays(train_rows)
    if share and not record_prompt.supported(model):
        share = False
        say("note: this model's layers cannot share a record's prompt across its rows (sliding window, "
            "recurrent state or their own position and mask handling): each row runs its prompt")
    extra = {"share_prompts": True} if share else {}  # a custom iterate_batches need not know the option

    if args.loss_chunk and memory.head_of(model) is None:
        say(f"note: --loss-chunk {args.loss_chunk}: this model's logits are not head(hidden states) "
            "(final soft-capping or scaling); the loss runs over the whole logits")
    loss = loss or make_loss(model, method, args.objective, args.teacher_mode, args.loss_chunk,
                             args.grad_checkpoint)
    step, state = make_step(model, loss, params, optimizer, args.grad_clip, size, compile=args.compile)
    reporters = reporting.open_reporters(args.report_to, Path(args.out).parent, asdict(args),
                                         Path(args.out).stem, args.project_name) if rank == 0 else []
    metrics = Metrics(args.metrics_path, rank == 0, start if start > 0 else None, reporters)
    meta = {
        "objective": args.objective,
        "guard": _text(manifest_guard(data.manifest)),
        "guard_template": _text(manifest_guard_template(data.manifest)),
        "refusal": _text(manifest_value(data.manifest, "refusal")),
        "data_hash": dhash,
        "teacher_mode": args.teacher_mode,
        "moderation": _text(manifest_value(data.manifest, "mode")),
        "hard_guard": str(bool(args.hard_guard)).lower(),
        "base_model": str(args.base),  # as given (hub id or directory): export-peft's default base
    }

    def checkpoint(at: int):
        if rank != 0:
            return
        method.save(args.out, params, model, config, steps=str(at), **meta)
        save_state(args.state_path, params, optimizer, at, at * args.grad_accum, args, expect)

    def validate(at: int):
        if not val_rows:
            return None
        return evaluate_rows(loss, params, val_rows, args, topk_k, rank, size, args.val_batches, share)

    say(f"train: {args.method} x {args.objective} ({args.teacher_mode} teacher), {len(train_rows)} train rows / "
        f"{len(val_rows)} val rows from {len(data.records)} records, {per_epoch} batches per epoch, "
        f"{size} machine(s)" + (", each prompt run once for its rows" if share else ""))
    bar = Bar(total=args.iters - start, desc="train" if start == 0 else f"train (from step {start})",
              unit="step", disable=rank != 0)
    both = CallbackList(Reporter(metrics, bar), callback)
    val_loss = None
    if start == 0:
        val_loss = validate(0)
        if val_loss is not None:
            both.on_val_loss_report(dict(step=0, val_loss=val_loss))
    batches = iterate_batches(train_rows, args, topk_k, start * args.grad_accum, rank, size, **extra)
    out = loop(params, optimizer, step, state, batches, args, start, validate, checkpoint, both, size,
               tick=lambda: bar.update(1))
    bar.close()
    metrics.close()
    if start >= args.iters:
        checkpoint(args.iters)
    val_loss = out["val_loss"] if out["val_loss"] is not None else val_loss
    return {"out": str(args.out), "steps": args.iters, "resumed_from": start, "train_loss": out["train_loss"],
            "val_loss": val_loss, "train_rows": len(train_rows), "val_rows": len(val_rows),
            "machines": size, "rank": rank, "seconds": out["seconds"]}


def _check_base(cache_fp: Optional[dict], fp: dict, args: TrainArgs, say) -> None:
    """The cache's base must be --base: same shape always; the same weights or a (quantized) copy."""
    if not cache_fp:
        return
    for k in ("architecture", "hidden_size", "vocab_size"):
        if str(cache_fp.get(k)) != str(fp[k]):
            raise UserError(f"{args.teacher}: teacher cache was made with base {models.short(cache_fp)}, "
                            f"but --base {args.base} is {models.short(fp)}")
    if isinstance(cache_fp.get("probes"), str):
        why = models.fingerprint_mismatch({**cache_fp, "probes": models.decode_probes(
            cache_fp["probes"], f"{args.teacher}/manifest.json")}, fp)
        if why:
            raise UserError(f"{args.teacher}: teacher cache was made with base {models.short(cache_fp)}, "
                            f"but --base {args.base} ({models.short(fp)}) is not it or a quantized copy: {why}")
        return
    if cache_fp.get("embedding_hash") != fp["embedding_hash"]:
        if "sketch" in cache_fp and not models.fingerprints_match(cache_fp, fp):
            raise UserError(f"{args.teacher}: teacher cache was made with base {models.short(cache_fp)}, "
                            f"but --base {args.base} is {models.short(fp)}")
        say(f"note: the teacher cache's base has embedding hash {cache_fp.get('embedding_hash')}, --base has "
            f"{fp['embedding_hash']}: fine for a quantized copy of the same model, wrong targets otherwise")


def _text(v) -> Optional[str]:
    if v is None:
        return None
    return v if isinstance(v, str) else json.dumps(v)
