"""Memory savers give the plain path's loss and gradients: gradient checkpointing (memory.grad_checkpoint)
and the chunked loss (losses.chunked), alone and together, for the soft prompt (shared prefix and naive)
mlx-lm's LoRA layers and prefix tuning; models whose logits are not head(hidden) keep the whole-logits path."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_softprompt import memory, methods, models, tiny, train
from mlx_softprompt.methods.base import decoder_layers


@pytest.fixture(scope="module")
def base(teacher):
    model, tok, config = models.load(teacher[0])
    model.freeze()
    return model, tok, config


def _batch(teacher, n_rows, objective, mode):
    rows = train.build_rows(teacher[2], objective, topk=mode == "cache")
    rows = [rows[i] for i in np.random.default_rng(1).permutation(len(rows))[:n_rows]]
    batch, _ = train.collate(rows, 1024, 16 if mode == "cache" and objective != "ce" else 0)
    return batch


def _value_and_grad(model, method, params, batch, objective, mode, **kw):
    loss = train.make_loss(model, method, objective, mode, **kw)
    (s, c), g = mx.value_and_grad(loss)(params, batch)
    return float(s), float(c), {k: np.array(v) for k, v in tree_flatten(g)}


def _close(got, ref):
    assert abs(got[1] - ref[1]) <= 1e-6 * ref[1]  # weighted token counts, summed chunk by chunk
    assert abs(got[0] - ref[0]) <= 2e-5 * abs(ref[0])
    assert got[2].keys() == ref[2].keys()
    for k in ref[2]:
        scale = np.abs(ref[2][k]).max()
        assert scale > 0
        np.testing.assert_allclose(got[2][k], ref[2][k], atol=2e-5 * scale, rtol=1e-3)


@pytest.mark.parametrize("objective,mode", [("tv", "cache"), ("kl", "online"), ("ce", "cache")])
@pytest.mark.parametrize("shared", [True, False])
def test_softprompt_grad_checkpoint_and_chunked_loss_equal_the_plain_path(teacher, base, objective, mode, shared):
    model = base[0]
    batch = _batch(teacher, 6, objective, mode)
    assert batch["inputs"].shape[1] > 7  # several chunks of 7, the last one partial
    m = methods.get("softprompt", num_tokens=5, init="random", shared_prefix=shared)
    params = m.init(model, base[1], 1)
    ref = _value_and_grad(model, m, params, batch, objective, mode)
    for kw in ({"grad_checkpoint": True}, {"loss_chunk": 7}, {"grad_checkpoint": True, "loss_chunk": 7}):
        _close(_value_and_grad(model, m, params, batch, objective, mode, **kw), ref)


def test_lora_grad_checkpoint_and_chunked_loss_equal_the_plain_path(teacher, base):
    model = base[0]
    batch = _batch(teacher, 6, "kl", "cache")
    m = methods.get("lora", rank=4, layers=2)
    params = m.init(model, base[1], 1)
    params = {k: v for k, v in params.items()}
    # lora_b starts at zero (no gradient to lora_a yet): move it so both factors get a gradient
    flat = [(k, v + 0.05 * mx.random.normal(v.shape, key=mx.random.key(i))) for i, (k, v) in
            enumerate(tree_flatten(params))]
    train._assign(params, dict(flat))
    ref = _value_and_grad(model, m, params, batch, "kl", "cache")
    assert len(ref[2]) >= 4
    _close(_value_and_grad(model, m, params, batch, "kl", "cache", grad_checkpoint=True, loss_chunk=7), ref)


def test_grad_checkpoint_patches_the_block_class_only_while_active(base):
    model = base[0]
    blk = type(decoder_layers(model)[0])
    own = blk.__dict__.get("__call__")
    with memory.grad_checkpoint(model):
        assert blk.__dict__.get("__call__") is not own
    assert blk.__dict__.get("__call__") is own


def test_chunked_loss_never_holds_the_whole_logits():
    """A vocabulary-heavy model: the step's peak memory drops when the logits come a chunk at a time."""
    config = tiny.make_config("llama", vocab_size=32000, hidden_size=64, num_layers=1, num_heads=2)
    model = tiny.build_model(config)
    model.freeze()
    B, L = 2, 256
    ids = np.random.default_rng(0).integers(1, 32000, (B, L + 1))
    rows = [train.Row(ids[b, :4].tolist(), ids[b, 4:].tolist(), 1.0, False, b) for b in range(B)]
    batch, _ = train.collate(rows, L + 1)
    m = methods.get("softprompt", num_tokens=5, init="random")
    params = m.init(model, None, 1)
    peaks = {}
    for chunk in (0, 16):
        f = mx.value_and_grad(train.make_loss(model, m, "ce", "cache", loss_chunk=chunk))
        mx.eval(f(params, batch))
        mx.clear_cache()
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        mx.eval(f(params, batch))
        peaks[chunk] = mx.get_peak_memory() - before
    logits_bytes = B * L * 32000 * 4
    assert peaks[0] > 2 * logits_bytes  # the whole path holds several [B, L, V] arrays
    assert peaks[16] < logits_bytes  # the chunked one not even one


def test_models_whose_logits_are_not_the_head_keep_the_whole_path(tiny_model):
    model, tok, config = models.load(tiny_model("gemma2"))  # final logit soft-capping
    assert memory.head_of(model) is None
    model2, _, _ = models.load(tiny_model("llama"))
    assert memory.head_of(model2) is not None
    with memory.headless(model) as head:
        assert head is None
    ids = mx.array([[3, 4, 5, 6]])
    before = np.array(model2(ids))
    with memory.headless(model2) as head:
        hidden = model2(ids)
    np.testing.assert_allclose(np.array(head(hidden)), before, atol=1e-5)
    np.testing.assert_array_equal(np.array(model2(ids)), before)  # the head is back


def test_prefix_tuning_grad_checkpoint_keeps_the_gradient_of_its_keys_and_values(teacher, base):
    """Prefix tuning's trained keys/values reach the blocks through shared caches, not their inputs."""
    model = base[0]
    batch = _batch(teacher, 4, "tv", "cache")
    m = methods.get("prefix", num_tokens=3, init="random")
    params = m.init(model, base[1], 1)
    ref = _value_and_grad(model, m, params, batch, "tv", "cache")
    _close(_value_and_grad(model, m, params, batch, "tv", "cache", grad_checkpoint=True, loss_chunk=7), ref)
