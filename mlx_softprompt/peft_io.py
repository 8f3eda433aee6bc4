"""Prompt files <-> Hugging Face PEFT prompt-tuning adapters.

PEFT's prompt tuning (``PeftModelForCausalLM``) concatenates its virtual-token
embeddings in front of the embeddings of every input token, BOS included: our
placement. One difference: PEFT's virtual tokens are concatenated after the
model's embedding module. mlx-lm's Gemma models multiply by sqrt(d) after the
lookup, so our P gets that scale; transformers 5 (and Gemma 3 already in 4.x)
does the multiplication inside the embedding module, so PEFT's tokens do not.
The exported tensor is therefore P * s (``peft_scale``: s = sqrt(d) for the
Gemma family, 1 elsewhere) and the import divides by s. A PEFT adapter is a directory with
``adapter_config.json`` and ``adapter_model.safetensors`` holding one tensor,
``prompt_embeddings`` [num_virtual_tokens * num_transformer_submodules,
token_dim] (the key PEFT's ``get_peft_model_state_dict`` writes for prompt
learning). Our own metadata (base fingerprint, objective, ...) rides along in
the safetensors header under ``mlx_softprompt.*`` keys, which PEFT ignores, so
an import can check the adapter belongs to the base it is given.

Prefix tuning maps to PEFT's ``PREFIX_TUNING`` (without ``prefix_projection``):
PEFT's ``prompt_embeddings`` [n, layers * 2 * kv heads * head dim] is, per
virtual token, layer 0's key, layer 0's value, layer 1's key, ..., each
[kv heads, head dim]: exactly our per-layer keys/values [kv heads, n, head dim],
which PEFT places in the cache as they are (no embedding scale, no RoPE applied).

LoRA maps to PEFT's ``LORA``. mlx-lm names the adapted modules as transformers
does for the architectures tested (``model.layers.3.self_attn.q_proj`` on both
sides; an export checks the names against the HF checkpoint when it is on this
machine and otherwise refuses model types not verified, an import checks them
against the MLX base). PEFT's ``lora_A.weight`` [r, in] and
``lora_B.weight`` [out, r] are our ``lora_a`` [in, r] and ``lora_b`` [r, out]
transposed, and its scaling lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA)
is our scale. LoRA variants that compute something else (DoRA, ...) or carry
other weights (modules_to_save, biases) are refused.
"""

import base64
import json
import math
import re
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from . import files, models, prompt_file
from . import checks
from .checks import read_json_object
from .errors import UserError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
TENSOR_KEY = "prompt_embeddings"
META_PREFIX = "mlx_softprompt."
SKETCH_META = META_PREFIX + prompt_file.SKETCH_KEY
# transformers scales these models' embeddings inside the embedding module while
# mlx-lm scales after the lookup; models we have not checked are refused.
_SQRT_D = {"gemma", "gemma2"}
_SQRT_D_BF16 = {"gemma3", "gemma3_text"}  # mlx-lm rounds this scale to bfloat16
_UNVERIFIED = {"gemma3n", "gemma4", "gemma4_text", "minicpm3", "vaultgemma", "falcon_h1"}
# Set by prompt_file.save for the base the prompt is imported into; not carried over.
_OWN_KEYS = set(prompt_file.OWN_KEYS)
LORA_PREFIX = "base_model.model."  # PEFT's state-dict keys: PeftModel.base_model (LoraModel).model.<module>
_LORA_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")
# model_types whose mlx-lm module paths were checked to be transformers' (tests/test_peft.py); for
# others an export needs the HF checkpoint on this machine to compare the names with
_LORA_PATHS_VERIFIED = {"llama", "qwen2", "gemma2", "gemma3_text", "granite", "olmo2", "phi3", "smollm3"}
# LoraConfig fields that, when set, make the adapter compute more than y = W x + scale * B A x or carry
# weights a LoRA file has no place for
_LORA_REFUSED = {
    "use_dora": "DoRA also rescales every output by a learned magnitude",
    "modules_to_save": "it carries whole trained copies of base modules",
    "lora_bias": "it adds a bias to lora_B",
    "target_parameters": "it adapts parameters (MoE experts), not linear modules",
    "trainable_token_indices": "it trains rows of the embedding",
    "layer_replication": "it repeats base layers",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens",
    "use_qalora": "QA-LoRA pools the input",
    "use_bdlora": "a LoRA variant",
    "arrow_config": "a LoRA variant",
    "kasa_config": "a LoRA variant",
    "velora_config": "a LoRA variant",
    "monteclora_config": "a LoRA variant",
    "megatron_config": "a LoRA variant",
}


