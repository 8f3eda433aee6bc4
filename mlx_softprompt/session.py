"""Open "a base model with its soft prompt" once, for generate, chat and serve.

The prompt file is checked against the base (fingerprint) and P's key/value
cache is computed here, once; every request then starts from a copy of it.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx

from . import models, prompt_file as pf
from .errors import UserError


@dataclass
class System:
    model: Any
    tokenizer: Any
    config: dict
    prompt: Optional[mx.array] = None
    prompt_file: Optional[pf.PromptFile] = None
    cache: Any = None
    name: str = "model"


def open_system(model: Optional[str], prompt_file: Optional[Path] = None) -> System:
    """Load the base (or a bundle directory) and its soft prompt, with P's cache ready."""
    if model is None:
        raise UserError("--model is required (an MLX model directory, hub id or bundle directory)")
    path = Path(model)
    if path.is_dir() and (path / "bundle.json").exists():
        from .bundle import open_bundle

        return open_bundle(path, prompt_file_override=prompt_file)
    m, tok, config = models.load(model)
    prompt, file = None, None
    if prompt_file is not None:
        file = pf.load(prompt_file)
        if file.method != "softprompt":
            raise UserError(f"{prompt_file}: a {file.method!r} file, not a soft prompt")
        file.check_base(m, config)
        prompt = file.prompt
    return System(m, tok, config, prompt, file, models.prefix_cache(m, prompt), name=str(model))
