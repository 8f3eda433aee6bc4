"""PEFT interop against the real peft package: export, import, round trip, refusals.

Each base is a tiny random checkpoint saved by transformers and converted to MLX
by our converter, so MLX and transformers+PEFT run the same weights.
"""

import json
import os
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from safetensors import safe_open

from converters.hf_to_mlx import convert
from mlx_softprompt import cli, models, prompt_file
from mlx_softprompt.generate import GenerationConfig, chat_ids, generate
from mlx_softprompt.peft_io import CONFIG_NAME, TENSOR_KEY, WEIGHTS_NAME, export_peft, import_peft, peft_scale

TEXT = "Write a poem about the sea, the wind and the long grey evening over the harbour."
OTHERS = ["Tell me how to sort a list of numbers in Python, step by step, with an example.",
          "hello", "What is 2 + 2?", "Describe a cat."]
ATOL = 1e-4  # max |logit difference|, MLX vs transformers+PEFT (measured <= 1.9e-5 over the ARCHS)
GREEDY = 16  # tokens compared, greedy

# llama and qwen2: plain; gemma2 and gemma3_text: the model scales its embeddings by sqrt(d),
# which PEFT's virtual tokens skip under transformers 5 (see peft_io); granite scales the
# embeddings by a multiplier after the lookup (as mlx-lm does); olmo2, phi3 and smollm3 have
# configs as transformers 5 writes them.
ARCHS = ["llama", "qwen2", "gemma2", "gemma3_text", "granite", "olmo2", "phi3", "smollm3"]
# peft's cached generate() for prompt tuning gives other tokens than full forward passes
# with transformers >= 5.24 on these (the same family as huggingface/peft#2123).
# the Gemma family's sqrt(d) scaling saturates tiny models at the sharp default init
# (every request continues with one token): a softer init keeps the input visible.
HF_KWARGS = {"gemma2": {"init_std": 0.05}, "gemma3_text": {"init_std": 0.05}}
CACHED_GENERATE_BROKEN = ["llama", "qwen2", "granite", "olmo2", "phi3", "smollm3"]


def _transformers_at_least(version: str) -> bool:
    import transformers

    def key(v):
        return tuple(int(x) for x in v.split(".")[:2] if x.isdigit())

    return key(transformers.__version__) >= key(version)


@pytest.fixture(scope="module")
def base(hf_tiny_model, tmp_path_factory):
    """base(arch) -> (hf dir, mlx dir, mlx model, tokenizer, config), converted by our converter."""
    made = {}

    def make(arch):
        if arch not in made:
            hf = hf_tiny_model(arch, **HF_KWARGS.get(arch, {}))
            mlx_dir = convert(hf, tmp_path_factory.mktemp(f"peft-{arch}") / "mlx")
            made[arch] = (hf, str(mlx_dir)) + models.load(str(mlx_dir))
        return made[arch]

    return make


def _hf(hf_dir):
    from hf_tiny import load_hf

    return load_hf(hf_dir)[0]


def _random_prompt(model, n, seed):
    std = float(models.embed_rows(model, list(range(64))).std())
    return mx.random.normal((n, models.hidden_size(model)), key=mx.random.key(seed)) * std


def _assert_config_is_peft_s(ours_dir, theirs_dir, *keys):
    """Our exported adapter_config.json has the fields peft itself writes, with the same values for the
    shared shape fields and `keys`."""
    theirs = json.loads((Path(theirs_dir) / CONFIG_NAME).read_text())
    ours = json.loads((Path(ours_dir) / CONFIG_NAME).read_text())
    assert set(ours) == set(theirs) - {"peft_version"}
    for key in ("peft_type", "task_type", "num_virtual_tokens", "token_dim", "num_transformer_submodules",
                "num_layers", "num_attention_heads") + keys:
        assert ours[key] == theirs[key], key


def _peft_logits(peft_model, ids):
    with torch.no_grad():
        return peft_model(input_ids=torch.tensor([ids])).logits[0].numpy()


def _peft_greedy_full(peft_model, ids, n, eos_ids):
    """Greedy decoding by full forward passes of transformers + PEFT: no KV cache involved."""
    seq, out = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            token = int(peft_model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            if token in eos_ids:
                break
            out.append(token)
            seq.append(token)
    return out


def _peft_generate(peft_model, ids, n, **kw):
    with torch.no_grad():
        out = peft_model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, **kw)
    return out[0, len(ids):].tolist()