def peft_scale(architecture: str, hidden_size: int) -> float:
    """s such that PEFT's prompt_embeddings = s * our P for a base of this model_type."""
    if architecture in _UNVERIFIED:
        raise UserError(f"PEFT interop is not verified for model_type {architecture!r}: its embedding "
                        "scaling differs between mlx-lm and transformers")
    if architecture in _SQRT_D:
        return float(hidden_size) ** 0.5
    if architecture in _SQRT_D_BF16:
        return mx.array(float(hidden_size) ** 0.5, dtype=mx.bfloat16).item()
    return 1.0


def adapter_config(num_virtual_tokens: int, token_dim: int, base_model_name: Optional[str] = None,
                   num_layers: Optional[int] = None, num_attention_heads: Optional[int] = None) -> dict:
    """The adapter_config.json PEFT writes for a causal-LM prompt-tuning adapter.

    PEFT fills num_layers / num_attention_heads from the model when they are null.
    """
    return {
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name,
        "inference_mode": True,
        "modules_to_save": None,
        "num_attention_heads": num_attention_heads,
        "num_layers": num_layers,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": int(num_virtual_tokens),
        "peft_type": "PROMPT_TUNING",
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "revision": None,
        "task_type": "CAUSAL_LM",
        "token_dim": int(token_dim),
        "tokenizer_kwargs": None,
        "tokenizer_name_or_path": None,
    }


def _base_shape(base_model_name: Optional[str]):
    """(num_layers, num_attention_heads) from a local base directory's config.json, else (None, None)."""
    if not base_model_name:
        return None, None
    path = Path(base_model_name).expanduser() / "config.json"
    if not path.is_file():
        return None, None
    config = read_json_object(path)
    config = config.get("text_config", config)
    return config.get("num_hidden_layers"), config.get("num_attention_heads")


def base_model_of(pf, given: Optional[str] = None) -> str:
    """The HF base an exported adapter names: `given`, else the base the prompt was trained on.

    PEFT's ``AutoPeftModelForCausalLM`` loads the base from ``base_model_name_or_path``;
    an adapter with ``null`` there cannot be loaded, so none is ever written.
    """
    for name in (given, pf.metadata.get("base_model"), pf.metadata.get("peft_base_model")):
        if name:
            return str(name)
    raise UserError(f"{pf.path}: the prompt file does not record its base model; pass --model with the "
                    "Hugging Face model it belongs to (hub id or directory)")


def prefix_adapter_config(num_virtual_tokens: int, num_layers: int, kv_heads: int, head_dim: int,
                          base_model_name: Optional[str] = None) -> dict:
    """The adapter_config.json PEFT writes for a causal-LM prefix-tuning adapter (no projection).

    token_dim and num_attention_heads are the key/value sizes, as PEFT sets them for
    grouped-query attention."""
    token_dim = int(kv_heads) * int(head_dim)
    return {
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name,
        "encoder_hidden_size": token_dim,
        "inference_mode": True,
        "init_weights": None,
        "modules_to_save": None,
        "num_attention_heads": int(kv_heads),
        "num_layers": int(num_layers),
        "num_transformer_submodules": 1,
        "num_virtual_tokens": int(num_virtual_tokens),
        "peft_type": "PREFIX_TUNING",
        "prefix_projection": False,
        "revision": None,
        "task_type": "CAUSAL_LM",
        "token_dim": token_dim,
    }


def prefix_to_peft(layers: dict) -> mx.array:
    """Our {layer: {keys, values}} ([H, n, hd] each) as PEFT's prompt_embeddings [n, 2L * H * hd]."""
    rows = []
    for l in range(len(layers)):
        for kind in ("keys", "values"):
            rows.append(layers[str(l)][kind].astype(mx.float32).transpose(1, 0, 2))  # [n, H, hd]
    n, H, hd = rows[0].shape
    return mx.stack(rows, axis=1).reshape(n, len(rows) * H * hd)


