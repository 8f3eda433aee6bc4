"""The record's prompt shared: [P; x] run once for all the rows that continue the same prompt x.

A teacher record gives two rows that start with the same prompt x: [x; r]
(the refusal) and [x; y] (the base's own answer); several samples of one
prompt give more. The plain step runs [P; x; continuation] for every row, so
x runs once per row. Here a batch runs in two stages:

1. the batch's distinct prompts (R of them, right-padded to the longest) run
   once against P's keys/values; each layer keeps their keys/values
   [R, H, n + X, hd], and the output at each prompt's last real position
   (it predicts the continuation's first token) is kept;
2. the continuations (B rows, right-padded) run against their prompt's
   keys/values, gathered by record index so that the gradient flows back to
   stage 1 and to P. The cache (``RecordKVCache``) masks the prompt's padding
   (``make_mask``: mlx-lm's ``create_attention_mask`` asks the cache for the
   mask) and gives every row its own RoPE offset n + len(x_i) (an array, as
   mlx-lm's ``BatchKVCache``; ``mx.fast.rope`` takes one offset per row).
   Short continuations (a tv/kl batch's refusals, next to longer responses)
   run as a second group padded to their own length when that saves enough.

The loss sees, per row, the logits of its target tokens only ([B, 1 + C]):
the same terms as the plain path, so the same loss and gradients.

Models whose layers do not all use a plain ``KVCache`` (sliding windows,
recurrent layers) or that do not take per-row offsets and array masks the
way the plain path needs (e.g. learned positions read as ``cache.offset``)
are detected by a probe (``supported``: the two-stage logits of a small batch
against the plain forward) and keep the plain layout.
"""

from functools import lru_cache
from typing import Optional, Sequence

import mlx.core as mx
import numpy as np

from . import batching

ATTR = "_mlx_softprompt_record_prompt"  # the probe's verdict, kept on the model object

# Rows per distinct prompt from which the record layout is used. Measured on the demo's teacher
# rows (docs/PERFORMANCE.md): tv/kl (about 2 rows a prompt) 1.37-1.75x the plain step's tokens/s;
# ce with one sample a prompt (1 row a prompt, nothing shared) 0.85-1.0x: two forward calls and
# two padded lengths (25 % padding against 7 %) for nothing.
MIN_ROWS_PER_PROMPT = 1.5


@lru_cache(maxsize=None)
def _classes():
    from mlx_lm.models.cache import KVCache

    from .methods.softprompt import _shared_cache_class

    class FillKVCache(KVCache):
        """Stage 1: P's keys/values (broadcast) or nothing, then the prompts' appended by concatenation
        (no preallocated buffer to slice-assign into), so the keys/values stay differentiable."""

        def update_and_fetch(self, keys, values):
            if self.keys is None:
                self.keys, self.values = keys, values
            else:
                self.keys = mx.concatenate([self.keys, keys], axis=2)
                self.values = mx.concatenate([self.values, values], axis=2)
            self.offset += keys.shape[2]
            return self.keys, self.values

    class RecordKVCache(_shared_cache_class()):
        """Stage 2: each row's [P | x_i padded] keys/values, its prompt's padding masked and its own
        RoPE offset (n + len(x_i), an array). A subclass of the shared prefix's cache: under
        --grad-checkpoint its keys/values enter mx.checkpoint as explicit inputs (memory.py)."""

        valid = None  # [B, 1, 1, K0] bool: which of the first K0 keys are a real prefix/prompt position

        def update_and_fetch(self, keys, values):
            self.keys = mx.concatenate([self.keys, keys], axis=2)
            self.values = mx.concatenate([self.values, values], axis=2)
            self.offset = self.offset + keys.shape[2]  # a new array: `+=` would move the layers' shared one
            return self.keys, self.values

        def make_mask(self, N: int, return_array: bool = False, window_size=None, **kwargs):
            if window_size is not None:
                raise ValueError("the record prompt's cache does not support sliding windows")
            B, K0 = self.valid.shape[0], self.valid.shape[-1]
            causal = mx.tril(mx.ones((N, N), dtype=mx.bool_))
            return mx.concatenate([mx.broadcast_to(self.valid, (B, 1, N, K0)),
                                   mx.broadcast_to(causal, (B, 1, N, N))], axis=-1)

    return FillKVCache, RecordKVCache


