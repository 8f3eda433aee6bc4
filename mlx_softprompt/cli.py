"""The `mlx-softprompt` command line: one typer app, a thin layer over the stage modules.

Each command parses flags (names follow mlx-lm where a twin exists) and calls
one function of the module named for its stage. Mistakes a user can fix raise
UserError and are printed as one line with a non-zero exit, never a traceback.
"""

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import UserError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Distil an LLM + guard model into a soft prompt, and run it safely on a laptop.",
)


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
    hf_path: str = typer.Option(..., "--hf-path", help="HF checkpoint: local directory or hub id."),
    mlx_path: Path = typer.Option(Path("mlx_model"), "--mlx-path", help="Output MLX directory."),
    quantize: bool = typer.Option(False, "-q", "--quantize", help="Quantize the weights."),
    q_bits: int = typer.Option(4, "--q-bits", help="Bits per weight (4 or 8)."),
    q_group_size: int = typer.Option(64, "--q-group-size", help="Quantization group size."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float16 | bfloat16 | float32 (unquantized params)."),
):
    """Convert a Hugging Face checkpoint to MLX, optionally quantized."""
    from converters.hf_to_mlx import convert as run

    out = run(hf_path, mlx_path, quantize=quantize, q_bits=q_bits, q_group_size=q_group_size, dtype=dtype)
    typer.echo(f"wrote {out}")


@app.command("export-peft")
def export_peft(
    prompt_file: Path = typer.Argument(..., help="A soft-prompt file."),
    out_dir: Path = typer.Argument(..., help="Directory for adapter_config.json + adapter_model.safetensors."),
    base_model_name: Optional[str] = typer.Option(None, "--base-model-name", help="Recorded as base_model_name_or_path."),
):
    """Write a soft-prompt file as an HF PEFT prompt-tuning adapter."""
    from .peft_io import export_peft as run

    typer.echo(f"wrote {run(prompt_file, out_dir, base_model_name=base_model_name)}")


@app.command("import-peft")
def import_peft(
    adapter_dir: Path = typer.Argument(..., help="A PEFT prompt-tuning adapter directory."),
    out: Path = typer.Argument(..., help="Output prompt file (.safetensors)."),
    model: str = typer.Option(..., "--model", help="The MLX base model the adapter belongs to."),
):
    """Read a PEFT prompt-tuning adapter back into a prompt file."""
    from .peft_io import import_peft as run

    typer.echo(f"wrote {run(adapter_dir, out, model)}")


# ---------------------------------------------------------------- generation


@app.command()
def generate(
    model: Optional[str] = typer.Option(None, "--model", help="MLX model dir or hub id (or a bundle dir)."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="Soft prompt to put in front."),
    text: str = typer.Option(..., "--text", help="The user message."),
    system: Optional[str] = typer.Option(None, "--system", help="A system message."),
    max_tokens: int = typer.Option(256, "--max-tokens"),
    temp: float = typer.Option(0.0, "--temp"),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    as_json: bool = typer.Option(False, "--json", help="Print text, tokens and timings as JSON."),
):
    """One chat-templated completion with the soft prompt in front."""
    from .generate import GenerationConfig, complete, chat_ids
    from .session import open_system

    system_ = open_system(model, prompt_file)
    cfg = GenerationConfig(max_tokens=max_tokens, temp=temp, top_p=top_p, seed=seed)
    ids = chat_ids(system_.tokenizer, text, system=system)
    out = complete(system_.model, system_.tokenizer, ids, system_.cache, cfg)
    if as_json:
        _echo_json(out.as_dict())
    else:
        typer.echo(out.text)


def main(argv: Optional[List[str]] = None) -> None:
    from .blas import maybe_reexec

    if argv is None:
        maybe_reexec()
    try:
        app(args=argv, standalone_mode=False, prog_name="mlx-softprompt")
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except (typer.Abort, EOFError):
        sys.exit(1)
    except Exception as e:  # click usage errors are handled by standalone_mode below
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Exit):
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