def prefix_from_peft(weight: mx.array, num_layers: int, kv_heads: int) -> dict:
    """The inverse of prefix_to_peft."""
    n = weight.shape[0]
    a = weight.reshape(n, num_layers, 2, kv_heads, -1).transpose(1, 2, 3, 0, 4)  # [L, 2, H, n, hd]
    return {str(l): {"keys": a[l, 0], "values": a[l, 1]} for l in range(num_layers)}


def _prefix_layers(pf) -> dict:
    from .methods.prefix import PrefixTuning, check_layout

    layers = PrefixTuning().params_from(pf.tensors, pf.path).get("prefix", {})
    check_layout(layers, pf.path)
    return layers


def lora_adapter_config(rank: int, alpha, target_modules: list, base_model_name: Optional[str] = None) -> dict:
    """The adapter_config.json PEFT writes for a causal-LM LoRA adapter (peft 0.21's fields).

    target_modules are full module paths: PEFT matches a path exactly, so only the adapted
    layers get adapters (no layers_to_transform / layers_pattern needed)."""
    return {
        "alora_invocation_tokens": None,
        "alpha_pattern": {},
        "arrow_config": None,
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name,
        "bias": "none",
        "corda_config": None,
        "ensure_weight_tying": False,
        "eva_config": None,
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "kasa_config": None,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": alpha,
        "lora_bias": False,
        "lora_dropout": 0.0,
        "lora_ga_config": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "monteclora_config": None,
        "peft_type": "LORA",
        "qalora_group_size": 16,
        "r": int(rank),
        "rank_pattern": {},
        "revision": None,
        "target_modules": list(target_modules),
        "target_parameters": None,
        "task_type": "CAUSAL_LM",
        "trainable_token_indices": None,
        "use_bdlora": None,
        "use_dora": False,
        "use_qalora": False,
        "use_rslora": False,
        "velora_config": None,
    }


def lora_to_peft(flat: dict) -> dict:
    """Our {"<module>.lora_a": [in, r], "<module>.lora_b": [r, out]} as PEFT's state dict
    (lora_A.weight [r, in], lora_B.weight [out, r])."""
    out = {}
    for key, v in flat.items():
        module, kind = key.rsplit(".", 1)
        out[f"{LORA_PREFIX}{module}.lora_{kind[-1].upper()}.weight"] = mx.contiguous(v.T)
    return out


def lora_from_peft(tensors: dict, where) -> dict:
    """The inverse of lora_to_peft (float32); any other tensor is a UserError naming it."""
    embedding = sorted(k for k in tensors if re.search(r"\.lora_embedding_[AB]$", k))
    if embedding:
        module = embedding[0].rsplit(".", 1)[0].removeprefix(LORA_PREFIX)
        raise UserError(f"{where}: LoRA on the embedding {module!r} (lora_embedding_A/B); mlx-softprompt's LoRA "
                        "adapts linear projections only")
    flat = {}
    for key, v in sorted(tensors.items()):
        if key.endswith(".base_layer.weight"):
            raise UserError(f"{where}: tensor {key!r} is a full weight of the base (peft saves targeted embedding "
                            "and output layers whole), which a LoRA file does not carry")
        m = _LORA_KEY.fullmatch(key)
        if m is None or v.ndim != 2:
            raise UserError(f"{where}: tensor {key!r} is not a LoRA factor of a linear module "
                            f"(base_model.model.<module>.lora_A.weight / lora_B.weight)")
        flat[f"{m[1]}.lora_{m[2].lower()}"] = v.astype(mx.float32).T
    return flat


def _hf_tensor_names(name: str) -> Optional[set]:
    """The tensor names of HF checkpoint `name` when it is on this machine (a directory, or the
    HF cache for a hub id), else None. Nothing is downloaded."""
    p = Path(name).expanduser()
    found = []
    if p.is_dir():
        index = p / "model.safetensors.index.json"
        found = [index] if index.is_file() else sorted(p.glob("*.safetensors"))
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            for file in ("model.safetensors.index.json", "model.safetensors"):
                got = try_to_load_from_cache(str(name), file)
                if isinstance(got, str):
                    found = [Path(got)]
                    break
        except Exception:  # not a hub id, no huggingface_hub: nothing to compare with
            return None
    names = set()
    for f in found:
        if f.name.endswith(".index.json"):
            names |= set(read_json_object(f).get("weight_map") or {})
        else:
            names |= set(checks.safetensors_header(f)) - {"__metadata__"}
    return names or None


