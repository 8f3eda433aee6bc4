"""Loading base models and injecting a soft prompt through the embedding layer.

Injection works for every mlx-lm architecture, including the many whose
``__call__`` takes no ``input_embeddings``: the model's own token-embedding
module is given a subclass whose lookup replaces the first ``n`` positions of
the sequence with the soft prompt P while injection is armed. Parameter paths,
tied output heads (``as_linear``), quantized embeddings and the model's own
embedding scaling (Gemma multiplies by sqrt(d) after the lookup) all stay as
they are, so P lives exactly where HF PEFT's prompt-tuning embeddings live.

Convention: a sequence that carries P starts with ``n`` placeholder ids
(``PLACEHOLDER_ID``), before BOS, as PEFT places its virtual tokens.
"""

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import UserError

PLACEHOLDER_ID = 0
SKETCH_ROWS = 256
SKETCH_DIM = 16


# ---------------------------------------------------------------- loading


def resolve_model_path(path_or_repo: str) -> Path:
    """A local directory, or a hub id fetched (safetensors only) into the HF cache."""
    p = Path(path_or_repo).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise UserError(f"{p}: not a model directory (no config.json)")
        return p
    if str(path_or_repo).startswith((".", "/", "~")) or str(path_or_repo).count("/") != 1:
        raise UserError(f"{path_or_repo}: no such model directory (and not a hub id like org/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(
            path_or_repo,
            allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"],
        ))
    except Exception as e:  # network, auth, missing repo: one line for the user
        raise UserError(f"{path_or_repo}: could not fetch from the Hugging Face hub ({type(e).__name__}: {e})")


# config fields every architecture sizes its arrays by: positive integers when present
CONFIG_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "max_position_embeddings", "head_dim", "n_embd", "n_layer",
                "n_head", "n_positions")


CONFIG_POSITIVE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                   "max_position_embeddings", "n_embd", "n_layer", "n_head", "n_positions")


def read_config(path: Path) -> dict:
    """config.json of a model directory, its size fields checked (a wrong type would fail deep in mlx-lm)."""
    from . import checks

    cpath = Path(path) / "config.json"
    config = checks.read_json(cpath, "config.json", constants=True)
    if not isinstance(config, dict):
        raise UserError(f"{cpath}: expected a JSON object")
    for c, prefix in ((config, ""), (config.get("text_config"), "text_config.")):
        if not isinstance(c, dict):
            continue
        for k in CONFIG_SIZES:
            if c.get(k) is not None:  # 0 is legal for some (a MoE model's dense intermediate_size)
                checks.number(checks.of_type(c[k], int, f"{cpath}: field {prefix + k!r}"),
                              f"{cpath}: field {prefix + k!r}", lo=1 if k in CONFIG_POSITIVE else 0, hi=2**40,
                              integer=True)
    return config


def load(path_or_repo: str, lazy: bool = False):
    """Load (model, tokenizer, config) with mlx-lm; safetensors only, never remote code."""
    from mlx_lm.utils import load_model, load_tokenizer

    from . import checks

    path = resolve_model_path(path_or_repo)
    config = read_config(path)
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise UserError(f"{path}: no *.safetensors weights (only safetensors are read)")
    for w in weights:  # a truncated or damaged file: one line naming it, not MLX's error or a crash
        checks.safetensors_header(w)
    # transformers 5 writes many fields where mlx-lm does not look; without this an HF
    # directory fails to load or, worse, loads silently wrong (see hf_config.py)
    from .hf_config import mlx_lm_config

    try:
        model, config = load_model(path, lazy=lazy, model_config=mlx_lm_config(config, str(path)),
                                   trust_remote_code=False)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise UserError(f"{path}: cannot build model: {type(e).__name__}: {e}".splitlines()[0])
    tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    model.eval()
    return model, tokenizer, config


# ---------------------------------------------------------------- the embedding


def find_embedding(model: nn.Module) -> nn.Module:
    """The token-embedding module: the (quantized) Embedding with the most rows."""
    best, rows = None, -1
    for _, m in model.named_modules():
        if isinstance(m, (nn.Embedding, nn.QuantizedEmbedding)):
            r = _rows(m)
            if r > rows:
                best, rows = m, r
    if best is None:
        raise UserError(f"{type(model).__module__}: no token-embedding layer found")
    return best


def _rows(emb: nn.Module) -> int:
    return emb.weight.shape[0]


def hidden_size(model: nn.Module) -> int:
    return embed_rows(model, [0]).shape[-1]


def embed_rows(model: nn.Module, ids) -> mx.array:
    """Raw embedding rows (dequantized, before any model scaling) for token ids."""
    emb = find_embedding(model)
    with disarmed(emb):
        return emb(mx.array(ids, dtype=mx.int32))


