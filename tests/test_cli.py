"""The flag vocabulary: mlx-lm's names everywhere, old names as hidden aliases, -h, --version,
-c/--config merged the same way on every command, mlx-lm's data directory layout."""

import io
import json
import re

import pytest
import typer

from mlx_softprompt import __version__, data, generate
from mlx_softprompt.cli import app
from mlx_softprompt.system import open_system
from conftest import run_cli

TEXT = "Write a poem about the sea."
# commands that read a model, and the flag that names it
MODEL_COMMANDS = ["generate", "bundle", "chat", "serve", "teach", "train", "eval", "import-peft", "convert"]
LONG_RUNNING = ["convert", "teach", "train", "eval", "bench", "bundle", "chat", "serve", "demo", "generate"]


def _help(capsys, *cmd):
    code, out, err = run_cli(capsys, *cmd, "-h")
    assert code == 0, err
    return re.sub(r"\s+", " ", out)


def test_version_and_short_help(capsys):
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"mlx-softprompt {__version__}"
    for cmd in typer.main.get_command(app).commands:
        assert "Usage: mlx-softprompt" in _help(capsys, cmd)


def test_every_model_flag_is_model_and_old_names_are_hidden(capsys):
    for cmd in MODEL_COMMANDS:
        text = _help(capsys, cmd)
        assert "--model" in text, cmd
        for old in ("--base ", "--text ", "--system ", "--dual-guard"):
            assert old not in text, (cmd, old)
    assert "--prompt -p" in _help(capsys, "generate") and "--system-prompt" in _help(capsys, "chat")
    for cmd in LONG_RUNNING:
        assert "--config -c" in _help(capsys, cmd), cmd


@pytest.fixture(scope="module")
def system(tiny_softprompt):
    base, pfile = tiny_softprompt()
    return base, pfile, open_system(base, pfile)


def _want(sys_, text, system_text=None):
    ids = generate.chat_ids(sys_.tokenizer, text, system=system_text)
    return generate.complete(sys_.model, sys_.tokenizer, ids, sys_.cache, generate.GenerationConfig(max_tokens=8))


def test_prompt_names_stdin_and_aliases_give_the_same_answer(system, capsys, monkeypatch):
    base, pfile, sys_ = system
    want = _want(sys_, TEXT, "Be brief.").text + "\n"
    common = ["--prompt-file", str(pfile), "--max-tokens", "8"]
    for argv in (["--model", base, "-p", TEXT, "--system-prompt", "Be brief."],
                 ["--model", base, "--prompt", TEXT, "--system", "Be brief."],
                 ["--base", base, "--text", TEXT, "--system-prompt=Be brief."]):
        code, out, err = run_cli(capsys, "generate", *argv, *common)
        assert (code, out) == (0, want), (argv, err)
    monkeypatch.setattr("sys.stdin", io.StringIO(TEXT))
    code, out, err = run_cli(capsys, "generate", "--model", base, "-p", "-", "--system-prompt", "Be brief.", *common)
    assert (code, out) == (0, want), err
    # a value that looks like an old flag name stays a value
    for value in ("--text", "-c"):
        code, out, err = run_cli(capsys, "generate", "--model", base, "-p", value, *common)
        assert (code, out) == (0, _want(sys_, value).text + "\n"), err


def test_config_file_defaults_then_file_then_flags(system, capsys, tmp_path):
    base, pfile, sys_ = system
    cfg = tmp_path / "gen.yaml"
    cfg.write_text(f"model: {base}\nprompt-file: {pfile}\nprompt: {TEXT}\nmax_tokens: 8\nsystem: Be brief.\n")
    code, out, err = run_cli(capsys, "generate", "-c", str(cfg))
    assert (code, out) == (0, _want(sys_, TEXT, "Be brief.").text + "\n"), err
    code, out, err = run_cli(capsys, "generate", "--config", str(cfg), "-p", "Hello there.", "--json")
    assert code == 0, err
    assert json.loads(out)["tokens"] == _want(sys_, "Hello there.", "Be brief.").tokens

    cfg.write_text(f"model: {base}\nprompt: hi\nmax-tokens: many\n")
    code, out, err = run_cli(capsys, "generate", "-c", str(cfg))
    assert code == 1 and err.startswith(f"error: {cfg}: max-tokens: ") and len(err.strip().splitlines()) == 1
    cfg.write_text(f"model: {base}\nbogus: 1\n")
    code, out, err = run_cli(capsys, "generate", "-c", str(cfg), "-p", "hi")
    assert code == 1 and "unknown key 'bogus'" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli(capsys, "generate", "-c", str(tmp_path / "missing.yaml"), "-p", "hi")
    assert code == 1 and "no such config file" in err
    # a value of the right type that a later check refuses: the error names the file and key too
    cfg.write_text(f"model: {base}\nmax_tokens: 0\n")
    code, out, err = run_cli(capsys, "generate", "-c", str(cfg), "-p", "hi")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "--max-tokens" in err and f"--max-tokens was set by {cfg}: max_tokens" in err, err
    # given on the command line, the same value is the flag's alone
    code, out, err = run_cli(capsys, "generate", "-c", str(cfg), "-p", "hi", "--max-tokens", "-3")
    assert code == 1 and "--max-tokens" in err and str(cfg) not in err, err