def _exported(base, tmp_path, arch):
    from peft import PeftModel

    hf_dir, mlx_dir, model, tok, config = base(arch)
    P = _random_prompt(model, 8, seed=3)
    pf = prompt_file.save(tmp_path / "p.safetensors", {"soft_prompt": P}, model, config, objective="tv")
    out = export_peft(pf, tmp_path / "adapter", base_model_name=hf_dir)
    return P, out, PeftModel.from_pretrained(_hf(hf_dir), out).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_exported_prompt_runs_the_same_in_peft(base, tmp_path, arch):
    hf_dir, mlx_dir, model, tok, config = base(arch)
    P, out, peft_model = _exported(base, tmp_path, arch)
    assert sorted(os.listdir(out)) == [CONFIG_NAME, WEIGHTS_NAME]  # no temporary files left
    cfg = peft_model.peft_config["default"]
    assert (cfg.peft_type.value, cfg.num_virtual_tokens, cfg.token_dim, cfg.num_layers) == ("PROMPT_TUNING", 8, 64, 2)
    assert cfg.base_model_name_or_path == hf_dir
    scale = peft_scale(arch, 64)
    assert scale == (8.0 if arch.startswith("gemma") else 1.0)
    loaded = peft_model.prompt_encoder["default"].embedding.weight.detach().numpy()
    np.testing.assert_allclose(loaded, np.array(P) * scale, rtol=1e-6)

    ids = chat_ids(tok, TEXT)
    ours = np.array(models.forward(model, ids, P)[0])
    theirs = _peft_logits(peft_model, ids)
    assert ours.shape == theirs.shape == (8 + len(ids), config["vocab_size"])
    assert np.abs(ours - theirs).max() <= ATOL
    # not vacuous: P changes the logits of the text positions
    plain = np.array(models.forward(model, ids)[0])
    assert np.abs(ours[8:] - plain).max() > 100 * ATOL

    # the reference: greedy decoding by full forward passes of transformers + PEFT
    cfg_g = GenerationConfig(max_tokens=GREEDY, temp=0.0)
    greedy = generate(model, tok, TEXT, prompt=P, cfg=cfg_g).tokens
    assert len(greedy) >= 10
    assert greedy == _peft_greedy_full(peft_model, ids, GREEDY, set(tok.eos_token_ids))[: len(greedy)]
    # the input matters: other requests continue differently (at least one; tiny random models
    # can repeat one token whatever they are asked), and the same in both
    differs = False
    for text in OTHERS:
        other = generate(model, tok, text, prompt=P, cfg=cfg_g).tokens
        assert other == _peft_greedy_full(peft_model, chat_ids(tok, text), GREEDY, set(tok.eos_token_ids))[: len(other)]
        differs = differs or other != greedy
    assert differs


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_peft_generate_without_cache_matches_ours(base, tmp_path, arch):
    """What the docs tell PEFT users to run: generate(..., use_cache=False) gives our tokens."""
    hf_dir, mlx_dir, model, tok, config = base(arch)
    P, _, peft_model = _exported(base, tmp_path, arch)
    ids = chat_ids(tok, TEXT)
    reference = _peft_greedy_full(peft_model, ids, GREEDY, set())
    assert _peft_generate(peft_model, ids, GREEDY, use_cache=False) == reference


@pytest.mark.parametrize("arch", [
    pytest.param(a, marks=pytest.mark.xfail(
        _transformers_at_least("5.24"), strict=True,
        reason="peft's cached generate() for prompt tuning diverges from full forward passes with "
               "transformers >= 5.24 (huggingface/peft#2123 family); an XPASS means upstream fixed it"))
    for a in CACHED_GENERATE_BROKEN])
def test_peft_cached_generate_is_a_reference(base, tmp_path, arch):
    """Records an upstream bug, both ways: fails (xfail) while it lasts, XPASS-fails when it is fixed."""
    hf_dir, mlx_dir, model, tok, config = base(arch)
    P, _, peft_model = _exported(base, tmp_path, arch)
    ids = chat_ids(tok, TEXT)
    assert _peft_generate(peft_model, ids, GREEDY) == _peft_greedy_full(peft_model, ids, GREEDY, set())


