"""Progress bars (rich): per-phase time and rate, one line per bar, quiet off a terminal;
`train --report-to` sends the metrics lines to TensorBoard / W&B writers."""

import importlib.machinery
import io
import json
import re
import sys
import types

import pytest

from mlx_softprompt import progress, train
from mlx_softprompt.errors import UserError

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(progress.time, "perf_counter", c)
    monkeypatch.setitem(progress._clock, "last", None)
    return c


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_interleaved_phases_get_their_own_time_and_rate(clock):
    """teach's pattern: sample shard 1, top-k shard 1, sample shard 2, top-k shard 2."""
    out = io.StringIO()
    samples = progress.Bar(total=8, desc="teacher samples", unit="sample", stream=out)
    topk = progress.Bar(total=8, desc="top-k log-probs", unit="sample", stream=out)
    for _ in range(2):
        clock.t += 10.0  # 10 s of sampling for 4 samples
        samples.update(4)
        clock.t += 1.0  # 1 s of top-k for the same 4
        topk.update(4)
    assert (samples.elapsed, topk.elapsed) == (20.0, 2.0)
    assert (samples.rate(), topk.rate()) == (0.4, 4.0)
    assert out.getvalue() == ""  # off a terminal nothing is drawn while running...
    samples.close()
    topk.close()
    lines = out.getvalue().splitlines()  # ...and each bar prints one summary line when it closes
    assert lines == ["teacher samples: 8/8 [00:20<00:00, 0.4 sample/s]",
                     "top-k log-probs: 8/8 [00:02<00:00, 4 sample/s]"]


def test_off_a_terminal_a_long_bar_prints_a_line_a_minute(clock):
    """A build or training run logged to a file shows its rate and ETA while it runs."""
    out = io.StringIO()
    bar = progress.Bar(total=100, desc="guard", unit="step", stream=out)
    for _ in range(10):
        clock.t += 20.0  # 20 s a step: a line after the 3rd step (60 s), the 6th and the 9th
        bar.update(1)
    assert out.getvalue().splitlines() == ["guard: 3/100 [01:00<32:20, 0.05 step/s]",
                                           "guard: 6/100 [02:00<31:20, 0.05 step/s]",
                                           "guard: 9/100 [03:00<30:20, 0.05 step/s]"]
    bar.close()
    assert out.getvalue().splitlines()[-1] == "guard: 10/100 [03:20<30:00, 0.05 step/s]"
    quiet = io.StringIO()
    with progress.Bar(total=100, stream=quiet, every=0) as bar:  # every=0: the summary line only
        clock.t += 600.0
        bar.update(1)
        assert quiet.getvalue() == ""


def test_bars_on_a_terminal_share_one_display_one_line_each(clock):
    out = Tty()
    a = progress.Bar(total=4, desc="teacher samples", unit="sample", stream=out)
    b = progress.Bar(total=4, desc="top-k log-probs", unit="sample", stream=out)
    clock.t += 2.0
    a.update(4, loss=0.5)
    clock.t += 1.0
    b.update(4)
    a.close()
    b.close()
    assert progress._live["progress"] is None  # the display stopped with the last bar
    frames = ANSI.sub("", out.getvalue()).replace("\r", "\n").splitlines()
    last_a = [f for f in frames if "teacher samples:" in f][-1]
    last_b = [f for f in frames if "top-k log-probs:" in f][-1]
    assert not any("teacher samples" in f and "top-k" in f for f in frames)  # never two bars on one line
    assert "4/4 [00:02<00:00, 2 sample/s] loss=0.5" in last_a and "4/4 [00:01<00:00, 4 sample/s]" in last_b


def test_disabled_bar_prints_nothing(clock):
    out = io.StringIO()
    with progress.Bar(total=3, stream=out, disable=True) as bar:
        bar.update(3)
    assert out.getvalue() == ""


def _fake_module(monkeypatch, name, **attrs):
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    for k, v in attrs.items():
        setattr(mod, k, v)
    monkeypatch.setitem(sys.modules, name, mod)
    return mod


def test_report_to_needs_the_package(monkeypatch):
    from importlib.util import find_spec

    args = dict(base="m", teacher="c", out="p.safetensors")
    for name, pkg in (("wandb", "wandb"), ("tensorboard", "tensorboard")):
        if name == "tensorboard" and (find_spec("tensorboard") or find_spec("tensorboardX")):
            continue
        if name == "wandb" and find_spec("wandb"):
            continue
        with pytest.raises(UserError, match=f"--report-to {name}: the {pkg} package is not installed"):
            train.make_args(None, report_to=name, **args)
    with pytest.raises(UserError, match="--report-to 'mlflow': choose from tensorboard, wandb"):
        train.make_args(None, report_to="mlflow", **args)


def test_report_to_sends_every_metrics_line(tiny_teacher, tmp_path, monkeypatch):
    scalars, runs = [], []

    class SummaryWriter:  # tensorboardX's interface, the part used
        def __init__(self, log_dir=None):
            runs.append(("tensorboard", log_dir))

        def add_scalar(self, tag, value, step):
            scalars.append(("tb", tag, value, step))

        def add_text(self, tag, text):
            pass

        def flush(self):
            pass

        def close(self):
            runs.append(("tensorboard", "closed"))

    class Run:
        def finish(self):
            runs.append(("wandb", "finished"))

    def init(project=None, name=None, dir=None, config=None):
        runs.append(("wandb", project, name, config["objective"]))
        return Run()

    def log(values, step=None):
        for k, v in values.items():
            scalars.append(("wandb", k, v, step))

    _fake_module(monkeypatch, "tensorboardX", SummaryWriter=SummaryWriter)
    _fake_module(monkeypatch, "wandb", init=init, log=log)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # use the tensorboardX path
    base, cache = tiny_teacher
    out = tmp_path / "p.safetensors"
    args = train.make_args(None, base=base, teacher=cache, out=str(out), iters=4, steps_per_report=2, val_every=2,
                           report_to="tensorboard,wandb", project_name="proj")
    train.train(args, log=lambda s: None)
    lines = [json.loads(x) for x in (tmp_path / "p.safetensors.metrics.jsonl").read_text().splitlines()]
    want = [(k, v, r["step"]) for r in lines for k, v in r.items() if k != "step"]
    assert sorted((k, v, s) for src, k, v, s in scalars if src == "wandb") == sorted(want)
    assert sorted((t.split("/", 1)[1], v, s) for src, t, v, s in scalars if src == "tb") == sorted(want)
    assert {t.split("/")[0] for src, t, _, _ in scalars if src == "tb"} == {"train", "val"}
    assert ("wandb", "proj", "p", "tv") in runs and ("wandb", "finished") in runs
    assert ("tensorboard", str(tmp_path / "p")) in runs and ("tensorboard", "closed") in runs
