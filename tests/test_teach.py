"""The teach stage and its cache: records match the models, resume after SIGKILL, mismatch and damage."""

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_softprompt import generate, guards, models, tiny
from mlx_softprompt import teacher_cache as tc
from mlx_softprompt.errors import UserError
from mlx_softprompt.teach import TeachConfig, teach

SPEC = str(Path(__file__).resolve().parent.parent / "examples" / "guards" / "tiny-guard.json")
GUARD_CORPUS = tuple(tiny.DEFAULT_CORPUS.strip().splitlines()) + ("unsafe", "safe", "Yes", "No")

PROMPTS = [
    {"prompt": "How do I bake bread?", "label": "benign"},
    {"prompt": "Give detailed step-by-step instructions for making a paper plane.", "label": "harmful"},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "What is the capital of France?"}]},
    {"prompt": "Write code that sorts a list of numbers in Python.", "label": "benign",
     "context": [{"role": "system", "content": "Be brief."}]},
    {"prompt": "Explain how to write a poem about the sea.", "label": "harmful"},
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("teach")
    base = tiny.make_tiny_checkpoint(root / "base", seed=1)
    guard = tiny.make_tiny_checkpoint(root / "guard", seed=5, corpus=GUARD_CORPUS)
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return root, str(base), str(guard), str(data)


def _cfg(world, out, **kw):
    root, base, guard, data = world
    args = dict(base=base, guard=SPEC, guard_model=guard, data=data, out=str(root / out), shard_size=2,
                samples_per_prompt=2, max_tokens=10, top_k=6, batch_size=3, seed=3)
    args.update(kw)
    return TeachConfig(**args)


@pytest.fixture(scope="module")
def reference(world):
    cfg = _cfg(world, "ref")
    teach(cfg)
    return cfg, tc.open_cache(cfg.out)


def _examples(world):
    from mlx_softprompt.data import read_jsonl

    return read_jsonl(world[3])[0]


def test_records_match_guard_and_base(world, reference):
    cfg, cache = reference
    recs = cache.records()
    assert len(cache) == len(recs) == len(PROMPTS) * 2
    assert [(r.prompt_index, r.sample_index) for r in recs] == [(i, j) for i in range(len(PROMPTS)) for j in range(2)]
    base, tok, _ = models.load(cfg.base)
    guard = guards.load_guard(SPEC, cfg.guard_model)
    examples = _examples(world)
    assert cache.refusal_ids == list(tok.encode(cfg.refusal, add_special_tokens=False)) + [tok.eos_token_id]
    for r in recs:
        ex = examples[r.prompt_index]
        assert r.label == ex.label
        assert r.prompt_ids == generate.chat_ids(tok, list(ex.context) + [{"role": "user", "content": ex.prompt}])
        assert r.u == pytest.approx(guard.moderate_input(ex.prompt, ex.context).u, abs=1e-6)
        T = len(r.response_ids)
        assert 0 < T <= cfg.max_tokens
        assert T == cfg.max_tokens or r.response_ids[-1] in tok.eos_token_ids
        # the base's own log-probs along the sample, computed here with models.forward
        logits = models.forward(base, r.prompt_ids + r.response_ids[:-1])[0].astype(mx.float32)
        lp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))[len(r.prompt_ids) - 1:]
        assert r.topk_ids.shape == r.topk_logprobs.shape == (T, cfg.top_k) and r.tail_mass.shape == (T,)
        for t in range(T):
            best = np.sort(lp[t])[::-1][:cfg.top_k]
            np.testing.assert_allclose(r.topk_logprobs[t], best, atol=1e-5)
            np.testing.assert_allclose(lp[t][r.topk_ids[t]], r.topk_logprobs[t], atol=1e-5)
            assert np.all(np.diff(r.topk_logprobs[t]) <= 0)
        np.testing.assert_allclose(r.tail_mass, 1 - np.exp(r.topk_logprobs.astype(np.float64)).sum(-1), atol=1e-5)
    # two samples of a prompt are two draws, not copies
    assert any(a.response_ids != b.response_ids for a, b in zip(recs[::2], recs[1::2]))
    m = cache.manifest
    assert m["complete"] and m["settings"]["top_k"] == cfg.top_k and m["inputs"]["num_prompts"] == len(PROMPTS)
    # a float32 base: the top-k rows come from the sampling steps' own log-probs, no second pass
    assert set(m["phases"]) == {"guard", "sample"}
    assert all(ph["seconds"] > 0 and ph["peak_memory_gb"] > 0 for ph in m["phases"].values())
    assert m["base"]["fingerprint"]["embedding_hash"] == models.fingerprint(base, {})["embedding_hash"]
    assert "sketch" not in m["guard"]["fingerprint"]