def fill_caches(model, prefix: Optional[Sequence], rows: int) -> list:
    """Stage-1 caches: a prefix's per-layer (keys, values) [1, H, n, hd] broadcast to `rows`, or empty."""
    from mlx_lm.models.cache import make_prompt_cache

    fill, _ = _classes()
    layers = len(make_prompt_cache(model)) if prefix is None else len(prefix)
    out = []
    for l in range(layers):
        c = fill()
        if prefix is not None:
            k, v = prefix[l]
            c.keys = mx.broadcast_to(k, (rows,) + k.shape[1:])
            c.values = mx.broadcast_to(v, (rows,) + v.shape[1:])
            c.offset = k.shape[2]
        out.append(c)
    return out


def _last(h: mx.array, lengths: mx.array) -> mx.array:
    """h[r, lengths[r] - 1] for every r: [R, X, D] -> [R, 1, D]."""
    return mx.take_along_axis(h, (lengths - 1).astype(mx.int32)[:, None, None], axis=1)


def forward(model, batch: dict, prefix: Optional[Sequence] = None) -> mx.array:
    """Outputs (logits, or hidden states inside memory.headless) at the rows' target positions:
    [B, 1 + C, V]. `prefix`: per-layer (keys, values) [1, H, n, hd] before every prompt, or None."""
    from . import memory

    prompts, lengths, record = batch["prompts"], batch["prompt_lengths"], batch["record"]
    R, X = prompts.shape
    n = 0 if prefix is None else int(prefix[0][0].shape[2])
    fill = fill_caches(model, prefix, R)
    with memory.headless(model) as head:  # the head on R last positions, not on R x X
        h = model(prompts, cache=fill)
    first = _last(h, lengths)
    if head is not None:
        first = head(first)
    _, record_cache = _classes()
    offsets = (n + lengths).astype(mx.int32)
    valid = mx.arange(n + X)[None] < offsets[:, None]

    def continue_(inputs, rec):
        cache = []
        for c in fill:
            rc = record_cache()
            rc.keys, rc.values = c.keys[rec], c.values[rec]
            rc.offset, rc.valid = offsets[rec], valid[rec][:, None, None, :]
            cache.append(rc)
        return model(inputs, cache=cache)

    if "inputs_short" in batch:  # the short continuations (refusals) apart, padded to their own length
        s, Cs = batch["inputs_short"].shape
        short = continue_(batch["inputs_short"], record[:s])
        rest = continue_(batch["inputs"], record[s:])
        short = mx.pad(short, [(0, 0), (0, rest.shape[1] - Cs), (0, 0)])
        rest = mx.concatenate([short, rest], axis=0)
    else:
        rest = continue_(batch["inputs"], record)
    return mx.concatenate([first[record].astype(rest.dtype), rest], axis=1)


def collate(rows: list, max_seq_length: int, topk_k: int = 0):
    """The record layout of `rows` -> (batch dict, real token count as train.collate counts it).

    prompts [R, X] (the distinct prompts, right-padded), prompt_lengths [R], record [B] (each
    row's prompt), inputs [B, C] (each row's continuation: its target minus the last token),
    targets / mask / top-k [B, 1 + C]: position 0 is predicted by the prompt's last token.
    Rows are ordered by continuation length; when that saves SPLIT_SAVING of the
    continuations' positions, the first s rows (a tv/kl batch's short refusals) run apart:
    inputs_short [s, Cs] and inputs [B - s, C].
    """
    # each row's target tokens (truncation included): the plain row's positions less its prompt's, plus one
    cont_of = [row.length(max_seq_length) - len(row.prompt) for row in rows]
    order = np.argsort(cont_of, kind="stable")  # the loss is a sum over rows: any order
    rows, cont = [rows[i] for i in order], [cont_of[i] for i in order]
    index, prompts, record = {}, [], []
    for row in rows:
        key = tuple(row.prompt)
        if key not in index:
            index[key] = len(prompts)
            prompts.append(row.prompt)
        record.append(index[key])
    R, B = len(prompts), len(rows)
    X = batching.padded_length(max(len(p) for p in prompts), max_seq_length)
    T = batching.padded_length(max(cont), max_seq_length)  # 1 + C target positions (>= 2: max_seq_length >= 2)
    p_ids = np.zeros((R, X), np.int32)
    for r, p in enumerate(prompts):
        p_ids[r, :len(p)] = p
    s = _split(cont, max_seq_length)
    inputs = np.zeros((B, T - 1), np.int32)
    a = batching.target_arrays(B, T, topk_k)
    for b, (row, t) in enumerate(zip(rows, cont)):
        inputs[b, :t - 1] = row.target[:t - 1]
        a["targets"][b, :t] = row.target[:t]
        a["mask"][b, :t] = 1.0
        batching.put_teacher(a, b, row, 0, t)
    batch = batching.to_batch({"prompts": p_ids, "prompt_lengths": np.array([len(p) for p in prompts], np.int32),
                               "record": np.array(record, np.int32)}, inputs, a, rows)
    if s:
        Cs = batching.padded_length(cont[s - 1], max_seq_length) - 1
        batch["inputs_short"] = mx.array(inputs[:s, :Cs])
        batch["inputs"] = mx.array(inputs[s:])
    ntok = sum(len(row.prompt) + t for row, t in zip(rows, cont))
    return batch, int(ntok)


