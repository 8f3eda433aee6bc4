"""The record's prompt shared ([P; x] once for a record's rows) = the naive path [P; x; continuation] per row:
the same loss and gradients on several mlx-lm architectures, with grad checkpointing and a chunked loss,
and an honest fallback where the model cannot take it."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_softprompt import methods, models, record_prompt, tiny, train

VOCAB = 300


def _model(arch, bits=None, **extra):
    config = tiny.make_config(arch, vocab_size=VOCAB)
    config.update(extra)
    model = tiny.build_model(config, seed=1)
    if bits:
        from mlx_lm.utils import quantize_model

        model, _ = quantize_model(model, dict(config), 32, bits)
    model.freeze()
    return model


def _rows(k=4, seed=0):
    """Records with prompts of different lengths, each giving a refusal row and a response row (top-k)."""
    rng = np.random.default_rng(seed)
    refusal = rng.integers(2, VOCAB, 3).tolist()
    rows = []
    for i, (px, ty) in enumerate([(5, 6), (9, 2), (3, 11), (7, 4)]):
        x = [0] + rng.integers(2, VOCAB, px - 1).tolist()
        y = rng.integers(2, VOCAB, ty).tolist()
        u = float(rng.uniform(0.2, 0.8))
        rows.append(train.Row(x, refusal, u, False, i))
        soft = train.Row(x, y, 1 - u, True, i)
        lps = np.log(rng.dirichlet(np.ones(k + 1), size=ty)).astype(np.float32)
        soft.topk_ids = rng.integers(0, VOCAB, (ty, k)).astype(np.int32)
        soft.topk_logprobs, soft.tail_mass = lps[:, :k], np.exp(lps[:, k]).astype(np.float32)
        rows.append(soft)
    return rows


def _loss_and_grad(model, rows, share, objective="tv", mode="cache", chunk=0, checkpoint=False, method="softprompt",
                   max_len=1024):
    """(loss sum, count, gradient) of one batch: the record layout, or the naive path (P prepended per row)."""
    topk = 4 if mode == "cache" and objective != "ce" else 0
    if method == "softprompt":
        m = methods.get("softprompt", num_tokens=3, init="random", shared_prefix=False, shared_record_prompt=share)
    else:
        m = methods.get("prefix", num_tokens=3, init="random", shared_record_prompt=share)
    params = m.init(model, None, 2)
    batch, ntok = train.collate(rows, max_len, topk, share_prompts=share)
    loss = train.make_loss(model, m, objective, mode, chunk, checkpoint)
    (s, c), g = mx.value_and_grad(loss)(params, batch)
    from mlx.utils import tree_flatten

    flat = np.concatenate([np.array(v).ravel() for _, v in tree_flatten(g)])
    return float(s), float(c), flat, batch, ntok


def _same(a, b):
    assert abs(a[1] - b[1]) <= 1e-6 * b[1]  # the same weighted target tokens (summed in another order)
    assert abs(a[0] - b[0]) <= 1e-5 * abs(b[0])
    np.testing.assert_allclose(a[2], b[2], atol=1e-5 * np.abs(b[2]).max(), rtol=1e-4)
    assert np.abs(b[2]).max() > 0


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "phi3", "starcoder2"])
def test_record_prompt_gives_the_naive_loss_and_gradient(arch):
    model = _model(arch)
    assert record_prompt.supported(model)
    rows = _rows()
    shared, naive = _loss_and_grad(model, rows, True), _loss_and_grad(model, rows, False)
    _same(shared, naive)
    batch = shared[3]
    assert batch["prompts"].shape[0] == 4  # x once per record
    assert batch["inputs_short"].shape[0] + batch["inputs"].shape[0] == 8  # short continuations apart
    assert len(set(np.array(batch["prompt_lengths"]).tolist())) == 4  # prompts of different lengths


def test_record_prompt_with_rows_cut_at_max_seq_length():
    model = _model("llama")
    rows = _rows(seed=5)  # prompts of 3 to 9 tokens: at 10 tokens a row keeps 1 to 7 target tokens
    _same(_loss_and_grad(model, rows, True, max_len=10), _loss_and_grad(model, rows, False, max_len=10))


def test_the_option_is_the_soft_prompt_s_and_prefix_tuning_s_only():
    from mlx_softprompt.errors import UserError

    args = train.make_args(None, base="m", teacher="c", out="p.safetensors", method="prefix",
                           shared_record_prompt=False)
    assert args.method_options["shared_record_prompt"] is False
    with pytest.raises(UserError, match="--shared-record-prompt is an option of softprompt / prefix"):
        train.make_args(None, base="m", teacher="c", out="p.safetensors", method="lora", shared_record_prompt=True)


def test_record_prompt_without_the_split_of_short_continuations(monkeypatch):
    model = _model("llama")
    rows = _rows(seed=4)
    monkeypatch.setattr(record_prompt, "SPLIT_SAVING", 1.0)  # never worth it: one [B, C] block
    shared = _loss_and_grad(model, rows, True)
    assert "inputs_short" not in shared[3] and shared[3]["inputs"].shape[0] == 8
    _same(shared, _loss_and_grad(model, rows, False))


@pytest.mark.parametrize("objective,mode", [("kl", "online"), ("ce", "cache")])
def test_record_prompt_other_objectives_and_the_online_teacher(objective, mode):
    model = _model("llama")
    rows = _rows(seed=1)
    _same(_loss_and_grad(model, rows, True, objective, mode), _loss_and_grad(model, rows, False, objective, mode))


def test_record_prompt_with_grad_checkpoint_and_loss_chunk():
    model = _model("qwen2")
    rows = _rows(seed=2)
    naive = _loss_and_grad(model, rows, False)
    _same(_loss_and_grad(model, rows, True, checkpoint=True), naive)
    _same(_loss_and_grad(model, rows, True, chunk=3), naive)
    _same(_loss_and_grad(model, rows, True, objective="kl", mode="online", chunk=4, checkpoint=True),
          _loss_and_grad(model, rows, False, objective="kl", mode="online"))


def test_record_prompt_for_prefix_tuning_and_a_4bit_base():
    model = _model("llama")
    rows = _rows(seed=3)
    _same(_loss_and_grad(model, rows, True, method="prefix"), _loss_and_grad(model, rows, False, method="prefix"))
    q = _model("llama", bits=4)
    assert record_prompt.supported(q)
    _same(_loss_and_grad(q, rows, True), _loss_and_grad(q, rows, False))


def test_models_that_cannot_take_it_are_refused_by_the_probe():
    # sliding-window layers (a rotating cache); Gemma 2's own attention broadcasts a [B, 1, L, K] mask
    # against its grouped [B, kv heads, repeats, L, K] scores: neither gives the plain logits
    sliding = _model("llama", layer_types=["sliding_attention", "full_attention"], sliding_window=4)
    assert not record_prompt.supported(sliding)
    assert not record_prompt.supported(_model("gemma2"))
    assert record_prompt.supported(_model("gemma2", num_key_value_heads=4))  # no grouping: it works


def test_record_layout_and_padding_positions():
    rows = _rows()
    assert record_prompt.pays(rows) and not record_prompt.pays(rows[::2])  # ce: one row a prompt, nothing shared
    plain, ntok = train.collate(rows, 1024, 4)
    shared, ntok2 = train.collate(rows, 1024, 4, share_prompts=True)
    assert ntok == ntok2  # the same rows' tokens: tokens/s stays comparable
    computed, real = record_prompt.positions(plain, ntok)
    assert computed == plain["inputs"].size and real == ntok - len(rows)
    computed2, real2 = record_prompt.positions(shared, ntok2)
    x = sum(len(r.prompt) for r in rows[::2])  # each record's prompt once
    assert real2 == real - x
    assert computed2 == shared["prompts"].size + shared["inputs_short"].size + shared["inputs"].size
    # each row's target tokens as the plain layout has them, masked alike (rows by continuation length)
    mask, tgt = np.array(plain["mask"]), np.array(plain["targets"])
    order = np.argsort([len(r.target) for r in rows], kind="stable")
    for b, i in enumerate(order):
        t = int(np.array(shared["mask"])[b].sum())
        np.testing.assert_array_equal(np.array(shared["targets"])[b, :t], tgt[i][mask[i] > 0])
        np.testing.assert_array_equal(np.array(shared["topk_ids"])[b, :t], np.array(plain["topk_ids"])[i][mask[i] > 0])
    np.testing.assert_array_equal(np.array(shared["weight"]), np.array(plain["weight"])[order])
    # the short refusals run apart: fewer continuation positions than one [B, C] block
    s, Cs = shared["inputs_short"].shape
    assert shared["inputs"].shape[0] == len(rows) - s and s * Cs + shared["inputs"].size < len(rows) * (
        shared["targets"].shape[1] - 1)


class _Stop(Exception):
    pass


class _StopAt(train.TrainingCallback):
    def __init__(self, step):
        self.step = step

    def on_train_loss_report(self, info):
        if info["step"] == self.step:
            raise _Stop


def test_training_on_the_record_layout_resumes_bitwise(tiny_teacher, tmp_path):
    """An interrupted run (after its step-3 checkpoint) resumed ends bitwise equal to an uninterrupted one;
    the validation loss before training equals the plain path's; the metric line has the padding share."""
    import json

    from mlx_softprompt import prompt_file

    base, cache = tiny_teacher
    data, bundle = train.open_teacher(cache), models.load(base)

    def args(out, **kw):
        a = dict(base=base, teacher=cache, out=str(tmp_path / out), num_tokens=4, iters=6, batch_size=8,
                 learning_rate=1e-2, val_split=0.25, val_every=3, save_every=3, steps_per_report=1)
        a.update(kw)
        return train.make_args(None, **a)

    quiet = lambda *a, **k: None  # noqa: E731
    said = []
    train.train(args("a.safetensors"), data, model_bundle=bundle, log=said.append)
    assert not any("cannot share a record's prompt" in s for s in said)  # the llama base takes it
    assert any("each prompt run once for its rows" in s for s in said)
    with pytest.raises(_Stop):
        train.train(args("b.safetensors"), data, model_bundle=bundle, log=quiet, callback=_StopAt(5))
    train.train(args("b.safetensors", resume=True), data, model_bundle=bundle, log=quiet)
    a, b = (np.array(prompt_file.load(tmp_path / f"{x}.safetensors").prompt) for x in "ab")
    np.testing.assert_array_equal(a, b)
    said = []
    train.train(args("plain.safetensors", shared_record_prompt=False), data, model_bundle=bundle, log=said.append)
    assert not any("each prompt run once" in s for s in said)
    lines = {x: [json.loads(s) for s in (tmp_path / f"{x}.safetensors.metrics.jsonl").read_text().splitlines()]
             for x in ("a", "plain")}
    v_rec, v_plain = (next(m["val_loss"] for m in lines[x] if m.get("step") == 0 and "val_loss" in m)
                      for x in ("a", "plain"))
    assert abs(v_rec - v_plain) <= 1e-5 * abs(v_plain)
    shares = [m["padding_share"] for m in lines["a"] if "padding_share" in m]
    assert len(shares) == 6 and all(0 <= s < 1 for s in shares)