class _Slot:
    """Plain holder (not an mlx parameter) for the prompt being injected."""

    def __init__(self):
        self.prompt: Optional[mx.array] = None


_SOFT_CLASSES = {}


def _soft_class(cls):
    if cls not in _SOFT_CLASSES:

        def __call__(self, x):
            h = cls.__call__(self, x)
            P = self._softprompt.prompt
            if P is None:
                return h
            n = P.shape[0]
            if h.shape[-2] < n:
                raise ValueError(f"sequence of {h.shape[-2]} positions is shorter than the {n}-token soft prompt")
            P = P.astype(h.dtype)
            if h.ndim == 3:
                P = mx.broadcast_to(P[None], (h.shape[0],) + P.shape)
            return mx.concatenate([P, h[..., n:, :]], axis=-2)

        _SOFT_CLASSES[cls] = type(f"SoftPrompt{cls.__name__}", (cls,), {"__call__": __call__})
    return _SOFT_CLASSES[cls]


def attach(model: nn.Module) -> nn.Module:
    """Make the model's embedding able to take a soft prompt (idempotent); returns it."""
    emb = find_embedding(model)
    if not hasattr(emb, "_softprompt"):
        emb._softprompt = _Slot()
        emb.__class__ = _soft_class(type(emb))
    return emb


def detach(model: nn.Module) -> None:
    """Undo `attach`: the embedding is again exactly the model's own class."""
    emb = find_embedding(model)
    if hasattr(emb, "_softprompt"):
        emb.__class__ = emb.__class__.__mro__[1]
        del emb.__dict__["_softprompt"]


@contextmanager
def injected(model: nn.Module, prompt: mx.array):
    """While active, every forward pass replaces its first n positions with `prompt`."""
    emb = attach(model)
    old = emb._softprompt.prompt
    emb._softprompt.prompt = prompt
    try:
        yield
    finally:
        emb._softprompt.prompt = old


@contextmanager
def disarmed(emb: nn.Module):
    slot = getattr(emb, "_softprompt", None)
    old = slot.prompt if slot else None
    if slot:
        slot.prompt = None
    try:
        yield
    finally:
        if slot:
            slot.prompt = old


def with_placeholders(ids, n: int) -> mx.array:
    """Prepend n placeholder ids (where P goes) to a [L] or [B, L] id array."""
    ids = mx.array(ids) if not isinstance(ids, mx.array) else ids
    pad = mx.full(ids.shape[:-1] + (n,), PLACEHOLDER_ID, dtype=ids.dtype)
    return mx.concatenate([pad, ids], axis=-1)


def forward(model: nn.Module, ids, prompt: Optional[mx.array] = None, cache=None) -> mx.array:
    """Logits of [P; ids] ([B, n+L, V]) or of ids alone when prompt is None."""
    ids = mx.array(ids) if not isinstance(ids, mx.array) else ids
    if ids.ndim == 1:
        ids = ids[None]
    if prompt is None:
        return model(ids, cache=cache)
    with injected(model, prompt):
        return model(with_placeholders(ids, prompt.shape[0]), cache=cache)


def prefix_cache(model: nn.Module, prompt: Optional[mx.array]):
    """A fresh mlx-lm prompt cache holding P's keys/values (offset n), or empty if no P.

    P does not depend on the conversation (causal attention), so this is
    computed once and reused for every request: P costs no prefill.
    """
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    if prompt is not None:
        with injected(model, prompt):
            model(mx.full((1, prompt.shape[0]), PLACEHOLDER_ID, dtype=mx.int32), cache=cache)
        mx.eval([c.state for c in cache])
    return cache


# ---------------------------------------------------------------- fingerprint


PROBE_WIDTH = 128  # elements per probed weight: whole quantization groups of 32, 64 or 128
PROBE_LIMIT = 4096  # weights probed at most (all of them in any model up to ~400 layers)


def _probe_targets(model: nn.Module):
    """(path, module) of every module holding a weight, in a fixed order, LoRA wrappers seen through."""
    out = []
    for path, m in model.named_modules():
        w = getattr(m, "weight", None) if "weight" in m else None
        if not isinstance(w, mx.array) or w.ndim < 1:
            continue
        parts = path.split(".")
        if len(parts) > 1 and parts[-1] == "linear":  # mlx-lm's LoRALinear keeps the base layer as .linear
            parent = model
            for p in parts[:-1]:
                parent = parent[int(p)] if isinstance(parent, list) else getattr(parent, p)
            if hasattr(parent, "lora_a"):
                path = ".".join(parts[:-1])
        out.append((path, m))
    return sorted(out, key=lambda pm: pm[0])[:PROBE_LIMIT]


