"""A corpus of bad inputs over every command: exit 1, one line naming the culprit, no traceback,
and no file that existed before the command changed (nor a new one left behind).

The files the cases read are built once (a tiny model, its soft prompt, a teacher cache, a
bundle) and every case runs the CLI in-process; each case names what the error must mention.
"""

import hashlib
import io
import json
import os
import shutil
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import TEACH_PROMPTS, run_cli

SPEC = str(Path(__file__).resolve().parent.parent / "examples" / "guards" / "tiny-guard.json")


@pytest.fixture(scope="module")
def env(tiny_softprompt, tiny_teacher, tiny_model, tmp_path_factory):
    """Every file the cases need, built once; cases must leave all of them as they are."""
    from mlx_softprompt import bundle

    base, pfile = tiny_softprompt()
    _, cache = tiny_teacher
    root = tmp_path_factory.mktemp("bad-inputs")
    e = {"root": root, "base": base, "pfile": str(pfile), "cache": cache,
         "other": tiny_model("llama", vocab_size=300)}
    e["bundle"] = str(bundle.make_bundle(bundle.BundleConfig(base, pfile, root / "bundle"), log=lambda s: None))
    (root / "good.jsonl").write_text("".join(json.dumps({"prompt": p, "label": lab}) + "\n"
                                             for p, lab in TEACH_PROMPTS[:4]))
    (root / "existing.safetensors").write_bytes(Path(pfile).read_bytes())
    (root / "existing.json").write_text('{"keep": true}\n')
    (root / "full").mkdir()
    (root / "full" / "keep.txt").write_text("a user's file\n")
    (root / "afile").write_text("not a directory\n")
    return e


def _snapshot(paths):
    """sha256 of every file under the given roots (and the set of names)."""
    out = {}
    for r in paths:
        r = Path(r)
        files = [r] if r.is_file() else sorted(p for p in r.rglob("*") if p.is_file())
        for p in files:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _write(root: Path, name: str, content) -> str:
    p = root / "made" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content)
    return str(p)


def _jsonl(root, name, *lines) -> str:
    return _write(root, name, b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))


def _copy_tree(src, root, name) -> Path:
    dst = root / "made" / name
    if not dst.exists():
        shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, fn) -> None:
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj))


def _truncated(src, root, name) -> str:
    data = Path(src).read_bytes()
    return _write(root, name, data[: len(data) - 37])


def _model_copy(e, name, fn) -> str:
    d = _copy_tree(e["base"], e["root"], name)
    fn(d)
    return str(d)


def _cache_copy(e, name, fn) -> str:
    d = _copy_tree(e["cache"], e["root"], name)
    _edit_json(d / "manifest.json", fn)
    return str(d)


def _pfile_meta(e, name, **changes) -> str:
    tensors, meta = mx.load(e["pfile"], return_metadata=True)
    meta.update(changes)
    p = e["root"] / "made" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(p), tensors, metadata=meta)
    return str(p)


def _flipped_tensor(e, name) -> str:
    """The prompt file with 4 bytes of the soft prompt's data overwritten (a valid file otherwise)."""
    from mlx_softprompt.checks import safetensors_header

    raw = bytearray(Path(e["pfile"]).read_bytes())
    header = safetensors_header(e["pfile"])
    n = int.from_bytes(raw[:8], "little")
    a = header["soft_prompt"]["data_offsets"][0]
    raw[8 + n + a + 8: 8 + n + a + 12] = np.float32([0.125]).tobytes()
    return _write(e["root"], name, bytes(raw))


def _finetuned_pfile(e, name, rel=0.01) -> str:
    """The prompt file re-saved as if for a fine-tune of its base: every weight perturbed by `rel`."""
    from mlx.utils import tree_flatten, tree_unflatten

    from mlx_softprompt import models, prompt_file

    model, _, config = models.load(e["base"])
    pf = prompt_file.load(e["pfile"])
    ps = []
    for i, (k, v) in enumerate(tree_flatten(model.parameters())):
        noise = mx.random.normal(v.shape, key=mx.random.key(i)).astype(v.dtype)
        ps.append((k, v + rel * mx.abs(v).mean() * noise))
    model.update(tree_unflatten(ps))
    p = e["root"] / "made" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    prompt_file.save(p, {"soft_prompt": pf.prompt}, model, config, objective="tv")
    return str(p)


