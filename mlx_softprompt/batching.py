"""Length-bucketed batches: rows of similar length share a batch, so a step computes on little padding.

A batch is right-padded to its longest row, so rows batched in random order
waste a large share of the step on padding (37 % on the demo's teacher rows,
which run from 30 to 295 tokens). mlx-lm's trainer sorts rows by length
before batching; we do the same, but keep the data order a function of
(seed, epoch) alone, so that a resumed run sees the same batches:

1. epoch e draws a permutation of the rows from a generator seeded with
   (seed, e); its first ``per_epoch x group`` rows are the epoch's rows (the
   few left over change from epoch to epoch, as with a plain shuffle);
2. those rows are sorted by length (ties broken by the permutation, so
   equal-length rows meet different partners each epoch) and cut into
   groups of ``batch_size x accum`` rows, one group per optimiser step;
3. the groups are visited in an order drawn from the same generator; a
   group's micro-batches (``accum`` of them) are consecutive slices of it.

Global micro-batch m is then a pure function of (seed, m): the data position
of a run is the number of micro-batches consumed. A step sees the same rows
whatever its split into micro-batches (``--grad-accum``), so accumulation
still equals one big batch.

Rows of one record stay together. A teacher record gives a refusal row [x; r]
(weight u) and a response row [x; y] (weight 1-u), and a batch's loss is
normalised by its weighted token count. Sorted by their own lengths, the short
refusal rows of benign prompts (small u) would fill batches of their own, where
that normalisation scales them back up to full weight: the student then learns
to refuse everything (measured on the demo world: 100 % over-refusal). So rows
are ordered by their record (``records``: one id per row, e.g. the prompt
index) and sorted by the record's longest row, which keeps a record's rows
adjacent, in the same batch unless it straddles a boundary.

Padded sizes are rounded up to a multiple of ``PAD_TO`` positions: every new
batch shape costs one compilation of the step, and rows of sorted batches
differ by a few tokens, so a coarse multiple (mlx-lm rounds to 32) would be
most of the padding left.
"""

from typing import Optional, Sequence

import numpy as np

from .errors import UserError

PAD_TO = 8


def padded_length(longest: int, max_length: int) -> int:
    """A batch's padded length: `longest` rounded up to a multiple of PAD_TO, at most `max_length`."""
    return max(longest, min(-(-longest // PAD_TO) * PAD_TO, max_length))


class Order:
    """Global micro-batch m -> row indices, bucketed by length, seeded by (seed, epoch) only."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, accum: int = 1,
                 records: Optional[Sequence[int]] = None):
        self.lengths = np.asarray(lengths, np.int64)
        # each row's record (default: its own); a row is sorted by its record's longest row
        ids = np.arange(len(self.lengths)) if records is None else np.asarray(records)
        if len(ids) != len(self.lengths):
            raise ValueError("records must give one id per row")
        uniq, self.record = np.unique(ids, return_inverse=True)
        self.records = len(uniq)
        self.record_length = record_lengths(self.lengths, self.record)
        self.n, self.bs, self.seed, self.accum = len(self.lengths), int(batch_size), int(seed), int(accum)
        group = self.bs * self.accum
        if self.n < group:
            raise UserError(f"only {self.n} training rows for --batch-size {batch_size}"
                            + (f" x --grad-accum {accum}" if accum > 1 else "")
                            + ": use a smaller batch or a larger teacher cache")
        self.groups = self.n // group
        self.per_epoch = self.groups * self.accum  # micro-batches per epoch
        self._epoch, self._rows = None, None

    def position(self, m: int):
        """(epoch, micro-batch within the epoch) of global micro-batch m."""
        return divmod(m, self.per_epoch)

    def epoch(self, e: int) -> np.ndarray:
        """[groups, batch_size x accum] row indices of epoch e, groups in visiting order."""
        rng = np.random.default_rng([self.seed, e])
        group = self.bs * self.accum
        perm = rng.permutation(self.n)
        # a record ranks where its first row falls in the permutation; its rows follow each other
        rank = np.empty(self.n, np.int64)
        rank[perm] = np.arange(self.n)
        first = np.full(self.records, self.n, np.int64)
        np.minimum.at(first, self.record, rank)
        perm = np.lexsort((rank, first[self.record]))[: self.groups * group]
        ordered = perm[np.argsort(self.record_length[perm], kind="stable")]
        groups = ordered.reshape(self.groups, group)
        return groups[rng.permutation(self.groups)]

    def batch(self, m: int) -> np.ndarray:
        e, j = self.position(m)
        if e != self._epoch:
            self._epoch, self._rows = e, self.epoch(e)
        g, a = divmod(j, self.accum)
        return self._rows[g, a * self.bs:(a + 1) * self.bs]


def record_lengths(lengths: Sequence[int], records: Sequence[int]) -> np.ndarray:
    """Per row, the longest row of its record (rows of a record are sorted and batched together)."""
    lengths, records = np.asarray(lengths, np.int64), np.asarray(records)
    uniq, inverse = np.unique(records, return_inverse=True)
    longest = np.zeros(len(uniq), np.int64)
    np.maximum.at(longest, inverse, lengths)
    return longest[inverse]


def padding_share(positions: int, real_positions: int) -> float:
    """Share of the computed positions (batches' B x L) that are padding, not the rows' own."""
    positions = int(positions)
    return 1.0 - real_positions / positions if positions else 0.0


def target_arrays(B: int, T: int, topk_k: int = 0) -> dict:
    """Zeroed per-position arrays a collate fills: targets and mask [B, T], and with topk_k > 0
    the soft rows' cached teacher top-k (ids, log-probs [B, T, k]) and tail mass [B, T]."""
    a = {"targets": np.zeros((B, T), np.int32), "mask": np.zeros((B, T), np.float32)}
    if topk_k:
        a.update(topk_ids=np.zeros((B, T, topk_k), np.int32), topk_logprobs=np.zeros((B, T, topk_k), np.float32),
                 tail_mass=np.zeros((B, T), np.float32))
    return a


def put_teacher(a: dict, b: int, row, at: int, n: int) -> None:
    """A soft row's first n cached teacher positions at positions [at, at + n) of batch row b."""
    if "topk_ids" in a and row.soft and row.topk_ids is not None and n > 0:
        a["topk_ids"][b, at:at + n] = row.topk_ids[:n]
        a["topk_logprobs"][b, at:at + n] = row.topk_logprobs[:n]
        a["tail_mass"][b, at:at + n] = row.tail_mass[:n]


def to_batch(layout: dict, inputs: np.ndarray, a: dict, rows: Sequence) -> dict:
    """The batch dict (MLX arrays): the layout's own arrays, inputs, the filled target arrays,
    and the rows' weights and soft flags."""
    import mlx.core as mx

    batch = {k: mx.array(v) for k, v in layout.items()}
    batch["inputs"] = mx.array(inputs)
    batch.update(targets=mx.array(a["targets"]), mask=mx.array(a["mask"]),
                 weight=mx.array(np.array([r.weight for r in rows], np.float32)),
                 soft=mx.array(np.array([r.soft for r in rows], np.float32)))
    batch.update({k: mx.array(a[k]) for k in ("topk_ids", "topk_logprobs", "tail_mass") if k in a})
    return batch
