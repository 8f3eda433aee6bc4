"""The objectives against brute-force numpy, and the bounds against enumerated sequence distributions."""

import itertools

import mlx.core as mx
import numpy as np
import pytest

from mlx_softprompt import losses
from mlx_softprompt.losses import Teacher


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _topk(q_logits, k):
    """What the teacher cache stores: top-k ids, their log-probs, the tail mass."""
    lq = np.log(_softmax(q_logits))
    ids = np.argsort(-lq, axis=-1)[..., :k]
    lps = np.take_along_axis(lq, ids, -1)
    tail = 1.0 - np.exp(lps).sum(-1)
    return ids.astype(np.int32), lps.astype(np.float32), tail.astype(np.float32)


def _np_tv_topk(q, s, ids):
    """Brute force: coarsen both distributions to {top-k ids} + {everything else}."""
    out = np.zeros(q.shape[:-1])
    for idx in np.ndindex(*q.shape[:-1]):
        k = ids[idx]
        rest = np.setdiff1d(np.arange(q.shape[-1]), k)
        out[idx] = 0.5 * (np.abs(q[idx][k] - s[idx][k]).sum() + abs(q[idx][rest].sum() - s[idx][rest].sum()))
    return out


def _np_kl_topk(q, s, ids):
    out = np.zeros(q.shape[:-1])
    for idx in np.ndindex(*q.shape[:-1]):
        k = ids[idx]
        rest = np.setdiff1d(np.arange(q.shape[-1]), k)
        qk, sk = q[idx][k], s[idx][k]
        val = (qk * (np.log(qk) - np.log(sk))).sum()
        qt, st = q[idx][rest].sum(), s[idx][rest].sum()
        if len(rest) and qt > 0:
            val += qt * (np.log(qt) - np.log(st))
        out[idx] = val
    return out


@pytest.fixture
def case():
    rng = np.random.default_rng(0)
    B, L, V = 3, 4, 9
    s_logits = rng.normal(size=(B, L, V)).astype(np.float32) * 2
    q_logits = rng.normal(size=(B, L, V)).astype(np.float32) * 2
    targets = rng.integers(0, V, size=(B, L)).astype(np.int32)
    return s_logits, q_logits, targets


def test_full_divergences_match_numpy(case):
    s_logits, q_logits, _ = case
    q, s = _softmax(q_logits.astype(np.float64)), _softmax(s_logits.astype(np.float64))
    lq, ls = losses.log_softmax(mx.array(q_logits)), losses.log_softmax(mx.array(s_logits))
    np.testing.assert_allclose(np.array(losses.tv_full(lq, ls)), 0.5 * np.abs(q - s).sum(-1), atol=1e-6)
    np.testing.assert_allclose(np.array(losses.kl_full(lq, ls)), (q * np.log(q / s)).sum(-1), atol=1e-5)


@pytest.mark.parametrize("k", [1, 3, 8, 9])
def test_topk_divergences_match_numpy_with_the_tail(case, k):
    s_logits, q_logits, _ = case
    q, s = _softmax(q_logits.astype(np.float64)), _softmax(s_logits.astype(np.float64))
    ids, lps, tail = _topk(q_logits, k)
    ls = losses.log_softmax(mx.array(s_logits))
    tv = np.array(losses.tv_topk(ls, mx.array(ids), mx.array(lps), mx.array(tail)))
    kl = np.array(losses.kl_topk(ls, mx.array(ids), mx.array(lps), mx.array(tail)))
    np.testing.assert_allclose(tv, _np_tv_topk(q, s, ids), atol=2e-6)
    np.testing.assert_allclose(kl, _np_kl_topk(q, s, ids), atol=2e-5)
    # the coarsened divergences never exceed the true ones, and equal them with no tail
    true_tv, true_kl = 0.5 * np.abs(q - s).sum(-1), (q * np.log(q / s)).sum(-1)
    assert np.all(tv <= true_tv + 1e-6) and np.all(kl <= true_kl + 1e-5)
    if k == q.shape[-1]:
        np.testing.assert_allclose(tv, true_tv, atol=2e-6)
        np.testing.assert_allclose(kl, true_kl, atol=2e-5)