def _check_hf_modules(modules: list, base_model_name: str, architecture: str, where) -> None:
    """Refuse an export PEFT could not place: a module path the HF model does not have."""
    names = _hf_tensor_names(base_model_name)
    if names is None:
        if architecture not in _LORA_PATHS_VERIFIED:
            raise UserError(f"{where}: mlx-lm's module names for model_type {architecture!r} are not verified to be "
                            "transformers'; pass --model a local copy of the HF model to check them against")
        return
    missing = [m for m in modules if f"{m}.weight" not in names]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"{where}: the HF model {base_model_name} has no module {missing[0]!r}{more}: "
                        "mlx-lm names it differently, so PEFT could not place the adapter")


def _lora_export(pf, base_model_name: str):
    """(PEFT's tensors, adapter_config.json) for a LoRA file; alpha = scale * r so that PEFT's alpha / r is our scale."""
    from .methods import parse
    from .methods.lora import adapted

    method, params = parse(pf, pf.path)
    options, flat = method.options, dict(tree_flatten(params))
    modules = adapted(flat)
    ranks = set()
    for m in modules:
        a, b = flat.get(f"{m}.lora_a"), flat.get(f"{m}.lora_b")
        if a is None or b is None or a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise UserError(f"{pf.path}: adapter {m!r} lacks lora_a [in, r] or lora_b [r, out]")
        ranks.add(int(a.shape[1]))
    if not modules or set(flat) != {f"{m}.lora_{k}" for m in modules for k in "ab"}:
        raise UserError(f"{pf.path}: not a LoRA file (tensors other than <module>.lora_a / .lora_b)")
    if len(ranks) != 1:
        raise UserError(f"{pf.path}: its adapters have ranks {sorted(ranks)}; a PEFT adapter has one r")
    _check_hf_modules(modules, base_model_name, pf.metadata.get("base_architecture", "?"), pf.path)
    r = ranks.pop()
    alpha = float(options.scale) * r
    alpha = int(alpha) if alpha.is_integer() else alpha
    return lora_to_peft(flat), lora_adapter_config(r, alpha, modules, base_model_name)


def export_peft(path, out_dir, base_model_name: Optional[str] = None) -> Path:
    """Write the soft prompt (prefix, LoRA) in `path` as a PEFT prompt-tuning (prefix-tuning, LoRA) adapter `out_dir`."""
    pf = prompt_file.load(path)
    if pf.method not in ("softprompt", "prefix", "lora"):
        raise UserError(f"{path}: a {pf.method!r} file; only soft prompts, prefix tuning and LoRA export to PEFT")
    base_model_name = base_model_of(pf, base_model_name)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a directory")
    if pf.method == "lora":
        tensors, config = _lora_export(pf, base_model_name)
        scale = 1.0
    elif pf.method == "prefix":
        layers = _prefix_layers(pf)
        H, n, hd = layers["0"]["keys"].shape
        config = prefix_adapter_config(n, len(layers), H, hd, base_model_name)
        P, scale = prefix_to_peft(layers), 1.0
    else:
        P = pf.prompt
        n, d = P.shape
        num_layers, num_heads = _base_shape(base_model_name)
        config = adapter_config(n, d, base_model_name, num_layers, num_heads)
        scale = peft_scale(pf.metadata.get("base_architecture", "?"), d)

    meta = {"format": "pt"}  # what PEFT/transformers write for torch tensors
    meta.update({META_PREFIX + k: v for k, v in pf.metadata.items()})
    meta[META_PREFIX + "peft_scale"] = repr(scale)
    if prompt_file.SKETCH_KEY in pf.tensors:
        sketch = np.array(pf.tensors[prompt_file.SKETCH_KEY].astype(mx.float32))
        meta[SKETCH_META] = json.dumps({"shape": list(sketch.shape),
                                        "f32": base64.b64encode(sketch.tobytes()).decode()})
    if pf.method != "lora":
        tensors = {TENSOR_KEY: P if scale == 1.0 else (P.astype(mx.float32) * scale).astype(P.dtype)}
    mx.eval(tensors)
    # weights first, then the config that announces them; each file atomically
    files.atomic_write(out_dir / WEIGHTS_NAME,
                                   lambda tmp: mx.save_safetensors(tmp, tensors, metadata=meta))
    text = json.dumps(config, indent=2) + "\n"
    files.write_text(out_dir / CONFIG_NAME, text)
    return out_dir


