"""The README's worked example runs as written: its code block is parsed and each command run
in order, with tiny local checkpoints in place of the hub ids and small budgets appended.
The Python API example (examples/python_api.py) runs too."""

import io
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from huggingface_hub import ModelCard

from conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent
HUB_IDS = {"Qwen/Qwen2.5-0.5B-Instruct": ("qwen2", 0), "meta-llama/Llama-Guard-3-1B": ("llama", 5)}
# appended to each command: the same steps, at the size of a test
BUDGET = {"data": ["--limit", "3"], "teach": ["--max-tokens", "8", "--top-k", "8"], "train": ["--iters", "3"],
          "eval": ["--max-tokens", "4", "--timing-prompts", "1"], "generate": ["--max-tokens", "8"],
          "chat": ["--max-tokens", "8"]}


def worked_example() -> list:
    """[(argv after `mlx-softprompt`, stdin or None)] from the README's worked-example block."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## A worked example"):]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    commands = []
    for line in block.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        stdin = None
        if "|" in line:
            feed, line = (x.strip() for x in line.split("|", 1))
            words = shlex.split(feed)
            assert words[0] == "echo", feed
            stdin = " ".join(words[1:]) + "\n"
        argv = shlex.split(line)
        assert argv[0] == "mlx-softprompt", line
        commands.append((argv[1:], stdin))
    return commands


def test_the_readme_worked_example_runs_as_written(hf_tiny_model, tmp_path, monkeypatch, capsys):
    commands = worked_example()
    assert [c[0][0] for c in commands] == ["convert", "convert", "data", "teach", "train", "eval", "bundle",
                                          "generate", "chat"]
    local = {hub: hf_tiny_model(arch, seed=seed) for hub, (arch, seed) in HUB_IDS.items()}
    monkeypatch.chdir(tmp_path)
    for argv, stdin in commands:
        argv = [local.get(a, a) for a in argv] + BUDGET.get(argv[0], [])
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin or ""))
        code, out, err = run_cli(capsys, *argv)
        assert code == 0, f"{argv}: {err[-2000:]}"
        if argv[0] == "generate":
            assert out.strip()
        if argv[0] == "chat":
            assert len(out.splitlines()) == 1  # one message in, one answer line out
    assert {p.name for p in (tmp_path / "data").iterdir()} == {"train.jsonl", "valid.jsonl", "test.jsonl"}
    assert json.loads((tmp_path / "teacher" / "manifest.json").read_text())["complete"]
    report = json.loads((tmp_path / "report.json").read_text())
    assert [m["kind"] for m in report["systems"].values()] == ["base", "softprompt", "dual"]
    card = ModelCard.load(tmp_path / "safe-qwen" / "README.md")
    assert card.data.library_name == "mlx" and card.data.eval_results


def test_the_python_api_example_runs(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "python_api.py"), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "answer: " in r.stdout and "| softprompt-tv |" in r.stdout and "| dual |" in r.stdout
    assert (tmp_path / "out" / "safe.safetensors").is_file() and (tmp_path / "out" / "report.json").is_file()


def test_constraints_pin_released_versions_only():
    """constraints.txt is what make and CI install from on a fresh machine: every line a released
    `name==version` (a local wheel path or URL would install here and fail everywhere else), and
    every extra's package pinned."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    root = Path(__file__).resolve().parents[1]
    lines = [l.strip() for l in (root / "constraints.txt").read_text().splitlines()]
    pins = {}
    for line in lines:
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.!+_-]+)", line)
        assert m, f"constraints.txt: {line!r} is not name==version"
        pins[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    for extra, reqs in project["optional-dependencies"].items():
        for req in reqs:
            name = re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", req).group(0)).lower()
            assert name in pins, f"extra {extra!r}: {name} has no pin in constraints.txt"
