"""The `mlx-softprompt` command line: one typer app, a thin layer over the stage modules.

Each command parses flags (names follow mlx-lm where a twin exists) and calls
one function of the module named for its stage. Mistakes a user can fix raise
UserError and are printed as one line with a non-zero exit, never a traceback.
"""

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from . import checks
from .errors import UserError
from .flags import CONFIG, App

app = App(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Distil an LLM + guard model into a soft prompt, and run it safely on a laptop.",
)


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"mlx-softprompt {__version__}")
        raise typer.Exit()


@app.callback()
def _app(version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                      help="Print the version and exit.")):
    """Distil an LLM + guard model into a soft prompt, and run it safely on a laptop."""


def _echo_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, sort_keys=False, default=str))


# ---------------------------------------------------------------- files


@app.command()
def inspect(path: Path = typer.Argument(..., help="A prompt/method file (.safetensors) or a bundle directory.")):
    """Print a prompt file's (or bundle's) metadata as JSON."""
    if path.is_dir():
        from .bundle import inspect_bundle

        _echo_json(inspect_bundle(path))
    else:
        from .prompt_file import inspect as inspect_file

        _echo_json(inspect_file(path))


@app.command()
def convert(
    hf_path: str = typer.Option(..., "--hf-path", "--model", help="HF checkpoint: local directory or hub id."),
    mlx_path: Path = typer.Option(Path("mlx_model"), "--mlx-path", help="Output MLX directory."),
    quantize: bool = typer.Option(False, "-q", "--quantize", help="Quantize the weights."),
    q_bits: int = typer.Option(4, "--q-bits", help="Bits per weight (4 or 8)."),
    q_group_size: int = typer.Option(64, "--q-group-size", help="Quantization group size."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float16 | bfloat16 | float32 (unquantized params)."),
    config: Optional[Path] = CONFIG,
):
    """Convert a Hugging Face checkpoint to MLX, optionally quantized."""
    from converters.hf_to_mlx import convert as run

    checks.output_dir(mlx_path, "--mlx-path")
    out = run(hf_path, mlx_path, quantize=quantize, q_bits=q_bits, q_group_size=q_group_size, dtype=dtype)
    typer.echo(f"wrote {out}")


@app.command("export-peft")
def export_peft(
    prompt_file: Path = typer.Argument(..., help="A soft-prompt, prefix-tuning or LoRA file."),
    out_dir: Path = typer.Argument(..., help="Directory for adapter_config.json + adapter_model.safetensors."),
    base_model_name: Optional[str] = typer.Option(
        None, "--model", "--base-model-name",
        help="The HF model the adapter is for (hub id or directory), recorded as base_model_name_or_path "
             "(default: the base the file was trained on); a local directory also fills num_layers / "
             "num_attention_heads, and a LoRA's module names are checked against its checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the adapter files if OUT_DIR has them."),
):
    """Write a soft-prompt (prefix-tuning, LoRA) file as an HF PEFT prompt-tuning (prefix-tuning, LoRA) adapter."""
    from .peft_io import export_peft as run

    checks.input_file(prompt_file, "PROMPT_FILE")
    checks.output_dir(out_dir, "OUT_DIR", overwrite=overwrite)
    typer.echo(f"wrote {run(prompt_file, out_dir, base_model_name=base_model_name)}")


@app.command("import-peft")
def import_peft(
    adapter_dir: Path = typer.Argument(..., help="A PEFT prompt-tuning, prefix-tuning or LoRA adapter directory."),
    out: Path = typer.Argument(..., help="Output method file (.safetensors)."),
    model: str = typer.Option(..., "--model", help="The MLX base model the adapter belongs to."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
):
    """Read a PEFT prompt-tuning (prefix-tuning, LoRA) adapter into a soft-prompt (prefix-tuning, LoRA) file."""
    from .peft_io import import_peft as run

    checks.output_file(out, "OUT", overwrite=overwrite, suffix=".safetensors")
    typer.echo(f"wrote {run(adapter_dir, out, model)}")


# ---------------------------------------------------------------- generation


@app.command()
def generate(
    model: Optional[str] = typer.Option(None, "--model", help="MLX model dir or hub id (or a bundle dir)."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", "--adapter-path", help="A method file to apply: soft prompt, prefix tuning, LoRA adapter or steering vector."),
    prompt: str = typer.Option(..., "-p", "--prompt", help="The user message; '-' reads it from stdin."),
    system_prompt: Optional[str] = typer.Option(None, "--system-prompt", help="A system message (after the soft prompt)."),
    max_tokens: int = typer.Option(256, "-m", "--max-tokens"),
    temp: float = typer.Option(0.0, "--temp"),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    as_json: bool = typer.Option(False, "--json", help="Print text, tokens and timings as JSON."),
    config: Optional[Path] = CONFIG,
):
    """One chat-templated completion with the method file (soft prompt, adapter, ...) applied."""
    from .generate import GenerationConfig, complete, chat_ids
    from .system import open_system

    cfg = GenerationConfig(max_tokens=max_tokens, temp=temp, top_p=top_p, seed=seed)
    if prompt == "-":
        prompt = checks.read_stdin()
    checks.text(prompt, "--prompt")
    system_ = open_system(model, prompt_file)
    ids = chat_ids(system_.tokenizer, prompt, system=system_prompt)
    checks.fits_context(len(ids), system_.config, "--prompt", extra=_prefix_len(system_))
    out = complete(system_.model, system_.tokenizer, ids, system_.cache, cfg)
    if as_json:
        _echo_json(out.as_dict())
    else:
        typer.echo(out.text)


# ---------------------------------------------------------------- shipping and local use


@app.command()
def bundle(
    model: str = typer.Option(..., "--model", help="The MLX base model (directory or hub id)."),
    prompt_file: Path = typer.Option(..., "--prompt-file", "--adapter-path",
                                     help="The trained method file (soft prompt, prefix tuning, LoRA, steering)."),
    out: Path = typer.Option(..., "--out", help="Bundle directory to create (must not exist or be empty)."),
    quantize: bool = typer.Option(False, "-q", "--quantize", help="Quantize the base (mlx-lm affine)."),
    q_bits: int = typer.Option(4, "--q-bits", help="Bits per weight."),
    q_group_size: int = typer.Option(64, "--q-group-size", help="Quantization group size."),
    eval_report: Optional[Path] = typer.Option(None, "--eval-report", help="An eval report.json to summarise."),
    upload_repo: Optional[str] = typer.Option(None, "--upload-repo", help="Then push the bundle to this Hub "
                                                                           "repository (ORG/NAME; `hf auth login` first)."),
    private: bool = typer.Option(False, "--private", help="With --upload-repo: create the repository private."),
    config: Optional[Path] = CONFIG,
):
    """Base (optionally quantized) + method file (+ its KV cache when precomputable) + model card -> one directory."""
    from .bundle import BundleConfig, make_bundle

    checks.output_dir(out, "--out", hint="choose a new path or delete it first")
    cfg = BundleConfig(base=model, prompt_file=prompt_file, out=out, quantize=quantize, q_bits=q_bits,
                       q_group_size=q_group_size, eval_report=eval_report)
    out = make_bundle(cfg, log=lambda s: typer.echo(s, err=True))
    typer.echo(f"wrote {out}")
    if upload_repo:
        from .upload import upload_bundle

        typer.echo(f"uploaded to {upload_bundle(out, upload_repo, private=private)}")


@app.command()
def upload(
    path: Path = typer.Option(..., "--path", "--model", help="The bundle directory to push."),
    upload_repo: str = typer.Option(..., "--upload-repo", help="Hub repository id, ORG/NAME (created if needed)."),
    private: bool = typer.Option(False, "--private", help="Create the repository private."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch to push to (default: main)."),
):
    """Push a bundle to the Hugging Face Hub (after checking every part's sha256)."""
    from .upload import upload_bundle

    typer.echo(f"uploaded to {upload_bundle(path, upload_repo, private=private, revision=revision)}")


def _prefix_len(system) -> int:
    """Positions the system's cache already holds (a soft prompt's or a prefix's)."""
    return max((int(getattr(c, "offset", 0) or 0) for c in (system.cache or [])), default=0)


def _open_for_use(path: Optional[str], model: Optional[str], prompt_file: Optional[Path]):
    from .system import open_system

    if path is not None and model is not None:
        raise UserError("give either a bundle directory or --model, not both")
    return open_system(path or model, prompt_file)


@app.command()
def chat(
    path: Optional[str] = typer.Argument(None, hidden=True, help="A bundle directory (same as --model)."),
    model: Optional[str] = typer.Option(None, "--model", help="A bundle directory, or an MLX model (dir or hub id) "
                                                              "with --prompt-file."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", "--adapter-path", help="A method file to apply: soft prompt, prefix tuning, LoRA adapter or steering vector."),
    system_prompt: Optional[str] = typer.Option(None, "--system-prompt", help="A system message (after the soft prompt)."),
    max_tokens: int = typer.Option(256, "-m", "--max-tokens"),
    temp: float = typer.Option(0.0, "--temp"),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    guard: Optional[str] = typer.Option(None, "--guard", help="Chat with the dual system (base + this guard) instead."),
    compare: Optional[str] = typer.Option(None, "--compare", help="Show the soft prompt's and the dual system's "
                                                                  "(base + this guard) answers, one after the other."),
    guard_model: Optional[str] = typer.Option(None, "--guard-model", help="The guard's weights (dir or hub id)."),
    guard_threshold: Optional[float] = typer.Option(None, "--threshold", "--guard-threshold",
                                                    help="The dual system refuses when P(unsafe) >= this (default 0.5)."),
    jsonl: bool = typer.Option(False, "--jsonl", help="Pipe mode: stdin lines may be JSON ({\"content\": ...}); "
                                                       "each answer is printed as one JSON object per line."),
    config: Optional[Path] = CONFIG,
):
    """Interactive multi-turn chat (stdin may be a pipe: one user message per line)."""
    from .chat import ChatConfig, Conversation, DualConversation, run

    if guard and compare:
        raise UserError("give --guard or --compare, not both")
    cfg = ChatConfig(max_tokens=max_tokens, temp=temp, top_p=top_p, seed=seed, system=system_prompt, jsonl=jsonl)
    if guard_threshold is not None:
        checks.number(guard_threshold, "--threshold", lo=0, hi=1)
    sys_ = _open_for_use(path, model, prompt_file)
    if sys_.method is None and not guard:
        typer.echo("warning: no method file given: this is the bare base model", err=True)
    conversations = []
    if not guard:
        conversations.append(Conversation(sys_, system_prompt))
    if guard or compare:
        from .guards import load_guard

        g = load_guard(guard or compare, guard_model)
        conversations.append(DualConversation(sys_, g, system_prompt, threshold=guard_threshold))
    what = sys_.method.name if sys_.method is not None else "bare base"
    if sys_.prompt is not None:
        what = f"soft prompt of {sys_.prompt.shape[0]} virtual tokens"
    mode = "dual system" if guard else what + (" vs the dual system" if compare else "")
    run(conversations, cfg, banner=f"{sys_.name}: {mode}")


@app.command()
def serve(
    path: Optional[str] = typer.Argument(None, hidden=True, help="A bundle directory (same as --model)."),
    model: Optional[str] = typer.Option(None, "--model", help="A bundle directory, or an MLX model (dir or hub id) "
                                                              "with --prompt-file."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", "--adapter-path", help="A method file to apply: soft prompt, prefix tuning, LoRA adapter or steering vector."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8080, "--port"),
    model_id: Optional[str] = typer.Option(None, "--model-id", help="The id clients use (default: the bundle name or model path)."),
    max_tokens: int = typer.Option(256, "--max-tokens", help="Default when a request sets none."),
    temp: float = typer.Option(0.0, "--temp", help="Default temperature when a request sets none."),
    top_p: float = typer.Option(1.0, "--top-p", help="Default top-p when a request sets none."),
    context_length: Optional[int] = typer.Option(None, "--context-length", help="Default: the base's max_position_embeddings."),
    allowed_host: List[str] = typer.Option([], "--allowed-host", help="Also answer this Host header (repeatable; '*' for any). Default: the bound address only."),
    cors_origin: List[str] = typer.Option([], "--cors-origin", help="Let this web origin call the API, e.g. http://localhost:3000 (repeatable; '*' for any)."),
    decode_concurrency: int = typer.Option(32, "--decode-concurrency", help="Requests decoded together in one batch."),
    prompt_concurrency: int = typer.Option(8, "--prompt-concurrency", help="Prompts prefilled together in one batch."),
    max_pending: int = typer.Option(64, "--max-pending", help="Requests running or waiting; beyond it: 503 + Retry-After."),
    max_body: int = typer.Option(1 << 20, "--max-body", help="Largest request body in bytes (413 beyond)."),
    config: Optional[Path] = CONFIG,
):
    """OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /v1/models); the soft prompt is always applied."""
    from .server import ServerConfig, serve as run

    checks.port(port)
    checks.max_tokens(max_tokens)
    checks.sampling(temp, top_p)
    if context_length is not None:
        checks.positive(context_length, "--context-length")
    for name, v in (("--decode-concurrency", decode_concurrency), ("--prompt-concurrency", prompt_concurrency),
                    ("--max-pending", max_pending), ("--max-body", max_body)):
        checks.number(v, name, lo=1, hi=2**40, integer=True)
    sys_ = _open_for_use(path, model, prompt_file)
    if sys_.method is None:
        typer.echo("warning: no method file given: serving the bare base model", err=True)
    run(sys_, ServerConfig(host=host, port=port, model_id=model_id, model_path=path or model, max_tokens=max_tokens,
                           temp=temp, top_p=top_p, context_length=context_length, allowed_hosts=allowed_host,
                           cors_origins=cors_origin, max_batch=decode_concurrency, prefill_batch=prompt_concurrency,
                           max_pending=max_pending, max_body=max_body))
    # The server has stopped and its generation thread is joined. Leave without the
    # interpreter's teardown: destroying MLX's streams while a daemon thread may still
    # hold them can abort the process (seen rarely after Ctrl-C).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---------------------------------------------------------------- teaching


@app.command()
def teach(
    model: str = typer.Option(..., "--model", help="The base model (MLX dir or hub id)."),
    guard: str = typer.Option(..., "--guard", help="Guard spec: a built-in id (see `mlx-softprompt teach --help`) or a .json/.yaml spec file."),
    guard_model: Optional[str] = typer.Option(None, "--guard-model", help="The guard's weights (MLX dir or hub id); default: the spec's hub id."),
    data_file: Path = typer.Option(..., "--data", help="Prompts: JSONL with {\"prompt\": ...} or {\"messages\": [...]}, "
                                                      "or an mlx-lm data directory (its train.jsonl)."),
    out: Path = typer.Option(..., "--out", help="Teacher-cache directory (created, or resumed)."),
    mode: str = typer.Option("input", "--mode", help="input (guard judges the prompt) | output (the prompt + response)."),
    samples_per_prompt: int = typer.Option(1, "--samples-per-prompt", help="Teacher samples per prompt."),
    max_tokens: int = typer.Option(256, "--max-tokens", help="Maximum tokens per teacher sample."),
    top_k: int = typer.Option(64, "--top-k", help="Base log-probs kept per response position."),
    refusal: str = typer.Option("I'm sorry, but I can't help with that.", "--refusal", help="The refusal r."),
    hard_guard: bool = typer.Option(False, "--hard-guard", help="Use u in {0, 1} (threshold 0.5), as deployed."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed (per prompt and sample)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Sequences per batched forward / generation."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip (and count) bad data lines instead of failing."),
    shard_size: int = typer.Option(64, "--shard-size", help="Prompts per shard (the unit of resumable work)."),
    temp: float = typer.Option(1.0, "--temp", help="Sampling temperature of the teacher (1.0 samples p_f itself)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling of the teacher (1.0 = off)."),
    guard_date: Optional[str] = typer.Option(None, "--guard-date", help="YYYY-MM-DD for guard templates that print today's date (Granite Guardian 3.1)."),
    config: Optional[Path] = CONFIG,
):
    """Guard verdicts + base-model teacher samples and top-k log-probs -> a resumable teacher cache.

    Built-in guards: llama-guard-3-1b, llama-guard-3-8b, llama-guard-4, qwen3guard-gen,
    shieldgemma, granite-guardian-3 (3.0), granite-guardian-3.1, wildguard.
    """
    from . import teach as t

    from .data import data_file as resolve_data

    cfg = t.TeachConfig(base=model, guard=guard, guard_model=guard_model, data=str(resolve_data(data_file, "train")), out=str(out),
                        mode=mode, samples_per_prompt=samples_per_prompt, max_tokens=max_tokens, top_k=top_k,
                        refusal=refusal, hard_guard=hard_guard, seed=seed, batch_size=batch_size,
                        skip_bad=skip_bad, shard_size=shard_size, temp=temp, top_p=top_p, guard_date=guard_date)
    summary = t.teach(cfg)
    typer.echo(t.format_summary(summary, out))


# ---------------------------------------------------------------- training


@app.command("train")
def train_(
    model: Optional[str] = typer.Option(None, "--model", help="The base model (MLX dir or hub id)."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Teacher cache directory (from `teach`)."),
    out: Optional[str] = typer.Option(None, "--out", help="Output method file (.safetensors)."),
    objective: Optional[str] = typer.Option(None, "--objective", help="A row of the objectives table: tv (default) | kl | ce."),
    method: Optional[str] = typer.Option(None, "--method", help="softprompt (default) | prefix | lora | steer-opt."),
    num_tokens: Optional[int] = typer.Option(None, "--num-tokens", help="softprompt/prefix: length n (default 16)."),
    init: Optional[str] = typer.Option(None, "--init", help='softprompt/prefix init: text:"..." | vocab (default) | random.'),
    iters: Optional[int] = typer.Option(None, "--iters", help="Optimiser steps (default 200)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Rows per global micro-batch (default 8)."),
    learning_rate: Optional[float] = typer.Option(None, "--learning-rate", help="Peak AdamW learning rate (default 1e-3)."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW weight decay (default 0)."),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="Linear warm-up steps, then cosine decay (default 0)."),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", "--grad-accumulation-steps", help="Micro-batches per step (default 1)."),
    grad_clip: Optional[float] = typer.Option(None, "--grad-clip", help="Max gradient norm, 0 = off (default 1)."),
    max_seq_length: Optional[int] = typer.Option(None, "--max-seq-length", help="Tokens per row, P excluded (default 1024)."),
    val_split: Optional[float] = typer.Option(None, "--val-split", help="Share of prompts held out (default 0.1)."),
    val_every: Optional[int] = typer.Option(None, "--val-every", "--steps-per-eval", help="Steps between validations (default 50)."),
    val_batches: Optional[int] = typer.Option(None, "--val-batches", help="Validation batches, -1 = all (default)."),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Steps between checkpoints (default 100)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Init, split and data-order seed (default 0)."),
    teacher_mode: Optional[str] = typer.Option(None, "--teacher-mode", help="cache (top-k, default) | online (base forward)."),
    hard_guard: Optional[bool] = typer.Option(None, "--hard-guard/--soft-guard", help="Weights 1[u >= 0.5] instead of u."),
    steps_per_report: Optional[int] = typer.Option(None, "--steps-per-report", help="Steps between metric lines (default 10)."),
    metrics: Optional[str] = typer.Option(None, "--metrics", help="Metrics JSONL (default: OUT.metrics.jsonl)."),
    shared_prefix: Optional[bool] = typer.Option(None, "--shared-prefix/--no-shared-prefix",
                                                 help="Run P once per batch into shared KV caches (default on)."),
    shared_record_prompt: Optional[bool] = typer.Option(
        None, "--shared-record-prompt/--no-shared-record-prompt",
        help="softprompt/prefix: run a prompt once for all its rows (tv/kl: 2 rows a record; default on)."),
    grad_checkpoint: Optional[bool] = typer.Option(None, "--grad-checkpoint/--no-grad-checkpoint",
                                                   help="Recompute activations in the backward pass: less memory, ~1 more forward."),
    loss_chunk: Optional[int] = typer.Option(None, "--loss-chunk", help="Compute the loss over N positions at a time "
                                                                       "(no whole [B, L, vocab] logits); 0 = off (default)."),
    lora_rank: Optional[int] = typer.Option(None, "--lora-rank", help="lora: rank (default 8)."),
    lora_layers: Optional[int] = typer.Option(None, "--lora-layers", help="lora: adapt the last N blocks (default 16)."),
    lora_keys: Optional[str] = typer.Option(None, "--lora-keys", help="lora: comma-separated projections, e.g. self_attn.q_proj,self_attn.v_proj."),
    lora_scale: Optional[float] = typer.Option(None, "--lora-scale", help="lora: scale (default 20)."),
    steer_layer: Optional[int] = typer.Option(None, "--steer-layer", help="steer-opt: decoder layer (default: the middle)."),
    method_options: Optional[str] = typer.Option(
        None, "--method-options", help="The method's options as a mapping, e.g. '{rank: 4, layers: 2}' "
                                       "(in a -c file: a method_options: mapping); the flags above fill it too."),
    report_to: Optional[str] = typer.Option(None, "--report-to", help="Also log metrics to tensorboard and/or wandb "
                                                                       "(comma-separated; the package must be installed)."),
    project_name: Optional[str] = typer.Option(None, "--project-name", help="W&B project (default mlx-softprompt)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT's training-state checkpoint."),
    config: Optional[Path] = CONFIG,
    overwrite: bool = typer.Option(False, "--overwrite", help="Start afresh even if OUT exists (replacing it)."),
):
    """Train one method with one objective on a teacher cache -> a prompt file (or adapter / vector)."""
    from . import train as t

    args = t.make_args(
        None, base=model, teacher=teacher, out=out, objective=objective, method=method,
        num_tokens=num_tokens, init=init, iters=iters, batch_size=batch_size, learning_rate=learning_rate,
        weight_decay=weight_decay, warmup=warmup, grad_accum=grad_accum, grad_clip=grad_clip,
        max_seq_length=max_seq_length, val_split=val_split, val_every=val_every, val_batches=val_batches,
        save_every=save_every, seed=seed, teacher_mode=teacher_mode, hard_guard=hard_guard,
        steps_per_report=steps_per_report, metrics=metrics, shared_prefix=shared_prefix, resume=resume or None,
        shared_record_prompt=shared_record_prompt,
        grad_checkpoint=grad_checkpoint, loss_chunk=loss_chunk,
        lora_rank=lora_rank, lora_layers=lora_layers, lora_keys=lora_keys, lora_scale=lora_scale,
        steer_layer=steer_layer, method_options=t.parse_mapping(method_options, "--method-options"),
        report_to=report_to, project_name=project_name, overwrite=overwrite or None)
    summary = t.train(args, log=lambda s: typer.echo(s, err=True))
    if summary.get("rank", 0) == 0:
        val = summary["val_loss"]
        typer.echo(f"wrote {summary['out']} (step {summary['steps']}, train loss {summary['train_loss']:.4f}"
                   + (f", val loss {val:.4f}" if val is not None else "") + f"); metrics: {args.metrics_path}")


# ---------------------------------------------------------------- evaluation


@app.command("eval")
def eval_(
    model: str = typer.Option(..., "--model", help="The base model (MLX dir or hub id)."),
    prompt_file: List[Path] = typer.Option([], "--prompt-file", "--method-file", "--adapter", "--steer",
                                           help="A method file to evaluate (soft prompt, prefix tuning, LoRA, "
                                                "steering; repeatable)."),
    system_prompt: Optional[str] = typer.Option(None, "--system-prompt", help="A textual safety system prompt to evaluate."),
    guard: Optional[str] = typer.Option(None, "--guard",
                                        help="Guard spec (built-in id or spec file): adds the dual system and the guard judge."),
    guard_model: Optional[str] = typer.Option(None, "--guard-model", help="The guard's weights (MLX dir or hub id)."),
    suite: str = typer.Option("harmful,benign,borderline", "--suite",
                              help="Comma-separated sources (harmful, harmbench, strongreject, benign, borderline, everyday, "
                                   "jailbreak: the split's harmful prompts in GPTFuzzer's templates) or .jsonl files."),
    split: Optional[str] = typer.Option(None, "--split", help="train | val | test | all (the data layer's fixed "
                                                            "splits); default: test for built-in sources, all of a file."),
    seed: int = typer.Option(0, "--seed", help="Split seed (must match training's)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most N prompts of each label."),
    max_tokens: int = typer.Option(64, "--max-tokens", help="Tokens generated per answer (greedy)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Prompts generated together."),
    timing_prompts: int = typer.Option(8, "--timing-prompts", help="Requests timed one by one for the cost figures."),
    refusal: Optional[str] = typer.Option(None, "--refusal", help="The dual system's refusal text."),
    threshold: Optional[float] = typer.Option(None, "--threshold", "--guard-threshold",
                                              help="Guard threshold: u >= threshold is unsafe (default 0.5)."),
    mc: Optional[Path] = typer.Option(None, "--mc", help="Optional multiple-choice JSONL {question, choices, answer}."),
    out: Path = typer.Option(Path("report.json"), "--out", help="Where to write the report (atomically)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
    config: Optional[Path] = CONFIG,
):
    """Safety, over-refusal, agreement with the dual system, utility and cost -> report.json."""
    from . import evaluate as ev

    if limit is not None:
        checks.positive(limit, "--limit")
    checks.output_file(out, "--out", overwrite=overwrite)
    for p in prompt_file:
        checks.input_file(p, "--prompt-file")
    cfg = ev.EvalConfig(max_tokens=max_tokens, batch_size=batch_size, timing_prompts=timing_prompts,
                        threshold=ev.DEFAULT_THRESHOLD if threshold is None else threshold,
                        refusal=refusal or ev.DEFAULT_REFUSAL)
    args = ev.EvalArgs(model=model, prompt_files=[str(p) for p in prompt_file], system_prompt=system_prompt, guard=guard,
                       guard_model=guard_model, suite=suite, split=split, seed=seed, limit=limit,
                       mc=str(mc) if mc else None, out=str(out))
    report = ev.run(args, cfg)
    typer.echo(ev.summary_table(report))
    typer.echo(f"wrote {out}")


@app.command()
def bench(
    config: Path = typer.Option(Path("examples/bench.yaml"), "-c", "--config", help="Bench config (YAML)."),
    out: Path = typer.Option(Path("bench-out"), "--out", help="Output directory (resumable: finished cells are kept)."),
):
    """Every method x objective on the same base, guard and data -> results.json, table.md, tradeoff.png."""
    from . import bench as run_bench

    checks.output_dir(out, "--out", resumable=True)
    results = run_bench.run(run_bench.load_config(config), out, log=lambda s: typer.echo(s, err=True))
    typer.echo(run_bench.table(results))


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", help="Output directory (teacher cache, soft prompt, report.json, demo.png)."),
    quick: bool = typer.Option(False, "--quick", help="A reduced run (few prompts and steps), for tests."),
    seed: int = typer.Option(0, "--seed", help="Teacher sampling and training seed (splits stay those of the world)."),
    validation: bool = typer.Option(False, "--validation", help="Evaluate on validation data (validation split, everyday "
                                    "val, validation wrappers) to choose settings; never the test data."),
    world: Optional[Path] = typer.Option(None, "--world", help="World directory (default: examples/world)."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Build the world from scratch first (slow)."),
    config: Optional[Path] = CONFIG,
    chat: bool = typer.Option(False, "--chat", help="Chat with the demo's soft prompt (runs the demo first if needed)."),
    compare: bool = typer.Option(False, "--compare", help="With --chat: each answer followed by the dual system's."),
    max_tokens: int = typer.Option(64, "--max-tokens", help="With --chat: tokens per answer."),
    settings: List[str] = typer.Option([], "--set", metavar="KEY=VALUE",
                                       help="A recipe setting (repeatable): a DemoConfig field (general_train=0, "
                                            "unread_train=0, wrapped_train=1200, ...) or train.KEY (train.iters=800)."),
):
    """The whole method on the built-in tiny world: teach -> train -> eval on the test split, the
    everyday split, the jailbreak suite, everyday chats and everyday prompts after a refusal; a
    table, report.json, a plot. --chat: try your own prompts."""
    from . import demo as run_demo

    if compare and not chat:
        raise UserError("--compare goes with --chat (chat with the soft prompt and the dual system side by side)")
    checks.seed(seed)
    checks.max_tokens(max_tokens)
    checks.output_dir(out, "--out", resumable=True)
    if world is not None and not world.is_dir():
        raise UserError(f"--world {world}: no such directory")
    cfg = run_demo.DemoConfig(out=str(out), world=str(world) if world else None, seed=seed, quick=quick,
                              rebuild=rebuild, validation=validation, **run_demo.settings(settings))
    if chat:
        run_demo.chat(cfg, compare=compare, log=lambda s: typer.echo(s, err=True), max_tokens=max_tokens)
        return
    report = run_demo.run(cfg, log=lambda s: typer.echo(s, err=True))
    typer.echo(run_demo.summary(report, out))


# ---------------------------------------------------------------- data

data_app = App(no_args_is_help=True, help="The built-in prompt sets as files (JSONL) for teach, eval and your own tools.")
app.add_typer(data_app, name="data")


@data_app.command("export")
def data_export(
    out: Path = typer.Option(..., "--out", help="A .jsonl file (the --split), or a directory: train.jsonl, "
                                                  "valid.jsonl, test.jsonl (mlx-lm's data layout)."),
    suite: str = typer.Option("harmful,benign,borderline", "--suite",
                              help="Comma-separated sources, as eval's --suite (harmful = harmbench + strongreject)."),
    split: str = typer.Option("train", "--split", help="train | val | test | all: which prompts a .jsonl --out gets."),
    seed: int = typer.Option(0, "--seed", help="Split seed (the one teach, train and eval use)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most N prompts of each label (per split)."),
):
    """Write built-in prompt sets as JSONL ({"prompt", "label", "source"} per line): prompts for `teach --data`."""
    from .data import write_jsonl
    from .evaluate import load_eval_examples

    if out.exists() and (out.is_file() or any(out.iterdir())):
        raise UserError(f"{out}: already exists; choose a new path or delete it first")
    if out.suffix == ".jsonl":
        parts = {out: split}
    else:
        parts = {out / f"{name}.jsonl": part for name, part in (("train", "train"), ("valid", "val"), ("test", "test"))}
    for path, part in parts.items():
        examples = load_eval_examples(suite, part, seed, limit)
        write_jsonl(path, examples)
        counts = {}
        for e in examples:
            counts[e.label or "unlabelled"] = counts.get(e.label or "unlabelled", 0) + 1
        typer.echo(f"wrote {path}: {len(examples)} prompts of split {part} "
                   f"({', '.join(f'{n} {k}' for k, n in sorted(counts.items()))})")


def main(argv: Optional[List[str]] = None) -> None:
    from .blas import maybe_reexec

    if argv is None:
        maybe_reexec()
    try:
        app(args=argv, standalone_mode=False, prog_name="mlx-softprompt")
    except UserError as e:
        from .flags import explain

        typer.echo(f"error: {explain(str(e))}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except (typer.Abort, EOFError):
        sys.exit(1)
    except Exception as e:
        # Usage errors from click (typer may vendor its own copy of click: match by shape).
        code = getattr(e, "exit_code", None)
        if code is not None and hasattr(e, "show"):
            e.show()
            sys.exit(code)
        if code is not None and type(e).__name__ == "Exit":
            sys.exit(code)
        raise

if __name__ == "__main__":
    main()