def _docs_snippet() -> str:
    """The python block of docs/PEFT.md that loads an exported adapter with peft."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "PEFT.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "PeftModel" in b]
    assert len(blocks) == 1, "docs/PEFT.md must hold exactly one peft loading snippet"
    return blocks[0]


def test_docs_peft_snippet_gives_the_text_of_generate(base, tmp_path, capsys):
    """The documented snippet, run as written on a local base, prints what `mlx-softprompt generate` prints."""
    from conftest import run_cli

    hf_dir, mlx_dir, model, tok, config = base("llama")
    P = _random_prompt(model, 8, seed=5)
    pf = prompt_file.save(tmp_path / "safety.safetensors", {"soft_prompt": P}, model, config)
    adapter = export_peft(pf, tmp_path / "safety-adapter", base_model_name=hf_dir)
    snippet = _docs_snippet()
    assert '"safety-adapter"' in snippet and "Write a poem about the sea." in snippet
    source = snippet.replace('"safety-adapter"', repr(str(adapter))).replace("max_new_tokens=64", "max_new_tokens=24")
    namespace = {}
    exec(compile(source, "docs/PEFT.md", "exec"), namespace)
    theirs_text = capsys.readouterr().out.rstrip("\n")
    theirs = namespace["out"][0, namespace["inputs"]["input_ids"].shape[1]:].tolist()
    code, ours, err = run_cli(capsys, "generate", "--model", mlx_dir, "--prompt-file", str(pf), "--text",
                              "Write a poem about the sea.", "--max-tokens", "24", "--json")
    assert code == 0, err
    ours = json.loads(ours)
    assert len(ours["tokens"]) >= 10
    assert ours["tokens"] == [t for t in theirs if t not in tok.eos_token_ids]
    # the same text (the snippet hides special tokens, as chat front ends do)
    assert theirs_text == tok.decode(ours["tokens"], skip_special_tokens=True)


def test_exported_trained_prompt_loads_with_auto_peft(tiny_teacher, tmp_path, capsys):
    """`train` records its base; `export-peft` names it; AutoPeftModelForCausalLM loads the adapter from it."""
    from conftest import run_cli
    from peft import AutoPeftModelForCausalLM

    base_dir, cache = tiny_teacher
    pf = tmp_path / "trained.safetensors"
    code, _, err = run_cli(capsys, "train", "--base", base_dir, "--teacher", cache, "--out", str(pf),
                           "--num-tokens", "4", "--iters", "2", "--batch-size", "4")
    assert code == 0, err
    assert prompt_file.load(pf).metadata["base_model"] == base_dir
    code, out, err = run_cli(capsys, "export-peft", str(pf), str(tmp_path / "ad"))
    assert code == 0, err
    assert json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())["base_model_name_or_path"] == base_dir
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "ad"), dtype=torch.float32).eval()
    model, tok, config = models.load(base_dir)
    ids = chat_ids(tok, TEXT)
    ours = np.array(models.forward(model, ids, prompt_file.load(pf).prompt)[0])
    assert np.abs(ours - _peft_logits(peft_model, ids)).max() <= ATOL


def test_export_refuses_to_write_a_null_base(base, tmp_path, capsys):
    from conftest import run_cli

    hf_dir, mlx_dir, model, tok, config = base("llama")
    pf = prompt_file.save(tmp_path / "p.safetensors", {"soft_prompt": _random_prompt(model, 4, 0)}, model, config)
    code, out, err = run_cli(capsys, "export-peft", str(pf), str(tmp_path / "ad"))
    assert code == 1 and err.count("\n") == 1 and "does not record its base model; pass --model" in err
    assert not (tmp_path / "ad").exists()
    code, out, err = run_cli(capsys, "export-peft", str(pf), str(tmp_path / "ad"), "--model", hf_dir)
    assert code == 0, err
    assert json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())["base_model_name_or_path"] == hf_dir


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_round_trip_gives_the_same_tensor(base, tmp_path, arch):
    hf_dir, mlx_dir, model, tok, config = base(arch)
    P = _random_prompt(model, 5, seed=7)
    pf = prompt_file.save(tmp_path / "p.safetensors", {"soft_prompt": P}, model, config, objective="kl",
                          guard="llama-guard-3-1b", refusal="I'm sorry, but I can't help with that.")
    adapter = export_peft(pf, tmp_path / "adapter", base_model_name="org/tiny")
    back = prompt_file.load(import_peft(adapter, tmp_path / "back.safetensors", mlx_dir))
    assert mx.array_equal(back.prompt, P)
    back.check_base(model, config)
    for key in ("objective", "guard", "refusal", "base_embedding_hash", "num_virtual_tokens"):
        assert back.metadata[key] == prompt_file.load(pf).metadata[key]
    assert back.metadata["peft_base_model"] == "org/tiny"


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_adapter_made_by_peft_imports(base, tmp_path, arch):
    """An adapter created and saved by peft itself gives the same logits in MLX after import."""
    from peft import PeftModel, PromptTuningConfig, get_peft_model

    hf_dir, mlx_dir, model, tok, config = base(arch)
    torch.manual_seed(0)
    made = get_peft_model(_hf(hf_dir), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6))
    made.save_pretrained(tmp_path / "theirs")
    with safe_open(str(tmp_path / "theirs" / WEIGHTS_NAME), "pt") as f:
        assert list(f.keys()) == [TENSOR_KEY]  # the key peft writes for prompt tuning
    # our exported config has the same fields with the same meaning as peft's own
    P = _random_prompt(model, 6, seed=1)
    ours_dir = export_peft(prompt_file.save(tmp_path / "p.safetensors", {"soft_prompt": P}, model, config),
                           tmp_path / "ours", base_model_name=hf_dir)
    _assert_config_is_peft_s(ours_dir, tmp_path / "theirs", "inference_mode", "prompt_tuning_init")

    out = import_peft(tmp_path / "theirs", tmp_path / "imported.safetensors", mlx_dir)
    P2 = prompt_file.load(out).prompt
    assert P2.shape == (6, 64)
    ids = chat_ids(tok, TEXT)
    reloaded = PeftModel.from_pretrained(_hf(hf_dir), tmp_path / "theirs").eval()
    assert np.abs(np.array(models.forward(model, ids, P2)[0]) - _peft_logits(reloaded, ids)).max() <= ATOL


# ---------------------------------------------------------------- the command line


def _run(capsys, *argv):
    try:
        cli.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_export_and_import(base, tmp_path, capsys):
    hf_dir, mlx_dir, model, tok, config = base("llama")
    P = _random_prompt(model, 4, seed=2)
    pf = prompt_file.save(tmp_path / "p.safetensors", {"soft_prompt": P}, model, config)
    code, out, _ = _run(capsys, "export-peft", pf, tmp_path / "ad", "--base-model-name", hf_dir)
    assert code == 0 and out.strip() == f"wrote {tmp_path / 'ad'}"
    code, out, _ = _run(capsys, "import-peft", tmp_path / "ad", tmp_path / "back.safetensors", "--model", mlx_dir)
    assert code == 0 and out.strip() == f"wrote {tmp_path / 'back.safetensors'}"
    assert mx.array_equal(prompt_file.load(tmp_path / "back.safetensors").prompt, P)


def _edit_config(adapter: Path, **fields):
    cfg = json.loads((adapter / CONFIG_NAME).read_text())
    cfg.update(fields)
    (adapter / CONFIG_NAME).write_text(json.dumps(cfg))


@pytest.mark.parametrize("case", ["ia3", "count-mismatch", "bin-only", "no-config", "not-a-dir",
                                  "other-width", "other-base", "bad-tensor-key"])
def test_cli_import_errors_are_one_line(base, tiny_model, tmp_path, capsys, case):
    hf_dir, mlx_dir, model, tok, config = base("llama")
    adapter = export_peft(prompt_file.save(tmp_path / "p.safetensors", {"soft_prompt": _random_prompt(model, 4, 0)},
                                           model, config), tmp_path / "ad", base_model_name="org/tiny")
    target = mlx_dir
    if case == "ia3":
        _edit_config(adapter, peft_type="IA3")
        expect = "peft_type is 'IA3'; only PROMPT_TUNING (a soft prompt), PREFIX_TUNING and LORA adapters are read"
    elif case == "count-mismatch":
        _edit_config(adapter, num_virtual_tokens=5)
        expect = "has shape [4, 64], but adapter_config.json says num_virtual_tokens=5, token_dim=64"
    elif case == "bin-only":
        (adapter / WEIGHTS_NAME).rename(adapter / "adapter_model.bin")
        expect = "no adapter_model.safetensors (found adapter_model.bin); only safetensors are read"
    elif case == "no-config":
        (adapter / CONFIG_NAME).unlink()
        expect = "no adapter_config.json"
    elif case == "not-a-dir":
        adapter = tmp_path / "missing"
        expect = "no such adapter directory"
    elif case == "other-width":
        target = tiny_model("llama", hidden_size=32)
        expect = "token_dim 64 does not match the hidden size 32"
    elif case == "other-base":
        target = tiny_model("llama")  # same shapes, other weights
        expect = "exported for base llama/d=64/V="
    elif case == "bad-tensor-key":
        P = mx.zeros((4, 64))
        mx.save_safetensors(str(adapter / WEIGHTS_NAME), {"embedding.weight": P})
        expect = "no tensor 'prompt_embeddings' (found embedding.weight)"
    out = tmp_path / "out.safetensors"
    code, stdout, stderr = _run(capsys, "import-peft", adapter, out, "--model", target)
    assert code == 1
    assert stderr.startswith("error: ") and stderr.count("\n") == 1 and expect in stderr, stderr
    assert stdout == "" and not out.exists()


def test_export_refusals(base, tmp_path, capsys):
    hf_dir, mlx_dir, model, tok, config = base("llama")
    steer = prompt_file.save(tmp_path / "s.safetensors", {"vector": mx.zeros((64,))}, model, config, method="steer-opt")
    code, _, err = _run(capsys, "export-peft", steer, tmp_path / "a")
    assert code == 1 and "a 'steer-opt' file; only soft prompts, prefix tuning and LoRA export" in err and err.count("\n") == 1
    # a base whose embedding scaling we have not checked against transformers
    odd = prompt_file.save(tmp_path / "o.safetensors", {"soft_prompt": mx.zeros((2, 64))}, model,
                           dict(config, model_type="gemma3n"))
    code, _, err = _run(capsys, "export-peft", odd, tmp_path / "b", "--model", "org/x")
    assert code == 1 and "not verified for model_type 'gemma3n'" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---------------------------------------------------------------- prefix tuning <-> PEFT PREFIX_TUNING


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prefix_tuning_exports_to_and_imports_from_peft(base, tmp_path, arch):
    """A prefix file exports as a PREFIX_TUNING adapter that PeftModel loads with our logits; one made by
    peft itself imports with its logits; the round trip is exact."""
    from peft import PeftModel, PrefixTuningConfig, get_peft_model

    from mlx_softprompt import methods

    hf_dir, mlx_dir, model, tok, config = base(arch)
    m = methods.get("prefix", num_tokens=5, init="random")
    params = m.init(model, tok, 3)
    pf = m.save(tmp_path / "prefix.safetensors", params, model, config, objective="tv")
    ids = chat_ids(tok, TEXT)
    ours = np.array(m.logits(model, params, mx.array([ids]))[0])

    adapter = export_peft(pf, tmp_path / "ours", base_model_name=hf_dir)
    reloaded = PeftModel.from_pretrained(_hf(hf_dir), adapter).eval()
    assert np.abs(ours - _peft_logits(reloaded, ids)).max() <= ATOL

    # the config has peft's own fields and values
    torch.manual_seed(0)
    made = get_peft_model(_hf(hf_dir), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    made.save_pretrained(tmp_path / "theirs")
    _assert_config_is_peft_s(adapter, tmp_path / "theirs", "encoder_hidden_size", "prefix_projection")

    # peft's own adapter in MLX
    out = import_peft(tmp_path / "theirs", tmp_path / "imported.safetensors", mlx_dir)
    loaded = methods.load(out, model, config)
    assert loaded.method.name == "prefix" and loaded.method.prefix_length(loaded.params) == 5
    theirs = _peft_logits(PeftModel.from_pretrained(_hf(hf_dir), tmp_path / "theirs").eval(), ids)
    assert np.abs(np.array(loaded.method.logits(model, loaded.params, mx.array([ids]))[0]) - theirs).max() <= ATOL

    # our export read back: the same tensors, the metadata carried
    back = methods.load(import_peft(adapter, tmp_path / "back.safetensors", mlx_dir), model, config)
    for l, kv in params["prefix"].items():
        for kind in ("keys", "values"):
            assert mx.array_equal(back.params["prefix"][l][kind], kv[kind])
    assert back.file.metadata["objective"] == "tv"


def test_prefix_adapter_for_another_base_is_refused(base, tmp_path, capsys):
    """A PREFIX_TUNING adapter whose layers or heads do not fit the base: one line naming the adapter."""
    from peft import PrefixTuningConfig, get_peft_model

    hf_dir, mlx_dir, *_ = base("llama")
    made = get_peft_model(_hf(hf_dir), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    made.save_pretrained(tmp_path / "a")
    capsys.readouterr()
    cfg = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    # one layer more than the base, with a tensor that agrees with the config
    from safetensors.numpy import save_file

    cfg["num_layers"] += 1
    (tmp_path / "a" / CONFIG_NAME).write_text(json.dumps(cfg))
    save_file({TENSOR_KEY: np.zeros((3, 2 * cfg["num_layers"] * cfg["token_dim"]), np.float32)},
              str(tmp_path / "a" / WEIGHTS_NAME))
    code, out, err = _run(capsys, "import-peft", tmp_path / "a", tmp_path / "x.safetensors", "--model", mlx_dir)
    assert code == 1 and len(err.strip().splitlines()) == 1 and str(tmp_path / "a") in err, err
    assert "layers" in err and not (tmp_path / "x.safetensors").exists()
    # and a tensor that disagrees with its own config is named with both shapes
    save_file({TENSOR_KEY: np.zeros((3, 7), np.float32)}, str(tmp_path / "a" / WEIGHTS_NAME))
    code, out, err = _run(capsys, "import-peft", tmp_path / "a", tmp_path / "x.safetensors", "--model", mlx_dir)
    assert code == 1 and "[3, 7]" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- LoRA <-> PEFT LORA

# default keys on the last 2 layers (every layer of the tiny bases); an explicit key list on the last one,
# with a scale that is not mlx-lm's default
LORA_VARIANTS = {"default-keys": dict(rank=4, layers=2),
                 "explicit-keys": dict(rank=4, layers=1, keys=["self_attn.o_proj", "mlp.down_proj"], scale=2.5)}


def _random_lora(model, tok, seed, **options):
    """A LoRA method and params with random non-zero lora_a and lora_b (init's lora_b is zero: no effect)."""
    from mlx_softprompt import methods
    from mlx_softprompt.methods.base import nest

    m = methods.get("lora", **options)
    flat = tree_flatten(m.init(model, tok, seed))
    keys = mx.random.split(mx.random.key(seed), len(flat))
    params = nest({k: v if k.endswith("lora_a") else mx.random.normal(v.shape, key=keys[i]) * 0.02
                   for i, (k, v) in enumerate(flat)})
    mx.eval(params)
    return m, params


def _peft_lora_layers(peft_model) -> dict:
    """{module path (transformers' name): peft LoRA layer} of a PeftModel."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {n[len(prefix):]: m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


def _lora_check(method, params, peft_model, model, tok) -> float:
    """Max |logit difference| between our bound LoRA and transformers+PEFT (asserted <= ATOL, and the LoRA
    changes the logits)."""
    ids = chat_ids(tok, TEXT)
    ours = np.array(method.logits(model, params, mx.array([ids]))[0])
    theirs = _peft_logits(peft_model, ids)
    diff = float(np.abs(ours - theirs).max())
    assert diff <= ATOL, diff
    assert np.abs(ours - np.array(model(mx.array([ids]))[0])).max() > 100 * ATOL  # not vacuous
    return diff


@pytest.mark.parametrize("variant", list(LORA_VARIANTS))
@pytest.mark.parametrize("arch", ARCHS)
def test_lora_exports_to_peft(base, tmp_path, arch, variant):
    """PeftModel loads an exported LoRA file onto exactly the adapted modules, with our factors and scale,
    and gives our logits."""
    from peft import PeftModel

    from mlx_softprompt.methods.lora import adapted

    hf_dir, mlx_dir, model, tok, config = base(arch)
    m, params = _random_lora(model, tok, 1, **LORA_VARIANTS[variant])
    pf = m.save(tmp_path / "lora.safetensors", params, model, config, objective="tv")
    adapter = export_peft(pf, tmp_path / "ours", base_model_name=hf_dir)
    assert sorted(os.listdir(adapter)) == [CONFIG_NAME, WEIGHTS_NAME]  # no temporary files left
    peft_model = PeftModel.from_pretrained(_hf(hf_dir), adapter).eval()
    assert peft_model.peft_config["default"].peft_type.value == "LORA"
    layers = _peft_lora_layers(peft_model)
    assert sorted(layers) == adapted(params)  # those modules, in the last `layers` blocks only
    flat = dict(tree_flatten(params))
    for path, layer in layers.items():
        assert layer.scaling["default"] == m.options.scale
        np.testing.assert_array_equal(layer.lora_A["default"].weight.detach().numpy(), np.array(flat[f"{path}.lora_a"]).T)
        np.testing.assert_array_equal(layer.lora_B["default"].weight.detach().numpy(), np.array(flat[f"{path}.lora_b"]).T)
    _lora_check(m, params, peft_model, model, tok)


def test_lora_on_the_last_layers_of_a_deeper_base(hf_tiny_model, tmp_path):
    """The last 2 of 4 layers: PEFT adapts those and leaves layers 0 and 1 alone; AutoPeftModelForCausalLM
    loads the base the adapter names and gives our logits."""
    from peft import AutoPeftModelForCausalLM

    from mlx_softprompt.methods.lora import adapted

    hf_dir = hf_tiny_model("llama", num_layers=4)
    model, tok, config = models.load(str(convert(hf_dir, tmp_path / "mlx")))
    m, params = _random_lora(model, tok, 2, rank=4, layers=2)
    assert {p.split(".")[2] for p in adapted(params)} == {"2", "3"}
    adapter = export_peft(m.save(tmp_path / "lora.safetensors", params, model, config), tmp_path / "ad",
                          base_model_name=hf_dir)
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(adapter), dtype=torch.float32).eval()
    assert sorted(_peft_lora_layers(peft_model)) == adapted(params)
    _lora_check(m, params, peft_model, model, tok)


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_adapter_made_by_peft_imports(base, tmp_path, arch):
    """A LoRA adapter created and saved by peft itself (every linear module, random A and B) imports into a
    LoRA file that gives peft's logits."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from mlx_softprompt import methods
    from mlx_softprompt.methods.lora import adapted

    hf_dir, mlx_dir, model, tok, config = base(arch)
    torch.manual_seed(0)
    made = get_peft_model(_hf(hf_dir), LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear",
                                                  init_lora_weights=False))
    made.save_pretrained(tmp_path / "theirs")
    loaded = methods.load(import_peft(tmp_path / "theirs", tmp_path / "imported.safetensors", mlx_dir), model, config)
    assert loaded.name == "lora"
    assert (loaded.method.options.rank, loaded.method.options.scale, loaded.method.options.layers) == (4, 2.0, 2)
    assert adapted(loaded.params) == sorted(_peft_lora_layers(made))
    reloaded = PeftModel.from_pretrained(_hf(hf_dir), tmp_path / "theirs").eval()
    _lora_check(loaded.method, loaded.params, reloaded, model, tok)


