"""Use a fast BLAS for MLX's CPU backend on Linux.

The Linux ``mlx[cpu]`` wheel bundles the reference BLAS (about 5 GFLOP/s on
two cores). Preloading the system's OpenBLAS routes MLX's fp32 matmuls to it
(~30x faster GEMM; docs/PERFORMANCE.md has the figures). The preload must happen before the
process starts, so the CLI re-executes itself once with LD_PRELOAD set.
Set MLX_SOFTPROMPT_NO_BLAS=1 to opt out.
"""

import os
import sys
from pathlib import Path
from typing import Optional

CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
]
HINT = ("hint: MLX on Linux is using the slow reference BLAS; "
        "`sudo apt-get install libopenblas0-pthread` makes fp32 training ~17x faster")


def find_openblas() -> Optional[str]:
    for c in [os.environ.get("MLX_SOFTPROMPT_OPENBLAS", "")] + CANDIDATES:
        if c and Path(c).exists():
            return c
    return None


def active() -> bool:
    return "openblas" in os.environ.get("LD_PRELOAD", "")


def maybe_reexec(argv=None) -> None:
    """On Linux, restart this process once with OpenBLAS preloaded when it is available."""
    if not sys.platform.startswith("linux") or os.environ.get("MLX_SOFTPROMPT_NO_BLAS") or active():
        return
    lib = find_openblas()
    if lib is None:
        if not os.environ.get("MLX_SOFTPROMPT_BLAS_HINTED"):
            os.environ["MLX_SOFTPROMPT_BLAS_HINTED"] = "1"
            print(HINT, file=sys.stderr)
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(p for p in [lib, env.get("LD_PRELOAD", "")] if p)
    argv = list(argv if argv is not None else sys.argv)
    try:
        os.execve(sys.executable, [sys.executable, "-m", "mlx_softprompt"] + argv[1:], env)
    except OSError:
        return  # keep going with the slow BLAS rather than fail


if __name__ == "__main__":
    print(find_openblas() or HINT)
