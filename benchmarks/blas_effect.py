"""Soft-prompt training step speed with MLX's bundled BLAS vs a preloaded OpenBLAS.

Runs the same step in two child processes (with and without LD_PRELOAD) and
prints tokens/s for each and the ratio. Linux only; used for the README figure.
"""

import json
import os
import subprocess
import sys

CHILD = r"""
import json, time, sys
import mlx.core as mx, mlx.nn as nn
from mlx_softprompt import models
from mlx_softprompt.tiny import make_config, build_model
cfg = make_config("llama", vocab_size=2000, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4)
model = build_model(cfg, seed=0); model.freeze()
B, L, n = 8, 128, 16
ids = mx.random.randint(1, 2000, (B, L), key=mx.random.key(0))
P = mx.random.normal((n, 256), key=mx.random.key(1)) * 0.02
def loss(P):
    logits = models.forward(model, ids, P)[:, n:-1]
    return nn.losses.cross_entropy(logits, ids[:, 1:]).mean()
step = mx.value_and_grad(loss)
for _ in range(2): mx.eval(step(P))
times = []
for _ in range(5):
    t = time.perf_counter(); mx.eval(step(P)); times.append(time.perf_counter() - t)
times.sort()
print(json.dumps({"tokens_per_s": B * (L + n) / times[len(times) // 2]}))
"""


def run(preload):
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    if preload:
        env["LD_PRELOAD"] = preload
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_s"]


def main():
    from mlx_softprompt.blas import find_openblas

    lib = find_openblas()
    ref = run(None)
    res = {"reference_blas_tokens_per_s": ref}
    if lib:
        fast = run(lib)
        res.update(openblas_tokens_per_s=fast, speedup=fast / ref, openblas=lib)
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
