"""`generate`: text, and `--json` with tokens and timings; P's cache is reused, never modified."""

import json
import os
import subprocess
import sys

import pytest

from mlx_softprompt import generate, models
from mlx_softprompt.system import open_system
from conftest import run_cli

TEXT = "Write a poem about the sea."
KEYS = {"text", "tokens", "prompt_tokens", "generation_tokens", "time_to_first_token", "tokens_per_second",
        "peak_memory_gb", "finish_reason"}


@pytest.fixture(scope="module")
def system(tiny_softprompt):
    base, pfile = tiny_softprompt()
    return base, pfile, open_system(base, pfile)


def _complete(sys_, text, cache=None, system_text=None, **cfg):
    ids = generate.chat_ids(sys_.tokenizer, text, system=system_text)
    return generate.complete(sys_.model, sys_.tokenizer, ids, sys_.cache if cache is None else cache,
                             generate.GenerationConfig(**cfg))


def test_json_output_through_the_real_entry_point(system):
    base, pfile, sys_ = system
    env = {"MLX_SOFTPROMPT_NO_BLAS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONIOENCODING": "utf-8"}
    if os.environ.get("LD_PRELOAD"):
        env["LD_PRELOAD"] = os.environ["LD_PRELOAD"]
    r = subprocess.run([sys.executable, "-m", "mlx_softprompt", "generate", "--model", base, "--prompt-file",
                        str(pfile), "--text", TEXT, "--max-tokens", "8", "--json"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == KEYS
    want = _complete(sys_, TEXT, max_tokens=8)
    assert out["tokens"] == want.tokens and out["text"] == want.text
    assert all(isinstance(t, int) for t in out["tokens"])
    assert out["generation_tokens"] == len(out["tokens"]) <= 8
    assert out["prompt_tokens"] == len(generate.chat_ids(sys_.tokenizer, TEXT))
    assert 0 < out["time_to_first_token"] < 60
    assert out["peak_memory_gb"] > 0
    assert out["finish_reason"] == ("length" if len(out["tokens"]) == 8 else "stop")
    if len(out["tokens"]) > 1:
        assert out["tokens_per_second"] > 0


def test_text_mode_prints_only_the_answer(system, capsys):
    base, pfile, sys_ = system
    code, out, err = run_cli(capsys, "generate", "--model", base, "--prompt-file", str(pfile), "--text", TEXT,
                           "--max-tokens", "8")
    assert code == 0, err
    assert out == _complete(sys_, TEXT, max_tokens=8).text + "\n"


def test_system_message_and_bare_base(system, capsys):
    base, pfile, sys_ = system
    code, out, err = run_cli(capsys, "generate", "--model", base, "--prompt-file", str(pfile), "--text", TEXT,
                           "--system", "Be brief.", "--max-tokens", "8", "--json")
    assert code == 0, err
    assert json.loads(out)["tokens"] == _complete(sys_, TEXT, system_text="Be brief.", max_tokens=8).tokens
    code, out, err = run_cli(capsys, "generate", "--model", base, "--text", TEXT, "--max-tokens", "8", "--json")
    assert code == 0, err
    bare = _complete(sys_, TEXT, cache=models.prefix_cache(sys_.model, None), max_tokens=8)
    assert json.loads(out)["tokens"] == bare.tokens
    assert bare.tokens != _complete(sys_, TEXT, max_tokens=8).tokens  # P changes the answer


def test_sampling_is_reproducible_with_a_seed(system, capsys):
    base, pfile, _ = system

    def sample(seed):
        code, out, err = run_cli(capsys, "generate", "--model", base, "--prompt-file", str(pfile), "--text", TEXT,
                               "--max-tokens", "12", "--temp", "1.0", "--top-p", "0.95", "--seed", str(seed),
                               "--json")
        assert code == 0, err
        return json.loads(out)["tokens"]

    first = sample(5)
    assert sample(5) == first
    assert any(sample(s) != first for s in (1, 2, 3))


def test_the_prompt_cache_is_reused_not_modified(system):
    _, _, sys_ = system
    n = sys_.prompt.shape[0]
    def snapshot():
        return [(c.offset, c.keys[..., :c.offset, :].tolist(), c.values[..., :c.offset, :].tolist())
                for c in sys_.cache]

    states = snapshot()
    one = _complete(sys_, TEXT, max_tokens=8)
    assert all(c.offset == n for c in sys_.cache)
    assert snapshot() == states
    assert _complete(sys_, TEXT, max_tokens=8).tokens == one.tokens