def _bundle_copy(e, name, fn) -> str:
    d = _copy_tree(e["bundle"], e["root"], name)
    fn(d)
    return str(d)


def _peft_dir(e, name, fn=None) -> str:
    from mlx_softprompt.peft_io import export_peft

    d = e["root"] / "made" / name
    if not d.exists():
        export_peft(e["pfile"], d, base_model_name=e["base"])
    if fn:
        fn(d)
    return str(d)


def _deep(n=100_000) -> str:
    return "[" * n + "]" * n


LONG = "word " * 6000  # ~6,000+ tokens: more than the tiny base's 2,048 positions


# Each case: (id, function env -> (argv, words the one-line error must contain)).
CASES = [
    # ---------------------------------------------------------------- convert
    ("convert-missing-src", lambda e: (["convert", "--hf-path", str(e["root"] / "nope"), "--mlx-path",
                                        str(e["root"] / "o1")], "nope")),
    ("convert-no-config", lambda e: (["convert", "--hf-path", str(e["root"] / "full"), "--mlx-path",
                                      str(e["root"] / "o2")], "config.json")),
    ("convert-q-bits", lambda e: (["convert", "--hf-path", e["base"], "--mlx-path", str(e["root"] / "o3"), "-q",
                                   "--q-bits", "7"], "q-bits")),
    ("convert-q-group", lambda e: (["convert", "--hf-path", e["base"], "--mlx-path", str(e["root"] / "o4"), "-q",
                                    "--q-group-size", "0"], "group")),
    ("convert-dtype", lambda e: (["convert", "--hf-path", e["base"], "--mlx-path", str(e["root"] / "o5"),
                                  "--dtype", "float8"], "dtype")),
    ("convert-target-not-empty", lambda e: (["convert", "--hf-path", e["base"], "--mlx-path",
                                             str(e["root"] / "full")], "full")),
    ("convert-target-is-file", lambda e: (["convert", "--hf-path", e["base"], "--mlx-path",
                                           str(e["root"] / "afile")], "afile")),
    ("convert-bad-config-json", lambda e: (["convert", "--hf-path", _model_copy(
        e, "m-badjson", lambda d: (d / "config.json").write_text("{oops")), "--mlx-path", str(e["root"] / "o6")],
        "config.json")),
    ("convert-truncated-weights", lambda e: (["convert", "--hf-path", _model_copy(
        e, "m-trunc", lambda d: [_shrink(p) for p in d.glob("*.safetensors")]), "--mlx-path", str(e["root"] / "o7")],
        "safetensors")),
    ("convert-target-under-file", lambda e: (["convert", "--hf-path", e["base"], "--mlx-path",
                                            str(e["root"] / "afile" / "m")], "afile")),
    # ---------------------------------------------------------------- teach
    ("teach-missing-data", lambda e: (_teach(e, data=str(e["root"] / "none.jsonl")), "none.jsonl")),
    ("teach-bad-json-line", lambda e: (_teach(e, data=_jsonl(e["root"], "t1.jsonl", '{"prompt": "hi"}', '{"prompt":')),
                                       "t1.jsonl:2")),
    ("teach-lone-surrogate", lambda e: (_teach(e, data=_jsonl(e["root"], "t2.jsonl", '{"prompt": "hi"}',
                                                              '{"prompt": "a\\ud800b"}')), "t2.jsonl:2")),
    ("teach-deep-json", lambda e: (_teach(e, data=_jsonl(e["root"], "t3.jsonl", '{"prompt": ' + _deep() + "}")),
                                   "t3.jsonl:1")),
    ("teach-invalid-utf8", lambda e: (_teach(e, data=_jsonl(e["root"], "t4.jsonl", b'{"prompt": "\xff\xfe"}')),
                                      "t4.jsonl:1")),
    ("teach-prompt-wrong-type", lambda e: (_teach(e, data=_jsonl(e["root"], "t5.jsonl", '{"prompt": 5}')),
                                           "t5.jsonl:1")),
    ("teach-empty-data", lambda e: (_teach(e, data=_jsonl(e["root"], "t6.jsonl", "")), "t6.jsonl")),
    ("teach-huge-prompt", lambda e: (_teach(e, data=_jsonl(e["root"], "t7.jsonl", json.dumps(
        {"prompt": "a" * 1_000_000}))), "t7.jsonl:1")),
    ("teach-long-prompt", lambda e: (_teach(e, data=_jsonl(e["root"], "t8.jsonl", json.dumps({"prompt": LONG}))),
                                     "t8.jsonl:1")),
    ("teach-temp-nan", lambda e: (_teach(e, "--temp", "nan"), "--temp")),
    ("teach-temp-negative", lambda e: (_teach(e, "--temp", "-1"), "--temp")),
    ("teach-top-p-zero", lambda e: (_teach(e, "--top-p", "0"), "--top-p")),
    ("teach-max-tokens-negative", lambda e: (_teach(e, "--max-tokens", "-5"), "--max-tokens")),
    ("teach-batch-size-zero", lambda e: (_teach(e, "--batch-size", "0"), "--batch-size")),
    ("teach-top-k-zero", lambda e: (_teach(e, "--top-k", "0"), "--top-k")),
    ("teach-top-k-over-vocab", lambda e: (_teach(e, "--top-k", "100000"), "--top-k")),
    ("teach-samples-zero", lambda e: (_teach(e, "--samples-per-prompt", "0"), "--samples-per-prompt")),
    ("teach-mode", lambda e: (_teach(e, "--mode", "sideways"), "--mode")),
    ("teach-empty-refusal", lambda e: (_teach(e, "--refusal", " "), "--refusal")),
    ("teach-out-is-file", lambda e: (_teach(e, out=str(e["root"] / "afile")), "afile")),
    ("teach-out-not-a-cache", lambda e: (_teach(e, out=str(e["root"] / "full")), "full")),
    ("teach-out-under-file", lambda e: (_teach(e, out=str(e["root"] / "afile" / "c")), "afile")),
    ("teach-unknown-guard", lambda e: (_teach(e, guard="no-such-guard"), "no-such-guard")),
    ("teach-guard-spec-wrong-type", lambda e: (_teach(e, guard=_write(e["root"], "spec.json", json.dumps(
        {**json.loads(Path(SPEC).read_text()), "unsafe_labels": 5}))), "spec.json")),
    ("teach-other-settings", lambda e: (_teach(e, out=e["cache"], data=str(e["root"] / "good.jsonl")), "cache")),
    # ---------------------------------------------------------------- train
    ("train-lr-nan", lambda e: (_train(e, "--learning-rate", "nan"), "--learning-rate")),
    ("train-lr-inf", lambda e: (_train(e, "--learning-rate", "inf"), "--learning-rate")),
    ("train-lr-negative", lambda e: (_train(e, "--learning-rate", "-1e-3"), "--learning-rate")),
    ("train-grad-clip-nan", lambda e: (_train(e, "--grad-clip", "nan"), "--grad-clip")),
    ("train-weight-decay-inf", lambda e: (_train(e, "--weight-decay", "inf"), "--weight-decay")),
    ("train-num-tokens-huge", lambda e: (_train(e, "--num-tokens", "100000"), "--num-tokens")),
    ("train-batch-zero", lambda e: (_train(e, "--batch-size", "0"), "--batch-size")),
    ("train-iters-negative", lambda e: (_train(e, "--iters", "-1"), "--iters")),
    ("train-val-split", lambda e: (_train(e, "--val-split", "1.5"), "--val-split")),
    ("train-max-seq-length", lambda e: (_train(e, "--max-seq-length", "0"), "--max-seq-length")),
    ("train-out-exists", lambda e: (_train(e, out=str(e["root"] / "existing.safetensors")), "existing.safetensors")),
    ("train-out-is-dir", lambda e: (_train(e, out=str(e["root"] / "full")), "full")),
    ("train-out-suffix", lambda e: (_train(e, out=str(e["root"] / "p.bin")), "p.bin")),
    ("train-out-under-file", lambda e: (_train(e, out=str(e["root"] / "afile" / "p.safetensors")), "afile")),
    ("train-teacher-not-cache", lambda e: (_train(e, teacher=str(e["root"] / "full")), "full")),
    ("train-manifest-shard-no-sha", lambda e: (_train(e, teacher=_cache_copy(
        e, "c-nosha", lambda m: [s.pop("sha256") for s in m["shards"]])), "sha256")),
    ("train-manifest-shards-wrong-type", lambda e: (_train(e, teacher=_cache_copy(
        e, "c-shards", lambda m: m.update(shards="all"))), "shards")),
    ("train-manifest-refusal-ids", lambda e: (_train(e, teacher=_cache_copy(
        e, "c-refusal", lambda m: m.update(refusal_ids=["x"]))), "refusal_ids")),
    ("train-manifest-records-type", lambda e: (_train(e, teacher=_cache_copy(
        e, "c-records", lambda m: m["shards"][0].update(records="many"))), "records")),
    ("train-manifest-probes-corrupt", lambda e: (_train(e, teacher=_cache_copy(
        e, "c-probes", lambda m: m["base"]["fingerprint"].update(probes="not base64"))), "manifest.json")),
    ("teach-skip-bad-nothing-fits", lambda e: (_teach(e, "--skip-bad", data=_jsonl(e["root"], "t9.jsonl", json.dumps(
        {"prompt": LONG}))), "t9.jsonl")),
    ("train-lora-scale-nan", lambda e: (_train(e, "--method", "lora", "--lora-scale", "nan"), "scale")),
    ("train-method-options-inf", lambda e: (_train(e, "--method", "steer-opt", "--method-options", "{alpha: .inf}"),
                                            "alpha")),
    ("train-config-wrong-type", lambda e: (_train(e, "--config", _write(e["root"], "c1.yaml",
                                                                         "learning_rate: fast\n")), "learning_rate")),
    ("train-config-unknown-key", lambda e: (_train(e, "--config", _write(e["root"], "c2.yaml", "speed: 3\n")),
                                            "speed")),
    ("train-config-not-mapping", lambda e: (_train(e, "--config", _write(e["root"], "c3.yaml", "- 1\n- 2\n")),
                                            "c3.yaml")),
    ("train-config-nan", lambda e: (_train(e, "--config", _write(e["root"], "c4.yaml", "learning_rate: .nan\n")),
                                    "learning")),
    # ---------------------------------------------------------------- eval
    ("eval-batch-zero", lambda e: (_eval(e, "--batch-size", "0"), "--batch-size")),
    ("eval-max-tokens-zero", lambda e: (_eval(e, "--max-tokens", "0"), "--max-tokens")),
    ("eval-threshold-nan", lambda e: (_eval(e, "--threshold", "nan"), "--threshold")),
    ("eval-limit-negative", lambda e: (_eval(e, "--limit", "-1"), "--limit")),
    ("eval-out-is-dir", lambda e: (_eval(e, out=str(e["root"] / "full")), "full")),
    ("eval-out-under-file", lambda e: (_eval(e, out=str(e["root"] / "afile" / "r.json")), "afile")),
    ("eval-out-exists", lambda e: (_eval(e, out=str(e["root"] / "existing.json")), "existing.json")),
    ("eval-prompt-truncated", lambda e: (_eval(e, "--prompt-file", _truncated(e["pfile"], e["root"], "tr.safetensors")),
                                         "tr.safetensors")),
    ("eval-prompt-other-model", lambda e: (_eval(e, "--prompt-file", e["pfile"], model=e["other"]),
                                           "prompt")),
    ("eval-suite-bad-line", lambda e: (_eval(e, suite=_jsonl(e["root"], "s1.jsonl", '{"prompt": "x", "label": "harmful"}',
                                                             "[1, 2]")), "s1.jsonl:2")),
    ("eval-mc-deep", lambda e: (_eval(e, "--mc", _jsonl(e["root"], "mc.jsonl", _deep(500))), "mc.jsonl:1")),
    # ---------------------------------------------------------------- bench
    ("bench-config-missing", lambda e: (["bench", "--config", str(e["root"] / "none.yaml"), "--out",
                                         str(e["root"] / "b1")], "none.yaml")),
    ("bench-config-wrong-type", lambda e: (["bench", "--config", _write(e["root"], "b.yaml", "base: 5\nguard: x\n"),
                                            "--out", str(e["root"] / "b2")], "base")),
    ("bench-out-is-file", lambda e: (["bench", "--config", _write(e["root"], "b2.yaml", f"base: {e['base']}\n"
                                                                  f"guard: {SPEC}\n"), "--out",
                                      str(e["root"] / "afile")], "afile")),
    # ---------------------------------------------------------------- bundle
    ("bundle-out-exists", lambda e: (_bundle(e, out=str(e["root"] / "full")), "full")),
    ("bundle-out-under-file", lambda e: (_bundle(e, out=str(e["root"] / "afile" / "b")), "afile")),
    ("bundle-prompt-truncated", lambda e: (_bundle(e, pfile=_truncated(e["pfile"], e["root"], "tb.safetensors")),
                                           "tb.safetensors")),
    ("bundle-report-surrogate", lambda e: (_bundle(e, "--eval-report", _write(e["root"], "r1.json", '{"a": "\\udc80"}')),
                                           "r1.json")),
    ("bundle-report-deep", lambda e: (_bundle(e, "--eval-report", _write(e["root"], "r2.json", _deep())), "r2.json")),
    ("bundle-report-list", lambda e: (_bundle(e, "--eval-report", _write(e["root"], "r3.json", "[1]")), "r3.json")),
    ("bundle-q-bits", lambda e: (_bundle(e, "-q", "--q-bits", "7"), "q-bits")),
    ("bundle-prompt-finetune", lambda e: (_bundle(e, pfile=_finetuned_pfile(e, "ft.safetensors")), "ft.safetensors")),
    ("bundle-prompt-tensor-flipped", lambda e: (_bundle(e, pfile=_flipped_tensor(e, "flip.safetensors")),
                                                "flip.safetensors")),
    # ---------------------------------------------------------------- generate
    ("generate-max-tokens-negative", lambda e: (_gen(e, "--max-tokens", "-5"), "--max-tokens")),
    ("generate-temp-nan", lambda e: (_gen(e, "--temp", "nan"), "--temp")),
    ("generate-top-p", lambda e: (_gen(e, "--top-p", "1.5"), "--top-p")),
    ("generate-seed-negative", lambda e: (_gen(e, "--seed", "-1"), "--seed")),
    ("generate-prompt-too-long", lambda e: (_gen(e, text=LONG), "context")),
    ("generate-stdin-invalid-utf8", lambda e: (_gen(e, "--stdin-bytes", b"hi \xff\xfe there", text="-"), "stdin")),
    ("generate-truncated-weights", lambda e: (_gen(e, model=_model_copy(
        e, "m-trunc2", lambda d: [_shrink(p) for p in d.glob("*.safetensors")])), "safetensors")),
    ("generate-config-wrong-type", lambda e: (_gen(e, model=_model_copy(
        e, "m-cfgtype", lambda d: _edit_json(d / "config.json", lambda c: c.update(hidden_size="wide")))),
        "hidden_size")),
    ("generate-config-negative", lambda e: (_gen(e, model=_model_copy(
        e, "m-cfgneg", lambda d: _edit_json(d / "config.json", lambda c: c.update(num_hidden_layers=-2)))),
        "num_hidden_layers")),
    ("generate-prompt-flipped", lambda e: (_gen(e, "--prompt-file", _flipped_tensor(e, "flip2.safetensors")),
                                           "flip2.safetensors")),
    ("generate-prompt-meta-type", lambda e: (_gen(e, "--prompt-file", _pfile_meta(e, "meta.safetensors",
                                                                                   base_hidden_size="wide")),
                                             "base_hidden_size")),
    ("generate-prompt-finetune", lambda e: (_gen(e, "--prompt-file", _finetuned_pfile(e, "ft2.safetensors", 1e-3)),
                                            "ft2.safetensors")),
    ("generate-prompt-other-model", lambda e: (_gen(e, "--prompt-file", e["pfile"], model=e["other"]), "prompt")),
    ("generate-bundle-extra-weights", lambda e: (_gen(e, model=_bundle_copy(
        e, "b-extra", lambda d: shutil.copy(next((d / "model").glob("*.safetensors")),
                                            d / "model" / "model-00002-of-00002.safetensors"))), "model-00002")),
    ("generate-bundle-files-wrong-type", lambda e: (_gen(e, model=_bundle_copy(
        e, "b-files", lambda d: _edit_json(d / "bundle.json", lambda m: m.update(files=["x"])))), "files")),
    ("generate-bundle-fingerprint-type", lambda e: (_gen(e, model=_bundle_copy(
        e, "b-fp", lambda d: _edit_json(d / "bundle.json", lambda m: m["base"].update(fingerprint="abc")))),
        "fingerprint")),
    ("generate-bundle-entry-type", lambda e: (_gen(e, model=_bundle_copy(
        e, "b-entry", lambda d: _edit_json(d / "bundle.json", lambda m: m["files"].update(
            {"prompt.safetensors": {"sha256": 5, "bytes": "x"}})))), "prompt.safetensors")),
    # ---------------------------------------------------------------- chat
    ("chat-invalid-utf8-stdin", lambda e: (["chat", "--model", e["base"], "--max-tokens", "2",
                                            "--stdin-bytes", b"hello\n\xff\xfe\n"], "stdin")),
    ("chat-temp-inf", lambda e: (["chat", "--model", e["base"], "--temp", "inf"], "--temp")),
    ("chat-max-tokens-zero", lambda e: (["chat", "--model", e["base"], "--max-tokens", "0"], "--max-tokens")),
    ("chat-guard-threshold", lambda e: (["chat", "--model", e["base"], "--compare", SPEC, "--guard-threshold", "nan"],
                                        "--threshold")),
    ("chat-bundle-and-model", lambda e: (["chat", e["bundle"], "--model", e["base"]], "--model")),
    ("chat-long-line", lambda e: (["chat", "--model", e["base"], "--max-tokens", "2",
                                   "--stdin-bytes", (LONG + "\n").encode()], "context")),
    ("chat-jsonl-surrogate", lambda e: (["chat", "--model", e["base"], "--max-tokens", "2", "--jsonl",
                                         "--stdin-bytes", b'{"content": "\\udc00"}\n'], "stdin line 1")),
    ("chat-jsonl-deep", lambda e: (["chat", "--model", e["base"], "--max-tokens", "2", "--jsonl",
                                    "--stdin-bytes", ('{"content": ' + _deep(1000) + "}\n").encode()], "stdin line 1")),
    # ---------------------------------------------------------------- serve
    ("serve-port-high", lambda e: (["serve", "--model", e["base"], "--port", "99999"], "--port")),
    ("serve-port-negative", lambda e: (["serve", "--model", e["base"], "--port", "-1"], "--port")),
    ("serve-max-tokens-zero", lambda e: (["serve", "--model", e["base"], "--max-tokens", "0"], "--max-tokens")),
    ("serve-temp-nan", lambda e: (["serve", "--model", e["base"], "--temp", "nan"], "--temp")),
    ("serve-max-body-negative", lambda e: (["serve", "--model", e["base"], "--max-body", "-1"], "--max-body")),
    ("serve-decode-concurrency-zero", lambda e: (["serve", "--model", e["base"], "--decode-concurrency", "0"],
                                                 "--decode-concurrency")),
    ("serve-context-zero", lambda e: (["serve", "--model", e["base"], "--context-length", "0"], "--context-length")),
    # ---------------------------------------------------------------- export-peft / import-peft / inspect
    ("export-out-exists", lambda e: (["export-peft", e["pfile"], str(e["root"] / "full")], "full")),
    ("export-out-is-file", lambda e: (["export-peft", e["pfile"], str(e["root"] / "afile")], "afile")),
    ("export-truncated", lambda e: (["export-peft", _truncated(e["pfile"], e["root"], "te.safetensors"),
                                     str(e["root"] / "pe1")], "te.safetensors")),
    ("import-out-exists", lambda e: (["import-peft", _peft_dir(e, "peft"), str(e["root"] / "existing.safetensors"),
                                      "--model", e["base"]], "existing.safetensors")),
    ("import-missing-dir", lambda e: (["import-peft", str(e["root"] / "nope-peft"), str(e["root"] / "i1.safetensors"),
                                       "--model", e["base"]], "nope-peft")),
    ("import-config-wrong-type", lambda e: (["import-peft", _peft_dir(e, "peft-type", lambda d: _edit_json(
        d / "adapter_config.json", lambda c: c.update(num_virtual_tokens="five"))), str(e["root"] / "i2.safetensors"),
        "--model", e["base"]], "num_virtual_tokens")),
    ("import-config-deep", lambda e: (["import-peft", _peft_dir(e, "peft-deep", lambda d: (
        d / "adapter_config.json").write_text(_deep())), str(e["root"] / "i3.safetensors"), "--model", e["base"]],
        "adapter_config.json")),
    ("import-other-model", lambda e: (["import-peft", _peft_dir(e, "peft"), str(e["root"] / "i4.safetensors"),
                                       "--model", e["other"]], "")),
    ("inspect-truncated", lambda e: (["inspect", _truncated(e["pfile"], e["root"], "ti.safetensors")],
                                     "ti.safetensors")),
    ("inspect-bundle-tampered", lambda e: (["inspect", _bundle_copy(e, "b-tamper", lambda d: (
        d / "prompt.safetensors").write_bytes((d / "prompt.safetensors").read_bytes()[:-4] + b"\0\0\0\0"))],
        "prompt.safetensors")),
    ("upload-bundle-tampered", lambda e: (["upload", "--path", _bundle_copy(e, "b-tamper2", lambda d: (
        d / "model" / "config.json").write_text("{}")), "--upload-repo", "me/x"], "config.json")),
    ("upload-bundle-extra-file", lambda e: (["upload", "--path", _bundle_copy(e, "b-extra2", lambda d: (
        d / "extra.safetensors").write_bytes(Path(e["pfile"]).read_bytes())), "--upload-repo", "me/x"],
        "extra.safetensors")),
    ("upload-bad-repo-id", lambda e: (["upload", "--path", e["bundle"], "--upload-repo", "no-slash"], "no-slash")),
    # ---------------------------------------------------------------- demo
    ("demo-out-is-file", lambda e: (["demo", "--quick", "--out", str(e["root"] / "afile")], "afile")),
    ("demo-world-missing", lambda e: (["demo", "--quick", "--out", str(e["root"] / "d1"), "--world",
                                       str(e["root"] / "no-world")], "no-world")),
    ("demo-chat-max-tokens", lambda e: (["demo", "--chat", "--max-tokens", "0", "--out", str(e["root"] / "d3")],
                                        "--max-tokens")),
    ("demo-seed-negative", lambda e: (["demo", "--quick", "--out", str(e["root"] / "d2"), "--seed", "-3"], "--seed")),
    ("demo-set-unknown", lambda e: (["demo", "--quick", "--out", str(e["root"] / "d4"), "--set", "genral_train=0"],
                                    "genral_train")),
    ("demo-set-wrong-type", lambda e: (["demo", "--quick", "--out", str(e["root"] / "d5"), "--set",
                                        "unread_train=many"], "unread_train=many")),
    ("demo-set-unknown-train-key", lambda e: (["demo", "--quick", "--out", str(e["root"] / "d6"), "--set",
                                               "train.iter=5"], "train.iter")),
    # a value of the right type out of range: refused before the teach stage writes anything
    ("demo-set-train-out-of-range", lambda e: (["demo", "--quick", "--out", str(e["root"] / "d7"), "--set",
                                                "train.learning_rate=-1"], "--learning-rate")),
]