def test_tiny_student_tail_stays_exact_and_finite():
    """A student that puts ~1e-20 outside the top-k: log s_tail comes from a log-sum-exp, not 1 - sum."""
    V, k = 6, 3
    s_logits = np.array([[[30.0, 29.0, 28.0, -20.0, -21.0, -22.0]]], np.float32)
    q_logits = np.array([[[1.0, 0.5, 0.0, -1.0, -1.5, -2.0]]], np.float32)
    ids, lps, tail = _topk(q_logits, k)
    ls = losses.log_softmax(mx.array(s_logits))
    s = _softmax(s_logits.astype(np.float64))
    q = _softmax(q_logits.astype(np.float64))
    kl = float(losses.kl_topk(ls, mx.array(ids), mx.array(lps), mx.array(tail))[0, 0])
    expected = float(_np_kl_topk(q, s, ids)[0, 0])
    assert np.isfinite(kl) and abs(kl - expected) / expected < 1e-5
    # in float32, 1 - sum of the student's top-k probabilities is rounding noise (0 or ~1e-7),
    # not the true ~1e-22: the tail term would be off by dozens of nats
    naive = float((1.0 - np.exp(np.array(losses.gather(ls, mx.array(ids)))).sum(-1))[0, 0])
    true_tail = s[0, 0, 3:].sum()
    assert naive <= 0.0 or naive / true_tail > 1e6
    assert expected > 5


def test_gradients_are_finite_on_padding_and_full_vocab_topk():
    """Padded positions (ids 0, log-prob 0, tail 0) and k = V give no NaN in the loss or its gradient."""
    V = 5
    logits = mx.random.normal((2, 3, V), key=mx.random.key(1))
    for k in (2, V):
        ids = mx.zeros((2, 3, k), mx.int32) if k < V else mx.broadcast_to(mx.arange(V), (2, 3, V))
        teacher = Teacher(topk_ids=ids, topk_logprobs=mx.zeros((2, 3, k)), tail_mass=mx.zeros((2, 3)))
        for name in ("tv", "kl"):
            def f(x):
                return losses.OBJECTIVES[name](x, mx.zeros((2, 3), mx.int32), mx.array([[1, 1, 0], [0, 0, 0]]),
                                               mx.array([0.5, 0.0]), mx.array([1, 1]), teacher)[0]
            v, g = mx.value_and_grad(f)(logits)
            assert np.isfinite(float(v)) and np.all(np.isfinite(np.array(g)))


@pytest.mark.parametrize("name", ["tv", "kl", "ce"])
def test_objective_sums_and_counts_match_numpy(case, name):
    """Rows mix hard (refusal) and soft (response) targets, a padding mask and weights."""
    s_logits, q_logits, targets = case
    q, s = _softmax(q_logits.astype(np.float64)), _softmax(s_logits.astype(np.float64))
    mask = np.array([[1, 1, 1, 0], [0, 1, 1, 1], [1, 1, 0, 0]], np.float32)
    weight = np.array([0.3, 0.7, 1.0], np.float32)
    soft = np.array([0, 1, 1])
    p_t = np.take_along_axis(s, targets[..., None], -1)[..., 0]
    if name == "tv":
        hard, soft_t = 1 - p_t, 0.5 * np.abs(q - s).sum(-1)
    elif name == "kl":
        hard, soft_t = -np.log(p_t), (q * np.log(q / s)).sum(-1)
    else:
        hard = soft_t = -np.log(p_t)
    terms = np.where(soft[:, None] == 1, soft_t, hard)
    w = mask * weight[:, None]
    total, count = losses.OBJECTIVES[name](
        mx.array(s_logits), mx.array(targets), mx.array(mask), mx.array(weight), mx.array(soft),
        Teacher(logprobs=losses.log_softmax(mx.array(q_logits))))
    np.testing.assert_allclose(float(total), (terms * w).sum(), rtol=1e-5)
    np.testing.assert_allclose(float(count), w.sum(), rtol=1e-6)


def test_row_weights():
    assert losses.row_weights("tv", 0.25) == (0.25, 0.75)
    assert losses.row_weights("kl", 0.25, hard_guard=True) == (0.0, 1.0)
    assert losses.row_weights("ce", 0.5) == (1.0, 0.0)
    assert losses.row_weights("ce", 0.49) == (0.0, 1.0)
    with pytest.raises(ValueError, match="unknown objective"):
        losses.row_weights("mse", 0.5)


