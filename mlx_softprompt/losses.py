"""The training objectives: the TV and KL bounds of docs/METHOD.md, and CE, as one table.

``OBJECTIVES`` maps a name to its terms (an ``Objective``): the per-token term
for a hard target, the per-token divergence from the teacher's q_t (full or
top-k), and whether the rows take the guard's hard decision. The loop, bench
and the CLI read the table; a new objective is one row, and an unknown name is
an error, never a silent fallback.

The dual system answers p_S(y|x) = (1-u) p_f(y|x) + u 1[y = r]. Each teacher
record (prompt x, teacher sample y ~ p_f, guard verdict u) gives two rows:

- the refusal branch, [x; r], weight u, hard target r:
  TV term 1 - p_theta(r_t | x, r_<t), KL term -log p_theta(r_t | x, r_<t);
- the response branch, [x; y], weight 1-u, soft target q_t = p_f(. | x, y_<t):
  TV term TV(q_t, s_t) = 0.5 ||q_t - s_t||_1, KL term KL(q_t || s_t),
  with s_t = p_theta(. | x, y_<t).

Summed over t, these bound TV(p_S, p_theta) and KL(p_S || p_theta) from above
(joint convexity, the union bound for the refusal, the chain rule for y).
``ce`` is direct optimisation: hard labels, cross-entropy on r where the guard
says unsafe (u >= the guard threshold) and on the teacher sample y where it says safe.

Normalisation is per token: a batch's loss is the weighted sum of its token
terms divided by the number of target tokens in the batch, each token counted
with its row's weight (u or 1-u: the expected target length under p_S; with
hard weights, as for ``ce``, exactly the plain token count, as mlx-lm's
default loss). The functions return the sum and the count separately, so the
trainer can normalise over a whole global batch (gradient accumulation,
several machines) and get the same step as one big batch.

Teacher distributions q_t come either in full (the base without P, computed on
the fly) or from the teacher cache as top-k log-probs plus the tail mass
(the probability outside the k ids). With top-k the vocabulary is coarsened
to the k ids plus one "tail" bucket:

- TV counts the tail exactly as far as it can: sum over the top-k of |q - s|
  plus |q_tail - s_tail|, with s_tail = 1 - sum over the top-k of s. By the
  triangle inequality |q_tail - s_tail| <= sum over the tail of |q_i - s_i|,
  so this is a lower bound of the true TV(q_t, s_t) (equal when q_i - s_i
  keeps one sign over the tail), and the cached TV objective is a slightly
  optimistic estimate of the bound.
- KL uses a tail bucket: sum over the top-k of q (log q - log s) plus
  q_tail (log q_tail - log s_tail), i.e. KL between the coarsened
  distributions, which is <= the true KL(q_t || s_t) (data processing) and
  equals it when s matches q's shape inside the tail. The top-k is not
  renormalised: q keeps its real top-k probabilities.

For KL, log s_tail is a log-sum-exp over the student's non-top-k logits, so it
stays exact (no 1 - sum cancellation) even when the tail is tiny. TV needs
s_tail itself only to absolute accuracy, so it takes 1 - sum over the top-k of
s (error ~ k x 1e-7 in fp32): no extra pass over the vocabulary, which halves
the TV loss's time and cuts its memory by a third (top-k ids are distinct, as
the teacher cache stores them; padded positions are masked).
"""

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import mlx.core as mx

from .errors import UserError
from .guards import DEFAULT_THRESHOLD, refuses

_FILL = -1e30  # a finite -inf: keeps log-sum-exp and its gradient NaN-free on empty sets


@dataclass
class Teacher:
    """Teacher distributions q_t at each target position: full log-probs or the cache's top-k."""

    logprobs: Optional[mx.array] = None  # [B, L, V], the base without P
    topk_ids: Optional[mx.array] = None  # [B, L, k] int32
    topk_logprobs: Optional[mx.array] = None  # [B, L, k] log q of those ids (not renormalised)
    tail_mass: Optional[mx.array] = None  # [B, L] 1 - sum exp(topk_logprobs)

    def __post_init__(self):
        if self.logprobs is None and self.topk_ids is None:
            raise ValueError("Teacher needs full log-probs or top-k ids/log-probs/tail mass")