def _read_config(adapter_dir: Path) -> dict:
    path = adapter_dir / CONFIG_NAME
    if not path.is_file():
        raise UserError(f"{adapter_dir}: no {CONFIG_NAME} (not a PEFT adapter directory)")
    config = read_json_object(path)
    peft_type = config.get("peft_type")
    if peft_type not in ("PROMPT_TUNING", "PREFIX_TUNING", "LORA"):
        raise UserError(f"{path}: peft_type is {peft_type!r}; only PROMPT_TUNING (a soft prompt), "
                        "PREFIX_TUNING and LORA adapters are read")
    if peft_type == "LORA":
        return _check_lora_config(config, path)
    if peft_type == "PREFIX_TUNING":
        for key in ("num_layers", "num_attention_heads"):
            if not isinstance(config.get(key), int) or config[key] <= 0:
                raise UserError(f"{path}: field {key!r} must be a positive integer (got {config.get(key)!r})")
    if config.get("task_type", "CAUSAL_LM") != "CAUSAL_LM":
        raise UserError(f"{path}: task_type is {config.get('task_type')!r}; only CAUSAL_LM is supported")
    if int(config.get("num_transformer_submodules") or 1) != 1:
        raise UserError(f"{path}: num_transformer_submodules is {config['num_transformer_submodules']}; "
                        "only decoder-only (1) adapters are supported")
    for key in ("num_virtual_tokens", "token_dim"):
        if not isinstance(config.get(key), int) or config[key] <= 0:
            raise UserError(f"{path}: field {key!r} must be a positive integer (got {config.get(key)!r})")
    return config


def _check_lora_config(config: dict, path) -> dict:
    """A LORA adapter_config.json our LoRA (one rank, one scale, y = W x + scale * B A x) can represent."""
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise UserError(f"{path}: task_type is {config.get('task_type')!r}; only CAUSAL_LM is supported")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise UserError(f"{path}: field 'r' must be a positive integer (got {r!r})")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise UserError(f"{path}: field 'lora_alpha' must be a number (got {alpha!r})")
    for key, why in _LORA_REFUSED.items():
        if config.get(key):  # null, false, [] and {} all mean "not used"
            raise UserError(f"{path}: {key} is set ({json.dumps(config[key])[:60]}): {why}, which "
                            "mlx-softprompt's LoRA does not represent")
    if config.get("bias", "none") != "none":
        raise UserError(f"{path}: bias is {config['bias']!r}: the adapter carries trained biases of the base, "
                        "which mlx-softprompt's LoRA does not represent (only 'none')")
    for key, default in (("rank_pattern", r), ("alpha_pattern", alpha)):
        pattern = config.get(key) or {}
        odd = {k: v for k, v in pattern.items() if v != default} if isinstance(pattern, dict) else pattern
        if odd:
            raise UserError(f"{path}: {key} gives some modules other values than {default} ({json.dumps(odd)[:60]}); "
                            "mlx-softprompt's LoRA has one rank and one scale for every module")
    return config


def _read_safetensors(adapter_dir: Path):
    """(tensors, metadata) of the adapter's safetensors file; never a pickle."""
    path = adapter_dir / WEIGHTS_NAME
    if not path.is_file():
        pickled = [p.name for p in adapter_dir.glob("adapter_model.*")]
        found = f" (found {', '.join(pickled)})" if pickled else ""
        raise UserError(f"{adapter_dir}: no {WEIGHTS_NAME}{found}; only safetensors are read")
    files.check_safetensors(path)
    try:
        return mx.load(str(path), return_metadata=True)
    except Exception as e:
        raise UserError(f"{path}: cannot read safetensors ({e})".splitlines()[0])


