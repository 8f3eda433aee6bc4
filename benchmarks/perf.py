"""Performance of the soft prompt against mlx-lm LoRA, PEFT on PyTorch and the dual system.

What `make bench-perf` runs. Five parts (issue 8):

1. train:  the project's own training step (train.make_loss + train.make_step,
           compiled, AdamW, gradient clipping) for a soft prompt (n = 100, shared
           prefix and naive) against mlx-lm's LoRA layers (methods.lora.LoRA: rank 8,
           every layer), same objective (TV against the cache's top-k), batch and
           length, on tiny Llamas (4 layers, d = 256 and 512), fp32 and 4-bit.
2. torch:  the same soft-prompt step against HF PEFT prompt tuning on PyTorch
           (CPU, 2 threads), both with the CE objective (PEFT's own).
3. infer:  time to first token and decode tokens/s: base alone, base + P from
           its precomputed cache, base + P prefilled with every request, and the
           dual system (guard verdict, then the answer: guards.dual_complete).
4. scale:  step time and peak memory against n and against the sequence length,
           on the tiny model and on a ~110M-parameter Llama-shaped model.
5. blas:   MLX's bundled BLAS against OpenBLAS (benchmarks/blas_effect.py).

Before them (issue 18): peer, `mlx-softprompt train` against `mlx_lm.lora` itself on
the demo's teacher rows (ce, tv plain, tv with the record's prompt shared); record,
the training step in the plain layout and the record layout (with and without its
split of short continuations) on tiny Llamas.

Every figure is the median of >= 3 measured repeats after a warm-up (which
also compiles). Things compared with each other are measured in the same run,
interleaved repeat by repeat, so a change of load on a shared machine hits all
of them alike. Peak memory is mx.get_peak_memory() after mx.reset_peak_memory()
around each measured step (it includes the resident weights).

Writes benchmarks/results.json, benchmarks/RESULTS.md and benchmarks/perf_scaling.png.
"""

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from mlx_softprompt import generate, guards, methods, models, tiny, train
from mlx_softprompt.progress import Bar

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


@dataclass
class Settings:
    repeats: int = 3  # measured repeats per figure (4-bit steps and the cost curves)
    fast_repeats: int = 7  # for the quick ones: fp32 steps of the tiny models, PyTorch
    warmup: int = 1
    batch: int = 8
    length: int = 256
    num_tokens: int = 100
    vocab: int = 2000
    topk: int = 64
    lora_rank: int = 8
    tiny_dims: tuple = (256, 512)
    tiny_layers: int = 4
    bits: tuple = (None, 4)
    naive_bits: tuple = (None,)  # the naive step is measured on these bases only (4-bit steps are slow on CPU)
    ce_bits: tuple = (None,)  # the ce objective is measured too on these bases
    eager_bits: tuple = (None,)  # and the uncompiled step (train.make_step(compile=False)) on these
    sweep_n: tuple = (10, 50, 100, 200)
    sweep_length: tuple = (128, 256, 512, 1024)
    big_batch: int = 2
    big_dim: int = 768
    big_layers: int = 12
    big_vocab: int = 32000
    big_intermediate: int = 2048
    lora_lengths_tiny: tuple = (128, 256, 512, 1024)  # LoRA alongside the length sweep at these lengths
    lora_lengths_big: tuple = (256,)
    infer_repeats: int = 15  # decode/TTFT of tiny models swing +-30 % with the load: many repeats
    infer_repeats_big: int = 7
    infer_max_tokens: int = 64
    infer_max_tokens_big: int = 32
    infer_dims: tuple = ("tiny-512", "big")
    peer_iters: int = 60  # against mlx_lm.lora: steps per run, report windows, runs per tool
    peer_report: int = 10
    peer_repeats: int = 3
    peer_batch: int = 8
    peer_num_tokens: int = 16
    peer_limit: int = 0  # prompts per label for the demo teacher cache (0: the whole train split)
    record_shapes: tuple = ((40, 16, 60), (64, 16, 256))  # (prompt, refusal, response) tokens, +-8 per record


def quick(s: Settings) -> Settings:
    """A smoke-test configuration (`--quick`): small and fast, not for the README."""
    s.batch, s.length, s.num_tokens, s.vocab = 2, 64, 16, 512
    s.tiny_dims, s.bits, s.naive_bits = (64,), (None, 4), (None,)
    s.sweep_n, s.sweep_length = (4, 16), (32, 64)
    s.lora_lengths_tiny, s.lora_lengths_big = (32, 64), (64,)
    s.big_dim, s.big_layers, s.big_vocab, s.big_intermediate = 128, 2, 1024, 256
    s.infer_max_tokens = s.infer_max_tokens_big = 8
    s.fast_repeats = s.infer_repeats = s.infer_repeats_big = 3
    s.peer_iters, s.peer_report, s.peer_repeats, s.peer_limit = 12, 4, 1, 16
    s.record_shapes = ((12, 4, 16),)
    return s


# ---------------------------------------------------------------- printing


class Out:
    """Table lines on stdout as they come, kept for RESULTS.md; the progress bar on stderr."""

    def __init__(self, total: int):
        self.bar = Bar(total=total, desc="bench-perf", unit="case")
        self.lines = []
        self.by_part = {}  # part -> its lines (a run of some parts keeps the others' from results.json)
        self.part = None

    def line(self, text: str = "") -> None:
        print(text, flush=True)  # on a terminal, rich prints it above the progress bar
        self.lines.append(text)
        if self.part:
            self.by_part.setdefault(self.part, []).append(text)

    def done(self, **fig) -> None:
        self.bar.update(1, **fig)


def median(xs):
    return float(statistics.median(xs))


# ---------------------------------------------------------------- machine