def _spot(path: str, rows: int, cols: int) -> tuple:
    h = int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "little")
    width = min(PROBE_WIDTH, cols)
    return h % rows, ((h >> 32) % max(1, cols // width)) * width, width


def _probe(path: str, m: nn.Module) -> tuple:
    """(kind, values [width] float32): a fixed window of one row of the module's weight, dequantized.

    kind is the dtype ("bfloat16") or, for a quantized weight, "q<bits>:<group>:<mode>:<dtype of scales>",
    which says how to requantize a full-precision copy for an exact comparison.
    """
    w = m.weight
    if "scales" in m:
        bits, group, mode = int(m.bits), int(m.group_size), str(getattr(m, "mode", "affine"))
        cols = m.scales.shape[-1] * group
        r, c, width = _spot(path, w.shape[0], cols)
        biases = m["biases"] if "biases" in m else None
        row = mx.dequantize(w[r:r + 1], m.scales[r:r + 1], None if biases is None else biases[r:r + 1],
                            group_size=group, bits=bits, mode=mode)
        vals = row[0, c:c + width]
        kind = f"q{bits}:{group}:{mode}:{str(m.scales.dtype).replace('mlx.core.', '')}"
    else:
        flat = w.reshape(w.shape[0], -1) if w.ndim > 1 else w.reshape(1, -1)
        r, c, width = _spot(path, flat.shape[0], flat.shape[1])
        vals = flat[r, c:c + width]
        kind = str(w.dtype).replace("mlx.core.", "")
    return kind, np.array(vals.astype(mx.float32))


def probes(model: nn.Module) -> dict:
    """The model's probes: {"index": [[path, kind, width], ...], "values": [K, PROBE_WIDTH] float32}."""
    index, values = [], []
    for path, m in _probe_targets(model):
        kind, v = _probe(path, m)
        index.append([path, kind, int(v.size)])
        values.append(np.pad(v, (0, PROBE_WIDTH - v.size)))
    return {"index": index, "values": np.stack(values).astype(np.float32) if values else
            np.zeros((0, PROBE_WIDTH), np.float32)}


def encode_probes(p: dict) -> str:
    """Probes as one string (safetensors metadata are strings): JSON index + base64 float32 values."""
    import base64

    return json.dumps({"index": p["index"], "f32": base64.b64encode(p["values"].tobytes()).decode()})


def decode_probes(s: str, where: str) -> dict:
    import base64

    try:
        d = json.loads(s)
        index = [[str(a), str(b), int(c)] for a, b, c in d["index"]]
        values = np.frombuffer(base64.b64decode(d["f32"], validate=True), dtype=np.float32)
        values = values.reshape(len(index), PROBE_WIDTH)
        if any(not 0 < w <= PROBE_WIDTH for _, _, w in index):
            raise ValueError
    except (ValueError, KeyError, TypeError, json.JSONDecodeError):
        raise UserError(f"{where}: corrupt base fingerprint (metadata 'base_probes')")
    return {"index": index, "values": values}


_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def _requantize(values: np.ndarray, kind: str) -> Optional[np.ndarray]:
    """What a quantized copy of these full-precision values holds (mlx-lm quantizes this way)."""
    bits, group, mode, dtype = kind[1:].split(":")
    if values.size % int(group) or dtype not in _DTYPES:
        return None
    x = mx.array(values)[None].astype(_DTYPES[dtype])
    q = mx.quantize(x, group_size=int(group), bits=int(bits), mode=mode)
    w, scales = q[0], q[1]
    biases = q[2] if len(q) > 2 else None
    return np.array(mx.dequantize(w, scales, biases, group_size=int(group), bits=int(bits),
                                  mode=mode).astype(mx.float32))[0]


def _cast(values: np.ndarray, dtype: str) -> np.ndarray:
    return np.array(mx.array(values).astype(_DTYPES.get(dtype, mx.float32)).astype(mx.float32))


def _steps(values: np.ndarray, kind: str) -> np.ndarray:
    """Per-element quantization step of values quantized as `kind` (group range / levels)."""
    bits, group = int(kind[1:].split(":")[0]), int(kind[1:].split(":")[1])
    g = values.reshape(-1, group) if values.size % group == 0 else values.reshape(1, -1)
    step = (g.max(axis=1) - g.min(axis=1)) / (2 ** bits - 1)
    return np.repeat(step, g.shape[1])


def probe_differs(a: np.ndarray, ka: str, b: np.ndarray, kb: str) -> int:
    """How many elements of one probe disagree, once both are put on the same footing:

    - both full precision: the stored values rounded to the given dtype must equal it exactly;
    - one quantized: the other is quantized the same way (requantized), then they must be equal;
    - both quantized, differently: they must lie within half a step of each other's grid.
    """
    qa, qb = ka.startswith("q"), kb.startswith("q")
    if not qa and not qb:
        lo = ka if ka in _DTYPES and kb in _DTYPES and _precision(ka) < _precision(kb) else kb
        x, y = _cast(a, lo), _cast(b, lo)
        return int(np.sum(x != y))
    if qa and qb and ka != kb:
        tol = _steps(a, ka) / 2 + _steps(b, kb) / 2 + 1e-6 * np.abs(a)
        return int(np.sum(np.abs(a - b) > tol))
    if qa and qb:
        x, y = a, b
    elif qb:
        x, y = _requantize(a, kb), b
    else:
        x, y = a, _requantize(b, ka)
    if x is None or y is None:
        return a.size
    tol = 1e-5 * np.maximum(np.abs(x), np.abs(y)) + 1e-9
    return int(np.sum(np.abs(x - y) > tol))


def _precision(dtype: str) -> int:
    return {"float32": 24, "float16": 11, "bfloat16": 8}[dtype]


def compare_probes(stored: dict, given: dict) -> Optional[str]:
    """None when `given` is the stored model or a quantized / cast copy of it; else why not."""
    have = {path: (kind, w, i) for i, (path, kind, w) in enumerate(given["index"])}
    missing = [p for p, _, _ in stored["index"] if p not in have]
    if len(missing) > len(stored["index"]) // 10:
        return f"its layers differ ({len(missing)} of {len(stored['index'])} weights missing, e.g. {missing[0]})"
    differ = []
    for i, (path, kind, width) in enumerate(stored["index"]):
        if path not in have:
            continue
        gk, gw, j = have[path]
        if gw != width:
            differ.append(path)
            continue
        bad = probe_differs(stored["values"][i, :width], kind, given["values"][j, :width], gk)
        if bad > max(1, width // 32):
            differ.append(path)
    if differ:
        return (f"its weights differ ({len(differ)} of {len(stored['index'])} probed weights, e.g. {differ[0]}): "
                "another model or a fine-tune of it, not a quantized copy")
    return None


def fingerprint(model: nn.Module, config: dict) -> dict:
    """Identify a base model cheaply, in a way that survives quantization and nothing else.

    ``embedding_hash`` hashes 256 fixed rows of the embedding matrix (exact
    identity, shown to users); ``probes`` is a fixed window of one row of every
    weight (see `compare_probes`: a quantized or cast copy matches exactly once
    requantized, a fine-tune does not); ``sketch`` (those embedding rows
    projected to 16 dims) is what files written before the probes carry.
    """
    emb = find_embedding(model)
    vocab = _rows(emb)
    ids = np.unique(np.linspace(0, vocab - 1, SKETCH_ROWS).astype(np.int64))
    rows = np.array(embed_rows(model, ids).astype(mx.float32))
    d = rows.shape[-1]
    proj = np.random.default_rng(0).standard_normal((d, SKETCH_DIM)).astype(np.float32) / np.sqrt(d)
    return {
        "architecture": str(config.get("model_type", type(model).__module__.split(".")[-1])),
        "hidden_size": int(d),
        "vocab_size": int(vocab),
        "embedding_hash": hashlib.sha256(rows.astype(np.float16).tobytes()).hexdigest()[:16],
        "sketch": (rows @ proj).astype(np.float32),
        "probes": probes(model),
    }


def short(fp: dict) -> str:
    return f"{fp['architecture']}/d={fp['hidden_size']}/V={fp['vocab_size']}/{fp['embedding_hash']}"


def fingerprint_mismatch(a: dict, b: dict) -> Optional[str]:
    """None when b is the base a was made for, or a quantized / cast copy of it; else why not."""
    if str(a["architecture"]) != str(b["architecture"]):
        return f"architecture {a['architecture']} vs {b['architecture']}"
    for k in ("hidden_size", "vocab_size"):
        if int(a[k]) != int(b[k]):
            return f"{k.replace('_', ' ')} {a[k]} vs {b[k]}"
    if a.get("probes") is not None and b.get("probes") is not None:
        return compare_probes(a["probes"], b["probes"])
    return None if _sketch_match(a, b) else "its embedding differs"


def fingerprints_match(a: dict, b: dict) -> bool:
    return fingerprint_mismatch(a, b) is None


def _sketch_match(a: dict, b: dict) -> bool:
    """Files without probes: the same embedding (exact hash) or a sketch correlation >= 0.9."""
    if a["embedding_hash"] == b["embedding_hash"]:
        return True
    sa, sb = np.asarray(a["sketch"]).ravel(), np.asarray(b["sketch"]).ravel()
    if sa.shape != sb.shape or not sa.size:
        return False
    sa, sb = sa - sa.mean(), sb - sb.mean()
    den = float(np.linalg.norm(sa) * np.linalg.norm(sb))
    return den > 0 and float(sa @ sb) / den >= 0.9
