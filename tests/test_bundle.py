"""The bundle: round trip (same greedy tokens as base + P), model card, atomic write, tampering refused."""

import json
import os
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from mlx_softprompt import bundle, generate, models, prompt_file
from mlx_softprompt.errors import UserError
from mlx_softprompt.system import open_system
from conftest import greedy_by_hand, run_cli

TEXTS = ["Write a poem about the sea.", "What is the capital of France?"]


def _cli(*args):
    env = {"MLX_SOFTPROMPT_NO_BLAS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONIOENCODING": "utf-8"}
    if os.environ.get("LD_PRELOAD"):
        env["LD_PRELOAD"] = os.environ["LD_PRELOAD"]
    return subprocess.run([sys.executable, "-m", "mlx_softprompt", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def _tokens(system, text, steps=8):
    ids = generate.chat_ids(system.tokenizer, text)
    return generate.complete(system.model, system.tokenizer, ids, system.cache,
                             generate.GenerationConfig(max_tokens=steps)).tokens


@pytest.fixture(scope="module")
def made(tiny_softprompt, tmp_path_factory):
    base, pfile = tiny_softprompt()
    root = tmp_path_factory.mktemp("bundles")
    report = root / "report.json"
    report.write_text(json.dumps({"suite": "tiny", "unsafe_compliance": {"prefix": 0.125, "n": 8},
                                  "over_refusal": {"rate": 0.25, "n": 8}, "notes": ["ignored list"]}))
    plain = bundle.make_bundle(bundle.BundleConfig(base, pfile, root / "plain", eval_report=report), log=lambda s: None)
    quant = bundle.make_bundle(bundle.BundleConfig(base, pfile, root / "q4", quantize=True, q_bits=4,
                                                   q_group_size=64), log=lambda s: None)
    return base, pfile, plain, quant


def test_round_trip_same_greedy_tokens_as_base_plus_prompt(made):
    base, pfile, plain, _ = made
    system = open_system(plain)
    assert system.cache[0].offset == 5 and system.name == "plain"
    model, tok, _ = models.load(base)
    P = prompt_file.load(pfile).prompt
    for text in TEXTS:
        want = greedy_by_hand(model, tok, text, P)
        assert want, "the reference produced no tokens"
        assert _tokens(system, text) == want
    # the soft prompt matters: the bare base answers differently
    assert any(greedy_by_hand(model, tok, t, None) != greedy_by_hand(model, tok, t, P) for t in TEXTS)


def test_quantized_bundle_ships_the_cache_of_the_quantized_base(made):
    _, pfile, _, quant = made
    config = json.loads((quant / "model" / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 64
    manifest = json.loads((quant / "bundle.json").read_text())
    assert manifest["base"]["quantization"] == {"bits": 4, "group_size": 64}
    system = open_system(quant)
    # the shipped cache equals P's cache recomputed on the base as bundled
    model, tok, _ = models.load(str(quant / "model"))
    P = prompt_file.load(pfile).prompt
    fresh = models.prefix_cache(model, P)
    for a, b in zip(system.cache, fresh):
        assert a.offset == b.offset == 5 and a.keys.shape[2] == 5  # stored compactly: n positions, not 256
        for x, y in [(a.keys, b.keys), (a.values, b.values)]:
            np.testing.assert_allclose(np.array(x), np.array(y[..., :5, :]), atol=1e-5)
    for text in TEXTS:
        assert _tokens(system, text) == greedy_by_hand(model, tok, text, P)
    # and the quantized weights are smaller than the fp32 ones
    assert (quant / "model" / "model.safetensors").stat().st_size < (made[2] / "model" / "model.safetensors").stat().st_size


def test_layout_manifest_and_model_card(made):
    _, pfile, plain, quant = made
    names = sorted(p.relative_to(plain).as_posix() for p in plain.rglob("*") if p.is_file())
    for part in ["bundle.json", "README.md", "prompt.safetensors", "prompt_cache.safetensors", "eval_report.json",
                 "model/config.json", "model/model.safetensors", "model/tokenizer.json"]:
        assert part in names
    manifest = json.loads((plain / "bundle.json").read_text())
    assert manifest["format"] == bundle.FORMAT
    assert manifest["prompt"]["objective"] == "tv" and manifest["prompt"]["num_virtual_tokens"] == "5"
    assert manifest["cache"] == {"layers": 2, "types": ["KVCache", "KVCache"], "offset": 5}
    assert set(manifest["files"]) == set(names) - {"bundle.json", "README.md"}
    assert manifest["files"]["prompt.safetensors"]["sha256"] == bundle.sha256(pfile)
    assert (plain / "prompt.safetensors").read_bytes() == pfile.read_bytes()
    card = (plain / "README.md").read_text()
    assert "llama-guard-3-1b" in card and "| objective | tv |" in card and "5 virtual tokens" in card
    assert "has no `systems`" in card  # not an eval report: the card points at the file (test_model_card.py: a real one)
    assert "mlx-softprompt chat --model plain" in card
    assert "No eval report was bundled." in (quant / "README.md").read_text()
    assert "4-bit, group size 64" in (quant / "README.md").read_text()
    # written atomically: nothing but the two bundles and the report next to them
    assert sorted(p.name for p in plain.parent.iterdir()) == ["plain", "q4", "report.json"]


def _copy(src, tmp_path, name="b"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _rehash(path):
    """Make bundle.json agree with the files again (a consistent but mismatched bundle)."""
    manifest = json.loads((path / "bundle.json").read_text())
    for rel in manifest["files"]:
        p = path / rel
        manifest["files"][rel] = {"sha256": bundle.sha256(p), "bytes": p.stat().st_size}
    (path / "bundle.json").write_text(json.dumps(manifest))


def _flip_byte(p, at=-3):
    data = bytearray(p.read_bytes())
    data[at] ^= 0x55
    p.write_bytes(bytes(data))


def _error(path):
    with pytest.raises(UserError) as e:
        open_system(path)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("part", ["prompt.safetensors", "prompt_cache.safetensors", "model/model.safetensors",
                                  "model/tokenizer.json"])
def test_tampered_part_is_named(made, tmp_path, part):
    b = _copy(made[2], tmp_path)
    _flip_byte(b / part)
    msg = _error(b)
    assert str(b / part) in msg and "sha256" in msg


def test_missing_part_and_broken_manifest(made, tmp_path):
    b = _copy(made[2], tmp_path)
    (b / "prompt_cache.safetensors").unlink()
    assert "bundle part missing" in _error(b) and "prompt_cache.safetensors" in _error(b)
    (b / "bundle.json").write_text("{not json")
    assert "bundle.json: invalid JSON" in _error(b)
    (b / "bundle.json").unlink()
    assert "not a bundle (no bundle.json)" in _error(b)


def test_consistent_but_mismatched_parts_are_refused(made, tiny_softprompt, tmp_path):
    """Hashes that agree with bundle.json are not enough: the parts must belong together."""
    base, pfile, plain, _ = made
    # another soft prompt for the same base, cache left as it was
    _, other_p = tiny_softprompt(p_seed=4)
    b = _copy(plain, tmp_path, "other_prompt")
    shutil.copyfile(other_p, b / "prompt.safetensors")
    _rehash(b)
    assert "computed for another prompt file" in _error(b)
    # a cache of the right prompt but with one virtual token too many
    b = _copy(plain, tmp_path, "offset")
    model, _, _ = models.load(base)
    P = prompt_file.load(pfile).prompt
    from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

    _, meta = load_prompt_cache(str(b / "prompt_cache.safetensors"), return_metadata=True)
    save_prompt_cache(str(b / "prompt_cache.safetensors"),
                      models.prefix_cache(model, mx.concatenate([P, P[:1]])), metadata=meta)
    _rehash(b)
    assert "cache offset [6] != the method's 5 prefix positions" in _error(b)
    # the base swapped for another model of the same shape
    b = _copy(plain, tmp_path, "other_base")
    from mlx_softprompt.tiny import make_tiny_checkpoint

    other = make_tiny_checkpoint(tmp_path / "other_model", seed=7)
    shutil.copyfile(other / "model.safetensors", b / "model" / "model.safetensors")
    _rehash(b)
    msg = _error(b)
    assert str(b / "model") in msg and "bundle.json records" in msg


def test_prompt_file_override_runs_another_prompt_on_the_bundled_base(made, tiny_softprompt):
    base, _, plain, _ = made
    _, other_p = tiny_softprompt(p_seed=4)
    system = open_system(plain, other_p)
    model, tok, _ = models.load(base)
    P = prompt_file.load(other_p).prompt
    assert _tokens(system, TEXTS[0]) == greedy_by_hand(model, tok, TEXTS[0], P)


def test_refusals(made, tiny_softprompt, tiny_model, tmp_path):
    base, pfile, plain, _ = made
    with pytest.raises(UserError, match="already exists and is not empty"):
        bundle.make_bundle(bundle.BundleConfig(base, pfile, plain), log=lambda s: None)
    _, foreign = tiny_softprompt(seed=1)
    with pytest.raises(UserError, match="trained for base"):
        bundle.make_bundle(bundle.BundleConfig(base, foreign, tmp_path / "x"), log=lambda s: None)
    with pytest.raises(UserError, match="already quantized"):
        bundle.make_bundle(bundle.BundleConfig(tiny_model("llama", q_bits=4), pfile, tmp_path / "y", quantize=True),
                           log=lambda s: None)
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    with pytest.raises(UserError, match="bad.json: invalid JSON"):
        bundle.make_bundle(bundle.BundleConfig(base, pfile, tmp_path / "z", eval_report=bad), log=lambda s: None)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp dirs left behind


def test_cli_bundle_inspect_and_generate(made, tmp_path, capsys):
    base, pfile, plain, _ = made
    out = tmp_path / "cli-bundle"
    code, stdout, err = run_cli(capsys, "bundle", "--base", base, "--prompt-file", str(pfile), "--out", str(out),
                              "-q", "--q-bits", "8")
    assert code == 0, err
    assert f"wrote {out}" in stdout
    code, stdout, err = run_cli(capsys, "inspect", str(out))
    assert code == 0, err
    meta = json.loads(stdout)
    assert meta["base"]["quantization"] == {"bits": 8, "group_size": 64} and meta["cache"]["offset"] == 5
    code, stdout, err = run_cli(capsys, "generate", "--model", str(plain), "--text", TEXTS[0], "--max-tokens", "8",
                              "--json")
    assert code == 0, err
    model, tok, _ = models.load(base)
    assert json.loads(stdout)["tokens"] == greedy_by_hand(model, tok, TEXTS[0], prompt_file.load(pfile).prompt)
    code, _, err = run_cli(capsys, "bundle", "--base", base, "--prompt-file", str(pfile), "--out", str(out))
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1
    # the real entry point: a damaged bundle is one line on stderr, exit 1, no traceback
    _flip_byte(out / "prompt.safetensors")
    r = _cli("inspect", str(out))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "prompt.safetensors" in r.stderr
    assert "Traceback" not in r.stderr
