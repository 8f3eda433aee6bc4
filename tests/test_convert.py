"""HF -> MLX conversion: logits parity with transformers on CPU, quantization bounds, refusals."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from converters.hf_to_mlx import convert
from mlx_softprompt import cli, models
from mlx_softprompt.errors import UserError
from mlx_softprompt.hf_config import mlx_lm_config
from mlx_softprompt.generate import chat_ids

TEXTS = ["Write a poem about the sea.", "What is the capital of France? Explain how to bake bread."]

# fp32 parity: max |logit difference| over every position of two chat-templated prompts
# (measured <= 2.5e-5 on every architecture below, seeds 0-2; logits' std is about 1.6).
FP32_ATOL = 1e-4
# Quantized (group size 64) vs the fp32 transformers model, on models with transformers'
# default init (std 0.02), llama/qwen2/gemma2/phi3, seeds 0-2, measured:
#   8-bit: relative L2 error of the logits <= 0.015, top-1 agreement >= 0.93, in top-5 1.00
#   4-bit: relative L2 error <= 0.274, top-1 agreement >= 0.54, in top-5 >= 0.76
# (a random tiny model's logits have small margins, so 4-bit flips many argmaxes). Bounds:
Q_BOUNDS = {8: {"rel": 0.03, "top1": 0.85, "top5": 0.95}, 4: {"rel": 0.4, "top1": 0.45, "top5": 0.7}}


def _ids(tokenizer):
    return [chat_ids(tokenizer, t) for t in TEXTS]


def _hf_logits(hf_model, ids):
    from hf_tiny import load_hf

    if isinstance(hf_model, (str, Path)):
        hf_model, _ = load_hf(hf_model)
    with torch.no_grad():
        return [hf_model(torch.tensor([i])).logits[0].float().numpy() for i in ids]


def _mlx_logits(model, ids):
    return [np.array(models.forward(model, i)[0].astype(mx.float32)) for i in ids]


def _convert(hf, tmp_path, name="mlx", **kw):
    return convert(hf, tmp_path / name, **kw)


@pytest.mark.parametrize("arch,kw", [
    ("llama", {}), ("llama", {"tie": True}), ("qwen2", {}), ("qwen3", {}), ("mistral", {}),
    ("gemma2", {}), ("gemma3_text", {}), ("phi3", {}),
])
def test_fp32_logits_match_transformers(hf_tiny_model, tmp_path, arch, kw):
    hf = hf_tiny_model(arch, **kw)
    model, tok, config = models.load(_convert(hf, tmp_path, dtype="float32"))
    assert {v.dtype for _, v in tree_flatten(model.parameters())} == {mx.float32}
    ids = _ids(tok)
    for ours, theirs in zip(_mlx_logits(model, ids), _hf_logits(hf, ids)):
        assert ours.shape == theirs.shape
        assert np.abs(ours - theirs).max() <= FP32_ATOL


def test_gemma_differs_only_by_mlx_lm_exact_gelu(hf_tiny_model, tmp_path):
    """mlx-lm's gemma.py uses the exact GELU where Gemma (and transformers) use the tanh
    approximation: logits differ by <= 3e-3 (2.4e-4 relative; measured, seeds 0-2). With
    transformers' activation swapped for the exact GELU they agree to FP32_ATOL."""
    from hf_tiny import load_hf

    hf = hf_tiny_model("gemma")
    model, tok, _ = models.load(_convert(hf, tmp_path))
    ids = _ids(tok)
    hf_model, _ = load_hf(hf)
    for ours, theirs in zip(_mlx_logits(model, ids), _hf_logits(hf_model, ids)):
        assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) <= 1e-3
        assert (ours.argmax(-1) == theirs.argmax(-1)).all()
    for layer in hf_model.model.layers:
        layer.mlp.act_fn = torch.nn.GELU()  # exact
    for ours, theirs in zip(_mlx_logits(model, ids), _hf_logits(hf_model, ids)):
        assert np.abs(ours - theirs).max() <= FP32_ATOL


def _dequantized_hf(hf, model):
    """The transformers model with every weight replaced by the MLX model's dequantized copy."""
    from hf_tiny import load_hf
    from mlx_lm.utils import dequantize_model

    hf_model, _ = load_hf(hf)
    weights = {k: torch.from_numpy(np.array(v.astype(mx.float32)))
               for k, v in tree_flatten(dequantize_model(model).parameters())}
    missing, unexpected = hf_model.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    if missing:
        hf_model.tie_weights()
    return hf_model


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "phi3"])
def test_quantized_logits(hf_tiny_model, tmp_path, arch, bits):
    from hf_tiny import TRANSFORMERS_INIT_STD

    hf = hf_tiny_model(arch, init_std=TRANSFORMERS_INIT_STD)
    out = _convert(hf, tmp_path, quantize=True, q_bits=bits, q_group_size=64)
    assert json.loads((out / "config.json").read_text())["quantization"] == {
        "group_size": 64, "bits": bits, "mode": "affine"}
    model, tok, _ = models.load(out)
    assert isinstance(models.find_embedding(model), nn.QuantizedEmbedding)
    ids = _ids(tok)
    ours = _mlx_logits(model, ids)
    # exactly the fp32 model with each weight rounded to its quantization grid ...
    for o, t in zip(ours, _hf_logits(_dequantized_hf(hf, model), ids)):
        assert np.abs(o - t).max() <= FP32_ATOL
    # ... which stays within the stated distance of the original
    for o, t in zip(ours, _hf_logits(hf, ids)):
        assert np.linalg.norm(o - t) / np.linalg.norm(t) <= Q_BOUNDS[bits]["rel"]
        assert (o.argmax(-1) == t.argmax(-1)).mean() >= Q_BOUNDS[bits]["top1"]
        top5 = np.argsort(-o, axis=-1)[:, :5]
        assert (top5 == t.argmax(-1)[:, None]).any(-1).mean() >= Q_BOUNDS[bits]["top5"]