# ---------------------------------------------------------------- the bounds, on enumerable sequences


def _tables(rng, V, T, sharp):
    """Random autoregressive conditionals: prefix (tuple) -> distribution over V."""
    return {pre: rng.dirichlet(np.full(V, sharp))
            for t in range(T) for pre in itertools.product(range(V), repeat=t)}


def _seq_prob(table, y):
    return float(np.prod([table[tuple(y[:t])][y[t]] for t in range(len(y))]))


def _bounds(p_f, p_th, r, u, V, T):
    """The TV and KL bounds, computed by the objectives on every sequence y weighted by (1-u) p_f(y)."""
    seqs = list(itertools.product(range(V), repeat=T))
    rows = seqs + [r]
    logits = np.log(np.array([[p_th[tuple(y[:t])] for t in range(T)] for y in rows]))
    teacher = np.log(np.array([[p_f[tuple(y[:t])] for t in range(T)] for y in rows]))
    weight = np.array([(1 - u) * _seq_prob(p_f, y) for y in seqs] + [u])
    soft = np.array([1] * len(seqs) + [0])
    args = (mx.array(logits.astype(np.float32)), mx.array(np.array(rows, np.int32)),
            mx.ones((len(rows), T)), mx.array(weight.astype(np.float32)), mx.array(soft),
            Teacher(logprobs=mx.array(teacher.astype(np.float32))))
    return float(losses.tv(*args)[0]), float(losses.kl(*args)[0])


def _true(p_f, p_th, r, u, V, T):
    seqs = list(itertools.product(range(V), repeat=T))
    pS = np.array([(1 - u) * _seq_prob(p_f, y) + u * (y == tuple(r)) for y in seqs])
    pT = np.array([_seq_prob(p_th, y) for y in seqs])
    assert abs(pS.sum() - 1) < 1e-9 and abs(pT.sum() - 1) < 1e-9
    nz = pS > 0
    return 0.5 * np.abs(pS - pT).sum(), float((pS[nz] * np.log(pS[nz] / pT[nz])).sum())


@pytest.mark.parametrize("V,T", [(2, 2), (2, 3), (3, 2), (3, 3)])
def test_bounds_are_never_below_the_true_sequence_divergences(V, T):
    rng = np.random.default_rng(V * 10 + T)
    for trial in range(40):
        sharp = [0.3, 1.0, 3.0][trial % 3]
        p_f, p_th = _tables(rng, V, T, sharp), _tables(rng, V, T, sharp)
        r = tuple(int(x) for x in rng.integers(0, V, T))
        u = float(rng.uniform(0.02, 0.98))
        tv_b, kl_b = _bounds(p_f, p_th, r, u, V, T)
        tv_t, kl_t = _true(p_f, p_th, r, u, V, T)
        assert tv_b >= tv_t - 1e-5, (trial, tv_b, tv_t)
        assert kl_b >= kl_t - 1e-5, (trial, kl_b, kl_t)
        # a student equal to the base: the response branch vanishes, the refusal term remains
        tv_0, kl_0 = _bounds(p_f, p_f, r, u, V, T)
        assert tv_0 >= _true(p_f, p_f, r, u, V, T)[0] - 1e-5
        assert kl_0 == pytest.approx(u * -np.log(_seq_prob(p_f, r)), rel=1e-4)


@pytest.mark.parametrize("u", [0.0, 1.0])
def test_hard_guard_kl_bound_is_exact(u):
    """With u in {0, 1} the KL bound is the chain rule: it equals the sequence KL exactly."""
    rng = np.random.default_rng(7)
    V, T = 3, 3
    for _ in range(10):
        p_f, p_th = _tables(rng, V, T, 1.0), _tables(rng, V, T, 1.0)
        r = tuple(int(x) for x in rng.integers(0, V, T))
        tv_b, kl_b = _bounds(p_f, p_th, r, u, V, T)
        tv_t, kl_t = _true(p_f, p_th, r, u, V, T)
        assert kl_b == pytest.approx(kl_t, rel=1e-4, abs=1e-5)
        assert tv_b >= tv_t - 1e-5
