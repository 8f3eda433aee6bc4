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


def load(path_or_repo: str, lazy: bool = False):
    """Load (model, tokenizer, config) with mlx-lm; safetensors only, never remote code."""
    from mlx_lm.utils import load_model, load_tokenizer

    path = resolve_model_path(path_or_repo)
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path / 'config.json'}: invalid JSON ({e.msg} at line {e.lineno})")
    if not list(path.glob("*.safetensors")):
        raise UserError(f"{path}: no *.safetensors weights (only safetensors are read)")
    # transformers 5 writes many fields where mlx-lm does not look; without this an HF
    # directory fails to load or, worse, loads silently wrong (see hf_config.py)
    from .hf_config import mlx_lm_config

    try:
        model, config = load_model(path, lazy=lazy, model_config=mlx_lm_config(config, str(path)),
                                   trust_remote_code=False)
    except ValueError as e:
        raise UserError(f"{path}: cannot build model: {e}".splitlines()[0])
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


def fingerprint(model: nn.Module, config: dict) -> dict:
    """Identify a base model cheaply, in a way that survives quantization.

    ``embedding_hash`` hashes 256 fixed rows of the embedding matrix (exact
    identity); ``sketch`` is those rows projected to 16 dims (a quantized copy
    of the same base correlates > 0.9 with it; another model does not).
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
    }


def short(fp: dict) -> str:
    return f"{fp['architecture']}/d={fp['hidden_size']}/V={fp['vocab_size']}/{fp['embedding_hash']}"


def fingerprints_match(a: dict, b: dict) -> bool:
    """Same base (exact hash) or a quantized/cast copy of it (sketch correlation >= 0.9)."""
    if str(a["architecture"]) != str(b["architecture"]):
        return False
    for k in ("hidden_size", "vocab_size"):
        if int(a[k]) != int(b[k]):
            return False
    if a["embedding_hash"] == b["embedding_hash"]:
        return True
    sa, sb = np.asarray(a["sketch"]).ravel(), np.asarray(b["sketch"]).ravel()
    if sa.shape != sb.shape or not sa.size:
        return False
    sa, sb = sa - sa.mean(), sb - sb.mean()
    den = float(np.linalg.norm(sa) * np.linalg.norm(sb))
    return den > 0 and float(sa @ sb) / den >= 0.9