def log_softmax(logits: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def gather(logprobs: mx.array, ids: mx.array) -> mx.array:
    """logprobs[..., ids] along the last axis; ids has the same leading shape ([..., k] or [...])."""
    if ids.ndim == logprobs.ndim - 1:
        return mx.take_along_axis(logprobs, ids[..., None], axis=-1)[..., 0]
    return mx.take_along_axis(logprobs, ids, axis=-1)


# ---------------------------------------------------------------- per-token divergences


def tv_full(q_logprobs: mx.array, s_logprobs: mx.array) -> mx.array:
    """TV(q_t, s_t) = 0.5 ||q_t - s_t||_1 for full distributions; [..., V] -> [...]."""
    return 0.5 * mx.abs(mx.exp(q_logprobs) - mx.exp(s_logprobs)).sum(axis=-1)


def kl_full(q_logprobs: mx.array, s_logprobs: mx.array) -> mx.array:
    """KL(q_t || s_t) for full distributions; terms with q = 0 contribute 0."""
    q = mx.exp(q_logprobs)
    lq = mx.where(q > 0, q_logprobs, 0.0)
    return mx.where(q > 0, q * (lq - s_logprobs), 0.0).sum(axis=-1)


def _student_tail(s_logprobs: mx.array, ids: mx.array) -> mx.array:
    """log of the student's mass outside `ids` (exact log-sum-exp over the other logits)."""
    in_topk = mx.put_along_axis(mx.zeros(s_logprobs.shape, dtype=mx.bool_), ids,
                                mx.array(True), axis=-1)
    return mx.logsumexp(mx.where(in_topk, _FILL, s_logprobs), axis=-1)


def tv_topk(s_logprobs, topk_ids, topk_logprobs, tail_mass) -> mx.array:
    """TV between q and s coarsened to top-k + one tail bucket (a lower bound of TV(q, s))."""
    q = mx.exp(topk_logprobs.astype(mx.float32))
    s = mx.exp(gather(s_logprobs, topk_ids))
    s_tail = mx.maximum(1.0 - s.sum(axis=-1), 0.0)  # absolute accuracy is all TV needs (module doc)
    q_tail = mx.clip(tail_mass.astype(mx.float32), 0.0, 1.0)
    return 0.5 * (mx.abs(q - s).sum(axis=-1) + mx.abs(q_tail - s_tail))


def kl_topk(s_logprobs, topk_ids, topk_logprobs, tail_mass) -> mx.array:
    """KL between q and s coarsened to top-k + one tail bucket (<= KL(q || s))."""
    lq = topk_logprobs.astype(mx.float32)
    q = mx.exp(lq)
    lq = mx.where(q > 0, lq, 0.0)
    head = mx.where(q > 0, q * (lq - gather(s_logprobs, topk_ids)), 0.0).sum(axis=-1)
    if topk_ids.shape[-1] >= s_logprobs.shape[-1]:
        return head  # the top-k is the whole vocabulary: no tail bucket
    q_tail = mx.clip(tail_mass.astype(mx.float32), 0.0, 1.0)
    log_q_tail = mx.log(mx.maximum(q_tail, 1e-30))
    tail = mx.where(q_tail > 0, q_tail * (log_q_tail - _student_tail(s_logprobs, topk_ids)), 0.0)
    return head + tail


# ---------------------------------------------------------------- per-token hard terms


def tv_hard(s_logprobs: mx.array, targets: mx.array) -> mx.array:
    """1 - p(target): the TV bound's term for the refusal."""
    return 1.0 - mx.exp(gather(s_logprobs, targets))


def nll(s_logprobs: mx.array, targets: mx.array) -> mx.array:
    """-log p(target): the KL bound's term for the refusal, and cross-entropy."""
    return -gather(s_logprobs, targets)


# ---------------------------------------------------------------- the table


def reduce(terms: mx.array, mask: mx.array, weight: mx.array) -> Tuple[mx.array, mx.array]:
    """(weighted sum of the target tokens' terms, weighted target-token count)."""
    w = mask.astype(mx.float32) * weight.astype(mx.float32)[:, None]
    return (terms * w).sum(), w.sum()


@dataclass(frozen=True)
class Objective:
    """One objective: its terms. Called as obj(logits, targets, mask, weight, soft, teacher) -> (sum, count).

    Rows with soft[b] true (the response branch) are scored against the teacher's q_t
    with `soft_full` / `soft_topk`; the others (the refusal, or every row when the
    objective has no soft terms) with `hard` against their own targets.
    """

    name: str
    label: str
    hard: Callable
    soft_full: Optional[Callable] = None  # (q_logprobs [.., V], s_logprobs [.., V]) -> [..]
    soft_topk: Optional[Callable] = None  # (s_logprobs, topk_ids, topk_logprobs, tail_mass) -> [..]
    hard_labels: bool = False  # rows weighted by the guard's decision u >= threshold, not by u

    @property
    def needs_teacher(self) -> bool:
        return self.soft_full is not None

    def soft_terms(self, s_logprobs: mx.array, teacher: "Teacher") -> mx.array:
        if teacher.logprobs is not None:
            return self.soft_full(teacher.logprobs.astype(mx.float32), s_logprobs)
        return self.soft_topk(s_logprobs, teacher.topk_ids, teacher.topk_logprobs, teacher.tail_mass)

    def token_terms(self, logits: mx.array, targets: mx.array, soft: Optional[mx.array] = None,
                    teacher: Optional["Teacher"] = None) -> mx.array:
        """[B, L] terms; logits[:, t] predicts targets[:, t]; `soft` is [B] (1 for response rows)."""
        s_lp = log_softmax(logits)
        hard = self.hard(s_lp, targets)
        if not self.needs_teacher:
            return hard
        if teacher is None:
            raise ValueError(f"objective {self.name!r} needs teacher distributions for the response rows")
        return mx.where(soft[:, None].astype(mx.bool_), self.soft_terms(s_lp, teacher), hard)

    def __call__(self, logits, targets, mask, weight, soft=None, teacher: Optional["Teacher"] = None):
        return reduce(self.token_terms(logits, targets, soft, teacher), mask, weight)


OBJECTIVES: Dict[str, Objective] = {
    # u sum_t (1 - p_theta(r_t)) + (1-u) sum_t TV(q_t, s_t)
    "tv": Objective("tv", "TV", hard=tv_hard, soft_full=tv_full, soft_topk=tv_topk),
    # u sum_t -log p_theta(r_t) + (1-u) sum_t KL(q_t || s_t)
    "kl": Objective("kl", "KL", hard=nll, soft_full=kl_full, soft_topk=kl_topk),
    # direct optimisation: cross-entropy on r where the guard says unsafe, on y where it says safe
    "ce": Objective("ce", "CE (direct)", hard=nll, hard_labels=True),
}
tv, kl, ce = OBJECTIVES["tv"], OBJECTIVES["kl"], OBJECTIVES["ce"]


def chunked(objective, head, hidden: mx.array, targets, mask, weight, soft, teacher: Optional[Teacher] = None,
            teacher_hidden: Optional[mx.array] = None, chunk: int = 256) -> Tuple[mx.array, mx.array]:
    """An objective of this module over the sequence in chunks of `chunk` positions: (sum, count).

    The logits are head(hidden) one chunk at a time, in the forward pass and
    again in the backward pass (a custom VJP recomputes them), and each chunk
    waits for the previous one (mx.depends), so no [B, L, V] array is ever
    whole: memory for the logits drops from ~4 x B x L x V floats to
    ~4 x B x chunk x V, for one extra head matmul per chunk. The teacher's
    full distributions (online mode) come the same way from
    `teacher_hidden`, the base's hidden states. Sums of sums: the same value
    and gradient as the whole objective, up to fp32 rounding. Only `hidden`
    gets a gradient (the head and the batch are constants).
    """
    L = hidden.shape[1]
    parts = [slice(start, min(start + chunk, L)) for start in range(0, L, chunk)]

    def piece(h, part):
        t = None
        if teacher_hidden is not None:
            t = Teacher(logprobs=mx.stop_gradient(log_softmax(head(teacher_hidden[:, part]))))
        elif teacher is not None:
            t = Teacher(topk_ids=teacher.topk_ids[:, part], topk_logprobs=teacher.topk_logprobs[:, part],
                        tail_mass=teacher.tail_mass[:, part])
        return objective(head(h), targets[:, part], mask[:, part], weight, soft, t)

    def after(x, previous):
        return mx.depends(x, previous) if previous is not None else x

    @mx.custom_function
    def whole(hidden):
        total, count, previous = mx.array(0.0), mx.array(0.0), None
        for part in parts:
            s, c = piece(after(hidden[:, part], previous), part)
            total, count, previous = total + s, count + c, s
        return total, count

    @whole.vjp
    def whole_vjp(primals, cotangents, outputs):
        hidden = primals[0] if isinstance(primals, (list, tuple)) else primals
        d_total = cotangents[0]
        grads, previous = [], outputs[0]  # after the forward chunks: one chunk alive at a time
        for part in parts:
            h = after(hidden[:, part], previous)
            _, (g,) = mx.vjp(lambda h, part=part: piece(h, part)[0], [h], [d_total])
            grads.append(g)
            previous = g
        return (mx.concatenate(grads, axis=1),)

    return whole(hidden)


def objective(name: str) -> Objective:
    """The table row for `name`; an unknown name is a UserError listing the table."""
    if name not in OBJECTIVES:
        raise UserError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def row_weights(name: str, u: float, hard_guard: bool = False, threshold: float = DEFAULT_THRESHOLD) -> Tuple[float, float]:
    """(refusal-row weight, response-row weight) for a guard verdict u.

    Soft objectives: (u, 1-u), or the hard guard's (1[u >= threshold], 1[u < threshold]);
    objectives with hard labels always take the guard's decision.
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    u = float(u)
    if OBJECTIVES[name].hard_labels or hard_guard:
        return (1.0, 0.0) if refuses(u, threshold) else (0.0, 1.0)
    return u, 1.0 - u


def needs_teacher(name: str) -> bool:
    """Whether response rows need the teacher's distributions q_t (tv, kl) or only y (ce)."""
    return objective(name).needs_teacher