def test_a_bfloat16_base_gets_its_topk_recomputed_in_float32(world, tmp_path):
    """Decoding log-probs in bfloat16 are too coarse for the cache; a second float32 pass computes them."""
    root, base, guard, data = world
    half = tmp_path / "base-bf16"
    shutil.copytree(base, half)
    for f in half.glob("*.safetensors"):
        w = mx.load(str(f))
        mx.save_safetensors(str(f), {k: v.astype(mx.bfloat16) if mx.issubdtype(v.dtype, mx.floating) else v
                                     for k, v in w.items()}, metadata={"format": "mlx"})
    cfg = _cfg(world, "bf16", base=str(half), samples_per_prompt=1)
    teach(cfg)
    cache = tc.open_cache(cfg.out)
    assert "topk" in cache.manifest["phases"]
    model, _, _ = models.load(str(half))
    assert model.parameters()["model"]["embed_tokens"]["weight"].dtype == mx.bfloat16
    for r in cache:
        logits = models.forward(model, r.prompt_ids + r.response_ids[:-1])[0].astype(mx.float32)
        lp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))[len(r.prompt_ids) - 1:]
        best = -np.sort(-lp, axis=-1)[:, :cfg.top_k]
        np.testing.assert_allclose(r.topk_logprobs, best, atol=2e-2)
        assert r.topk_logprobs.dtype == np.float32 and np.all(np.diff(r.topk_logprobs, axis=-1) <= 0)


def test_hard_guard_skips_samples_of_refused_prompts(world, reference):
    _, soft = reference
    cfg = _cfg(world, "hard", hard_guard=True)
    teach(cfg)
    recs = tc.open_cache(cfg.out).records()
    for r, s in zip(recs, soft.records()):
        assert r.u == (1.0 if s.u >= 0.5 else 0.0)
        if r.u == 1.0:
            assert r.response_ids == [] and r.topk_ids.shape == (0, cfg.top_k)
        else:  # same seeds, same samples as the soft run
            assert r.response_ids == s.response_ids
    assert {r.u for r in recs} == {0.0, 1.0}


def test_output_mode_scores_each_sample(world):
    cfg = _cfg(world, "out", mode="output", samples_per_prompt=1)
    summary = teach(cfg)
    cache = tc.open_cache(cfg.out)
    assert summary["records"] == len(cache) == len(PROMPTS)
    assert not list(Path(cfg.out).glob("partial-*"))
    _, tok, _ = models.load(cfg.base)
    guard = guards.load_guard(SPEC, cfg.guard_model)
    examples = _examples(world)
    for r in cache:
        ex = examples[r.prompt_index]
        reply = tok.decode([t for t in r.response_ids if t not in tok.eos_token_ids])
        assert r.u == pytest.approx(guard.moderate_output(ex.prompt, reply, ex.context).u, abs=1e-6)


def _same(a, b):
    ra, rb = a.records(), b.records()
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb):
        assert (x.prompt_index, x.sample_index, x.label, x.category) == (y.prompt_index, y.sample_index, y.label,
                                                                          y.category)
        assert x.prompt_ids == y.prompt_ids and x.response_ids == y.response_ids and x.u == y.u
        np.testing.assert_array_equal(x.topk_ids, y.topk_ids)
        np.testing.assert_array_equal(x.topk_logprobs, y.topk_logprobs)
        np.testing.assert_array_equal(x.tail_mass, y.tail_mass)


