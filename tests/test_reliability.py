"""What users are promised beyond bad input: identical bytes from identical runs, outputs replaced
only when asked, no half-state that blocks a corrected retry, temporary files of a killed run removed."""

import hashlib
import json
from pathlib import Path

import pytest

from conftest import TEACH_PROMPTS, run_cli

SPEC = str(Path(__file__).resolve().parent.parent / "examples" / "guards" / "tiny-guard.json")


@pytest.fixture(scope="module")
def world(tiny_model, tmp_path_factory):
    from mlx_softprompt import tiny

    root = tmp_path_factory.mktemp("reliability")
    guard = str(tiny.make_tiny_checkpoint(root / "guard", seed=5, corpus=tuple(
        tiny.DEFAULT_CORPUS.strip().splitlines()) + ("unsafe", "safe")))
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "label": lab}) + "\n" for p, lab in TEACH_PROMPTS[:12]))
    return {"root": root, "base": tiny_model("llama"), "guard": guard, "data": str(data)}


def _teach(w, out, *extra):
    return ["teach", "--model", w["base"], "--guard", SPEC, "--guard-model", w["guard"], "--data", w["data"],
            "--out", str(out), "--max-tokens", "6", "--top-k", "8", "--samples-per-prompt", "2",
            "--shard-size", "5", "--batch-size", "4", *extra]


def _digests(d: Path, skip=("timings.json",)) -> dict:
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file() and p.name not in skip}


def test_two_teach_runs_write_identical_files(world, capsys):
    outs = [world["root"] / f"same-{i}" for i in range(2)]
    for out in outs:
        code, _, err = run_cli(capsys, *_teach(world, out))
        assert code == 0, err
    a, b = _digests(outs[0]), _digests(outs[1])
    assert "manifest.json" in a and sum(k.startswith("shard-") for k in a) == 3
    assert a == b
    # the timings live beside the manifest (they differ from run to run), and are still reported
    assert json.loads((outs[0] / "timings.json").read_text())["phases"]["guard"]["seconds"] > 0


def test_a_failed_teach_does_not_block_the_corrected_command(world, capsys):
    out = world["root"] / "retry"
    code, _, err = run_cli(capsys, *_teach(world, out, "--guard-model", str(world["root"] / "no-guard")))
    assert code == 1 and "no-guard" in err
    code, _, err = run_cli(capsys, *_teach(world, out, "--top-k", "4"))  # other settings: still fine
    assert code == 0, err


def test_teach_removes_the_temporary_files_of_a_killed_run(world, capsys):
    out = world["root"] / "killed"
    code, _, err = run_cli(capsys, *_teach(world, out))
    assert code == 0, err
    stale = out / ".shard-00001.safetensors.x1y2.tmp.safetensors"
    stale.write_bytes(b"")
    code, _, err = run_cli(capsys, *_teach(world, out))
    assert code == 0, err
    assert not stale.exists()


@pytest.fixture(scope="module")
def trained(tiny_teacher, tmp_path_factory):
    base, cache = tiny_teacher
    return base, cache, tmp_path_factory.mktemp("trained")


def _train(base, cache, out, *extra):
    return ["train", "--model", base, "--teacher", cache, "--out", str(out), "--iters", "3", "--num-tokens", "4",
            "--batch-size", "4", "--save-every", "2", *extra]


def test_train_twice_gives_the_same_prompt_file_and_never_replaces_one_unasked(trained, capsys):
    base, cache, root = trained
    a, b = root / "a.safetensors", root / "b.safetensors"
    for out in (a, b):
        code, _, err = run_cli(capsys, *_train(base, cache, out))
        assert code == 0, err
    assert a.read_bytes() == b.read_bytes()

    before = a.read_bytes(), Path(str(a) + ".metrics.jsonl").read_bytes()
    code, _, err = run_cli(capsys, *_train(base, cache, a, "--learning-rate", "0.5"))
    assert code == 1 and "already exists" in err and "--resume" in err and "--overwrite" in err
    assert (a.read_bytes(), Path(str(a) + ".metrics.jsonl").read_bytes()) == before

    code, _, err = run_cli(capsys, *_train(base, cache, a, "--resume"))  # finished: nothing to do, same file
    assert code == 0, err
    assert a.read_bytes() == before[0]
    code, _, err = run_cli(capsys, *_train(base, cache, a, "--overwrite", "--learning-rate", "0.5"))
    assert code == 0, err
    assert a.read_bytes() != before[0]


def test_train_removes_stale_temporary_files_next_to_its_outputs(trained, capsys):
    base, cache, root = trained
    out = root / "c.safetensors"
    stale = [root / ".c.safetensors.k9.tmp.safetensors", root / ".c.train-state.safetensors.k9.tmp.safetensors"]
    for p in stale:
        p.write_bytes(b"")
    code, _, err = run_cli(capsys, *_train(base, cache, out))
    assert code == 0, err
    assert not any(p.exists() for p in stale)


def test_peft_export_and_import_replace_only_when_asked(tiny_softprompt, tmp_path, capsys):
    base, pfile = tiny_softprompt()
    adapter = tmp_path / "adapter"
    code, _, err = run_cli(capsys, "export-peft", str(pfile), str(adapter), "--model", base)
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}
    code, _, err = run_cli(capsys, "export-peft", str(pfile), str(adapter), "--model", base)
    assert code == 1 and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before
    code, _, err = run_cli(capsys, "export-peft", str(pfile), str(adapter), "--model", base, "--overwrite")
    assert code == 0, err

    out = tmp_path / "back.safetensors"
    out.write_bytes(b"a user's file")
    code, _, err = run_cli(capsys, "import-peft", str(adapter), str(out), "--model", base)
    assert code == 1 and "--overwrite" in err and out.read_bytes() == b"a user's file"
    code, _, err = run_cli(capsys, "import-peft", str(adapter), str(out), "--model", base, "--overwrite")
    assert code == 0, err
    from mlx_softprompt import prompt_file

    assert prompt_file.load(out).metadata["tensors_sha256"]
