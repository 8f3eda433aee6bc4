"""A real-scale dry run: teach -> train -> eval -> bundle (4-bit) -> serve with real model shapes.

The largest model the tests and the demo run is tiny; users bring 0.5-3B
bases. This run takes random models with the shapes of real ones (weights
are random: nothing is downloaded, the figures are about cost, not quality):

- base: Qwen2.5-0.5B-Instruct's config (24 layers, d = 896, 14/2 heads,
  MLP 4,864, vocabulary 151,936, tied head; 494M parameters), fp32;
- guard: Llama-Guard-3-1B's shapes (Llama 3.2 1B: 16 layers, d = 2,048,
  32/8 heads, MLP 8,192, vocabulary 128,256; 1.24B parameters), fp32;

both with the demo world's small tokenizers (the extra vocabulary rows are
never produced by the tokenizer, but every matmul and every logits array has
the real size). Each stage is the `mlx-softprompt` command a user runs, in
its own process, timed, with its peak memory (MLX's peak and the process's
max RSS). Bounded on purpose (few prompts, few steps, short sequences) so it
runs in minutes on 2 cores.

Then the memory target of a long row: one training step of a 1,024-token
row on the 0.5B-shaped base, plain, with --grad-checkpoint, and with
--grad-checkpoint --loss-chunk, and a projection of each stage to 1B and 3B
bases on a 16 GB MacBook (see `project`).

    python benchmarks/scale.py [--out DIR] [--keep DIR]

Writes DIR/scale.json (default benchmarks/) and prints the tables; perf.py's
`stages` part runs it and puts the tables into RESULTS.md.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# Real configs (the HF config.json fields that shape the model).
QWEN25_05B = {
    "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 896, "num_hidden_layers": 24,
    "num_attention_heads": 14, "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936,
    "tie_word_embeddings": True, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
    "hidden_act": "silu", "torch_dtype": "float32",
}
LLAMA32_1B = {  # Llama-Guard-3-1B
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 2048, "num_hidden_layers": 16,
    "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 8192, "vocab_size": 128256,
    "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
    "hidden_act": "silu", "head_dim": 64, "torch_dtype": "float32",
}
LLAMA32_3B = {
    "model_type": "llama", "hidden_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 24,
    "num_key_value_heads": 8, "intermediate_size": 8192, "vocab_size": 128256, "tie_word_embeddings": True,
}
TARGETS = {"1B (Llama-3.2-1B shapes)": LLAMA32_1B, "3B (Llama-3.2-3B shapes)": LLAMA32_3B}
MAC_GB = 16.0
MAC_USABLE_GB = 0.7 * MAC_GB  # what MLX may wire on a 16 GB Mac by default (iogpu.wired_limit_mb raises it)


@dataclass
class Settings:
    prompts: int = 8  # per label (harmful, benign, borderline) from the data layer's train split
    teach_tokens: int = 32
    train_iters: int = 4
    train_batch: int = 4
    train_length: int = 256
    num_tokens: int = 16
    eval_limit: int = 4
    eval_tokens: int = 16
    serve_tokens: int = 16
    long_row: int = 1024
    loss_chunk: int = 128


# ---------------------------------------------------------------- models


def params_of(config: dict) -> int:
    """Parameter count from the shapes (no weights drawn)."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    return sum(v.size for _, v in tree_flatten(model.parameters()))


def make_model(out: Path, config: dict, tokenizer_from: Path, seed: int) -> Path:
    """A loadable model directory: `config`'s shapes, random fp32 weights, a small real tokenizer."""
    import mlx.core as mx

    from mlx_softprompt import tiny

    if (out / "config.json").exists():
        return out  # made by an earlier run kept with --keep
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_from / name).exists():
            shutil.copy(tokenizer_from / name, out / name)
    tok_config = json.loads((tokenizer_from / "config.json").read_text())
    config = {**config, **{k: tok_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                            if k in tok_config}}
    model = tiny.build_model(config, seed=seed)
    tiny.save_checkpoint(model, config, out)
    del model
    mx.clear_cache()
    return out


# ---------------------------------------------------------------- stages


STAGE = r"""
import atexit, json, os, resource, runpy, sys
import mlx.core as mx
_peak, _reset = [0], mx.reset_peak_memory
def _reset_peak():  # teach resets the peak per phase: keep the largest
    _peak[0] = max(_peak[0], mx.get_peak_memory())
    _reset()
mx.reset_peak_memory = _reset_peak
def _report():
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open(os.environ["SCALE_STAGE_OUT"], "w") as f:
        json.dump({"max_rss_bytes": rss if sys.platform == "darwin" else rss * 1024,
                   "mlx_peak_bytes": max(_peak[0], mx.get_peak_memory())}, f)
atexit.register(_report)
sys.argv = ["mlx-softprompt"] + sys.argv[1:]
runpy.run_module("mlx_softprompt", run_name="__main__")
"""


