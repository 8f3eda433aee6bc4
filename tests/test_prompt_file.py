"""The prompt file: round trip, fingerprint checks, damaged files, and the CLI around it."""

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from mlx_softprompt import models, prompt_file
from mlx_softprompt.errors import UserError


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "mlx_softprompt", *args], capture_output=True, text=True,
                          env={"MLX_SOFTPROMPT_NO_BLAS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


@pytest.fixture(scope="module")
def saved(tiny_model, tmp_path_factory):
    path = tiny_model("llama")
    model, tok, config = models.load(path)
    P = mx.random.normal((5, models.hidden_size(model)), key=mx.random.key(3)) * 0.1
    out = tmp_path_factory.mktemp("pf") / "p.safetensors"
    prompt_file.save(out, {"soft_prompt": P}, model, config, objective="tv", guard="llama-guard-3-1b",
                     refusal="I'm sorry, but I can't help with that.")
    return path, out, P


def test_round_trip_and_metadata(saved):
    path, out, P = saved
    pf = prompt_file.load(out)
    np.testing.assert_array_equal(np.array(pf.prompt), np.array(P))
    m = pf.metadata
    assert m["format"] == prompt_file.FORMAT and m["placement"] == "prepend-before-bos"
    assert m["num_virtual_tokens"] == "5" and m["objective"] == "tv" and m["base_architecture"] == "llama"
    model, _, config = models.load(path)
    pf.check_base(model, config)  # no error
    # no temporary files are left next to the output
    assert sorted(p.name for p in out.parent.iterdir()) == ["p.safetensors"]


def test_quantized_copy_of_the_base_is_accepted(saved, tiny_model):
    _, out, _ = saved
    model, _, config = models.load(tiny_model("llama", q_bits=4))
    prompt_file.load(out).check_base(model, config)


def test_other_base_is_refused_naming_both(saved, tiny_model):
    _, out, _ = saved
    model, _, config = models.load(tiny_model("llama", seed=1))
    with pytest.raises(UserError) as e:
        prompt_file.load(out).check_base(model, config)
    msg = str(e.value)
    assert "trained for base llama/d=64" in msg and "model given is llama/d=64" in msg and "\n" not in msg
    r = _cli("generate", "--model", tiny_model("llama", seed=1), "--prompt-file", str(out), "--text", "hi")
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1


@pytest.mark.parametrize("damage", ["truncate", "header", "empty", "garbage"])
def test_damaged_files_fail_clearly(saved, tmp_path, damage):
    _, out, _ = saved
    data = out.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes({"truncate": data[: len(data) - 7], "header": data[:8] + b"{not json" + data[17:],
                     "empty": b"", "garbage": b"\x00" * 3}[damage])
    with pytest.raises(UserError) as e:
        prompt_file.load(bad)
    assert str(bad) in str(e.value)
    r = _cli("inspect", str(bad))
    assert r.returncode == 1 and "Traceback" not in r.stderr and str(bad) in r.stderr


def test_inspect_prints_json(saved):
    _, out, _ = saved
    r = _cli("inspect", str(out))
    assert r.returncode == 0, r.stderr
    meta = json.loads(r.stdout)
    assert meta["tensors"]["soft_prompt"]["shape"] == [5, 64] and meta["method"] == "softprompt"


def test_generate_puts_the_prompt_in_front(saved):
    """The CLI's greedy answer with P equals greedy decoding of [P; chat(x)] done by hand."""
    path, out, P = saved
    r = _cli("generate", "--model", path, "--prompt-file", str(out), "--text", "Write a poem.",
             "--max-tokens", "8", "--temp", "0", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)["tokens"]
    model, tok, config = models.load(path)
    ids = tok.apply_chat_template([{"role": "user", "content": "Write a poem."}], add_generation_prompt=True)
    want = []
    for _ in range(8):
        nxt = int(mx.argmax(models.forward(model, ids + want, P)[0, -1]).item())
        if nxt in tok.eos_token_ids:
            break
        want.append(nxt)
    assert got == want


def test_help_lists_commands():
    r = _cli("--help")
    assert r.returncode == 0
    for cmd in ["convert", "generate", "inspect", "export-peft", "import-peft"]:
        assert cmd in r.stdout