def _read_weights(adapter_dir: Path, config: dict):
    path = adapter_dir / WEIGHTS_NAME
    tensors, meta = _read_safetensors(adapter_dir)
    P = tensors.get(TENSOR_KEY)
    if P is None:
        raise UserError(f"{path}: no tensor {TENSOR_KEY!r} (found {', '.join(sorted(tensors)) or 'none'})")
    n, d = config["num_virtual_tokens"], config["token_dim"]
    if config["peft_type"] == "PREFIX_TUNING":  # [n, layers * 2 * token_dim] (what PEFT saves, projected or not)
        d = config["num_layers"] * 2 * d
    if tuple(P.shape) != (n, d):
        says = f"num_virtual_tokens={n}, token_dim={config['token_dim']}"
        if config["peft_type"] == "PREFIX_TUNING":
            says += f", num_layers={config['num_layers']} (so [{n}, {d}])"
        raise UserError(f"{path}: tensor {TENSOR_KEY!r} has shape {list(P.shape)}, but {CONFIG_NAME} says {says}")
    P = P.astype(mx.float32)
    if not bool(mx.all(mx.isfinite(P)).item()):
        raise UserError(f"{path}: {TENSOR_KEY!r} holds NaN or infinite values")
    return P, meta


def _exported_fingerprint(meta: dict) -> Optional[dict]:
    """The base fingerprint an mlx-softprompt export carries, or None for a foreign adapter."""
    m = {k[len(META_PREFIX):]: v for k, v in meta.items() if k.startswith(META_PREFIX)}
    if "base_embedding_hash" not in m:
        return None
    sketch = np.zeros(0, dtype=np.float32)
    if SKETCH_META in meta:
        try:
            s = json.loads(meta[SKETCH_META])
            sketch = np.frombuffer(base64.b64decode(s["f32"]), dtype=np.float32).reshape(s["shape"])
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{WEIGHTS_NAME}: corrupt {SKETCH_META} metadata")
    return {
        "architecture": m.get("base_architecture", "?"),
        "hidden_size": checks.int_string(m, "base_hidden_size", WEIGHTS_NAME, optional=True) or -1,
        "vocab_size": checks.int_string(m, "base_vocab_size", WEIGHTS_NAME, optional=True) or -1,
        "embedding_hash": m["base_embedding_hash"],
        "sketch": sketch,
        "probes": models.decode_probes(m[prompt_file.PROBES_KEY], WEIGHTS_NAME) if prompt_file.PROBES_KEY in m else None,
    }


