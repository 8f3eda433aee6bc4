"""`mlx-softprompt demo`: the whole method on the built-in tiny world, end to end.

The world (examples/world/, built by world.py) is a tiny chat model that complies
with every request and a tiny Llama-Guard-like guard. The demo runs the project's
one pipeline on it, the same code the `teach`, `train` and `eval` commands run:

1. teach: the guard's verdicts u(x) and the base's teacher samples and top-k
   log-probs on the train split (teach.py -> a teacher cache);
2. train: a soft prompt with the TV objective (train.py);
3. eval on the test split (evaluate.py): the base alone, the dual system (base +
   guard), the soft prompt, and a textual system prompt in words the base never saw;

then prints a table, writes report.json and a PNG, and shows three sample chats.
Splits are data.load_suite's with seed 0, which the world was built on; --seed sets
the teacher sampling and training seed only (another split seed would put the
world's training prompts into the test split).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from . import data
from .errors import UserError

SYSTEM = "softprompt-tv"
SYSTEM_ORDER = ("base", "dual", SYSTEM, "system-prompt")


def default_world() -> Path:
    return data.examples_dir() / "world"


@dataclass
class DemoConfig:
    out: str = "demo-out"
    world: Optional[str] = None  # default: examples/world
    seed: int = 0
    quick: bool = False
    rebuild: bool = False
    # teach
    max_tokens: int = 48
    top_k: int = 64
    # train (train.TrainArgs fields). 200 steps (about 2.5 epochs of the 1,160 rows): the
    # held-out validation loss is flat from step ~150 on (0.0088 at 100, 0.0084 at 150-300).
    train: dict = field(default_factory=lambda: {
        "num_tokens": 16, "init": "vocab", "iters": 200, "batch_size": 16, "learning_rate": 0.01,
        "warmup": 20, "max_seq_length": 160, "val_split": 0.1, "val_every": 50, "save_every": 200,
        "steps_per_report": 10,
    })
    # eval
    eval_max_tokens: int = 40
    limit: Optional[int] = None  # at most N prompts of each label per split (quick runs)

    def __post_init__(self):
        if self.quick:
            self.limit = self.limit or 12
            self.max_tokens = min(self.max_tokens, 24)
            self.eval_max_tokens = min(self.eval_max_tokens, 16)
            self.train = {**self.train, "iters": 20, "batch_size": 8, "warmup": 2, "val_every": 10,
                          "save_every": 20, "steps_per_report": 5}


def ensure_world(cfg: DemoConfig, log=print) -> Path:
    """The world's directory: shipped weights, or built now with --rebuild."""
    from . import world

    path = Path(cfg.world) if cfg.world else default_world()
    present = all((path / name / "model.safetensors").exists() for name in ("base", "guard")) and \
        (path / "guard-spec.json").exists()
    if cfg.rebuild or not present:
        if not cfg.rebuild:
            raise UserError(f"{path}: no built demo world (base/, guard/, guard-spec.json); "
                            "pass --rebuild to build it (about 25 minutes on 2 cores)")
        log(f"demo: building the world into {path} (seed {cfg.seed}) ...")
        world.build(path, world.WorldConfig(seed=cfg.seed))
    return path


def run(cfg: DemoConfig, log=print) -> dict:
    """teach -> train -> eval on the demo world; writes report.json, the PNG; returns the report."""
    from . import evaluate as ev
    from . import models, train as trainer, world
    from .guards import load_guard
    from .teach import TeachConfig, format_summary, teach

    t0 = time.perf_counter()
    times = {}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    wpath = ensure_world(cfg, log)
    base_path, guard_path, spec_path = wpath / "base", wpath / "guard", wpath / "guard-spec.json"

    suite = data.load_suite(data.SOURCES, seed=data.DEFAULT_SEED)
    train, test = data.limit_per_label(suite["train"], cfg.limit), data.limit_per_label(suite["test"], cfg.limit)
    log(f"demo: world {wpath}; {len(train)} train / {len(test)} test prompts (split seed {data.DEFAULT_SEED})")

    # 1. teach
    tic = time.perf_counter()
    train_file = out / "train.jsonl"
    data.write_jsonl(train_file, train)
    tcfg = TeachConfig(base=str(base_path), guard=str(spec_path), guard_model=str(guard_path),
                       data=str(train_file), out=str(out / "teacher"), max_tokens=cfg.max_tokens,
                       top_k=cfg.top_k, seed=cfg.seed, batch_size=32, refusal=world.REFUSAL)
    teach_summary = teach(tcfg)
    log(format_summary(teach_summary, tcfg.out))
    times["teach"] = time.perf_counter() - tic

    # 2. train (the base is loaded once and shared with the evaluation)
    tic = time.perf_counter()
    model, tok, config = models.load(str(base_path))
    prompt_path = out / f"{SYSTEM}.safetensors"
    args = trainer.make_args(None, **{**cfg.train, "base": str(base_path), "teacher": tcfg.out,
                                      "out": str(prompt_path), "method": "softprompt", "objective": "tv",
                                      "seed": cfg.seed, "resume": True})
    train_summary = trainer.train(args, model_bundle=(model, tok, config), log=log)
    times["train"] = time.perf_counter() - tic

    # 3. eval on the test split
    tic = time.perf_counter()
    guard = load_guard(str(spec_path), str(guard_path))
    base = ev.base_system(model, tok, config)
    systems = [base, ev.softprompt_system(base, prompt_path, name=SYSTEM),
               ev.system_prompt_system(base, world.GENERIC_SYSTEM_PROMPT)]
    ecfg = ev.EvalConfig(max_tokens=cfg.eval_max_tokens, batch_size=32, timing_prompts=8, refusal=world.REFUSAL)
    report = ev.evaluate(systems, test, ecfg, guard=guard)
    times["eval"] = time.perf_counter() - tic
    times["total"] = time.perf_counter() - t0

    report["demo"] = {
        "world": str(wpath),
        "world_info": _world_info(wpath),
        "config": asdict(cfg),
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "teach": teach_summary,
        "train": train_summary,
        "n_train": len(train),
        "n_test": len(test),
        "samples": sample_chats(report, test),
    }
    ev.write_report(report, out / "report.json")
    plot(report, out / "demo.png")
    return report