def pays(rows: Sequence) -> bool:
    """Whether the training rows share prompts enough for the record layout (MIN_ROWS_PER_PROMPT)."""
    prompts = len({tuple(r.prompt) for r in rows})
    return bool(prompts) and len(rows) >= MIN_ROWS_PER_PROMPT * prompts


SPLIT_SAVING = 0.2


def _split(cont: list, max_seq_length: int) -> int:
    """How many of the (ascending) continuations run apart: the split that computes the fewest
    continuation positions, if it saves at least SPLIT_SAVING of them, else 0."""
    B = len(cont)
    C = batching.padded_length(cont[-1], max_seq_length) - 1
    best, at = B * C, 0
    for s in range(1, B):
        cost = s * (batching.padded_length(cont[s - 1], max_seq_length) - 1) + (B - s) * C
        if cost < best:
            best, at = cost, s
    return at if best <= (1 - SPLIT_SAVING) * B * C else 0


def positions(batch: dict, tokens: int) -> tuple:
    """(computed positions, real positions) of a batch (either layout), for the padding share.

    Plain: B x L computed, a row of t tokens has t - 1 real positions. Record layout: the
    prompts' R x X and the continuations' B x C computed; real are the prompts' own tokens
    (each once) and each row's continuation."""
    B = batch["weight"].shape[0]
    if "prompts" not in batch:
        return int(batch["inputs"].size), int(tokens - B)
    lengths = np.asarray(batch["prompt_lengths"])
    per_row = lengths[np.asarray(batch["record"])]
    real = int(lengths.sum()) + int(tokens - per_row.sum() - B)
    short = batch["inputs_short"].size if "inputs_short" in batch else 0
    return int(batch["prompts"].size + batch["inputs"].size + short), real


def supported(model) -> bool:
    """Whether `forward` gives the plain forward's outputs on this model (a probe, kept on the model).

    Plain KV caches in every layer (no sliding window, no recurrent state), then two prompts of
    different lengths with continuations of different lengths through both paths."""
    verdict = getattr(model, ATTR, None)
    if verdict is None:
        verdict = _probe(model)
        object.__setattr__(model, ATTR, verdict)
    return verdict


def _probe(model) -> bool:
    from . import models
    from .methods.softprompt import supports_shared_prefix

    try:
        if not supports_shared_prefix(model):
            return False
    except Exception:
        return False
    vocab = models.find_embedding(model).weight.shape[0]
    rng = np.random.default_rng(0)
    tok = lambda k: rng.integers(1, vocab, k).tolist()  # noqa: E731
    x1, x2 = tok(5), tok(2)
    seqs = [(x1, tok(2)), (x1, tok(4)), (x2, tok(6))]  # in collate's order (by continuation length)

    class _Row:
        def __init__(self, p, t):
            self.prompt, self.target, self.weight, self.soft, self.topk_ids = p, t, 1.0, False, None

        def length(self, m):
            return min(len(self.prompt) + len(self.target), m)

    try:
        with models.disarmed(models.find_embedding(model)):
            batch, _ = collate([_Row(p, t) for p, t in seqs], 1 << 20)
            got = forward(model, batch)
            # fp32 models agree to rounding; half-precision ones to a few of their ulps at the logits' scale
            rel = 1e-4 if got.dtype == mx.float32 else 3e-2
            got = got.astype(mx.float32)
            for b, (p, t) in enumerate(seqs):
                plain = model(mx.array([p + t[:-1]], dtype=mx.int32))[0, len(p) - 1:].astype(mx.float32)
                diff = float(mx.abs(got[b, :len(t)] - plain).max().item())
                if not diff <= rel * max(1.0, float(mx.abs(plain).max().item())):
                    return False
    except Exception:  # a model whose layers cannot take array offsets or masks
        return False
    return True