def test_dtype_defaults_to_the_checkpoint_and_can_be_set(hf_tiny_model, tmp_path):
    bf16 = hf_tiny_model("llama", torch_dtype="bfloat16")
    assert json.loads((Path(bf16) / "config.json").read_text())["dtype"] == "bfloat16"
    m, _, _ = models.load(_convert(bf16, tmp_path, "a"))
    assert {v.dtype for _, v in tree_flatten(m.parameters())} == {mx.bfloat16}
    m, _, _ = models.load(_convert(bf16, tmp_path, "b", dtype="float16"))
    assert {v.dtype for _, v in tree_flatten(m.parameters())} == {mx.float16}
    # quantized: weights packed, the rest (scales, norms) in the requested dtype
    m, _, _ = models.load(_convert(hf_tiny_model("llama"), tmp_path, "c", quantize=True, q_bits=4,
                                   dtype="bfloat16"))
    assert {v.dtype for _, v in tree_flatten(m.parameters())} == {mx.uint32, mx.bfloat16}


def test_transformers5_fields_reach_mlx_lm():
    """What transformers 5 writes under other names reaches mlx-lm's ModelArgs under its own."""
    llama3 = mlx_lm_config({"model_type": "llama", "rope_parameters": {
        "rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}}, "m")
    assert llama3["rope_theta"] == 5e5
    assert llama3["rope_scaling"] == {"rope_type": "llama3", "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    plain = mlx_lm_config({"model_type": "llama", "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}, "m")
    assert plain["rope_theta"] == 5e5 and plain["rope_scaling"] is None  # not mlx-lm's default 1e4
    assert plain["hidden_size"] == 4096  # a field left out of config.json: transformers' class default
    gemma3 = mlx_lm_config({"model_type": "gemma3", "text_config": {
        "model_type": "gemma3_text",
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        "layer_types": ["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention"] * 2}}, "m")
    text = gemma3["text_config"]
    assert (text["rope_theta"], text["rope_local_base_freq"], text["sliding_window_pattern"]) == (1e6, 1e4, 6)
    # renamed fields, and the same field meant as another type (EXAONE 4: an int in transformers, letters in mlx-lm)
    neox = mlx_lm_config({"model_type": "gpt_neox", "rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.25,
                                                                      "rope_type": "default"}}, "m")
    assert (neox["rotary_emb_base"], neox["rotary_pct"]) == (1e4, 0.25)
    assert mlx_lm_config({"model_type": "gpt2", "n_positions": 77}, "m")["n_ctx"] == 77
    assert mlx_lm_config({"model_type": "qwen3_moe", "num_local_experts": 6}, "m")["num_experts"] == 6
    exaone4 = mlx_lm_config({"model_type": "exaone4", "num_hidden_layers": 4, "sliding_window_pattern": 4,
                             "layer_types": ["sliding_attention"] * 3 + ["full_attention"]}, "m")
    assert exaone4["sliding_window_pattern"] == "LLLG"
    granite = mlx_lm_config({"model_type": "granitemoehybrid", "num_hidden_layers": 2,
                             "layer_types": ["linear_attention", "full_attention"]}, "m")
    assert granite["layer_types"] == ["mamba", "attention"]
    # explicit fields win; a field transformers computes and refuses to read back is not written
    assert mlx_lm_config({"model_type": "llama", "rope_theta": 3.0, "rope_parameters": {"rope_theta": 1.0}},
                         "m")["rope_theta"] == 3.0
    assert "layers_block_type" not in mlx_lm_config({"model_type": "jamba"}, "m")


@pytest.mark.parametrize("config,words", [
    ({"model_type": "kimi_linear"}, ["kimi_linear", "linear_attn_config"]),
    ({"model_type": "olmo"}, ["olmo", "ai2-olmo"]),
    ({"model_type": "my_arch"}, ["'my_arch' is not supported"]),
])
def test_what_mlx_lm_cannot_build_is_refused_in_one_line(config, words):
    with pytest.raises(UserError) as e:
        mlx_lm_config(config, "ckpt")
    assert str(e.value).startswith("ckpt: ") and "\n" not in str(e.value)
    assert all(w in str(e.value) for w in words), str(e.value)


# ---------------------------------------------------------------- the command line


def _run(capsys, *argv):
    """Run the CLI in-process; (exit code, stdout, stderr)."""
    try:
        cli.main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _no_leftovers(parent: Path, name: str):
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_cli_convert_writes_a_loadable_model(hf_tiny_model, tmp_path, capsys):
    out = tmp_path / "sub" / "mlx"
    code, stdout, _ = _run(capsys, "convert", "--hf-path", hf_tiny_model("llama"), "--mlx-path", str(out),
                           "-q", "--q-bits", "8", "--q-group-size", "32")
    assert code == 0 and stdout.strip() == f"wrote {out}"
    assert json.loads((out / "config.json").read_text())["quantization"]["group_size"] == 32
    model, tok, _ = models.load(str(out))
    assert tok.chat_template and np.isfinite(np.array(models.forward(model, [0, 5, 6]))).all()
    _no_leftovers(out.parent, "mlx")


def _hf_copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("case", ["non-empty-target", "pickle-only", "no-config", "unsupported-type",
                                  "bad-bits", "bad-dtype", "hub-offline", "truncated-weights"])
def test_cli_convert_errors_are_one_line(hf_tiny_model, tmp_path, capsys, case):
    src = tmp_path / "hf"
    out = tmp_path / "out"
    args = ["--hf-path", str(src), "--mlx-path", str(out)]
    if case == "pickle-only":
        src = Path(hf_tiny_model("llama", weights="bin"))
        args[1] = str(src)
        expect = "only safetensors are read; convert the checkpoint to safetensors first"
    else:
        _hf_copy(hf_tiny_model("llama"), src)
    if case == "non-empty-target":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        expect = "already exists and is not empty"
    elif case == "no-config":
        (src / "config.json").unlink()
        expect = "no config.json"
    elif case == "unsupported-type":
        config = json.loads((src / "config.json").read_text())
        config["model_type"] = "my_arch"
        (src / "config.json").write_text(json.dumps(config))
        expect = "model_type 'my_arch' is not supported"
    elif case == "bad-bits":
        args += ["-q", "--q-bits", "3"]
        expect = "--q-bits 3: expected 4 or 8"
    elif case == "bad-dtype":
        args += ["--dtype", "float64"]
        expect = "--dtype float64: expected one of float16, bfloat16, float32"
    elif case == "hub-offline":
        args[1] = "nobody-xyz/no-such-model"
        expect = "could not fetch from the Hugging Face hub"
    elif case == "truncated-weights":
        w = src / "model.safetensors"
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
        expect = "model.safetensors: truncated or corrupt"
    code, stdout, stderr = _run(capsys, "convert", *args)
    assert code == 1, stderr
    assert stderr.startswith("error: ") and stderr.count("\n") == 1 and expect in stderr, stderr
    assert "Traceback" not in stderr and stdout == ""
    if case == "non-empty-target":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
    _no_leftovers(tmp_path, "out")


def test_convert_into_an_existing_empty_directory(hf_tiny_model, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert convert(hf_tiny_model("llama"), out) == out
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()


def test_a_directory_converted_by_mlx_lm_loads_with_the_checkpoints_rope(hf_tiny_model, tmp_path):
    """mlx_lm.convert keeps transformers 5's config as is (RoPE theta only under rope_parameters); loading
    that directory here reads the checkpoint's theta (5e5, as Llama 3), not mlx-lm's default (1e4)."""
    import contextlib
    import sys

    from mlx_lm.convert import convert as mlx_lm_convert

    hf = hf_tiny_model("llama", any_arch=True, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    with contextlib.redirect_stdout(sys.stderr):
        mlx_lm_convert(hf, tmp_path / "by-mlx-lm", dtype="float32")
    assert "rope_theta" not in json.loads((tmp_path / "by-mlx-lm" / "config.json").read_text())
    model, tok, _ = models.load(str(tmp_path / "by-mlx-lm"))
    ids = _ids(tok)
    for ours, theirs in zip(_mlx_logits(model, ids), _hf_logits(hf, ids)):
        assert np.abs(ours - theirs).max() <= FP32_ATOL
    # what plain mlx-lm computes from that directory: silently another model
    from mlx_lm import load as mlx_lm_load

    plain, _ = mlx_lm_load(str(tmp_path / "by-mlx-lm"))
    assert max(np.abs(a - b).max() for a, b in zip(_mlx_logits(plain, ids), _hf_logits(hf, ids))) > 100 * FP32_ATOL


def test_our_converted_directory_loads_with_plain_mlx_lm(hf_tiny_model, tmp_path):
    """The converted config.json carries the translated fields: mlx_lm.load alone builds the model
    (qwen3_moe: mlx-lm's num_experts is transformers 5's num_local_experts)."""
    from mlx_lm import load as mlx_lm_load

    hf = hf_tiny_model("qwen3_moe", any_arch=True)
    model, tok = mlx_lm_load(str(_convert(hf, tmp_path, dtype="float32")))
    ids = _ids(tok)
    for ours, theirs in zip(_mlx_logits(model, ids), _hf_logits(hf, ids)):
        assert np.abs(ours - theirs).max() <= FP32_ATOL