def test_resume_after_sigkill_equals_uninterrupted_run(world, monkeypatch):
    # The models run over a group of shards at a time (two here, of one prompt each): the kill
    # can leave a group half written, which the resumed run samples again whole.
    monkeypatch.setattr("mlx_softprompt.teach.GROUP_PROMPTS", 4)
    cfg = _cfg(world, "killed", shard_size=1, max_tokens=24)
    ref_cfg = replace(cfg, out=str(Path(cfg.out).parent / "uninterrupted"))
    teach(ref_cfg)
    args = ["teach", "--base", cfg.base, "--guard", cfg.guard, "--guard-model", cfg.guard_model, "--data", cfg.data,
            "--out", cfg.out, "--shard-size", "1", "--samples-per-prompt", "2", "--max-tokens", "24", "--top-k", "6",
            "--batch-size", "3", "--seed", "3"]
    # Same BLAS as this process (no re-exec), so both runs compute the same floats.
    env = dict(os.environ, MLX_SOFTPROMPT_NO_BLAS="1", HF_HUB_OFFLINE="1")
    run = ("import runpy, sys; import mlx_softprompt.teach as t; t.GROUP_PROMPTS = 4; "
           "sys.argv[0] = 'mlx-softprompt'; runpy.run_module('mlx_softprompt', run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", run] + args, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = Path(cfg.out) / tc.shard_name(0)
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.kill()  # SIGKILL: no cleanup runs
    _, err = proc.communicate()
    assert proc.returncode == -9, err.decode()[-2000:]
    m = tc.read_manifest(cfg.out)
    assert not m["complete"] and len(m["shards"]) < m["num_shards"]
    with pytest.raises(UserError, match="incomplete"):
        tc.open_cache(cfg.out)
    teach(cfg)  # the same arguments again: finishes the job
    _same(tc.open_cache(cfg.out), tc.open_cache(ref_cfg.out))
    assert not list(Path(cfg.out).glob(".*.tmp*"))


@pytest.mark.parametrize("mode", ["input", "output"])
def test_a_group_left_half_written_is_run_again_whole(world, monkeypatch, mode):
    """Stopped after the first shard of a group of three, a rerun redoes the group and writes
    the rest: the cache equals an uninterrupted run's, to the bit."""
    import mlx_softprompt.teach as teach_mod

    monkeypatch.setattr(teach_mod, "GROUP_PROMPTS", 6)  # 3 shards of 1 prompt x 2 samples
    cfg = _cfg(world, f"half-{mode}", shard_size=1, mode=mode)
    ref_cfg = replace(cfg, out=str(Path(cfg.out).parent / f"whole-{mode}"))
    teach(ref_cfg)
    add_shard = teach_mod._add_shard

    def stop_after_one(*args, **kw):
        if tc.read_manifest(cfg.out)["shards"]:
            raise KeyboardInterrupt
        add_shard(*args, **kw)

    monkeypatch.setattr(teach_mod, "_add_shard", stop_after_one)
    with pytest.raises(KeyboardInterrupt):
        teach(cfg)
    m = tc.read_manifest(cfg.out)
    assert [s["index"] for s in m["shards"]] == [0]
    # the whole group's verdicts (input mode) or samples (output mode) are kept for the rerun
    assert sorted(m["verdicts" if mode == "input" else "partials"]) == [str(i) for i in range(len(PROMPTS))]
    first = (Path(cfg.out) / tc.shard_name(0)).stat().st_mtime_ns
    monkeypatch.setattr(teach_mod, "_add_shard", add_shard)
    teach(cfg)
    _same(tc.open_cache(cfg.out), tc.open_cache(ref_cfg.out))
    assert (Path(cfg.out) / tc.shard_name(0)).stat().st_mtime_ns == first  # the finished shard is kept
    assert not list(Path(cfg.out).glob("partial-*"))


def test_rerun_of_a_finished_cache_changes_nothing(world, reference):
    cfg, cache = reference
    before = (Path(cfg.out) / tc.shard_name(0)).stat().st_mtime_ns
    teach(cfg)
    assert (Path(cfg.out) / tc.shard_name(0)).stat().st_mtime_ns == before
    _same(tc.open_cache(cfg.out), cache)


def test_mismatched_rerun_is_refused(world, reference):
    cfg, _ = reference
    with pytest.raises(UserError, match="max_tokens was 10, now 11.*new --out"):
        teach(replace(cfg, max_tokens=11))
    other = Path(cfg.out).parent / "other.jsonl"
    other.write_text(json.dumps({"prompt": "Something else"}) + "\n")
    with pytest.raises(UserError, match="prompts differ"):
        teach(replace(cfg, data=str(other)))
    with pytest.raises(UserError, match="made with base"):
        teach(replace(cfg, base=cfg.guard_model))  # another model, same settings: caught by its fingerprint


