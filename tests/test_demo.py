"""The demo world (examples/world) and a reduced `mlx-softprompt demo` run end to end."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from mlx_softprompt import data, demo, world

WORLD = Path(__file__).resolve().parent.parent / "examples" / "world"
needs_world = pytest.mark.skipif(not (WORLD / "base" / "model.safetensors").exists(),
                                 reason="examples/world not built")


def test_world_sequences_weight_only_what_is_learned(tmp_path):
    suite = data.load_suite()
    train = suite["train"][:40]
    cfg = world.WorldConfig()
    tok = world.world_tokenizer(tmp_path / "tok", train, cfg)
    rng = np.random.default_rng(0)
    answer = world.compliant_answer(rng)
    seq = world.chat_seq(tok, "How do I bake bread?", answer, cfg)
    n_answer = len(tok.encode(answer, add_special_tokens=False)) + 1  # + end of turn
    assert seq.weights[-n_answer:] == [1.0] * n_answer
    assert all(w < 1.0 for w in seq.weights[:-n_answer])
    assert tok.decode(seq.ids[-n_answer:]).startswith(answer)
    # the user's words get the small LM weight, the template's scaffolding none
    user = [tok.decode([i]) for i, w in zip(seq.ids, seq.weights) if w == cfg.prompt_loss_weight]
    assert "".join(user).strip() == "How do I bake bread?"
    refusal = world.chat_seq(tok, "x", world.REFUSAL, cfg, system=world.SAFETY_SYSTEM_PROMPTS[0])
    assert tok.decode(refusal.ids).count(world.SAFETY_SYSTEM_PROMPTS[0]) == 1
    # the guard's sequences go through its spec (guards.py) and end with the label word
    from mlx_softprompt.guards import Guard

    g = Guard(world.guard_spec(), None, tok)
    s = world.guard_seq(g, "How do I make a bomb?", True)
    assert tok.decode(s.ids[-2:-1]) == "unsafe" and s.weights[-2:] == [1.0, 1.0]
    s = world.guard_seq(g, "How do I bake bread?", False, response=answer)
    assert tok.decode(s.ids[-2:-1]) == "safe"


def test_balanced_and_augmented():
    rng = np.random.default_rng(0)
    train = data.load_suite()["train"]
    bal = world._balanced(train, rng)
    harm = sum(world.is_harmful(e) for e in bal)
    assert harm == len(bal) - harm
    variants = {world.augment("Explain photosynthesis", rng) for _ in range(50)}
    assert len(variants) > 5 and all("xplain photosynthesis" in v.lower() or "explain photosynthesis" in v
                                     for v in variants)


@needs_world
def test_shipped_world_is_small_and_recorded():
    info = json.loads((WORLD / "world.json").read_text())
    assert sum(info["bytes"].values()) < 15e6
    total = sum(f.stat().st_size for f in WORLD.rglob("*") if f.is_file())
    assert total < 16e6
    assert (WORLD / "BUILD.md").read_text().count(f"--seed {info['config']['seed']}") == 1
    # built on the train split only: the recorded hash is the train split's
    assert info["train_data_hash"] == data.dataset_hash(data.load_suite()["train"])
    from mlx_softprompt.guards import load_spec

    assert load_spec(WORLD / "guard-spec.json").id == "demo-guard"


@needs_world
def test_quick_demo_end_to_end(tmp_path):
    cfg = demo.DemoConfig(out=str(tmp_path / "demo-out"), quick=True)
    report = demo.run(cfg, log=lambda *a, **k: None)
    path = tmp_path / "demo-out" / "report.json"
    on_disk = json.loads(path.read_text())
    assert set(on_disk["systems"]) >= {"base", "dual", "softprompt-tv", "system-prompt"}
    n_test = on_disk["demo"]["n_test"]
    for name, m in on_disk["systems"].items():
        for key in ("unsafe_compliance", "over_refusal", "agreement_with_dual"):
            assert 0.0 <= m[key] <= 1.0, (name, key, m[key])
        assert m["utility_kl"] >= 0.0 and math.isfinite(m["utility_kl"])
        assert m["n_harmful"] > 0 and m["n_benign"] > 0
        assert m["n_harmful"] + m["n_benign"] + m["n_borderline"] == n_test
        # each fraction is a count over its own prompts
        assert abs(m["unsafe_compliance"] * m["n_harmful"] - round(m["unsafe_compliance"] * m["n_harmful"])) < 1e-6
        assert abs(m["over_refusal"] * m["n_benign"] - round(m["over_refusal"] * m["n_benign"])) < 1e-6
    assert on_disk["systems"]["dual"]["agreement_with_dual"] == 1.0
    assert on_disk["systems"]["base"]["utility_kl"] == pytest.approx(0.0, abs=1e-6)
    assert on_disk["systems"]["softprompt-tv"]["cost"]["added_bytes"] > 0
    assert (tmp_path / "demo-out" / "demo.png").stat().st_size > 1000
    samples = on_disk["demo"]["samples"]
    assert [s["label"] for s in samples] == ["harmful", "benign", "borderline"]
    assert all(s["base"] and s["softprompt-tv"] for s in samples)
    text = demo.summary(report, cfg.out)
    assert "| softprompt-tv |" in text and "report.json" in text


def test_world_build_small(tmp_path, monkeypatch):
    """The build recipe end to end on a slice of the train split: loadable base, guard and spec."""
    full = world.world_suite

    def small(seed=0):
        s = full(seed)
        return {k: v[:24] for k, v in s.items()}

    monkeypatch.setattr(world, "world_suite", small)
    cfg = world.WorldConfig(base_epochs=1, guard_epochs=1, vocab_size=600, semantic_init=False,
                            base=world.ModelSize(32, 1, intermediate_size=64))
    info = world.build(tmp_path / "w", cfg)
    for key in ("base_refuses_harmful", "safety_system_refuses_harmful", "guard_flags_harmful", "classify_accuracy"):
        assert 0.0 <= info["val"][key] <= 1.0
    assert info["train_data_hash"] == data.dataset_hash(small()["train"])
    from mlx_softprompt.guards import load_guard

    guard = load_guard(str(tmp_path / "w" / "guard-spec.json"), str(tmp_path / "w" / "guard"))
    assert 0.0 <= guard.moderate_input("How do I bake bread?").u <= 1.0
    assert (tmp_path / "w" / "BUILD.md").read_text().startswith("# The demo world")
