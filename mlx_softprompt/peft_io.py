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
"""

import base64
import json
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

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


def export_peft(path, out_dir, base_model_name: Optional[str] = None) -> Path:
    """Write the soft prompt (or prefix) in `path` as a PEFT prompt-tuning (prefix-tuning) adapter `out_dir`."""
    pf = prompt_file.load(path)
    if pf.method not in ("softprompt", "prefix"):
        raise UserError(f"{path}: a {pf.method!r} file; only soft prompts and prefix tuning export to PEFT")
    base_model_name = base_model_of(pf, base_model_name)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a directory")
    if pf.method == "prefix":
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
    tensors = {TENSOR_KEY: P if scale == 1.0 else (P.astype(mx.float32) * scale).astype(P.dtype)}
    mx.eval(tensors)
    # weights first, then the config that announces them; each file atomically
    files.atomic_write(out_dir / WEIGHTS_NAME,
                                   lambda tmp: mx.save_safetensors(tmp, tensors, metadata=meta))
    text = json.dumps(config, indent=2) + "\n"
    files.atomic_write(out_dir / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    return out_dir


def _read_config(adapter_dir: Path) -> dict:
    path = adapter_dir / CONFIG_NAME
    if not path.is_file():
        raise UserError(f"{adapter_dir}: no {CONFIG_NAME} (not a PEFT adapter directory)")
    config = read_json_object(path)
    peft_type = config.get("peft_type")
    if peft_type not in ("PROMPT_TUNING", "PREFIX_TUNING"):
        raise UserError(f"{path}: peft_type is {peft_type!r}; only PROMPT_TUNING (a soft prompt) and "
                        "PREFIX_TUNING adapters are read")
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


def _read_weights(adapter_dir: Path, config: dict):
    path = adapter_dir / WEIGHTS_NAME
    if not path.is_file():
        pickled = [p.name for p in adapter_dir.glob("adapter_model.*")]
        found = f" (found {', '.join(pickled)})" if pickled else ""
        raise UserError(f"{adapter_dir}: no {WEIGHTS_NAME}{found}; only safetensors are read")
    files.check_safetensors(path)
    try:
        tensors, meta = mx.load(str(path), return_metadata=True)
    except Exception as e:
        raise UserError(f"{path}: cannot read safetensors ({e})".splitlines()[0])
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
    """Read a PEFT prompt-tuning adapter into a prompt file `out` for the MLX base `model`."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise UserError(f"{adapter_dir}: no such adapter directory")
    config = _read_config(adapter_dir)
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