def test_train_config_accepts_model_and_the_old_base_key(tmp_path, capsys):
    for key in ("model", "base"):
        cfg = tmp_path / f"{key}.yaml"
        cfg.write_text(f"{key}: m\nobjective: mse\n")
        code, _, err = run_cli(capsys, "train", "-c", str(cfg), "--teacher", "c", "--out", "p.safetensors")
        assert code == 1 and "--objective 'mse'" in err, err  # got past the config: the key was accepted


def test_data_directory_in_mlx_lm_layout(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    assert data.data_file(tmp_path / "x.jsonl", "train") == tmp_path / "x.jsonl"
    with pytest.raises(data.UserError, match="needs train.jsonl"):
        data.data_file(d, "train")
    lines = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "a"}]}
             for i in range(3)]
    for part in ("train", "valid", "test"):
        (d / f"{part}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert data.data_file(d, "train") == d / "train.jsonl"
    examples, _ = data.read_jsonl(data.data_file(d, "train"))
    assert [e.prompt for e in examples] == [f"question {i}" for i in range(3)]


def test_eval_uses_a_users_whole_file_unless_split_is_given(tmp_path):
    from mlx_softprompt import evaluate as ev

    mine = tmp_path / "mine.jsonl"
    rows = [{"prompt": f"How do I do thing number {i}?", "label": ("harmful", "benign", "borderline")[i % 3]}
            for i in range(24)]
    mine.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = ev.load_eval_examples(str(mine))
    assert [e.prompt for e in got] == [r["prompt"] for r in rows]  # all 24, in the file's order
    split = ev.load_eval_examples(str(mine), "test")
    assert 0 < len(split) < 24 and all(data.split_of(e.prompt) == "test" for e in split)
    both = ev.load_eval_examples(f"borderline,{mine}")  # built-in sources keep their test split
    builtin = data.load_suite(["borderline"])["test"]
    assert {e.prompt for e in both} == {e.prompt for e in builtin} | {r["prompt"] for r in rows}
    d = tmp_path / "dir"
    d.mkdir()
    (d / "test.jsonl").write_text(mine.read_text())
    assert [e.prompt for e in ev.load_eval_examples(str(d))] == [r["prompt"] for r in rows]


def _commands(group, prefix=""):
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, prefix + name + " ")
        else:
            yield prefix + name, cmd


def test_docs_cli_lists_every_command_and_flag():
    """docs/CLI.md is complete: a flag added to a command must be added to its table there."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "CLI.md").read_text()
    missing = []
    for name, cmd in _commands(typer.main.get_command(app)):
        if f"`{name}" not in doc:
            missing.append(name)
        for p in cmd.params:
            if getattr(p, "hidden", False) or not p.opts or not p.opts[0].startswith("-"):
                continue
            for flag in list(p.opts) + list(p.secondary_opts):
                if flag not in ("-h", "--help") and not re.search(rf"`[^`]*{re.escape(flag)}\b[^`]*`", doc):
                    missing.append(f"{name} {flag}")
    assert not missing, f"not in docs/CLI.md: {missing}"


def test_data_export_writes_the_splits_teach_and_eval_read(tmp_path, capsys):
    from mlx_softprompt import evaluate as ev

    code, out, err = run_cli(capsys, "data", "export", "--suite", "benign,borderline", "--out", str(tmp_path / "d"),
                             "--limit", "5")
    assert code == 0, err
    for name, split in (("train", "train"), ("valid", "val"), ("test", "test")):
        got, _ = data.read_jsonl(tmp_path / "d" / f"{name}.jsonl")
        want = ev.load_eval_examples("benign,borderline", split, limit=5)
        assert [(e.prompt, e.label) for e in got] == [(e.prompt, e.label) for e in want] and len(got) == 10
        assert all(data.split_of(e.prompt) == split for e in got)
    assert data.data_file(tmp_path / "d", "train") == tmp_path / "d" / "train.jsonl"
    code, out, err = run_cli(capsys, "data", "export", "--suite", "benign", "--split", "all", "--out",
                             str(tmp_path / "all.jsonl"))
    assert code == 0 and len(data.read_jsonl(tmp_path / "all.jsonl")[0]) == len(data.project_prompts("benign"))
    code, out, err = run_cli(capsys, "data", "export", "--out", str(tmp_path / "all.jsonl"))
    assert code == 1 and "already exists" in err  # never overwritten unasked
