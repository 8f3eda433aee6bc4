"""Length-bucketed batches: little padding, an order that is a function of (seed, epoch), and
micro-batches that cover the same rows as one big batch."""

import numpy as np
import pytest

from mlx_softprompt import batching, train
from mlx_softprompt.errors import UserError


def _padding(order, lengths, n_batches):
    pos = real = 0
    for m in range(n_batches):
        ls = lengths[order.batch(m)]
        pos += len(ls) * batching.padded_length(int(ls.max()), 10**9)
        real += int(ls.sum())
    return batching.padding_share(pos, real)


def test_buckets_cut_padding_against_a_random_order():
    rng = np.random.default_rng(0)
    lengths = rng.integers(30, 296, 1000)  # the spread of the demo's teacher rows
    order = batching.Order(lengths, 8, seed=0)
    shuffled = [rng.permutation(len(lengths))[:8] for _ in range(order.per_epoch)]
    random_pos = sum(8 * batching.padded_length(int(lengths[b].max()), 10**9) for b in shuffled)
    random_share = batching.padding_share(random_pos, sum(int(lengths[b].sum()) for b in shuffled))
    assert random_share > 0.3
    assert _padding(order, lengths, order.per_epoch) < 0.05


def test_each_epoch_uses_distinct_rows_and_a_new_order_from_seed_and_epoch_only():
    lengths = np.random.default_rng(1).integers(1, 40, 37)
    a = batching.Order(lengths, 4, seed=5)
    assert a.per_epoch == 9
    for e in range(3):
        rows = np.concatenate([a.batch(e * 9 + j) for j in range(9)])
        assert len(set(rows.tolist())) == 36  # one row left over, a different one from epoch to epoch
    epochs = [np.concatenate([a.batch(e * 9 + j) for j in range(9)]).tolist() for e in range(3)]
    assert epochs[0] != epochs[1] != epochs[2]
    b = batching.Order(lengths, 4, seed=5)
    assert [b.batch(m).tolist() for m in (20, 3, 11)] == [a.batch(m).tolist() for m in (20, 3, 11)]
    assert batching.Order(lengths, 4, seed=6).batch(0).tolist() != a.batch(0).tolist() or \
        batching.Order(lengths, 4, seed=6).batch(1).tolist() != a.batch(1).tolist()


def test_micro_batches_split_the_step_batch():
    """--batch-size 4 --grad-accum 2 sees, per step, the rows of --batch-size 8 (accumulation = one batch)."""
    lengths = np.random.default_rng(2).integers(1, 100, 50)
    big, small = batching.Order(lengths, 8, 0), batching.Order(lengths, 4, 0, accum=2)
    assert small.per_epoch == 2 * big.per_epoch
    for step in range(2 * big.per_epoch):
        both = np.concatenate([small.batch(2 * step), small.batch(2 * step + 1)])
        assert sorted(both.tolist()) == sorted(big.batch(step).tolist())
    with pytest.raises(UserError, match="grad-accum"):
        batching.Order(lengths[:10], 4, 0, accum=3)


def test_padded_length_rounds_up_within_the_maximum():
    assert batching.padded_length(1, 100) == batching.PAD_TO
    assert batching.padded_length(batching.PAD_TO, 100) == batching.PAD_TO
    assert batching.padded_length(97, 99) == 99  # never past --max-seq-length
    assert batching.padded_length(120, 99) == 120  # a row already cut to the maximum is not padded


def test_collate_pads_a_bucketed_batch_only_to_the_next_multiple():
    rows = [train.Row([1, 2, 3], list(range(10, 10 + t)), 1.0, False, i) for i, t in enumerate((20, 21, 22, 22))]
    batch, toks = train.collate(rows, 1024)
    assert batch["inputs"].shape == (4, 24)  # the longest row: 25 tokens, 24 input positions (a multiple of 8)
    assert toks == sum(3 + t for t in (20, 21, 22, 22))


def test_rows_of_one_record_share_a_batch():
    """A record's refusal and response rows stay together (else per-batch normalisation reweights them)."""
    rng = np.random.default_rng(0)
    n_rec = 40
    records = np.repeat(np.arange(n_rec), 2)
    lengths = np.stack([rng.integers(20, 40, n_rec), rng.integers(60, 300, n_rec)], 1).ravel()  # short r, long y
    order = batching.Order(lengths.tolist(), 8, seed=1, records=records.tolist())
    for m in range(order.per_epoch * 2):
        idx = order.batch(m)
        ids, counts = np.unique(records[idx], return_counts=True)
        assert (counts == 2).all(), (m, records[idx])
    # without records, sorting by length separates them: the test would notice the old behaviour
    plain = batching.Order(lengths.tolist(), 8, seed=1)
    assert any((np.unique(records[plain.batch(m)], return_counts=True)[1] == 1).any() for m in range(plain.per_epoch))