def test_rslora_adapter_on_one_layer_imports(base, tmp_path):
    """rsLoRA's scaling lora_alpha / sqrt(r) becomes our scale; layers_to_transform and dropout need nothing."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from mlx_softprompt import methods
    from mlx_softprompt.methods.lora import adapted

    hf_dir, mlx_dir, model, tok, config = base("llama")
    torch.manual_seed(1)
    made = get_peft_model(_hf(hf_dir), LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=3, use_rslora=True,
                                                  target_modules=["q_proj", "v_proj"], layers_to_transform=[1],
                                                  lora_dropout=0.1, init_lora_weights=False))
    made.save_pretrained(tmp_path / "theirs")
    loaded = methods.load(import_peft(tmp_path / "theirs", tmp_path / "imported.safetensors", mlx_dir), model, config)
    o = loaded.method.options
    assert (o.rank, o.scale, o.layers, o.keys) == (4, 1.5, 1, ["self_attn.q_proj", "self_attn.v_proj"])
    assert adapted(loaded.params) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    reloaded = PeftModel.from_pretrained(_hf(hf_dir), tmp_path / "theirs").eval()
    assert {l.scaling["default"] for l in _peft_lora_layers(reloaded).values()} == {1.5}
    _lora_check(loaded.method, loaded.params, reloaded, model, tok)


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_lora_round_trip_gives_the_same_tensors(base, tmp_path, arch):
    """export then import: the same tensors, options and metadata; the config is the one peft writes for the
    same LoRA."""
    from peft import LoraConfig, get_peft_model

    from mlx_softprompt import methods
    from mlx_softprompt.methods.lora import adapted

    hf_dir, mlx_dir, model, tok, config = base(arch)
    m, params = _random_lora(model, tok, 3, **LORA_VARIANTS["explicit-keys"])
    pf = m.save(tmp_path / "lora.safetensors", params, model, config, objective="kl", guard="llama-guard-3-1b",
                refusal="I'm sorry, but I can't help with that.")
    adapter = export_peft(pf, tmp_path / "ours", base_model_name=hf_dir)
    with safe_open(str(adapter / WEIGHTS_NAME), "pt") as f:
        assert f.metadata()["mlx_softprompt.method"] == "lora"
        assert f.metadata()["mlx_softprompt.objective"] == "kl"
    back = methods.load(import_peft(adapter, tmp_path / "back.safetensors", mlx_dir), model, config)
    flat, back_flat = dict(tree_flatten(params)), dict(tree_flatten(back.params))
    assert set(back_flat) == set(flat)
    assert all(mx.array_equal(back_flat[k], flat[k]) for k in flat)
    assert back.method.options == m.options
    for key in ("objective", "guard", "refusal", "base_embedding_hash"):
        assert back.file.metadata[key] == prompt_file.load(pf).metadata[key]
    assert back.file.metadata["peft_base_model"] == hf_dir

    made = get_peft_model(_hf(hf_dir), LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=10,
                                                  target_modules=adapted(params)))
    made.save_pretrained(tmp_path / "theirs")
    theirs = json.loads((tmp_path / "theirs" / CONFIG_NAME).read_text())
    ours = json.loads((adapter / CONFIG_NAME).read_text())
    theirs.pop("peft_version")
    assert sorted(ours.pop("target_modules")) == sorted(theirs.pop("target_modules"))
    assert ours == theirs


def test_lora_export_imports_into_a_quantized_copy(base, tmp_path):
    """An export imports into an 8-bit conversion of its base (the fingerprint accepts a quantized copy; the
    projections' sizes are read through the quantization) with the same tensors, and runs there."""
    from mlx_softprompt import methods

    hf_dir, mlx_dir, model, tok, config = base("llama")
    m, params = _random_lora(model, tok, 6, rank=4, layers=2)
    adapter = export_peft(m.save(tmp_path / "lora.safetensors", params, model, config), tmp_path / "ad",
                          base_model_name=hf_dir)
    q_dir = str(convert(hf_dir, tmp_path / "q8", quantize=True, q_bits=8))
    qmodel, _, qconfig = models.load(q_dir)
    back = methods.load(import_peft(adapter, tmp_path / "q.safetensors", q_dir), qmodel, qconfig)
    flat, back_flat = dict(tree_flatten(params)), dict(tree_flatten(back.params))
    assert set(back_flat) == set(flat) and all(mx.array_equal(back_flat[k], flat[k]) for k in flat)
    ids = mx.array([chat_ids(tok, TEXT)])
    ours = np.array(back.method.logits(qmodel, back.params, ids)[0])
    assert np.isfinite(ours).all() and np.abs(ours - np.array(qmodel(ids)[0])).max() > 100 * ATOL  # bound and active


def test_trained_lora_exports_and_loads_with_auto_peft(tiny_teacher, tmp_path, capsys):
    """`train --method lora` then `export-peft`: AutoPeftModelForCausalLM gives the logits of the trained file."""
    from conftest import run_cli
    from peft import AutoPeftModelForCausalLM

    from mlx_softprompt import methods

    base_dir, cache = tiny_teacher
    pf = tmp_path / "lora.safetensors"
    code, _, err = run_cli(capsys, "train", "--base", base_dir, "--teacher", cache, "--out", str(pf), "--method", "lora",
                           "--lora-rank", "4", "--lora-layers", "1", "--iters", "2", "--batch-size", "4")
    assert code == 0, err
    code, out, err = run_cli(capsys, "export-peft", str(pf), str(tmp_path / "ad"))
    assert code == 0 and out.strip() == f"wrote {tmp_path / 'ad'}", err
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "ad"), dtype=torch.float32).eval()
    model, tok, config = models.load(base_dir)
    loaded = methods.load(pf, model, config)
    ids = chat_ids(tok, TEXT)
    ours = np.array(loaded.method.logits(model, loaded.params, mx.array([ids]))[0])
    assert np.abs(ours - _peft_logits(peft_model, ids)).max() <= ATOL


