"""Data-parallel training over mx.distributed: 2 ranks on loopback (mlx.launch, ring backend) take the
same steps as 1 rank with the same global batch."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlx_softprompt import prompt_file, train
from ports import free_ports

LAUNCH = Path(sys.executable).parent / "mlx.launch"
FLAGS = dict(num_tokens=4, iters=6, batch_size=8, learning_rate=1e-2, warmup=2, save_every=3, val_every=3,
             steps_per_report=3, val_split=0.25, objective="tv", init="vocab")


def _two_ranks(argv, env, tries: int = 3) -> subprocess.CompletedProcess:
    """argv on 2 ranks over loopback; a new start port when one was taken in between (a fresh-clone
    run once lost rank 1's port to another process: "[ring] Couldn't bind socket (error: 98)")."""
    for _ in range(tries):
        two = subprocess.run([str(LAUNCH), "--backend", "ring", "-n", "2", "--starting-port", str(free_ports(2)),
                              "--"] + argv, env=env, capture_output=True, text=True, timeout=300)
        if "error: 98" not in two.stderr:
            break
    return two


def _metrics(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


@pytest.mark.skipif(not LAUNCH.exists(), reason="mlx.launch is not installed next to this python")
def test_two_ranks_on_loopback_equal_one_rank(tiny_teacher, tmp_path):
    base, cache = tiny_teacher
    argv = [sys.executable, "-m", "mlx_softprompt", "train", "--base", base, "--teacher", cache,
            "--out", str(tmp_path / "two.safetensors")]
    for k, v in FLAGS.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    env = dict(os.environ, MLX_SOFTPROMPT_NO_BLAS="1")  # same BLAS as this process, no re-exec
    one = train.train(train.make_args(None, base=base, teacher=cache, out=str(tmp_path / "one.safetensors"), **FLAGS),
                      log=lambda *a: None)
    two = _two_ranks(argv, env)
    out, err = two.stdout, two.stderr
    # mlx.launch exits 0 even when a rank fails (mlx 0.32): the ranks' exit lines are checked too
    assert two.returncode == 0 and "exited with code" not in err, err[-3000:]
    assert one["machines"] == 1
    assert "2 machine(s)" in err  # rank 0's header; rank 1 prints nothing
    assert out.count("wrote ") == 1  # only rank 0 reports (and writes)

    p1 = np.array(prompt_file.load(tmp_path / "one.safetensors").prompt)
    p2 = np.array(prompt_file.load(tmp_path / "two.safetensors").prompt)
    from mlx_softprompt import methods, models

    model, tok, config = models.load(base)
    args0 = train.make_args(None, base=base, teacher=cache, out="x.safetensors", **FLAGS)
    p0 = np.array(train.make_method(args0).init(model, tok, args0.seed)["soft_prompt"])
    moved = np.abs(p1 - p0).max()
    assert moved > 1e-3
    # the same 6 steps up to float summation order: measured max |diff| 1.5e-8 against a move of 2e-2 (8 steps)
    np.testing.assert_allclose(p2, p1, atol=1e-5 * max(1.0, np.abs(p1).max()), rtol=0)

    m1, m2 = _metrics(tmp_path / "one.safetensors.metrics.jsonl"), _metrics(tmp_path / "two.safetensors.metrics.jsonl")
    assert [x["step"] for x in m1] == [x["step"] for x in m2]  # one writer: no duplicated lines
    for a, b in zip(m1, m2):
        key = "val_loss" if "val_loss" in a else "loss"
        assert b[key] == pytest.approx(a[key], rel=1e-5)
        if key == "loss":
            assert b["trained_tokens"] == a["trained_tokens"]  # both ranks' tokens are counted


def test_a_ring_that_cannot_start_is_one_line(tiny_teacher, tmp_path):
    """Rank 0 of a 2-rank ring whose port another process holds: one line naming the rank and the
    hosts file, exit 1, nothing written (mlx raises "[ring] Couldn't bind socket (error: 98)")."""
    base, cache = tiny_teacher
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        hosts = tmp_path / "hosts.json"
        hosts.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
        env = dict(os.environ, MLX_SOFTPROMPT_NO_BLAS="1", MLX_RANK="0", MLX_HOSTFILE=str(hosts))
        r = subprocess.run([sys.executable, "-m", "mlx_softprompt", "train", "--base", base, "--teacher", cache,
                            "--out", str(tmp_path / "p.safetensors")], env=env, capture_output=True, text=True,
                           timeout=120)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "the distributed group did not start" in lines[0] and f"MLX_HOSTFILE={hosts}" in lines[0]
    assert "MLX_RANK=0" in lines[0] and "[ring]" in lines[0] and "--starting-port" in lines[0]
    assert not (tmp_path / "p.safetensors").exists()