def _world_info(path: Path) -> dict:
    p = path / "world.json"
    if not p.exists():
        return {}
    info = json.loads(p.read_text())
    return {k: info.get(k) for k in ("config", "val", "bytes", "train_data_hash")}


def sample_chats(report: dict, test: list) -> list:
    """Three test prompts, base vs dual vs soft prompt: the first harmful one the dual system
    refuses (chosen by the teacher, not by the soft prompt), the first benign and borderline ones."""
    from .evaluate import is_refusal

    dual = report["answers"].get("dual")

    def pick(i, e, label):
        if e.label != label:
            return False
        return label != "harmful" or dual is None or is_refusal(dual[i]["text"])

    out = []
    for label in ("harmful", "benign", "borderline"):
        i = next((i for i, e in enumerate(test) if pick(i, e, label)), None)
        if i is None:
            i = next((i for i, e in enumerate(test) if e.label == label), None)
        if i is None:
            continue
        row = {"label": label, "prompt": test[i].prompt}
        for name in ("base", "dual", SYSTEM):
            if name in report["answers"]:
                row[name] = report["answers"][name][i]["text"]
        out.append(row)
    return out


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _bytes(n) -> str:
    if not n:
        return "0"
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def table(report: dict) -> str:
    """The demo's table (Markdown): safety, over-refusal, agreement, utility, cost."""
    rows = ["| system | unsafe compliance | over-refusal (benign) | over-refusal (borderline) | agreement with dual "
            "| utility KL (nats/token) | added bytes | time to first token |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    names = [n for n in SYSTEM_ORDER if n in report["systems"]] + \
        [n for n in report["systems"] if n not in SYSTEM_ORDER]
    for name in names:
        m = report["systems"][name]
        c = m.get("cost", {})
        kl = m.get("utility_kl")
        ttft = c.get("ttft_s")
        rows.append(
            f"| {name} | {_pct(m['unsafe_compliance'])} of {m['n_harmful']} | {_pct(m['over_refusal'])} of "
            f"{m['n_benign']} | {_pct(m.get('over_refusal_borderline'))} of {m.get('n_borderline', 0)} "
            f"| {_pct(m['agreement_with_dual'])} | {'-' if kl is None else f'{kl:.3f}'} "
            f"| {_bytes(c.get('added_bytes', 0))} | {'-' if ttft is None else f'{1000 * ttft:.1f} ms'} |")
    return "\n".join(rows)


def format_samples(samples: list, width: int = 300) -> str:
    lines = []
    for s in samples:
        lines.append(f"[{s['label']}] user: {s['prompt'][:width]}")
        for name in ("base", "dual", SYSTEM):
            if name in s:
                lines.append(f"  {name:>14}: {s[name].strip()[:width]}")
        lines.append("")
    return "\n".join(lines).rstrip()


def plot(report: dict, path) -> None:
    """Bars per system: unsafe compliance, over-refusal, agreement with the dual system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [n for n in SYSTEM_ORDER if n in report["systems"]]
    metrics = [("unsafe_compliance", "unsafe compliance (harmful)"), ("over_refusal", "over-refusal (benign)"),
               ("over_refusal_borderline", "over-refusal (borderline)"), ("agreement_with_dual", "agreement with dual")]
    x = np.arange(len(names))
    w = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(8, 4))
    for j, (key, label) in enumerate(metrics):
        vals = [report["systems"][n].get(key) or 0.0 for n in names]
        bars = ax.bar(x + (j - (len(metrics) - 1) / 2) * w, [100 * v for v in vals], w, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(x, names)
    ax.set_ylabel("% of test prompts")
    ax.set_ylim(0, 125)
    n = report["systems"]["base"]
    ax.set_title(f"demo world, test split ({n['n_harmful']} harmful, {n['n_benign']} benign, "
                 f"{n.get('n_borderline', 0)} borderline)")
    ax.legend(fontsize=8, loc="upper right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(report: dict, out) -> str:
    """What the demo prints at the end: the table, the sample chats, where the files are."""
    d = report["demo"]
    sec = d["seconds"]
    return "\n".join([
        f"Demo world, test split (never seen by the base, the guard or training); teach {sec['teach']:.0f} s, "
        f"train {sec['train']:.0f} s, eval {sec['eval']:.0f} s:",
        "",
        table(report),
        "",
        "Sample chats (the first harmful test prompt the dual system refuses, the first benign and "
        "borderline ones):",
        format_samples(d["samples"]),
        "",
        f"wrote {Path(out) / 'report.json'}, {Path(out) / 'demo.png'} (total {sec['total'] / 60:.1f} min)",
    ])
