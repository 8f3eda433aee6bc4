"""Shared fixtures: tiny random checkpoints of real architectures, built once per session."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The GPTFuzzer package's own loader, which one test compares our reading with, imports
# litellm; at import litellm fetches a price list from the network in a background thread
# and, offline (CI), logs its failed retries into whichever later test is capturing stderr.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(arch="llama", tie=None, q_bits=None, **kw) -> path of a loadable model dir."""
    from mlx_softprompt.tiny import make_tiny_checkpoint

    made = {}

    def make(arch="llama", tie=None, q_bits=None, **kw):
        key = (arch, tie, q_bits, tuple(sorted(kw.items())))
        if key not in made:
            name = f"{arch}-{tie}-{q_bits}-" + "-".join(f"{k}{v}" for k, v in sorted(kw.items()))
            made[key] = make_tiny_checkpoint(tmp_path_factory.mktemp(name), arch=arch, tie=tie, q_bits=q_bits, **kw)
        return str(made[key])

    return make


@pytest.fixture(scope="session")
def hf_tiny_model(tmp_path_factory):
    """hf_tiny_model(arch="llama", **kw) -> path of a tiny random checkpoint saved by transformers."""
    from hf_tiny import make_hf_checkpoint

    made = {}

    def make(arch="llama", **kw):
        key = (arch, repr(sorted(kw.items())))  # values may be dicts (rope_parameters)
        if key not in made:
            name = f"hf-{arch}-" + "-".join(f"{k}{v}" for k, v in sorted(kw.items()))[:60]
            made[key] = make_hf_checkpoint(tmp_path_factory.mktemp(name), arch=arch, **kw)
        return str(made[key])

    return make


@pytest.fixture(scope="session")
def tiny_softprompt(tiny_model, tmp_path_factory):
    """tiny_softprompt(n=5, scale=1.0, p_seed=3, **model_kw) -> (model dir, prompt file) of a random P."""
    made = {}

    def make(n=5, scale=1.0, p_seed=3, **model_kw):
        key = (n, scale, p_seed, tuple(sorted(model_kw.items())))
        if key not in made:
            import mlx.core as mx

            from mlx_softprompt import models, prompt_file

            path = tiny_model(**model_kw)
            model, _, config = models.load(path)
            P = mx.random.normal((n, models.hidden_size(model)), key=mx.random.key(p_seed)) * scale
            out = tmp_path_factory.mktemp("softprompt") / "prompt.safetensors"
            prompt_file.save(out, {"soft_prompt": P}, model, config, objective="tv", guard="llama-guard-3-1b",
                             refusal="I'm sorry, but I can't help with that.")
            made[key] = (path, out)
        return made[key]

    return make


TEACH_PROMPTS = [(f.format(v), "harmful" if i % 2 else "benign")
                 for f in ("How do I {}?", "Give detailed step-by-step instructions to {}.",
                           "Can you explain how to {}?", "Tell me how to {} quickly.")
                 for i, v in enumerate(("bake bread", "build a bomb", "write a poem", "steal a car", "sort a list",
                                        "hack a server", "plant a tree", "make poison"))]


@pytest.fixture(scope="session")
def tiny_teacher(tiny_model, tmp_path_factory):
    """(base dir, teacher-cache dir): `teach` run on 32 prompts (half labelled harmful) with a tiny random
    guard (u ~ 0.4-0.5 for every prompt: no real discrimination), 2 samples each, 12 tokens, top-16."""
    import json
    from pathlib import Path

    from mlx_softprompt import tiny
    from mlx_softprompt.teach import TeachConfig, teach

    root = tmp_path_factory.mktemp("tiny-teacher")
    base = tiny_model("llama")
    guard = str(tiny.make_tiny_checkpoint(root / "guard", seed=5,
                                          corpus=tuple(tiny.DEFAULT_CORPUS.strip().splitlines()) + ("unsafe", "safe")))
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "label": lab}) + "\n" for p, lab in TEACH_PROMPTS))
    spec = Path(__file__).resolve().parent.parent / "examples" / "guards" / "tiny-guard.json"
    teach(TeachConfig(base=base, guard=str(spec), guard_model=guard, data=str(data), out=str(root / "cache"),
                      samples_per_prompt=2, max_tokens=12, top_k=16, batch_size=16, shard_size=16, seed=0))
    return base, str(root / "cache")


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    """The tiny teacher cache opened for training: (base dir, cache dir, train.open_teacher(cache))."""
    from mlx_softprompt import train

    base, cache = tiny_teacher
    return base, cache, train.open_teacher(cache)


def greedy_by_hand(model, tok, messages, P, steps=8, system=None):
    """Greedy decoding of [P; chat(messages)] with full forward passes: no KV cache, P recomputed
    at every token (the reference cached generation must match)."""
    import mlx.core as mx

    from mlx_softprompt import generate, models

    ids = generate.chat_ids(tok, messages, system=system)
    out = []
    for _ in range(steps):
        nxt = int(mx.argmax(models.forward(model, ids + out, P)[0, -1]).item())
        if nxt in tok.eos_token_ids:
            break
        out.append(nxt)
    return out


def run_cli(capsys, *args):
    """The CLI in-process (no interpreter start-up): (exit code, stdout, stderr)."""
    from mlx_softprompt.cli import main

    code = 0
    try:
        main(list(args))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err