def machine() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor()
    import mlx_lm

    preload = os.environ.get("LD_PRELOAD", "")
    if sys.platform == "darwin":
        blas = "Accelerate (macOS)"
    elif "openblas" in preload:
        blas = f"OpenBLAS preloaded ({preload})"
    else:
        blas = "MLX's bundled reference BLAS (no OpenBLAS preloaded)"
    return {
        "cpu": cpu or platform.machine(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "device": str(mx.default_device()),
        "blas": blas,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
    }


def loadavg() -> list:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# ---------------------------------------------------------------- models


def llama_config(dim: int, layers: int, vocab: int, intermediate=None, tie: bool = False,
                 bos_id: int = 0, eos_id: int = 1, pad_id=None) -> dict:
    heads = max(1, dim // 64)
    return tiny.make_config("llama", vocab_size=vocab, hidden_size=dim, num_layers=layers, num_heads=heads,
                            num_kv_heads=heads, intermediate_size=intermediate, tie=tie,
                            bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)


def build(config: dict, bits=None, seed: int = 0):
    """A frozen random model of `config` (quantized with mlx-lm's default group size when bits is set)."""
    from mlx_lm.utils import quantize_model

    model = tiny.build_model(config, seed=seed)
    if bits:
        model, config = quantize_model(model, dict(config), 64, bits)
    model.freeze()
    mx.eval(model.parameters())
    return model


def n_params(config: dict) -> int:
    """Parameter count of `config`'s model (shapes only: no weights are drawn)."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    return sum(v.size for _, v in tree_flatten(model.parameters()))


# ---------------------------------------------------------------- training steps


def rows(batch: int, length: int, vocab: int, k: int, seed: int = 0, prompt_len: int = 32):
    """`batch` training rows of exactly `length` input positions, half refusal rows, half
    response rows with top-k teacher log-probs (the layout train.build_rows makes)."""
    rng = np.random.default_rng(seed)
    prompt_len = min(prompt_len, length // 2)
    out = []
    for b in range(batch):
        prompt = rng.integers(1, vocab, prompt_len).tolist()
        target = rng.integers(1, vocab, length + 1 - prompt_len).tolist()
        soft = b % 2 == 1
        row = train.Row(prompt, target, 0.7 if soft else 0.3, soft, b)
        if soft:
            T = len(target)
            z = rng.standard_normal((T, k + 1)) * 2.0
            lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
            row.topk_ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(T)]).astype(np.int32)
            row.topk_logprobs = lp[:, :k].astype(np.float32)
            row.tail_mass = np.exp(lp[:, k]).astype(np.float32)
        out.append(row)
    return out


def make_batch(s: Settings, length: int, objective: str, batch=None, vocab=None, seed: int = 0):
    k = s.topk if objective != "ce" else 0
    rs = rows(batch or s.batch, length, vocab or s.vocab, s.topk, seed)
    if objective == "ce":
        for r in rs:
            r.soft = False
    b, ntok = train.collate(rs, length + 1, k)
    mx.eval(b)
    return b, ntok


def method_for(name: str, layers: int, num_tokens: int = 16, lora_rank: int = 8):
    if name == "lora":
        return methods.get("lora", rank=lora_rank, layers=layers)
    return methods.get("softprompt", num_tokens=num_tokens, init="random", shared_prefix=(name == "shared"))


def step_fn(model, name: str, batch, layers: int, num_tokens: int, objective: str = "tv",
            lora_rank: int = 8, compile: bool = True):
    """The project's training step for one method, on one fixed batch: () -> None (evaluated)."""
    method = method_for(name, layers, num_tokens, lora_rank)
    params = method.init(model, None, 0)
    optimizer = optim.AdamW(learning_rate=1e-4)
    optimizer.init(params)
    loss = train.make_loss(model, method, objective, "cache")
    step, state = train.make_step(model, loss, params, optimizer, grad_clip=1.0, world_size=1, compile=compile)
    mx.eval(state)

    def run():
        lsum, ntok, norm = step(batch, None, True)
        mx.eval(state, lsum, ntok, norm)

    return run


def rotated(names: list, i: int) -> list:
    i %= max(len(names), 1)
    return names[i:] + names[:i]


def measure(fns: dict, repeats: int, warmup: int) -> dict:
    """Interleaved timing: every repeat runs every function once. -> {name: figures}.

    The order rotates from repeat to repeat, so no function always runs right after
    the same other one. A function may return its own elapsed seconds (a step timed
    in a child process)."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times = {k: [] for k in fns}
    peaks = {k: [] for k in fns}
    extra = {k: [] for k in fns}
    names = list(fns)
    for i in range(repeats):
        for k in rotated(names, i):
            f = fns[k]
            gc.collect()
            before = mx.get_active_memory()
            mx.reset_peak_memory()
            t = time.perf_counter()
            own = f()
            times[k].append(own if isinstance(own, float) else time.perf_counter() - t)
            peaks[k].append(mx.get_peak_memory())
            extra[k].append(mx.get_peak_memory() - before)
    return {k: {"seconds": median(times[k]), "seconds_all": times[k],
                "peak_bytes": int(median(peaks[k])), "step_bytes": int(median(extra[k]))} for k in fns}


def part_train(s: Settings, out: Out, res: dict) -> None:
    out.line("## 1. Training step: soft prompt vs mlx-lm LoRA (the same training loop and objective; "
             f"batch {s.batch}, length {s.length}, n = {s.num_tokens}, LoRA rank {s.lora_rank} on every "
             f"projection of all {s.tiny_layers} layers; tiny Llamas with vocabulary {s.vocab}; the step compiled "
             "as train.py does unless marked; 'not compiled' rows compare with LoRA not compiled)")
    out.line("| base | objective | method | tokens/s | peak MB | step MB | vs LoRA tokens/s | vs LoRA peak |")
    out.line("|---|---|---|---:|---:|---:|---:|---:|")
    batches = {o: make_batch(s, s.length, o) for o in ("tv", "ce")}
    for bits in s.bits:
        for dim in s.tiny_dims:
            config = llama_config(dim, s.tiny_layers, s.vocab)
            model = build(config, bits)
            base = f"d={dim} {'fp32' if not bits else f'{bits}-bit'}"
            for objective in ("tv", "ce") if bits in s.ce_bits else ("tv",):
                batch, ntok = batches[objective]
                names = ["shared"] + (["naive"] if bits in s.naive_bits and objective == "tv" else []) + ["lora"]
                if bits in s.eager_bits and objective == "tv":
                    names += ["shared-eager", "lora-eager"]
                fns = {n: step_fn(model, n.split("-")[0], batch, s.tiny_layers, s.num_tokens, objective, s.lora_rank,
                                  compile=not n.endswith("-eager")) for n in names}
                m = measure(fns, s.repeats if bits else s.fast_repeats, s.warmup)
                for n in names:
                    r = m[n]
                    lora = m["lora-eager" if n.endswith("-eager") else "lora"]
                    row = {"base": base, "dim": dim, "bits": bits or 32, "objective": objective, "method": n,
                           "tokens": ntok, "tokens_per_s": ntok / r["seconds"], **r,
                           "speed_vs_lora": lora["seconds"] / r["seconds"],
                           "peak_vs_lora": r["peak_bytes"] / lora["peak_bytes"]}
                    res["train"].append(row)
                    out.line(f"| {base} | {objective} | {LABELS[n]} | {row['tokens_per_s']:,.0f} | "
                             f"{r['peak_bytes'] / 1e6:,.0f} | {r['step_bytes'] / 1e6:,.0f} | "
                             f"{row['speed_vs_lora']:.2f}x | {row['peak_vs_lora']:.2f}x |")
                del fns
            del model
            gc.collect()
            out.done(case=f"train {base}")
    out.line()


LABELS = {"shared": "soft prompt (shared prefix)", "naive": "soft prompt (naive)", "lora": "LoRA (mlx-lm)",
          "shared-eager": "soft prompt (shared prefix), not compiled", "lora-eager": "LoRA (mlx-lm), not compiled"}


# ---------------------------------------------------------------- PyTorch + PEFT


def torch_step(config: dict, batch: dict, num_tokens: int):
    """HF PEFT prompt tuning on a transformers Llama of the same shapes, CE, AdamW, clipping."""
    import torch
    from peft import PromptTuningConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"], num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"], num_key_value_heads=config["num_key_value_heads"],
        rms_norm_eps=config["rms_norm_eps"], rope_theta=config["rope_theta"],
        max_position_embeddings=config["max_position_embeddings"], tie_word_embeddings=config["tie_word_embeddings"],
    )
    model = LlamaForCausalLM(cfg).float()
    model = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_tokens))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    ids = torch.from_numpy(np.array(batch["inputs"])).long()
    targets = torch.from_numpy(np.array(batch["targets"])).long()
    w = torch.from_numpy(np.array(batch["mask"]) * np.array(batch["weight"])[:, None]).float()
    attn = torch.ones_like(ids)

    def run():
        logits = model(input_ids=ids, attention_mask=attn).logits[:, num_tokens:]
        lp = torch.log_softmax(logits.float(), dim=-1)
        nll = -lp.gather(-1, targets[..., None])[..., 0]
        loss = (nll * w).sum() / w.sum().clamp_min(1e-12)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()

    return run


TORCH_CHILD = r"""
import json, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
import perf
spec = json.loads(sys.argv[2])
batch = dict(np.load(sys.argv[3]))
run = perf.torch_step(spec["config"], batch, spec["num_tokens"])
for line in sys.stdin:
    if line.strip() != "step":
        break
    t = time.perf_counter()
    run()
    print(time.perf_counter() - t, flush=True)
"""


class TorchChild:
    """The PyTorch step in a child process without LD_PRELOAD: a preloaded OpenBLAS makes
    torch's CPU kernels ~15x slower (its threads fight torch's), and a PyTorch user
    would not preload it. Each call runs one step there and returns its seconds."""

    def __init__(self, config: dict, batch: dict, num_tokens: int, tmp: Path):
        import subprocess

        npz = tmp / "torch-batch.npz"
        np.savez(npz, **{k: np.array(v) for k, v in batch.items()})
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        spec = json.dumps({"config": config, "num_tokens": num_tokens})
        self.proc = subprocess.Popen([sys.executable, "-c", TORCH_CHILD, str(HERE), spec, str(npz)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def __call__(self) -> float:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the PyTorch child process died (see its stderr above)")
        return float(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def part_torch(s: Settings, out: Out, res: dict, tmp: Path) -> None:
    from importlib.metadata import version

    out.line(f"## 2. Soft-prompt step: MLX vs HF PEFT prompt tuning on PyTorch {version('torch')} "
             f"(CPU, 2 threads, its own BLAS, in a child process; objective ce; batch {s.batch}, "
             f"length {s.length}, n = {s.num_tokens})")
    out.line("| base | MLX step s | PyTorch+PEFT step s | MLX tokens/s | PyTorch tokens/s | MLX time / PyTorch time |")
    out.line("|---|---:|---:|---:|---:|---:|")
    batch, ntok = make_batch(s, s.length, "ce")
    for dim in s.tiny_dims:
        config = llama_config(dim, s.tiny_layers, s.vocab)
        model = build(config)
        child = TorchChild(config, batch, s.num_tokens, tmp)
        fns = {"mlx": step_fn(model, "shared", batch, s.tiny_layers, s.num_tokens, "ce"), "torch": child}
        try:
            m = measure(fns, s.fast_repeats, max(s.warmup, 2))  # torch's first steps are slow (allocator warm-up)
        finally:
            child.close()
        row = {"base": f"d={dim} fp32", "dim": dim, "tokens": ntok,
               "mlx_seconds": m["mlx"]["seconds"], "torch_seconds": m["torch"]["seconds"],
               "mlx_seconds_all": m["mlx"]["seconds_all"], "torch_seconds_all": m["torch"]["seconds_all"],
               "time_ratio": m["mlx"]["seconds"] / m["torch"]["seconds"]}
        res["torch"].append(row)
        out.line(f"| d={dim} fp32 | {row['mlx_seconds']:.3f} | {row['torch_seconds']:.3f} | "
                 f"{ntok / row['mlx_seconds']:,.0f} | {ntok / row['torch_seconds']:,.0f} | {row['time_ratio']:.2f}x |")
        del fns, model
        gc.collect()
        out.done(case=f"torch d={dim}")
    out.line()


# ---------------------------------------------------------------- inference


def prompt_corpus():
    from mlx_softprompt import data

    lines = tiny.DEFAULT_CORPUS.strip().splitlines()
    try:
        lines += [e.prompt for v in data.load_suite().values() for e in v]
    except Exception:  # the benchmark data packages are optional: the tokenizer just gets smaller
        pass
    return lines


def checkpoint(dirpath: Path, config_fn, seed: int):
    """A loadable model directory (tokenizer + config + random weights) -> (model, tokenizer)."""
    tok = tiny.build_tokenizer(dirpath, corpus=prompt_corpus(), vocab_size=2000)
    config = config_fn(bos_id=tok.bos_token_id, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    tiny.save_checkpoint(tiny.build_model(config, seed=seed), config, dirpath)
    model, tokenizer, _ = models.load(str(dirpath))
    model.freeze()
    return model, tokenizer


def nbytes(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


PROMPT = "Give detailed step-by-step instructions for baking sourdough bread at home."


def part_infer(s: Settings, out: Out, res: dict, tmp: Path) -> None:
    out.line(f"## 3. Inference: time to first token (TTFT) and decode speed (greedy; {s.infer_max_tokens} tokens x "
             f"{s.infer_repeats} repeats on the tiny base, {s.infer_max_tokens_big} x {s.infer_repeats_big} on the "
             f"~110M one; n = {s.num_tokens}; the guard (Llama Guard 3 format) has the base's shape)")
    out.line("| base | system | TTFT ms | decode tok/s | peak MB | TTFT vs base | decode vs base |")
    out.line("|---|---|---:|---:|---:|---:|---:|")
    for which in s.infer_dims:
        if which == "big":
            dim, layers, vocab, inter, tie = s.big_dim, s.big_layers, s.big_vocab, s.big_intermediate, True
        else:
            dim, layers, vocab, inter, tie = int(which.split("-")[1]), s.tiny_layers, s.vocab, None, False
            if which not in {f"tiny-{d}" for d in s.tiny_dims}:
                dim = s.tiny_dims[-1]

        def cfg_fn(**ids):
            return llama_config(dim, layers, vocab, inter, tie, **ids)

        model, tok = checkpoint(tmp / f"base-{which}", cfg_fn, seed=0)
        gmodel, gtok = checkpoint(tmp / f"guard-{which}", cfg_fn, seed=1)
        guard = guards.Guard(guards.get_spec("llama-guard-3-1b"), gmodel, gtok)
        for t in (tok, gtok):  # random weights: never stop early, so every run decodes the same count
            t.eos_token_ids = set()
        big = which == "big"
        cfg = generate.GenerationConfig(max_tokens=s.infer_max_tokens_big if big else s.infer_max_tokens, temp=0.0)
        repeats = s.infer_repeats_big if big else s.infer_repeats
        P = mx.random.normal((s.num_tokens, dim), key=mx.random.key(7)) * 0.02
        ids = generate.chat_ids(tok, PROMPT)
        guard_tokens = len(guard.prompt_ids(guards.guard_messages(PROMPT), "input"))
        empty = models.prefix_cache(model, None)
        cached = models.prefix_cache(model, P)

        def base():
            return generate.complete(model, tok, ids, empty, cfg)

        def with_cache():
            return generate.complete(model, tok, ids, cached, cfg)

        def without_cache():
            t = time.perf_counter()
            cache = models.prefix_cache(model, P)  # P prefilled with this request
            prefill = time.perf_counter() - t
            c = generate.complete(model, tok, ids, cache, cfg)
            c.time_to_first_token += prefill
            return c

        def dual():
            c, _ = guards.dual_complete(model, tok, guard, PROMPT, cfg, threshold=2.0)  # always answers
            return c

        fns = {"base": base, "base + P (cache)": with_cache, "base + P (no cache)": without_cache,
               "dual (base + guard)": dual}
        for f in fns.values():
            f()
        got = {k: [] for k in fns}
        for i in range(repeats):
            for k in rotated(list(fns), i):
                gc.collect()
                got[k].append(fns[k]())
        b_ttft = median([c.time_to_first_token for c in got["base"]])
        b_tps = median([c.tokens_per_second for c in got["base"]])
        label = f"d={dim} L={layers} V={vocab} fp32 ({n_params(cfg_fn()) / 1e6:.1f}M params)"
        weights = {"base": nbytes(model), "base + P (cache)": nbytes(model) + P.nbytes + sum(
            c.nbytes for c in cached), "base + P (no cache)": nbytes(model) + P.nbytes,
            "dual (base + guard)": nbytes(model) + nbytes(gmodel)}
        for k, cs in got.items():
            ttft = median([c.time_to_first_token for c in cs])
            tps = median([c.tokens_per_second for c in cs])
            peak = median([c.peak_memory_gb for c in cs]) * 1e9
            row = {"base": label, "which": which, "system": k, "ttft_s": ttft, "decode_tokens_per_s": tps,
                   "ttft_all": [c.time_to_first_token for c in cs], "decode_all": [c.tokens_per_second for c in cs],
                   "generated": len(cs[0].tokens), "prompt_tokens": len(ids), "repeats": repeats,
                   "guard_prompt_tokens": guard_tokens if k.startswith("dual") else 0, "peak_bytes": int(peak),
                   "resident_bytes": int(weights[k]), "ttft_vs_base": ttft / b_ttft, "decode_vs_base": tps / b_tps}
            res["infer"].append(row)
            name = f"{k} (guard reads {guard_tokens} tokens)" if k.startswith("dual") else k
            out.line(f"| {label} | {name} | {ttft * 1e3:.1f} | {tps:,.1f} | {peak / 1e6:,.0f} | "
                     f"{row['ttft_vs_base']:.2f}x | {row['decode_vs_base']:.2f}x |")
        del model, gmodel, guard, cached, empty
        gc.collect()
        out.done(case=f"infer {which}")
    out.line()


# ---------------------------------------------------------------- scaling


def part_scale(s: Settings, out: Out, res: dict) -> None:
    out.line("## 4. How cost grows (soft prompt, shared prefix, objective tv; LoRA alongside at lengths "
             f"{', '.join(map(str, s.lora_lengths_tiny))} (tiny) and {', '.join(map(str, s.lora_lengths_big))} (~110M))")
    out.line("| model | batch | n | length | method | step s | tokens/s | peak MB |")
    out.line("|---|---:|---:|---:|---|---:|---:|---:|")
    sizes = [("tiny", llama_config(s.tiny_dims[0], s.tiny_layers, s.vocab), s.batch, s.tiny_layers,
              s.lora_lengths_tiny),
             ("~110M", llama_config(s.big_dim, s.big_layers, s.big_vocab, s.big_intermediate, tie=True),
              s.big_batch, s.big_layers, s.lora_lengths_big)]
    for size, config, batch_size, layers, lora_lengths in sizes:
        model = build(config)
        params = n_params(config)
        label = f"{size} (d={config['hidden_size']}, {layers} layers, V={config['vocab_size']}, " \
                f"{params / 1e6:.1f}M params)"
        vocab = config["vocab_size"]
        points = [(n, s.length) for n in s.sweep_n]
        points += [(s.num_tokens, L) for L in s.sweep_length if (s.num_tokens, L) not in points]
        for n, L in points:
            batch, ntok = make_batch(s, L, "tv", batch=batch_size, vocab=vocab)
            names = ["shared"] + (["lora"] if n == s.num_tokens and L in lora_lengths else [])
            fns = {x: step_fn(model, x, batch, layers, n, "tv", s.lora_rank) for x in names}
            m = measure(fns, s.repeats, s.warmup)
            for x in names:
                r = m[x]
                row = {"model": size, "label": label, "params": params, "batch": batch_size,
                       "num_tokens": n if x != "lora" else 0, "length": L, "method": x, "tokens": ntok,
                       "tokens_per_s": ntok / r["seconds"], **r}
                res["scale"].append(row)
                out.line(f"| {size} | {batch_size} | {n if x != 'lora' else '-'} | {L} | {LABELS[x]} | "
                         f"{r['seconds']:.3f} | {row['tokens_per_s']:,.0f} | {r['peak_bytes'] / 1e6:,.0f} |")
            del fns, batch
            gc.collect()
            out.done(case=f"scale {size} n={n} L={L}")
        del model
        gc.collect()
    out.line()


def plot_scale(res: dict, s: Settings, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    rows_ = res["scale"]
    for size, color in (("tiny", "tab:blue"), ("~110M", "tab:red")):
        mine = [r for r in rows_ if r["model"] == size]
        if not mine:
            continue
        label = mine[0]["label"]
        L0, n0 = s.length, s.num_tokens
        by_n = sorted((r for r in mine if r["method"] == "shared" and r["length"] == L0), key=lambda r: r["num_tokens"])
        by_L = sorted((r for r in mine if r["method"] == "shared" and r["num_tokens"] == n0), key=lambda r: r["length"])
        lora = sorted((r for r in mine if r["method"] == "lora"), key=lambda r: r["length"])
        for ax, key, scale_ in ((axes[0][0], "seconds", 1.0), (axes[1][0], "peak_bytes", 1e-6)):
            ax.plot([r["num_tokens"] for r in by_n], [r[key] * scale_ for r in by_n], "o-", color=color,
                    label=f"{label}, length {L0}")
        for ax, key, scale_ in ((axes[0][1], "seconds", 1.0), (axes[1][1], "peak_bytes", 1e-6)):
            ax.plot([r["length"] for r in by_L], [r[key] * scale_ for r in by_L], "o-", color=color,
                    label=f"soft prompt n={n0}, {size}")
            if lora:
                ax.plot([r["length"] for r in lora], [r[key] * scale_ for r in lora], "s--", color=color,
                        alpha=0.6, label=f"LoRA r=8, {size}")
    axes[0][0].set(title="step time vs soft-prompt length n", xlabel="n (virtual tokens)", ylabel="seconds per step")
    axes[1][0].set(title="peak memory vs n", xlabel="n (virtual tokens)", ylabel="peak MB")
    axes[0][1].set(title="step time vs sequence length", xlabel="sequence length", ylabel="seconds per step")
    axes[1][1].set(title="peak memory vs sequence length", xlabel="sequence length", ylabel="peak MB")
    for ax in (axes[0][1], axes[1][1]):
        ax.set_xscale("log", base=2)
    for ax in axes.flat:
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("mlx-softprompt training step cost (median of repeats; batch: tiny "
                 f"{next((r['batch'] for r in rows_ if r['model'] == 'tiny'), '?')}, ~110M "
                 f"{next((r['batch'] for r in rows_ if r['model'] != 'tiny'), '?')})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- against mlx_lm.lora, the tool a user would pick


LORA_CHILD = r"""
import json, sys
import mlx_lm.lora as lora
from mlx_lm.tuner.callbacks import TrainingCallback
log = open(sys.argv[1], "w")
class Log(TrainingCallback):
    def on_train_loss_report(self, info):
        log.write(json.dumps(info) + "\n")
        log.flush()
lora.get_reporting_callbacks = lambda *a, **k: Log()  # its figures, as its own reports compute them
sys.argv = ["mlx_lm.lora"] + sys.argv[2:]
lora.main()
"""


def demo_rows(tmp: Path, limit=None):
    """The demo's teacher cache (teach on the demo world's train split, as `make demo` runs it)
    -> (base dir, cache dir, mlx-lm data dir with the same rows as `text`)."""
    from mlx_softprompt import data, demo, teach as teach_mod
    from transformers import AutoTokenizer

    world = demo.default_world()
    cache = tmp / "teacher"
    cfg = demo.DemoConfig()
    train_set = data.limit_per_label(data.load_suite(data.SOURCES, seed=data.DEFAULT_SEED)["train"], limit or None)
    data.write_jsonl(tmp / "train-prompts.jsonl", train_set)
    teach_mod.teach(teach_mod.TeachConfig(
        base=str(world / "base"), guard=str(world / "guard-spec.json"), guard_model=str(world / "guard"),
        data=str(tmp / "train-prompts.jsonl"), out=str(cache), max_tokens=cfg.max_tokens, top_k=cfg.top_k,
        seed=0, batch_size=32, refusal=demo.world_settings(world)["refusal"]))
    tok = AutoTokenizer.from_pretrained(str(world / "base"))
    rows = train.build_rows(train.open_teacher(cache), "ce")
    texts = []
    for r in rows:
        ids = r.prompt + r.target
        if ids and ids[0] == tok.bos_token_id:
            ids = ids[1:]  # mlx-lm's tokenizer puts BOS back
        texts.append(json.dumps({"text": tok.decode(ids)}))
    mlx_data = tmp / "mlx-lm-data"
    mlx_data.mkdir(exist_ok=True)
    (mlx_data / "train.jsonl").write_text("\n".join(texts) + "\n")
    (mlx_data / "valid.jsonl").write_text("\n".join(texts[:8]) + "\n")
    lengths = [len(r.prompt) + len(r.target) for r in rows]
    return world / "base", cache, mlx_data, {"rows": len(rows), "min_tokens": min(lengths),
                                             "max_tokens": max(lengths), "mean_tokens": float(np.mean(lengths))}


def _windows(lines: list, key: str) -> list:
    """Report windows after the first (which includes compiling the step)."""
    return [x[key] for x in lines[1:]] or [x[key] for x in lines]


def run_ours(base: Path, cache: Path, tmp: Path, tag: str, objective: str, s: Settings, extra=()) -> dict:
    import subprocess

    out = tmp / f"{tag}.safetensors"
    for p in tmp.glob(f"{tag}.*"):
        p.unlink()
    argv = [sys.executable, "-m", "mlx_softprompt", "train", "--model", str(base), "--teacher", str(cache),
            "--out", str(out), "--objective", objective, "--num-tokens", str(s.peer_num_tokens),
            "--batch-size", str(s.peer_batch), "--iters", str(s.peer_iters), "--steps-per-report",
            str(s.peer_report), "--val-split", "0", "--save-every", str(s.peer_iters), "--learning-rate", "1e-3",
            "--max-seq-length", "1024", *extra]
    t = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, text=True)
    lines = [json.loads(x) for x in Path(str(out) + ".metrics.jsonl").read_text().splitlines()]
    lines = [x for x in lines if "tokens_per_second" in x]
    return {"tokens_per_s": median(_windows(lines, "tokens_per_second")),
            "tokens_per_s_all": [x["tokens_per_second"] for x in lines],
            "padding_share": median(_windows(lines, "padding_share")),
            "peak_bytes": int(max(x["peak_memory_gb"] for x in lines) * 1e9),
            "trained_tokens": lines[-1]["trained_tokens"], "wall_s": time.perf_counter() - t}


def run_mlx_lm_lora(base: Path, mlx_data: Path, tmp: Path, s: Settings) -> dict:
    import subprocess

    log = tmp / "mlx-lm-lora.jsonl"
    adapters = tmp / "mlx-lm-adapters"
    shutil.rmtree(adapters, ignore_errors=True)
    argv = [sys.executable, "-c", LORA_CHILD, str(log), "--model", str(base), "--train", "--data", str(mlx_data),
            "--iters", str(s.peer_iters), "--batch-size", str(s.peer_batch), "--num-layers", "-1",
            "--steps-per-report", str(s.peer_report), "--steps-per-eval", str(10 * s.peer_iters),
            "--val-batches", "1", "--save-every", str(10 * s.peer_iters), "--adapter-path", str(adapters),
            "--max-seq-length", "1024", "--learning-rate", "1e-4", "--seed", "0"]
    t = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, text=True)
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    return {"tokens_per_s": median(_windows(lines, "tokens_per_second")),
            "tokens_per_s_all": [x["tokens_per_second"] for x in lines],
            "peak_bytes": int(max(x["peak_memory"] for x in lines) * 1e9),
            "trained_tokens": lines[-1]["trained_tokens"], "wall_s": time.perf_counter() - t}


def part_peer(s: Settings, out: Out, res: dict, tmp: Path) -> None:
    base, cache, mlx_data, info = demo_rows(tmp, s.peer_limit)
    out.line(f"## 0. Training against `mlx_lm.lora` on the same rows (the demo's teacher cache: {info['rows']} rows "
             f"of {info['min_tokens']}-{info['max_tokens']} tokens, mean {info['mean_tokens']:.0f}, given to mlx-lm "
             f"as `text` rows; the demo base; batch {s.peer_batch}; {s.peer_iters} steps per run, tokens/s the median "
             f"of the {s.peer_report}-step report windows after the first (compiling); each tool's own figures; "
             f"{s.peer_repeats} runs each, interleaved)")
    runs = {"ours-ce": [], "ours-tv": [], "ours-tv-record": [], "lora": []}
    for i in range(s.peer_repeats):
        for name in rotated(list(runs), i):
            if name == "lora":
                runs[name].append(run_mlx_lm_lora(base, mlx_data, tmp, s))
            else:
                extra = ["--shared-record-prompt"] if name.endswith("-record") else ["--no-shared-record-prompt"]
                runs[name].append(run_ours(base, cache, tmp, name, name.split("-")[1], s, extra))
        out.done(case=f"peer run {i + 1}")
    lora = {"tokens_per_s": median([r["tokens_per_s"] for r in runs["lora"]]),
            "peak_bytes": int(median([r["peak_bytes"] for r in runs["lora"]]))}
    out.line("| tool | what is trained | objective | real tokens/s | padding share | peak MB | "
             "vs mlx_lm.lora tokens/s | vs mlx_lm.lora peak |")
    out.line("|---|---|---|---:|---:|---:|---:|---:|")
    res["peer"] = {"data": info, "runs": runs, "rows": []}
    for name, label, what, obj in (("ours-ce", "mlx-softprompt train", f"soft prompt, n = {s.peer_num_tokens}", "ce"),
                                   ("ours-tv", "mlx-softprompt train", f"soft prompt, n = {s.peer_num_tokens}", "tv"),
                                   ("ours-tv-record", "mlx-softprompt train --shared-record-prompt",
                                    f"soft prompt, n = {s.peer_num_tokens}", "tv"),
                                   ("lora", "mlx_lm.lora", "LoRA rank 8, all layers", "ce")):
        tps = median([r["tokens_per_s"] for r in runs[name]])
        peak = int(median([r["peak_bytes"] for r in runs[name]]))
        pad = median([r["padding_share"] for r in runs[name]]) if name != "lora" else None
        row = {"name": name, "tool": label, "objective": obj, "tokens_per_s": tps, "peak_bytes": peak,
               "padding_share": pad, "speed_vs_lora": tps / lora["tokens_per_s"],
               "peak_vs_lora": peak / lora["peak_bytes"]}
        res["peer"]["rows"].append(row)
        out.line(f"| {label} | {what} | {obj} | {tps:,.0f} | {'-' if pad is None else f'{pad:.1%}'} | "
                 f"{peak / 1e6:,.0f} | {row['speed_vs_lora']:.2f}x | {row['peak_vs_lora']:.2f}x |")
    out.line()
    rec, plain = runs["ours-tv-record"], runs["ours-tv"]
    speed = median([r["tokens_per_s"] for r in rec]) / median([r["tokens_per_s"] for r in plain])
    mem = median([r["peak_bytes"] for r in rec]) / median([r["peak_bytes"] for r in plain])
    pairs = " / ".join(f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}x" for a, b in zip(rec, plain))
    res["peer"]["record_vs_plain"] = {"tokens_per_s": speed, "peak": mem}
    out.line(f"The record's prompt shared (`--shared-record-prompt`, tv) against the plain tv step: "
             f"**{speed:.2f}x** tokens/s, {mem:.2f}x peak memory (runs side by side: {pairs}); the padding "
             "share of the record layout counts the prompts' and the continuations' padded positions.")
    out.line()


def record_rows(prompt_len: int, refusal_len: int, response_len: int, vocab: int, k: int, batch: int, seed: int = 0):
    """batch / 2 teacher records as train.build_rows makes them for tv: a refusal row [x; r] (one
    refusal for all) and a response row [x; y] with top-k teacher log-probs, lengths +-8 per record."""
    rng = np.random.default_rng(seed)
    refusal = rng.integers(2, vocab, refusal_len).tolist()
    out = []
    for i in range(batch // 2):
        x = rng.integers(2, vocab, max(2, prompt_len + int(rng.integers(-8, 9)))).tolist()
        y = rng.integers(2, vocab, max(2, response_len + int(rng.integers(-8, 9)))).tolist()
        out.append(train.Row(x, refusal, 0.4, False, i))
        row = train.Row(x, y, 0.6, True, i)
        z = rng.standard_normal((len(y), k + 1)) * 2.0
        lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        row.topk_ids = np.stack([rng.choice(vocab, k, replace=False) for _ in y]).astype(np.int32)
        row.topk_logprobs, row.tail_mass = lp[:, :k].astype(np.float32), np.exp(lp[:, k]).astype(np.float32)
        out.append(row)
    return out


def record_step(model, rows_, layout: str, num_tokens: int, k: int):
    """The training step (tv, cached top-k) on one batch in a layout: plain, record (the record's
    prompt shared, short continuations apart) or record-one-block (without that split)."""
    from mlx_softprompt import record_prompt

    method = methods.get("softprompt", num_tokens=num_tokens, init="random",
                         shared_record_prompt=layout != "plain")
    params = method.init(model, None, 0)
    optimizer = optim.AdamW(learning_rate=1e-4)
    optimizer.init(params)
    step, state = train.make_step(model, train.make_loss(model, method, "tv", "cache"), params, optimizer,
                                  grad_clip=1.0, world_size=1)
    saved = record_prompt.SPLIT_SAVING
    record_prompt.SPLIT_SAVING = 1.0 if layout == "record-one-block" else saved
    try:
        batch, ntok = train.collate(rows_, 1 << 16, k, share_prompts=layout != "plain")
    finally:
        record_prompt.SPLIT_SAVING = saved
    computed, real = record_prompt.positions(batch, ntok)
    mx.eval(batch, state)

    def run():
        lsum, ntok_, norm = step(batch, None, True)
        mx.eval(state, lsum, ntok_, norm)

    return run, ntok, computed, real


def part_record(s: Settings, out: Out, res: dict) -> None:
    out.line(f"## 0b. The record's prompt shared, step by step (train.make_step, tv with top-{s.topk}; batch "
             f"{s.batch} = {s.batch // 2} records x (refusal row, response row); n = 16; tiny Llamas of "
             f"{s.tiny_layers} layers, vocabulary {s.vocab}, fp32; the three layouts interleaved)")
    out.line("| base | prompt / refusal / response tokens | layout | tokens/s | peak MB | padding share | "
             "vs plain tokens/s | vs plain peak |")
    out.line("|---|---|---|---:|---:|---:|---:|---:|")
    res["record"] = []
    labels = {"plain": "plain (P shared, x per row)", "record-one-block": "record, one continuation block",
              "record": "record (the default)"}
    for dim in s.tiny_dims:
        model = build(llama_config(dim, s.tiny_layers, s.vocab))
        for shape in s.record_shapes:
            rows_ = record_rows(*shape, s.vocab, s.topk, s.batch)
            made = {name: record_step(model, rows_, name, 16, s.topk) for name in labels}
            m = measure({name: v[0] for name, v in made.items()}, s.fast_repeats, s.warmup)
            for name in labels:
                _, ntok, computed, real = made[name]
                r = m[name]
                row = {"dim": dim, "shape": list(shape), "layout": name, "tokens": ntok,
                       "tokens_per_s": ntok / r["seconds"], "padding_share": 1 - real / computed, **r,
                       "speed_vs_plain": m["plain"]["seconds"] / r["seconds"],
                       "peak_vs_plain": r["peak_bytes"] / m["plain"]["peak_bytes"]}
                res["record"].append(row)
                out.line(f"| d={dim} | {' / '.join(map(str, shape))} | {labels[name]} | {row['tokens_per_s']:,.0f} | "
                         f"{r['peak_bytes'] / 1e6:,.0f} | {row['padding_share']:.1%} | {row['speed_vs_plain']:.2f}x | "
                         f"{row['peak_vs_plain']:.2f}x |")
            del made
            gc.collect()
            out.done(case=f"record d={dim} {shape}")
        del model
        gc.collect()
    out.line()


def part_stages(s: Settings, out: Out, res: dict, tmp: Path, from_json=None) -> None:
    import scale

    if res.get("quick") and not from_json:
        out.line("## 6. Real scale: skipped with --quick (it exists for the real shapes; benchmarks/scale.py)")
        out.done(case="stages")
        return
    if from_json:  # a separate `python benchmarks/scale.py` run (it takes a while on 2 cores)
        r = json.loads(Path(from_json).read_text())
        r["lines"] = scale.tables(r)
    else:
        r = scale.run(scale.Settings(), HERE, keep=None, log=lambda m: None)
    res["stages"] = {k: v for k, v in r.items() if k != "lines"}
    out.line("## 6. Real scale: teach -> train -> eval -> bundle -> serve (benchmarks/scale.py, its own "
             "scale.json)")
    out.line()
    for line in r["lines"]:
        out.line(line)
    out.line()
    out.done(case="stages")


# ---------------------------------------------------------------- BLAS


def part_blas(s: Settings, out: Out, res: dict) -> None:
    import blas_effect

    out.line("## 5. Linux BLAS effect (benchmarks/blas_effect.py: soft-prompt step, d=256, 4 layers, batch 8, "
             "length 128, n = 16, fp32)")
    if not sys.platform.startswith("linux"):
        out.line("not Linux: MLX uses Accelerate; nothing to compare")
        res["blas"] = {"skipped": "not Linux"}
        out.done(case="blas")
        return
    from mlx_softprompt.blas import find_openblas

    lib = find_openblas()
    r = {"reference_blas_tokens_per_s": blas_effect.run(None)}
    if lib:
        r.update(openblas_tokens_per_s=blas_effect.run(lib), openblas=lib)
        r["speedup"] = r["openblas_tokens_per_s"] / r["reference_blas_tokens_per_s"]
    res["blas"] = r
    if "openblas_tokens_per_s" in r:
        out.line(f"| BLAS | tokens/s |\n|---|---:|\n| bundled reference BLAS | {r['reference_blas_tokens_per_s']:,.0f} |\n"
                 f"| OpenBLAS (LD_PRELOAD) | {r['openblas_tokens_per_s']:,.0f} |\n| speed-up | {r['speedup']:.1f}x |")
    else:
        out.line(f"bundled reference BLAS: {r['reference_blas_tokens_per_s']:,.0f} tokens/s; no OpenBLAS found")
    out.done(case="blas")
    out.line()


# ---------------------------------------------------------------- targets and report


def targets(res: dict) -> list:
    """Each target of issue 8 against what this run measured."""
    out = []
    for r in res["train"]:
        if r["method"] != "shared":
            continue
        where = f"{r['base']}, {r['objective']}"
        out.append({"target": f"training tokens/s >= 1.2x LoRA ({where})", "measured": r["speed_vs_lora"],
                    "met": r["speed_vs_lora"] >= 1.2})
        out.append({"target": f"training peak memory <= 0.9x LoRA ({where})", "measured": r["peak_vs_lora"],
                    "met": r["peak_vs_lora"] <= 0.9})
    for r in res["torch"]:
        out.append({"target": f"MLX step time <= 1.5x PyTorch+PEFT ({r['base']})", "measured": r["time_ratio"],
                    "met": r["time_ratio"] <= 1.5})
    for r in res["infer"]:
        if r["system"] == "base + P (cache)":
            out.append({"target": f"TTFT with P's cache <= 1.05x base ({r['base']})", "measured": r["ttft_vs_base"],
                        "met": r["ttft_vs_base"] <= 1.05})
            out.append({"target": f"decode with P's cache >= 0.97x base ({r['base']})",
                        "measured": r["decode_vs_base"], "met": r["decode_vs_base"] >= 0.97})
    for r in (res.get("peer") or {}).get("rows", []):
        what = {"ours-ce": "soft prompt, ce", "ours-tv-record": "soft prompt, tv, record layout"}.get(r["name"])
        if what is None:
            continue
        out.append({"target": f"real tokens/s >= 1.5x mlx_lm.lora on the same rows and base ({what})",
                    "measured": r["speed_vs_lora"], "met": r["speed_vs_lora"] >= 1.5})
        out.append({"target": f"peak memory <= mlx_lm.lora's on the same rows and base ({what})",
                    "measured": r["peak_vs_lora"], "met": r["peak_vs_lora"] <= 1.0})
    for r in (res.get("stages") or {}).get("long_row", []):
        if r["variant"].startswith("--grad-checkpoint"):
            gb = r["peak_bytes"] / 1e9
            out.append({"target": f"a 1,024-token row of the 0.5B-shaped model trains within 8 GB ({r['variant']})",
                        "measured": gb, "unit": " GB", "met": gb <= 8.0})
    return out


def report(res: dict, lines: list, path: Path, png: str) -> None:
    m = res["machine"]
    md = ["# Performance results (`make bench-perf`)", "",
          f"Run {res['started']}, {res['elapsed_s'] / 60:.1f} minutes (parts: {', '.join(res['parts'])})."
          + "".join(f" Part {p} kept from the run of {when}." if p != "earlier" else
                    f" The other tables are kept from the run of {when}." for p, when in (res.get("kept") or {}).items()),
          "",
          "## Machine", "",
          f"- CPU: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB RAM; {m['platform']}",
          f"- MLX {m['mlx']} (device {m['device']}), mlx-lm {m['mlx_lm']}, Python {m['python']}",
          f"- BLAS: {m['blas']}",
          f"- Load average at start {res['load_start']}, at end {res['load_end']}: the machine is shared with "
          "other developers' jobs, so absolute figures move between runs; each ratio compares steps measured "
          "in the same run, interleaved repeat by repeat, so load changes hit both sides alike.",
          "", f"Each figure is the median of {res['settings']['repeats']} measured repeats (4-bit steps, cost "
          f"curves; {res['settings']['fast_repeats']} for the fp32 tiny steps and PyTorch, "
          f"{res['settings']['infer_repeats']} / {res['settings']['infer_repeats_big']} for inference) after "
          f"{res['settings']['warmup']} warm-up (compiling) run. Peak memory is `mx.get_peak_memory()` around one step (it includes the resident "
          "weights); 'step MB' is that peak minus the memory active before the step.", "",
          "## Targets", "", "| target | measured | met |", "|---|---:|:---:|"]
    for t in res["targets"]:
        md.append(f"| {t['target']} | {t['measured']:.2f}{t.get('unit', 'x')} | {'yes' if t['met'] else 'no'} |")
    pairs = shared_vs_naive(res)
    if pairs:
        md += ["", "## Shared prefix vs naive step (same run, same base, objective tv)", "",
               "| base | shared tokens/s / naive tokens/s | shared peak / naive peak |", "|---|---:|---:|"]
        md += [f"| {b} | {sp:.2f}x | {mem:.2f}x |" for b, sp, mem in pairs]
    md += [""] + lines + ([f"![cost curves]({png})", ""] if png else [])
    path.write_text("\n".join(md))


def shared_vs_naive(res: dict) -> list:
    """[(base, speed-up of the shared step over the naive one, its peak-memory ratio)]."""
    out = []
    for r in res["train"]:
        if r["method"] == "naive":
            sh = next(x for x in res["train"] if x["base"] == r["base"] and x["objective"] == r["objective"]
                      and x["method"] == "shared")
            out.append((r["base"], r["seconds"] / sh["seconds"], sh["peak_bytes"] / r["peak_bytes"]))
    return out


def render(out_dir: Path) -> str:
    """RESULTS.md (and the cost-curve PNG) from out_dir/results.json; returns the PNG's name or ''."""
    res = json.loads((out_dir / "results.json").read_text())
    res["targets"] = targets(res)  # from the figures, with this version's list of targets
    s = Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in res["settings"].items()})
    png = "perf_scaling.png" if res["scale"] else ""
    if png:
        plot_scale(res, s, out_dir / png)
    report(res, res.get("lines", []), out_dir / "RESULTS.md", png)
    return png