LORA_REFUSED = {  # case: (LoraConfig fields, base arch, what the one line says)
    "dora": (dict(use_dora=True), "llama", "use_dora is set (true): DoRA also rescales every output"),
    "rank-pattern": (dict(rank_pattern={"q_proj": 8}), "llama",
                     'rank_pattern gives some modules other values than 4 ({"q_proj": 8}); mlx-softprompt\'s LoRA has one rank'),
    "alpha-pattern": (dict(alpha_pattern={"v_proj": 16}), "llama", "alpha_pattern gives some modules other values than 8"),
    "modules-to-save": (dict(modules_to_save=["lm_head"]), "llama", "modules_to_save is set ([\"lm_head\"]): it carries"),
    "bias": (dict(bias="all"), "qwen2", "bias is 'all': the adapter carries trained biases"),
    "embedding": (dict(target_modules=["embed_tokens"]), "llama",
                  "LoRA on the embedding 'model.embed_tokens' (lora_embedding_A/B); mlx-softprompt's LoRA adapts "
                  "linear projections only"),
    # peft saves the whole output layer it adapts: a full weight
    "full-weight": (dict(target_modules=["lm_head"]), "llama",
                    "tensor 'base_model.model.lm_head.base_layer.weight' is a full weight of the base"),
    # gemma2 ties its output layer to the embedding: transformers has an lm_head module, mlx-lm does not
    "module-mlx-lacks": (dict(target_modules=["lm_head"]), "gemma2",
                         "does not fit {mlx}: adapter for 'lm_head', which this base model does not have"),
    "other-width": (dict(), "llama", "the base's projection maps 32 -> 32"),
}