def _env(stat: Path) -> dict:
    env = dict(os.environ, SCALE_STAGE_OUT=str(stat))
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_stage(name: str, argv: list, work: Path, log) -> dict:
    """One CLI command in its own process -> seconds and peak memory (kept in the work directory:
    a run with --keep the same directory takes finished stages from there)."""
    done_file = work / f"{name}.result.json"
    if done_file.exists():
        return json.loads(done_file.read_text())
    stat = work / f"{name}.stat.json"
    log(f"scale: {name}: mlx-softprompt {' '.join(argv)}")
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", STAGE, *argv], env=_env(stat), capture_output=True, text=True)
    seconds = time.perf_counter() - t
    (work / f"{name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-2000:]}")
    result = {"stage": name, "seconds": seconds, **json.loads(stat.read_text())}
    done_file.write_text(json.dumps(result))
    return result


def run_serve(bundle: Path, work: Path, max_tokens: int, log) -> dict:
    """`serve` the bundle, one chat request through the OpenAI API, then Ctrl-C."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stat = work / "serve.stat.json"
    log(f"scale: serve: mlx-softprompt serve --model {bundle} --port {port}")
    t0 = time.perf_counter()
    logf = open(work / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", STAGE, "serve", "--model", str(bundle), "--port", str(port)],
                            env=_env(stat), stdout=logf, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited ({proc.returncode}): {(work / 'serve.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(base + "/models", timeout=2).read()
                break
            except OSError:
                time.sleep(0.5)
        ready = time.perf_counter() - t0
        served = json.loads(urllib.request.urlopen(base + "/models", timeout=10).read())["data"][0]["id"]
        body = json.dumps({"model": served, "max_tokens": max_tokens, "temperature": 0.0,
                           "messages": [{"role": "user", "content": "How do I bake bread?"}]}).encode()
        req = urllib.request.Request(base + "/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        t = time.perf_counter()
        answer = json.loads(urllib.request.urlopen(req, timeout=600).read())
        request = time.perf_counter() - t
        status = Path(f"/proc/{proc.pid}/status")  # Linux: the server's max RSS so far, before it stops
        hwm = [ln for ln in status.read_text().splitlines() if ln.startswith("VmHWM:")] if status.exists() else []
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        logf.close()
    out = {"stage": "serve", "seconds": time.perf_counter() - t0, "ready_seconds": ready,
           "request_seconds": request, "completion_tokens": answer.get("usage", {}).get("completion_tokens")}
    if hwm:
        out["max_rss_bytes"] = int(hwm[0].split()[1]) * 1024
    if stat.exists():  # written at exit, if the server exits through Python's atexit
        out.update(json.loads(stat.read_text()))
    return out


def pipeline(s: Settings, work: Path, log) -> list:
    from mlx_softprompt import data

    world = ROOT / "examples" / "world"
    base = make_model(work / "base", QWEN25_05B, world / "base", seed=1)
    guard = make_model(work / "guard", LLAMA32_1B, world / "guard", seed=2)
    suite = data.load_suite(data.SOURCES, seed=data.DEFAULT_SEED)
    prompts = work / "prompts.jsonl"
    chosen = data.limit_per_label(suite["train"], s.prompts)
    data.write_jsonl(prompts, chosen)
    spec = str(world / "guard-spec.json")
    stages = [
        run_stage("teach", ["teach", "--model", str(base), "--guard", spec, "--guard-model", str(guard),
                            "--data", str(prompts), "--out", str(work / "teacher"), "--max-tokens",
                            str(s.teach_tokens), "--batch-size", "8"], work, log),
        run_stage("train", ["train", "--model", str(base), "--teacher", str(work / "teacher"), "--out",
                            str(work / "p.safetensors"), "--num-tokens", str(s.num_tokens), "--iters",
                            str(s.train_iters), "--batch-size", str(s.train_batch), "--max-seq-length",
                            str(s.train_length), "--val-split", "0.2", "--val-every", str(s.train_iters),
                            "--save-every", str(s.train_iters), "--steps-per-report", "2", "--grad-checkpoint",
                            "--loss-chunk", str(s.loss_chunk)], work, log),
        run_stage("eval", ["eval", "--model", str(base), "--prompt-file", str(work / "p.safetensors"),
                           "--guard", spec, "--guard-model", str(guard), "--suite", "harmful,benign",
                           "--split", "test", "--limit", str(s.eval_limit), "--max-tokens", str(s.eval_tokens),
                           "--timing-prompts", "2", "--out", str(work / "report.json")], work, log),
        run_stage("bundle", ["bundle", "--model", str(base), "--prompt-file", str(work / "p.safetensors"),
                             "--out", str(work / "bundle"), "-q", "--q-bits", "4"], work, log),
    ]
    stages.append(run_serve(work / "bundle", work, s.serve_tokens, log))
    stages[0]["prompts"] = len(chosen)
    metrics = [json.loads(x) for x in (work / "p.safetensors.metrics.jsonl").read_text().splitlines()]
    train_lines = [m for m in metrics if "tokens_per_second" in m]
    if train_lines:
        stages[1].update(tokens_per_second=train_lines[-1]["tokens_per_second"],
                         padding_share=train_lines[-1].get("padding_share"))
    return stages


# ---------------------------------------------------------------- one long row


def long_row(s: Settings, base: Path, log) -> list:
    """One training step of a `long_row`-token row: plain, --grad-checkpoint, and with --loss-chunk too."""
    done_file = base.parent / "long_row.result.json"
    if done_file.exists():
        return json.loads(done_file.read_text())
    rows = _long_row(s, base, log)
    done_file.write_text(json.dumps(rows))
    return rows


def _long_row(s: Settings, base: Path, log) -> list:
    import gc

    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np

    from mlx_softprompt import methods, models, train

    model, tok, config = models.load(str(base))
    model.freeze()
    mx.eval(model.parameters())
    weights = sum(v.nbytes for _, v in __import__("mlx.utils", fromlist=["tree_flatten"]).tree_flatten(
        model.parameters()))
    rng = np.random.default_rng(0)
    V = len(tok)
    prompt = rng.integers(5, V, 64).tolist()
    target = rng.integers(5, V, s.long_row - 64).tolist()
    batch, ntok = train.collate([train.Row(prompt, target, 1.0, False, 0)], s.long_row)
    out = []
    for name, kw in (("plain", {}), ("--grad-checkpoint", {"grad_checkpoint": True}),
                     ("--grad-checkpoint --loss-chunk", {"grad_checkpoint": True, "loss_chunk": s.loss_chunk})):
        m = methods.get("softprompt", num_tokens=s.num_tokens, init="random")
        params = m.init(model, tok, 0)
        opt = optim.AdamW(learning_rate=1e-4)
        opt.init(params)
        loss = train.make_loss(model, m, "ce", "cache", **kw)
        step, state = train.make_step(model, loss, params, opt, grad_clip=1.0, world_size=1)
        mx.eval(state)
        gc.collect()
        mx.clear_cache()
        mx.reset_peak_memory()
        log(f"scale: one {s.long_row}-token step, {name}")
        t = time.perf_counter()
        lsum, c, norm = step(batch, None, True)
        mx.eval(state, lsum, c, norm)
        out.append({"variant": name, "tokens": ntok, "seconds": time.perf_counter() - t,
                    "peak_bytes": mx.get_peak_memory(), "weights_bytes": weights})
        del step, state, loss, opt, params
    return out


# ---------------------------------------------------------------- projection


def project(stages: list, rows: list, base_params: int, guard_params: int) -> list:
    """Each stage's memory for 1B and 3B bases on a 16 GB Mac, from what was measured here.

    The training step's memory beyond the weights (activations kept for the backward
    pass, with --grad-checkpoint --loss-chunk) scales with layers x (4 d + 3 MLP width)
    per token: it is taken from the measured 1,024-token step and scaled by that ratio.
    Weights: bf16 (2 bytes/param) for teach/train/eval (what a Mac user loads), 4-bit
    (0.5625 bytes/param with group-64 scales) for the bundle served; the guard stays
    Llama-Guard-3-1B in bf16. Attention on Apple's GPU uses fused kernels: the CPU
    figures here are an upper bound for it.
    """
    def width(c):
        return c["num_hidden_layers"] * (4 * c["hidden_size"] + 3 * c["intermediate_size"])

    saver = next(r for r in rows if r["variant"].endswith("--loss-chunk"))
    act = saver["peak_bytes"] - saver["weights_bytes"]
    guard_bf16 = guard_params * 2
    out = []
    for label, c in TARGETS.items():
        p = params_of({**LLAMA32_1B, **c, "architectures": ["LlamaForCausalLM"]})
        bf16, q4 = p * 2, p * 0.5625
        train_gb = (bf16 + act * width(c) / width(QWEN25_05B)) / 1e9
        kv = 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * (c["hidden_size"] // c["num_attention_heads"]) \
            * 4096 * 2  # a 4,096-token bf16 KV cache
        stages_gb = {
            "teach (base + guard, bf16)": (bf16 + guard_bf16) / 1e9 * 1.1,
            f"train (1,024-token row, --grad-checkpoint --loss-chunk, bf16 base)": train_gb,
            "eval (base + guard, bf16)": (bf16 + guard_bf16) / 1e9 * 1.1,
            "bundle (bf16 in, 4-bit out)": (bf16 + q4) / 1e9,
            "serve (4-bit, 4,096-token context)": (q4 + kv) / 1e9,
        }
        for stage, gb in stages_gb.items():
            out.append({"base": label, "params": p, "stage": stage, "gb": gb, "fits": gb <= MAC_USABLE_GB})
    return out


# ---------------------------------------------------------------- report


def tables(res: dict) -> list:
    lines = [f"### Real-scale dry run: {res['base']} base, {res['guard']} guard (random weights, fp32, CPU)", "",
             "| stage | seconds | MLX peak GB | max RSS GB | notes |", "|---|---:|---:|---:|---|"]
    for st in res["stages"]:
        note = ""
        if st["stage"] == "train":
            note = (f"{res['settings']['train_iters']} steps x {res['settings']['train_batch']} rows, "
                    f"--grad-checkpoint --loss-chunk {res['settings']['loss_chunk']}")
            if st.get("tokens_per_second"):
                note += f"; {st['tokens_per_second']:,.0f} tokens/s, padding {st.get('padding_share', 0):.0%}"
        elif st["stage"] == "serve":
            note = (f"ready after {st['ready_seconds']:.1f} s; one chat request of {st.get('completion_tokens')} "
                    f"tokens: {st['request_seconds']:.1f} s")
        elif st["stage"] == "teach":
            note = f"{st.get('prompts')} prompts, {res['settings']['teach_tokens']} tokens each"
        elif st["stage"] == "eval":
            note = f"base, soft prompt, dual; {2 * res['settings']['eval_limit']} test prompts (harmful, benign)"
        elif st["stage"] == "bundle":
            note = "4-bit base + P + P's KV cache"
        gb = {k: f"{st[k] / 1e9:.2f}" if st.get(k) else "-" for k in ("mlx_peak_bytes", "max_rss_bytes")}
        lines.append(f"| {st['stage']} | {st['seconds']:.1f} | {gb['mlx_peak_bytes']} | {gb['max_rss_bytes']} | {note} |")
    lines += ["", f"### One training step of a {res['settings']['long_row']}-token row ({res['base']})", "",
              "| variant | seconds | peak GB | beyond the weights GB |", "|---|---:|---:|---:|"]
    for r in res["long_row"]:
        lines.append(f"| {r['variant']} | {r['seconds']:.1f} | {r['peak_bytes'] / 1e9:.2f} | "
                     f"{(r['peak_bytes'] - r['weights_bytes']) / 1e9:.2f} |")
    lines += ["", f"### Projection to a {MAC_GB:.0f} GB MacBook (about {MAC_USABLE_GB:.1f} GB usable by MLX)", "",
              "| base | stage | GB | fits |", "|---|---|---:|:---:|"]
    for r in res["projection"]:
        lines.append(f"| {r['base']} | {r['stage']} | {r['gb']:.1f} | {'yes' if r['fits'] else 'no'} |")
    return lines


def run(s: Settings, out_dir: Path, keep=None, log=print) -> dict:
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="mlx-softprompt-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        stages = pipeline(s, work, log)
        rows = long_row(s, work / "base", log)
        res = {"base": "Qwen2.5-0.5B-shaped", "guard": "Llama-Guard-3-1B-shaped", "settings": asdict(s),
               "base_params": params_of(QWEN25_05B), "guard_params": params_of(LLAMA32_1B),
               "stages": stages, "long_row": rows}
        res["projection"] = project(stages, rows, res["base_params"], res["guard_params"])
        res["seconds"] = time.perf_counter() - t0
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    res["lines"] = tables(res)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "scale.json").write_text(json.dumps(res, indent=1))
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE), help="directory for scale.json")
    ap.add_argument("--keep", default=None, help="work directory to keep (models, cache, bundle, logs)")
    a = ap.parse_args(argv)
    res = run(Settings(), Path(a.out), a.keep)
    print("\n".join(res["lines"]))
    print(f"scale: {res['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