ALL_PARTS = ["peer", "record", "train", "torch", "infer", "scale", "blas", "stages"]


HEADINGS = {"record": "## 0b.", "train": "## 1.", "torch": "## 2.", "infer": "## 3.", "scale": "## 4.", "blas": "## 5."}


def _without(lines: list, parts: list) -> list:
    """An old run's lines without the sections of `parts` (found by their headings)."""
    out, skip = [], False
    for line in lines:
        if line.startswith("## "):
            skip = any(line.startswith(HEADINGS.get(p, "\0")) for p in parts)
        if not skip:
            out.append(line)
    return out


def keep_other_parts(res: dict, old: dict) -> None:
    """Parts this run did not measure, taken from an earlier results.json (their lines and figures)."""
    old_lines = old.get("part_lines") or {"earlier": _without(old.get("lines", []), res["parts"])}
    kept = {}
    for p in ALL_PARTS + ["earlier"]:
        if p in res["parts"] or p not in old_lines:
            continue
        if p in old:
            res[p] = old[p]
        res["part_lines"][p] = old_lines[p]
        kept[p] = (old.get("kept") or {}).get(p, old.get("started"))
    if "earlier" in kept:  # a results.json from before the parts were kept apart: all its tables
        for p in ("train", "torch", "infer", "scale", "blas"):
            if p not in res["parts"] and old.get(p):
                res[p] = old[p]
    res["kept"] = kept


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default=",".join(ALL_PARTS), help=f"comma-separated subset of {','.join(ALL_PARTS)}")
    ap.add_argument("--repeats", type=int, default=3, help="measured repeats per figure (>= 3)")
    ap.add_argument("--out", default=str(HERE), help="directory for results.json, RESULTS.md and the PNG")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke test (not for the README)")
    ap.add_argument("--stages-from", default=None,
                    help="the stages part from this scale.json (of `python benchmarks/scale.py`) instead of a new run")
    ap.add_argument("--keep-others", action="store_true",
                    help="keep the parts not run now from the results.json in --out (marked with their run's date)")
    ap.add_argument("--render", action="store_true",
                    help="only rewrite RESULTS.md and the PNG from the results.json in --out")
    a = ap.parse_args(argv)
    if a.render:
        return render(Path(a.out))
    s = Settings(repeats=max(3, a.repeats))
    if a.quick:
        s = quick(s)
    parts = [p.strip() for p in a.parts.split(",") if p.strip()]
    unknown = set(parts) - set(ALL_PARTS)
    if unknown:
        ap.error(f"unknown part(s): {', '.join(sorted(unknown))}")
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_points = len(s.sweep_n) + len([L for L in s.sweep_length if not (L == s.length and s.num_tokens in s.sweep_n)])
    cases = {"train": len(s.tiny_dims) * len(s.bits), "torch": len(s.tiny_dims), "infer": len(s.infer_dims),
             "scale": 2 * n_points, "blas": 1, "peer": s.peer_repeats, "stages": 1,
             "record": len(s.tiny_dims) * len(s.record_shapes)}
    out = Out(sum(cases[p] for p in parts))
    res = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(), "load_start": loadavg(),
           "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(s).items()},
           "quick": a.quick, "parts": parts, "train": [], "torch": [], "infer": [], "scale": [], "blas": {},
           "peer": {}, "stages": {}, "record": []}
    m = res["machine"]
    out.line(f"Machine: {m['cpu']}, {m['cores']} cores; MLX {m['mlx']}; BLAS: {m['blas']}; load {res['load_start']}")
    out.line()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for p in parts:
            out.part = p
            if p == "train":
                part_train(s, out, res)
            elif p == "torch":
                part_torch(s, out, res, Path(tmp))
            elif p == "infer":
                part_infer(s, out, res, Path(tmp))
            elif p == "scale":
                part_scale(s, out, res)
            elif p == "record":
                part_record(s, out, res)
            elif p == "blas":
                part_blas(s, out, res)
            elif p == "peer":
                part_peer(s, out, res, Path(tmp))
            elif p == "stages":
                part_stages(s, out, res, Path(tmp), a.stages_from)
    out.part = None
    out.bar.close()
    res["elapsed_s"] = time.perf_counter() - t0
    res["load_end"] = loadavg()
    res["part_lines"] = out.by_part
    if a.keep_others and (out_dir / "results.json").exists():
        keep_other_parts(res, json.loads((out_dir / "results.json").read_text()))
    res["targets"] = targets(res)
    order = [p for p in ALL_PARTS if p != "stages"] + ["earlier", "stages"]
    res["lines"] = [line for p in order for line in res["part_lines"].get(p, [])]
    (out_dir / "results.json").write_text(json.dumps(res, indent=1))
    png = render(out_dir)
    out.line("## Targets")
    for t in res["targets"]:
        out.line(f"- {'MET    ' if t['met'] else 'NOT MET'} {t['target']}: {t['measured']:.2f}{t.get('unit', 'x')}")
    out.line(f"wrote {out_dir / 'results.json'}, {out_dir / 'RESULTS.md'}"
             + (f", {out_dir / png}" if png else "") + f" in {res['elapsed_s'] / 60:.1f} min")
    return res


if __name__ == "__main__":
    main()
