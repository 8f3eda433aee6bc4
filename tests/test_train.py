"""The training loop: data rows, config, shared prefix = naive, frozen (quantized) base, accumulation,
resume after a real SIGKILL, and an end-to-end teach -> train run that measurably helps."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_softprompt import batching, losses, methods, models, prompt_file, train
from mlx_softprompt.errors import UserError
from mlx_softprompt.teacher_cache import Record

def _args(base, cache, out, **kw):
    a = dict(base=base, teacher=cache, out=str(out), num_tokens=4, iters=6, batch_size=8, learning_rate=1e-2,
             val_split=0.25, val_every=3, save_every=3, steps_per_report=3)
    a.update(kw)
    return train.make_args(None, **a)


def _quiet(*a, **k):
    pass


@pytest.fixture(scope="module")
def base(teacher):
    return models.load(teacher[0])


# ---------------------------------------------------------------- data


def _record(prompt, y, u, k=3, prompt_index=0, sample_index=0, seed=0):
    rng = np.random.default_rng(seed)
    T = len(y)
    lps = np.log(rng.dirichlet(np.ones(k + 1), size=T)[:, :k]).astype(np.float32)
    return Record(prompt_ids=list(prompt), response_ids=list(y), u=u,
                  topk_ids=rng.integers(0, 50, (T, k)).astype(np.int32), topk_logprobs=lps,
                  tail_mass=(1 - np.exp(lps).sum(-1)).astype(np.float32), label="", prompt_index=prompt_index,
                  sample_index=sample_index)


def test_rows_weights_and_layout():
    r = [90, 91, 2]
    recs = [_record([1, 5, 6, 7], [10, 11, 12, 2], 0.25, prompt_index=0),
            _record([1, 8], [13, 2], 0.0, prompt_index=1),
            _record([1, 9, 9], [], 1.0, prompt_index=2)]  # refused for sure: no teacher sample
    data = train.TeacherData(recs, r)
    rows = train.build_rows(data, "tv", topk=True)
    assert [(row.weight, row.soft, row.target) for row in rows] == [
        (0.25, False, r), (0.75, True, [10, 11, 12, 2]), (1.0, True, [13, 2]), (1.0, False, r)]
    assert [(row.weight, row.soft) for row in train.build_rows(data, "ce")] == [
        (1.0, False), (1.0, False), (1.0, False)]  # hard labels: u=0.25 -> y, u=0 -> y, u=1 -> r
    assert [row.target for row in train.build_rows(data, "ce")] == [[10, 11, 12, 2], [13, 2], r]
    assert [row.weight for row in train.build_rows(data, "kl", hard_guard=True)] == [1.0, 1.0, 1.0]

    batch, ntok = train.collate(rows[:2], max_seq_length=1024, topk_k=3)
    ids = np.array(batch["inputs"])
    assert ids.shape == (2, 8)  # padded to a multiple of batching.PAD_TO
    # row 0: [1 5 6 7 90 91 2]: targets of positions 3..5 are r
    np.testing.assert_array_equal(np.array(batch["targets"])[0, :6], [5, 6, 7, 90, 91, 2])
    np.testing.assert_array_equal(np.array(batch["mask"])[0, :8], [0, 0, 0, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(np.array(batch["mask"])[1, :8], [0, 0, 0, 1, 1, 1, 1, 0])
    # the cached top-k of y[t] sits at the position that predicts y[t]
    np.testing.assert_array_equal(np.array(batch["topk_ids"])[1, 3:7], recs[0].topk_ids)
    np.testing.assert_array_equal(np.array(batch["tail_mass"])[1, 3:7], recs[0].tail_mass)
    assert not np.array(batch["topk_ids"])[0].any()  # the refusal row carries no teacher
    np.testing.assert_array_equal(np.array(batch["weight"]), [0.25, 0.75])
    np.testing.assert_array_equal(np.array(batch["soft"]), [0, 1])
    assert ntok == 7 + 8

    # truncation: 6 tokens per row at most, the prompt kept
    batch, _ = train.collate(rows[1:2], max_seq_length=6, topk_k=3)
    assert batch["inputs"].shape == (1, 5)
    np.testing.assert_array_equal(np.array(batch["mask"])[0], [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(np.array(batch["topk_ids"])[0, 3:5], recs[0].topk_ids[:2])


def test_validation_split_keeps_prompts_together_and_order_depends_on_seed_and_epoch_only():
    sides = {}
    for p in range(200):
        for s in range(3):
            sides.setdefault(p, set()).add(train.is_val(p, 7, 0.2))
    assert all(len(v) == 1 for v in sides.values())
    share = sum(train.is_val(p, 7, 0.2) for p in range(2000)) / 2000
    assert 0.15 < share < 0.25
    lengths = np.random.default_rng(0).integers(5, 300, 50)
    a, b = batching.Order(lengths, 8, seed=3), batching.Order(lengths, 8, seed=3)
    seq = [a.batch(m).tolist() for m in range(20)]
    assert seq == [b.batch(m).tolist() for m in reversed(range(20))][::-1]  # random access = sequential
    assert a.per_epoch == 6 and sorted(sum(seq[:6], [])) == sorted(set(sum(seq[:6], [])))
    assert seq[:6] != seq[6:12]  # a new order each epoch
    with pytest.raises(UserError, match="batch-size"):
        batching.Order([3] * 5, 8, 0)


def test_config_file_and_flags(tmp_path):
    cfg = tmp_path / "train.yaml"
    cfg.write_text("base: m\nteacher: c\nout: p.safetensors\nobjective: kl\nlearning-rate: 3e-3\niters: 50\n"
                   "hard_guard: true\n")
    args = train.make_args(str(cfg), iters=70, batch_size=None)
    assert (args.objective, args.learning_rate, args.iters, args.hard_guard, args.batch_size) == \
        ("kl", 3e-3, 70, True, 8)
    assert str(args.state_path) == "p.train-state.safetensors"
    assert str(args.metrics_path) == "p.safetensors.metrics.jsonl"
    cfg.write_text("base: m\nteacher: c\nout: p.safetensors\nlearning_rat: 0.1\n")
    with pytest.raises(UserError, match="unknown key 'learning_rat'"):
        train.make_args(str(cfg))
    cfg.write_text("base: m\nteacher: c\nout: p.safetensors\niters: many\n")
    with pytest.raises(UserError, match="train.yaml: iters: expected an integer, got str 'many'"):
        train.make_args(str(cfg))
    cfg.write_text("base: m\niters: [unclosed\n")
    with pytest.raises(UserError, match="train.yaml: line 3: invalid YAML"):
        train.make_args(str(cfg))
    with pytest.raises(UserError, match="--objective 'mse'"):
        train.make_args(None, base="m", teacher="c", out="p.safetensors", objective="mse")
    with pytest.raises(UserError, match="--teacher is required"):
        train.make_args(None, base="m", out="p.safetensors")


def test_method_options_block_and_shorthands(tmp_path):
    cfg = tmp_path / "train.yaml"
    cfg.write_text("base: m\nteacher: c\nout: p.safetensors\nmethod: lora\nmethod_options:\n  rank: 4\n  keys: [q_proj]\n")
    args = train.make_args(str(cfg), lora_scale=2.0)
    assert args.method_options == {"rank": 4, "layers": 16, "keys": ["q_proj"], "scale": 2.0}
    assert train.make_args(None, base="m", teacher="c", out="p.safetensors", num_tokens=3).method_options == \
        {"num_tokens": 3, "init": "vocab", "shared_prefix": True, "shared_record_prompt": True}
    with pytest.raises(UserError, match="--lora-rank is an option of lora, not of --method softprompt"):
        train.make_args(None, base="m", teacher="c", out="p.safetensors", lora_rank=4)
    cfg.write_text("base: m\nteacher: c\nout: p.safetensors\nmethod: prefix\nmethod_options: {rank: 2}\n")
    with pytest.raises(UserError, match="unknown option 'rank'"):
        train.make_args(str(cfg))
    with pytest.raises(UserError, match="--method 'steer-dom'"):
        train.make_args(None, base="m", teacher="c", out="p.safetensors", method="steer-dom")


def test_cli_method_options_from_a_config_file_and_a_flag(tmp_path, capsys):
    from mlx_softprompt.cli import main

    cfg = tmp_path / "t.yaml"
    cfg.write_text("model: m\nteacher: c\nout: p.safetensors\nmethod: lora\nmethod_options:\n  rank: 0\n")
    for argv in (["train", "-c", str(cfg)],
                 ["train", "--model", "m", "--teacher", "c", "--out", "p.safetensors", "--method", "lora",
                  "--method-options", "{rank: 0}"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 1 and "rank and layers must be >= 1" in err and len(err.splitlines()) == 1, err
    with pytest.raises(UserError, match="expected a mapping"):
        train.parse_mapping("[1, 2]", "--method-options")


def test_cli_reports_a_bad_config_key_in_one_line(tmp_path, capsys):
    from mlx_softprompt.cli import main

    cfg = tmp_path / "t.yaml"
    cfg.write_text("base: m\nbogus: 1\n")
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(cfg), "--teacher", "c", "--out", "p.safetensors"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "unknown key 'bogus'" in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------- the method


def test_softprompt_init(base):
    model, tok, config = base
    def init(how):
        return methods.get("softprompt", num_tokens=7, init=how).init(model, tok, 0)["soft_prompt"]

    ids = tok.encode("Paris is", add_special_tokens=False)
    P = init("text:Paris is")
    np.testing.assert_array_equal(np.array(P), np.array(models.embed_rows(model, [ids[i % len(ids)] for i in range(7)])))
    P = np.array(init("vocab"))
    emb = np.array(models.embed_rows(model, list(range(models.find_embedding(model).weight.shape[0]))))
    assert all((np.abs(emb - row).sum(-1) == 0).any() for row in P)  # each row is a vocabulary row
    P = np.array(init("random"))
    assert P.shape == (7, emb.shape[1]) and 0.5 < P.std() / emb.std() < 2
    with pytest.raises(UserError, match="init 'nonsense'"):
        init("nonsense")


def _batch(teacher, model, n_rows, objective="kl", teacher_mode="cache"):
    base, cache, data = teacher
    rows = train.build_rows(data, objective, topk=teacher_mode == "cache")
    rows = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))[:n_rows]]
    batch, _ = train.collate(rows, 1024, 16 if teacher_mode == "cache" and objective != "ce" else 0)
    return batch


@pytest.mark.parametrize("objective,mode", [("kl", "cache"), ("tv", "online"), ("ce", "cache")])
def test_shared_prefix_gives_the_same_loss_and_gradient_as_the_naive_path(teacher, base, objective, mode):
    model, tok, config = base
    model.freeze()
    batch = _batch(teacher, model, 6, objective, mode)
    assert float(batch["mask"].sum()) < batch["mask"].size  # right padding is present

    out = {}
    for shared in (False, True):
        m = methods.get("softprompt", num_tokens=5, init="random", shared_prefix=shared)
        params = m.init(model, tok, 1)
        loss = train.make_loss(model, m, objective, mode)
        (s, c), g = mx.value_and_grad(loss)(params, batch)
        out[shared] = (float(s), float(c), np.array(g["soft_prompt"]))
    assert out[True][1] == out[False][1]
    assert abs(out[True][0] - out[False][0]) <= 1e-5 * abs(out[False][0])
    np.testing.assert_allclose(out[True][2], out[False][2], atol=1e-5 * np.abs(out[False][2]).max(), rtol=1e-4)
    assert np.abs(out[True][2]).max() > 0


@pytest.mark.parametrize("arch", ["llama", "gemma", "gemma2", "qwen3", "phi3"])
def test_shared_prefix_logits_equal_naive_across_architectures(tiny_model, arch):
    model, tok, config = models.load(tiny_model(arch))
    P = mx.random.normal((3, models.hidden_size(model)), key=mx.random.key(0)) * 0.1
    ids = mx.array(np.random.default_rng(0).integers(5, 300, (2, 9)).astype(np.int32))
    assert methods.supports_shared_prefix(model)
    shared = methods.get("softprompt", shared_prefix=True).logits(model, {"soft_prompt": P}, ids)
    np.testing.assert_allclose(np.array(shared), np.array(models.forward(model, ids, P)[:, 3:]), atol=2e-5)


def test_sliding_window_models_fall_back_to_the_naive_path():
    from mlx_softprompt import tiny

    config = tiny.make_config("llama", vocab_size=300)
    config.update(layer_types=["sliding_attention", "full_attention"], sliding_window=4)
    model = tiny.build_model(config)
    assert not methods.supports_shared_prefix(model)  # a rotating cache cannot be shared
    P = mx.random.normal((3, models.hidden_size(model)), key=mx.random.key(0)) * 0.1
    ids = mx.array(np.random.default_rng(0).integers(5, 300, (2, 9)).astype(np.int32))
    shared = methods.get("softprompt", shared_prefix=True).logits(model, {"soft_prompt": P}, ids)
    np.testing.assert_allclose(np.array(shared), np.array(models.forward(model, ids, P)[:, 3:]), atol=1e-6)


# ---------------------------------------------------------------- the loop


def _weights(model):
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


@pytest.mark.parametrize("q_bits", [None, 4])
def test_training_moves_p_and_never_the_base(teacher, tiny_model, tmp_path, q_bits):
    """fp32 and 4-bit bases: gradients reach P through (quantized) layers; the base stays bitwise the same."""
    _, cache, data = teacher
    path = tiny_model("llama", q_bits=q_bits)
    bundle = models.load(path)
    before = _weights(bundle[0])
    args = _args(path, cache, tmp_path / "p.safetensors", iters=3, val_split=0.0, init="vocab")
    train.train(args, data, model_bundle=bundle, log=_quiet)
    after = _weights(bundle[0])
    assert before.keys() == after.keys()
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])
    P = methods.load(args.out, bundle[0], bundle[2]).params["soft_prompt"]
    P0 = train.make_method(args).init(bundle[0], bundle[1], args.seed)["soft_prompt"]
    assert float(mx.abs(P - P0).max()) > 1e-4
    f = prompt_file.load(args.out)
    assert (f.method, f.metadata["objective"], f.metadata["steps"], f.metadata["teacher_mode"]) == \
        ("softprompt", "tv", "3", "cache")
    assert f.metadata["refusal"] == "I'm sorry, but I can't help with that."
    g = data.manifest["guard"]  # which template rendered the guard's prompts, copied from the teacher cache
    assert f.metadata["guard_template"] == f"{g['template']} sha256:{g['template_sha256']}"


def test_gradient_accumulation_equals_one_big_batch(teacher, base, tmp_path):
    _, cache, data = teacher
    outs = []
    for bs, acc in ((8, 1), (4, 2)):
        args = _args(teacher[0], cache, tmp_path / f"p{bs}.safetensors", iters=3, batch_size=bs, grad_accum=acc,
                     val_split=0.0, init="vocab")
        train.train(args, data, model_bundle=base, log=_quiet)
        outs.append(np.array(prompt_file.load(args.out).prompt))
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-6, rtol=1e-4)  # micro-batches pad less: fp32 sums
    assert np.abs(outs[0] - np.array(train.make_method(args).init(base[0], base[1], args.seed)["soft_prompt"])).max() > 1e-4


def test_metrics_checkpoints_and_mismatched_resume(teacher, base, tmp_path):
    _, cache, data = teacher
    args = _args(teacher[0], cache, tmp_path / "p.safetensors", iters=6, save_every=2)
    summary = train.train(args, data, model_bundle=base, log=_quiet)
    lines = [json.loads(x) for x in args.metrics_path.read_text().splitlines()]
    train_lines = [x for x in lines if "loss" in x]
    val_lines = [x for x in lines if "val_loss" in x]
    assert [x["step"] for x in train_lines] == [3, 6] and [x["step"] for x in val_lines] == [0, 3, 6]
    for x in train_lines:
        assert x["tokens_per_second"] > 0 and x["learning_rate"] >= 0 and np.isfinite(x["loss"])
    assert summary["val_loss"] == val_lines[-1]["val_loss"]
    assert [k for k in os.listdir(tmp_path) if k.endswith(".tmp")] == []
    meta = mx.load(str(args.state_path), return_metadata=True)[1]
    assert meta["step"] == "6" and meta["format"] == train.STATE_FORMAT
    # resuming with other settings is refused, naming the setting
    with pytest.raises(UserError, match="learning_rate"):
        train.train(_args(teacher[0], cache, args.out, iters=6, save_every=2, learning_rate=5e-2, resume=True),
                    data, model_bundle=base, log=_quiet)


def test_a_cache_from_another_base_is_refused(teacher, tiny_model, tmp_path):
    _, cache, data = teacher
    other = tiny_model("llama", hidden_size=32)
    with pytest.raises(UserError, match="teacher cache was made with base"):
        train.train(_args(other, cache, tmp_path / "p.safetensors"), data, log=_quiet)


def _state_step(path):
    try:
        return int(mx.load(str(path), return_metadata=True)[1]["step"])
    except Exception:
        return -1


def _child(argv, env):
    return subprocess.Popen([sys.executable, "-m", "mlx_softprompt", "train"] + argv, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_resume_after_sigkill_ends_with_the_same_p(teacher, tmp_path):
    """A real SIGKILL of `python -m mlx_softprompt train` between checkpoints; --resume ends bitwise equal
    to an uninterrupted run (made in this process, with the same BLAS as the children)."""
    base, cache, data = teacher
    env = dict(os.environ, MLX_SOFTPROMPT_NO_BLAS="1")  # children keep this process's BLAS (LD_PRELOAD or not)
    flags = dict(num_tokens=4, iters=24, batch_size=8, learning_rate=1e-2, warmup=5, save_every=3, val_every=10,
                 val_split=0.2, objective="kl", init="text:I am sorry")
    argv = ["--base", base, "--teacher", cache]
    for k, v in flags.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    out = tmp_path / "run.safetensors"
    run = _child(argv + ["--out", str(out)], env)
    train.train(train.make_args(None, base=base, teacher=cache, out=str(tmp_path / "ref.safetensors"), **flags),
                log=_quiet)
    state = tmp_path / "run.train-state.safetensors"
    deadline = time.time() + 120
    while _state_step(state) < 6 and run.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    run.communicate()
    assert run.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = _state_step(state)
    assert 6 <= killed_at < 24
    resumed = _child(argv + ["--out", str(out), "--resume"], env)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"at step {killed_at}" in err
    a, b = prompt_file.load(tmp_path / "ref.safetensors"), prompt_file.load(out)
    np.testing.assert_array_equal(np.array(a.prompt), np.array(b.prompt))  # bitwise
    steps = [json.loads(x)["step"] for x in (tmp_path / "run.safetensors.metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == sorted(set(steps)) and steps[-1] == 24  # no duplicated lines after the resume


# ---------------------------------------------------------------- end to end


def _refusal_logprob(model, prompt, refusal, P):
    ids = list(prompt) + list(refusal)
    lp = losses.log_softmax(models.forward(model, ids[:-1], P)[0, P.shape[0]:])
    return float(losses.gather(lp, mx.array(ids[1:]))[len(prompt) - 1:].sum())


@pytest.mark.parametrize("objective", ["tv", "kl", "ce"])
def test_end_to_end_teach_then_train_helps_on_held_out_prompts(teacher, base, tmp_path, objective):
    """teach (conftest: tiny base + tiny random guard) -> train -> on held-out prompts the objective drops
    and the refusal becomes more likely after harmful-labelled prompts.

    The tiny random guard gives every prompt u ~ 0.4-0.5, so the refusal branch carries weight everywhere:
    this measures that training moves P the right way, not that it learns to discriminate (that needs a
    trained guard: the demo world)."""
    _, cache, data = teacher
    model, tok, config = base
    args = _args(teacher[0], cache, tmp_path / "p.safetensors", objective=objective, iters=30, batch_size=8,
                 num_tokens=8, learning_rate=1e-2, warmup=3, val_every=30, save_every=30, init="random")
    train.train(args, data, model_bundle=base, log=_quiet)
    m = train.make_method(args)
    P1 = methods.load(args.out, model, config).params
    P0 = m.init(model, tok, args.seed)

    rows = train.build_rows(data, objective, topk=objective != "ce")
    val = [r for r in rows if train.is_val(r.prompt_index, args.seed, args.val_split)]
    assert len(val) >= 8
    loss = train.make_loss(model, m, objective, "cache")
    before = train.evaluate_rows(loss, P0, val, args, 16 if objective != "ce" else 0)
    after = train.evaluate_rows(loss, P1, val, args, 16 if objective != "ce" else 0)
    assert after < before - 0.005 * abs(before), (before, after)  # measured: tv -2.4 %, kl -7.8 %, ce -1.2 %

    harmful = {tuple(r.prompt_ids) for r in data.records
               if r.label == "harmful" and train.is_val(r.prompt_index, args.seed, args.val_split)}
    assert harmful
    r = data.refusal_ids
    lp0 = np.mean([_refusal_logprob(model, p, r, P0["soft_prompt"]) for p in harmful])
    lp1 = np.mean([_refusal_logprob(model, p, r, P1["soft_prompt"]) for p in harmful])
    assert lp1 > lp0 + 2.0, (lp0, lp1)  # measured: +3.9 (tv), +6.4 (kl), +3.0 (ce) nats over 13 tokens


def test_cli_trains_lora_and_steer_opt_with_method_options(tiny_teacher, tmp_path):
    """`train --method lora --lora-rank ...` and `--method steer-opt --steer-layer ...` through the CLI."""
    import json as _json
    import subprocess
    import sys

    from mlx_softprompt import prompt_file

    base, cache = tiny_teacher
    for method, extra in (("lora", ["--lora-rank", "2", "--lora-layers", "1"]),
                          ("steer-opt", ["--steer-layer", "1"]), ("prefix", ["--num-tokens", "3"])):
        out = tmp_path / f"{method}.safetensors"
        r = subprocess.run([sys.executable, "-m", "mlx_softprompt", "train", "--base", base, "--teacher", cache,
                            "--out", str(out), "--method", method, "--objective", "kl", "--iters", "3",
                            "--batch-size", "4", *extra], capture_output=True, text=True,
                           env={"MLX_SOFTPROMPT_NO_BLAS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
        assert r.returncode == 0, r.stderr
        meta = prompt_file.load(out).metadata
        assert meta["method"] == method
        options = _json.loads(meta["method_options"])
        assert {"lora": options.get("rank") == 2 and options.get("layers") == 1,
                "steer-opt": options.get("layer") == 1, "prefix": options.get("num_tokens") == 3}[method]
    bad = subprocess.run([sys.executable, "-m", "mlx_softprompt", "train", "--base", base, "--teacher", cache,
                          "--out", str(tmp_path / "x.safetensors"), "--method", "lora", "--lora-rank", "abc"],
                         capture_output=True, text=True, env={"MLX_SOFTPROMPT_NO_BLAS": "1", "PATH": "/usr/bin:/bin"})
    assert bad.returncode != 0 and "Traceback" not in bad.stderr


def test_resume_extends_a_finished_run(teacher, base, tmp_path):
    _, cache, data = teacher
    args = _args(teacher[0], cache, tmp_path / "p.safetensors", iters=6, save_every=3)
    train.train(args, data, model_bundle=base, log=_quiet)
    p6 = np.array(prompt_file.load(args.out).prompt)
    said = []
    longer = _args(teacher[0], cache, args.out, iters=9, save_every=3, resume=True)
    summary = train.train(longer, data, model_bundle=base, log=said.append)
    assert summary["resumed_from"] == 6 and summary["steps"] == 9
    assert any("extending the run from 6 to 9 steps" in s for s in said)
    assert [x["step"] for x in map(json.loads, args.metrics_path.read_text().splitlines()) if "loss" in x] == [3, 6, 9]
    assert mx.load(str(args.state_path), return_metadata=True)[1]["step"] == "9"
    assert np.abs(np.array(prompt_file.load(args.out).prompt) - p6).max() > 0  # it trained on
    with pytest.raises(UserError, match="iters=9, now iters=4"):  # shortening is another run
        train.train(_args(teacher[0], cache, args.out, iters=4, save_every=3, resume=True), data,
                    model_bundle=base, log=_quiet)