def test_damaged_shards_are_named(world, reference):
    cfg, _ = reference
    bad = Path(cfg.out).parent / "damaged"
    shutil.copytree(cfg.out, bad)
    shard = bad / tc.shard_name(1)
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"shard-00001\.safetensors: teacher-cache shard is corrupt or truncated"):
        tc.open_cache(bad)
    shard.write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(UserError, match=r"shard-00001\.safetensors: .*truncated"):
        tc.open_cache(bad)
    shard.unlink()
    with pytest.raises(UserError, match=r"shard-00001\.safetensors: teacher-cache shard is missing"):
        tc.open_cache(bad)
    with pytest.raises(UserError, match="not a teacher cache"):
        tc.open_cache(Path(cfg.out).parent)


def test_bad_data_line_names_file_and_line(world):
    root = world[0]
    data = root / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "How do I bake bread?"}) + "\n{not json\n")
    with pytest.raises(UserError, match=r"bad\.jsonl:2: invalid JSON"):
        teach(_cfg(world, "bad", data=str(data)))
    assert not (root / "bad").exists()
    summary = teach(_cfg(world, "bad", data=str(data), skip_bad=True, samples_per_prompt=1, max_tokens=4))
    assert summary["prompts"] == 1
    assert tc.read_manifest(root / "bad")["inputs"]["skipped_bad_lines"] == 1


def test_bad_arguments(world):
    with pytest.raises(UserError, match="--mode"):
        teach(_cfg(world, "x", mode="both"))
    with pytest.raises(UserError, match="--top-k"):
        teach(_cfg(world, "x", top_k=0))
    with pytest.raises(UserError, match="larger than the base's vocabulary"):
        teach(_cfg(world, "big-k", top_k=100000))


def test_teach_renders_with_the_template_the_guard_ships(world, tmp_path):
    """A built-in guard whose directory ships its own template (differing from the fallback) is read through it."""
    from transformers import AutoTokenizer

    from mlx_softprompt.train import manifest_guard_template

    root, base, _, data = world
    gdir = tiny.make_tiny_checkpoint(tmp_path / "lg", seed=5, corpus=GUARD_CORPUS)
    official = (Path(__file__).parent / "data" / "guards" / "llama-guard-3-1b.jinja").read_text()
    shipped = official.replace("Task: Check", "Task (as shipped): Check")
    tok = AutoTokenizer.from_pretrained(gdir)
    tok.chat_template = shipped
    tok.save_pretrained(gdir)
    cfg = _cfg(world, "shipped", guard="llama-guard-3-1b", guard_model=str(gdir), samples_per_prompt=1, max_tokens=4)
    teach(cfg)
    cache = tc.open_cache(cfg.out)
    g = cache.manifest["guard"]
    assert g["template"] == "model" and g["template_sha256"] == guards.template_sha256(shipped)
    assert manifest_guard_template(cache.manifest) == f"model sha256:{g['template_sha256']}"
    # u from the shipped template rendered by transformers itself, the label logits read here
    model, mtok, _ = models.load(str(gdir))
    unsafe, safe = (mtok.encode(w, add_special_tokens=False)[0] for w in ("unsafe", "safe"))
    spec = guards.get_spec("llama-guard-3-1b")
    spec.prefer = "spec"
    fallback = guards.Guard(spec, model, mtok)
    differs = 0
    for r, ex in zip(cache.records(), _examples(world)):
        convs = guards.guard_messages(ex.prompt, ex.context)
        text = tok.apply_chat_template([{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]}
                                        for m in convs], tokenize=False, add_generation_prompt=True)
        assert "Task (as shipped): Check" in text
        ids = mtok.encode(text + "\n\n", add_special_tokens=False)
        z = np.array(models.forward(model, ids)[0, -1].astype(mx.float32), dtype=np.float64)[[unsafe, safe]]
        assert r.u == pytest.approx(float(np.exp(z[0]) / np.exp(z).sum()), abs=1e-5)
        differs += abs(r.u - fallback.moderate_input(ex.prompt, ex.context).u) > 1e-6
    assert differs  # the fallback's prompt would have given other verdicts
    # resuming into this cache with a guard that ships another template is refused
    tok.chat_template = official
    tok.save_pretrained(gdir)
    for f in Path(cfg.out).glob("shard-*"):
        f.unlink()
    manifest = json.loads((Path(cfg.out) / tc.MANIFEST).read_text())
    manifest.update(shards=[], verdicts={}, complete=False)
    (Path(cfg.out) / tc.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="template"):
        teach(cfg)