@pytest.mark.parametrize("case", list(LORA_REFUSED))
def test_cli_lora_import_refusals_are_one_line(base, tiny_model, tmp_path, capsys, case):
    """Adapters made by peft with what our LoRA cannot represent: one line, exit code 1, nothing written."""
    from peft import LoraConfig, get_peft_model

    fields, arch, expect = LORA_REFUSED[case]
    hf_dir, mlx_dir, *_ = base(arch)
    kw = dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    # peft saves a full copy of a targeted embedding or output layer unless told not to
    save = {"save_embedding_layers": False} if case == "module-mlx-lacks" else {}
    get_peft_model(_hf(hf_dir), LoraConfig(**{**kw, **fields})).save_pretrained(tmp_path / "ad", **save)
    target = tiny_model("llama", hidden_size=32) if case == "other-width" else mlx_dir
    out = tmp_path / "out.safetensors"
    capsys.readouterr()
    code, stdout, stderr = _run(capsys, "import-peft", tmp_path / "ad", out, "--model", target)
    assert code == 1
    assert stderr.startswith("error: ") and stderr.count("\n") == 1 and expect.replace("{mlx}", mlx_dir) in stderr, stderr
    assert stdout == "" and not out.exists()


def test_cli_lora_import_refuses_an_export_for_another_base(base, tiny_model, tmp_path, capsys):
    hf_dir, mlx_dir, model, tok, config = base("llama")
    m, params = _random_lora(model, tok, 4, rank=4, layers=1)
    adapter = export_peft(m.save(tmp_path / "lora.safetensors", params, model, config), tmp_path / "ad",
                          base_model_name=hf_dir)
    code, stdout, stderr = _run(capsys, "import-peft", adapter, tmp_path / "out.safetensors", "--model",
                                tiny_model("llama"))  # same shapes, other weights
    assert code == 1 and stderr.count("\n") == 1 and "exported for base llama/d=64/V=" in stderr, stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_cli_lora_export_refusals(base, tmp_path, capsys):
    """A module the HF checkpoint does not have, and module names not verified for an architecture whose HF
    checkpoint is not on this machine: one line each, nothing written."""
    hf_dir, mlx_dir, model, tok, config = base("llama")
    a, b = mx.ones((64, 4)), mx.ones((4, 64))
    odd = prompt_file.save(tmp_path / "odd.safetensors", {"model.layers.1.self_attn.qkv.lora_a": a,
                                                          "model.layers.1.self_attn.qkv.lora_b": b},
                           model, config, method="lora")
    code, _, err = _run(capsys, "export-peft", odd, tmp_path / "a", "--model", hf_dir)
    assert code == 1 and err.count("\n") == 1, err
    assert f"the HF model {hf_dir} has no module 'model.layers.1.self_attn.qkv': mlx-lm names it differently" in err
    m, params = _random_lora(model, tok, 5, rank=4, layers=1)
    unverified = m.save(tmp_path / "u.safetensors", params, model, dict(config, model_type="gemma3n"))
    code, _, err = _run(capsys, "export-peft", unverified, tmp_path / "b", "--model", "org/not-downloaded")
    assert code == 1 and err.count("\n") == 1 and "module names for model_type 'gemma3n' are not verified" in err, err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