def _shrink(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _teach(e, *extra, data=None, out=None, guard=None):
    return ["teach", "--base", e["base"], "--guard", guard or SPEC, "--guard-model", e["base"],
            "--data", data or str(e["root"] / "good.jsonl"), "--out", out or str(e["root"] / "teach-out"),
            "--max-tokens", "4", *extra]


def _train(e, *extra, out=None, teacher=None):
    return ["train", "--base", e["base"], "--teacher", teacher or e["cache"],
            "--out", out or str(e["root"] / "train-out.safetensors"), "--iters", "2", *extra]


def _eval(e, *extra, out=None, model=None, suite=None):
    return ["eval", "--model", model or e["base"], "--suite", suite or str(e["root"] / "good.jsonl"), "--split", "all",
            "--max-tokens", "2", "--out", out or str(e["root"] / "eval-out.json"), *extra]


def _bundle(e, *extra, out=None, pfile=None):
    return ["bundle", "--model", e["base"], "--prompt-file", pfile or e["pfile"],
            "--out", out or str(e["root"] / "bundle-out"), *extra]


def _gen(e, *extra, model=None, text="Hello there"):
    return ["generate", "--model", model or e["base"], "--prompt", text, "--max-tokens", "2", *extra]


def test_the_corpus_is_large_and_covers_every_command():
    assert len(CASES) >= 60
    assert len({c[0] for c in CASES}) == len(CASES)
    from mlx_softprompt.cli import app

    commands = {c.name or c.callback.__name__.rstrip("_") for c in app.registered_commands}
    covered = {c[0].split("-")[0] for c in CASES}
    assert {"convert", "teach", "train", "eval", "bench", "bundle", "generate", "chat", "serve", "export",
            "import", "inspect", "demo"} <= covered
    assert {c.split("-")[0] for c in commands} <= covered


@pytest.mark.parametrize("name,case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, case, env, capsys, monkeypatch):
    argv, culprit = case(env)
    stdin = None
    if "--stdin-bytes" in argv:
        i = argv.index("--stdin-bytes")
        stdin = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    watched = [env["root"], env["base"], env["cache"], env["other"], env["pfile"]]
    before = _snapshot(watched)
    code, out, err = run_cli(capsys, *argv)
    after = _snapshot(watched)
    lines = [x for x in err.splitlines() if x.strip() and not x.startswith("warning:")]
    assert code == 1, (code, out[-300:], err[-600:])
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-600:]
    assert culprit in lines[0], lines[0]
    changed = {k for k in before if before[k] != after.get(k)}
    new = set(after) - set(before)
    assert not changed, changed
    assert not new, new


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only directory")
def test_outputs_in_a_read_only_directory_are_refused_before_work(env, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    try:
        for argv in (_eval(env, out=str(ro / "r.json")), _train(env, out=str(ro / "p.safetensors")),
                     _bundle(env, out=str(ro / "b"))):
            code, _, err = run_cli(capsys, *argv)
            assert code == 1 and "not writable" in err and err.count("\n") == 1, err
    finally:
        os.chmod(ro, 0o755)