def import_peft(adapter_dir, out, model: str) -> Path:
    """Read a PEFT prompt-tuning (prefix-tuning, LoRA) adapter into a method file `out` for the MLX base `model`."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise UserError(f"{adapter_dir}: no such adapter directory")
    config = _read_config(adapter_dir)
    if config["peft_type"] == "LORA":
        return _import_lora(adapter_dir, out, config, model)
    P, meta = _read_weights(adapter_dir, config)

    base, _, base_config = models.load(model)
    hidden = models.hidden_size(base)
    if config["peft_type"] == "PREFIX_TUNING":
        return _import_prefix(adapter_dir, out, config, P, meta, base, base_config, model)
    if P.shape[1] != hidden:
        raise UserError(f"{adapter_dir}: token_dim {P.shape[1]} does not match the hidden size {hidden} of {model}")
    _check_fingerprint(adapter_dir, meta, base, base_config)
    scale = peft_scale(str(base_config.get("model_type", "?")), hidden)
    if scale != 1.0:
        P = P / scale
    carried = _carried(meta, config)
    if META_PREFIX + "method_options" in meta and meta.get(META_PREFIX + "method", "softprompt") == "softprompt":
        carried["method_options"] = meta[META_PREFIX + "method_options"]
    carried["method"] = "softprompt"
    return prompt_file.save(out, {"soft_prompt": P}, base, base_config, **carried)


def _check_fingerprint(adapter_dir, meta, base, base_config) -> None:
    ours = _exported_fingerprint(meta)
    if ours is not None:
        theirs = models.fingerprint(base, base_config)
        why = models.fingerprint_mismatch(ours, theirs)
        if why:
            raise UserError(f"{adapter_dir}: exported for base {models.short(ours)}, but the model given "
                            f"({models.short(theirs)}) is not that base or a quantized copy: {why}")


def _carried(meta: dict, config: dict) -> dict:
    """Our metadata an export carried (minus what is the new file's own), and PEFT's base name."""
    carried = {k[len(META_PREFIX):]: v for k, v in meta.items()
               if k.startswith(META_PREFIX) and k not in (SKETCH_META, META_PREFIX + "peft_scale")}
    carried = {k: v for k, v in carried.items() if k not in _OWN_KEYS | {"method", "method_options"}}
    if config.get("base_model_name_or_path"):
        carried.setdefault("peft_base_model", str(config["base_model_name_or_path"]))
    return carried


def _import_prefix(adapter_dir, out, config, weight, meta, base, base_config, model) -> Path:
    """A PEFT PREFIX_TUNING adapter as a prefix-tuning method file for `base`."""
    from . import methods

    _check_fingerprint(adapter_dir, meta, base, base_config)
    layers = prefix_from_peft(weight, config["num_layers"], config["num_attention_heads"])
    method = methods.get("prefix", num_tokens=int(weight.shape[0]))
    try:
        method.check_params({"prefix": layers}, base, adapter_dir / CONFIG_NAME)
    except UserError as e:
        raise UserError(f"{adapter_dir}: does not fit {model}: {str(e).split(': ', 1)[-1]}") from None
    return method.save(out, {"prefix": layers}, base, base_config, **_carried(meta, config))


def _lora_options(config: dict, flat: dict, meta: dict, num_layers: int) -> dict:
    """Our LoRA options for PEFT's config: scale = lora_alpha / r (/ sqrt(r) with rsLoRA); layers and
    keys describe the modules the tensors adapt. An export of ours gets its own options back."""
    from .methods.lora import adapted

    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    if meta.get(META_PREFIX + "method") == "lora" and META_PREFIX + "method_options" in meta:
        try:
            ours = json.loads(meta[META_PREFIX + "method_options"])
            if ours.get("rank") == r and math.isclose(float(ours.get("scale")), scale, rel_tol=1e-6):
                return ours
        except (ValueError, TypeError, AttributeError):
            pass  # malformed: described from the config like a foreign adapter
    layers, keys = [], set()
    for module in adapted(flat):
        m = re.search(r"(?:^|\.)layers\.(\d+)\.(.+)$", module)
        if m:
            layers.append(int(m[1]))
        keys.add(m[2] if m else module)
    return {"rank": r, "scale": scale, "layers": num_layers - min(layers) if layers else 1, "keys": sorted(keys)}


def _import_lora(adapter_dir, out, config, model) -> Path:
    """A PEFT LORA adapter as a LoRA method file for the MLX base `model`."""
    from . import methods
    from .methods.base import nest

    path = adapter_dir / WEIGHTS_NAME
    tensors, meta = _read_safetensors(adapter_dir)
    flat = lora_from_peft(tensors, path)
    for key, v in flat.items():
        if key.endswith(".lora_a") and v.shape[1] != config["r"]:
            raise UserError(f"{path}: {key[:-len('.lora_a')]} has rank {v.shape[1]}, but {CONFIG_NAME} says r={config['r']}")
        if not bool(mx.all(mx.isfinite(v)).item()):
            raise UserError(f"{path}: the adapter of {key.rsplit('.', 1)[0]} holds NaN or infinite values")
    if not flat:
        raise UserError(f"{path}: no LoRA tensors")

    base, _, base_config = models.load(model)
    _check_fingerprint(adapter_dir, meta, base, base_config)
    options = _lora_options(config, flat, meta, len(methods.decoder_layers(base)))
    method = methods.get("lora", options)
    params = nest(flat)
    try:
        method.check_params(params, base, adapter_dir / CONFIG_NAME)
    except UserError as e:
        raise UserError(f"{adapter_dir}: does not fit {model}: {str(e).split(': ', 1)[-1]}") from None
    return method.save(out, params, base, base_config, **_carried(meta, config))
