"""Calibrate the base fingerprint: quantized / cast copies must match, fine-tunes and other models must not.

For a base model, this builds its copies (fp16, bf16, 4- and 8-bit at group sizes 32/64/128,
as mlx-lm's `quantize_model` makes them) and its impostors (every weight perturbed at a relative
scale eps, as a short full fine-tune moves them; a LoRA-style low-rank update merged into the
attention projections of the last half of the layers; the embedding alone changed; a fine-tune
then quantized; another random model of the same shapes) and prints, for each, how many probed
weights differ and the decision, both ways round (file made on the original, model given = the
variant; and file made on the variant, model given = the original).

    python benchmarks/fingerprint.py                        # tiny random models, two sizes
    python benchmarks/fingerprint.py --model path/to/mlx    # a real model directory too
"""

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_softprompt import models  # noqa: E402


def perturbed(model, rel: float, seed: int = 0, only=None):
    """A copy of `model` with each selected weight w moved by rel * mean|w| * N(0, 1) (elementwise)."""
    m = copy.deepcopy(model)
    new = []
    for i, (k, v) in enumerate(tree_flatten(m.parameters())):
        if only is not None and not only(k):
            continue
        noise = mx.random.normal(v.shape, key=mx.random.key(seed * 100_003 + i))
        new.append((k, (v.astype(mx.float32) + rel * mx.abs(v.astype(mx.float32)).mean() * noise).astype(v.dtype)))
    m.update(tree_unflatten(new))
    mx.eval(m.parameters())
    return m


def lora_merged(model, rel: float = 1e-2, rank: int = 8, seed: int = 0):
    """A copy with W += B A (rank `rank`, ||BA|| = rel * ||W||) on q_proj/v_proj of the last half of the layers."""
    m = copy.deepcopy(model)
    layers = [k for k, _ in tree_flatten(m.parameters()) if k.endswith(("q_proj.weight", "v_proj.weight"))]
    n_layers = len({k.split(".layers.")[1].split(".")[0] for k in layers if ".layers." in k}) or 1
    new = []
    for i, (k, v) in enumerate(tree_flatten(m.parameters())):
        if k not in layers or int(k.split(".layers.")[1].split(".")[0]) < n_layers // 2:
            continue
        a = mx.random.normal((rank, v.shape[1]), key=mx.random.key(seed + 2 * i))
        b = mx.random.normal((v.shape[0], rank), key=mx.random.key(seed + 2 * i + 1))
        d = b @ a
        d = d * (rel * mx.linalg.norm(v.astype(mx.float32)) / mx.linalg.norm(d))
        new.append((k, (v.astype(mx.float32) + d).astype(v.dtype)))
    m.update(tree_unflatten(new))
    mx.eval(m.parameters())
    return m


def cast(model, dtype):
    m = copy.deepcopy(model)
    m.set_dtype(dtype)
    mx.eval(m.parameters())
    return m


def quantized(model, config, bits: int, group: int):
    from mlx_lm.utils import quantize_model

    m, _ = quantize_model(copy.deepcopy(model), dict(config), group, bits)
    mx.eval(m.parameters())
    return m


def variants(model, config, other=None):
    """(name, model, expected match) for the calibration table."""
    out = [("itself", model, True), ("float16 copy", cast(model, mx.float16), True),
           ("bfloat16 copy", cast(model, mx.bfloat16), True)]
    for bits in (4, 8):
        for group in (32, 64, 128):
            try:
                out.append((f"{bits}-bit g{group} copy", quantized(model, config, bits, group), True))
            except ValueError:
                pass  # a dimension not divisible by the group size
    bf = cast(model, mx.bfloat16)
    out.append(("4-bit g64 copy of its bfloat16 copy", quantized(bf, config, 4, 64), True))
    for rel in (1e-2, 1e-3, 1e-4, 1e-5):
        out.append((f"fine-tune: all weights moved {rel:g}", perturbed(model, rel), False))
    out.append(("fine-tune 1e-3, then 4-bit g64", quantized(perturbed(model, 1e-3), config, 4, 64), False))
    out.append(("LoRA (rank 8, 1e-2) merged in last half", lora_merged(model, 1e-2), False))
    out.append(("LoRA (rank 8, 1e-3) merged in last half", lora_merged(model, 1e-3), False))
    out.append(("embedding only moved 1e-3", perturbed(model, 1e-3, only=lambda k: "embed" in k), False))
    out.append(("norms only moved 1e-3", perturbed(model, 1e-3, only=lambda k: "norm" in k), False))
    if other is not None:
        out.append(("another model, same shapes", other, False))
    return out


def table(model, config, other=None) -> list:
    base_fp = models.fingerprint(model, config)
    rows = []
    for name, m, expected in variants(model, config, other):
        fp = models.fingerprint(m, config)
        there = models.compare_probes(base_fp["probes"], fp["probes"])
        back = models.compare_probes(fp["probes"], base_fp["probes"])
        rows.append((name, expected, there, back, _count(base_fp["probes"], fp["probes"]),
                     _count(fp["probes"], base_fp["probes"]), len(base_fp["probes"]["index"])))
    return rows


def _count(stored, given) -> int:
    have = {p: j for j, (p, _, _) in enumerate(given["index"])}
    n = 0
    for i, (p, k, w) in enumerate(stored["index"]):
        j = have.get(p)
        if j is None:
            n += 1
            continue
        bad = models.probe_differs(stored["values"][i, :w], k, given["values"][j, :w], given["index"][j][1])
        n += bad > max(1, w // 32)
    return n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", default=[], help="An MLX model directory (repeatable).")
    args = ap.parse_args()
    from mlx_softprompt import tiny

    todo = []
    with tempfile.TemporaryDirectory() as d:
        for hidden, layers in ((64, 2), (256, 4)):
            path = tiny.make_tiny_checkpoint(Path(d) / f"t{hidden}", hidden_size=hidden, num_layers=layers)
            other = tiny.make_tiny_checkpoint(Path(d) / f"o{hidden}", hidden_size=hidden, num_layers=layers, seed=1)
            todo.append((f"tiny llama d={hidden}, {layers} layers", str(path), str(other)))
        todo += [(p, p, None) for p in args.model]
        ok = True
        for title, path, other_path in todo:
            model, _, config = models.load(path)
            other = models.load(other_path)[0] if other_path else None
            rows = table(model, config, other)
            print(f"\n{title}: {rows[0][6]} probed weights")
            print("| variant | expected | file on base, model = variant | file on variant, model = base |")
            print("| --- | --- | --- | --- |")
            for name, expected, there, back, n1, n2, total in rows:
                d1 = "match" if there is None else f"refused ({n1} differ)"
                d2 = "match" if back is None else f"refused ({n2} differ)"
                print(f"| {name} | {'match' if expected else 'refuse'} | {d1} | {d2} |")
                ok &= (there is None) == expected and (back is None) == expected
        print("\nall as expected" if ok else "\nSOME CASES NOT AS EXPECTED")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
