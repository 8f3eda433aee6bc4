"""One System: a base model plus at most one addition, the thing every command runs.

The addition is one of:

- a method file (methods/: soft prompt, prefix tuning, LoRA, steering): a method
  that does not depend on the conversation gives the key/value cache every
  request starts from (a soft prompt's P, prefix tuning's prefixes), computed
  once; one that changes weights or activations (LoRA, steering) is bound to
  the model, for the System's lifetime when opened for use (generate, chat,
  serve) or around each use when several Systems share one base (eval, bench);
- a textual system prompt (extra tokens on every request);
- a guard in front: the dual system (the teacher being distilled). It answers
  the refusal when the guard's P(unsafe | request) >= threshold, else what the
  base answers (`guards.refuses`, the one place that rule is written).

Attributes used by chat, serve, generate, eval and bench: ``model``,
``tokenizer``, ``config``, ``cache`` (copy it per request), ``name``.
``open_system`` opens one from a model directory, hub id or bundle, with an
optional method file.
"""

from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import mlx.core as mx

from . import bundle, methods, models
from .errors import UserError
from .generate import GenerationConfig, chat_ids, complete, copy_cache
from .guards import DEFAULT_REFUSAL, DEFAULT_THRESHOLD, refuses  # noqa: F401 (refuses: the dual system's rule)

KINDS = ("base", "method", "system-prompt", "dual")


def empty_cache(model):
    from mlx_lm.models.cache import make_prompt_cache

    return make_prompt_cache(model)


@dataclass
class System:
    """A base model plus at most one addition (module docstring)."""

    model: Any
    tokenizer: Any
    config: dict
    cache: Any = None
    name: str = "base"
    kind: str = "base"
    method: Optional[methods.Method] = None
    params: Optional[dict] = None
    file: Any = None  # the method file (prompt_file.PromptFile) it came from
    system_prompt: Optional[str] = None
    guard: Any = None
    threshold: float = DEFAULT_THRESHOLD
    refusal: str = DEFAULT_REFUSAL
    added_params: int = 0
    added_bytes: int = 0
    info: dict = field(default_factory=dict)
    binds: bool = False  # the method acts by binding (LoRA, steering), not through the cache
    _held: Optional[ExitStack] = field(default=None, repr=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind {self.kind!r}: one of {', '.join(KINDS)}")
        if self.cache is None:
            self.cache = empty_cache(self.model)

    # -- what the addition is
    @property
    def prompt(self) -> Optional[mx.array]:
        """The soft prompt P, when the addition is one."""
        return self.params.get("soft_prompt") if self.params is not None else None

    @property
    def prompt_file(self):
        return self.file

    @property
    def n_prefix(self) -> int:
        """Positions the prefix cache holds (n for a soft prompt or prefix tuning, else 0)."""
        offsets = {int(getattr(c, "offset", 0) or 0) for c in self.cache}
        return max(offsets) if offsets else 0

    # -- applying the method
    def bound(self):
        """A context in which the model runs with this System's method bound (no-op if held or none)."""
        if not self.binds or self._held is not None:
            return nullcontext()
        return self.method.bind(self.model, self.params)

    def hold(self) -> "System":
        """Bind the method for the System's lifetime (generate, chat, serve: one System per base)."""
        if self._held is None and self.binds:
            stack = ExitStack()
            stack.enter_context(self.method.bind(self.model, self.params))
            self._held = stack
        return self

    def close(self) -> None:
        if self._held is not None:
            self._held.close()
            self._held = None

    # -- running it
    def ids(self, messages, context=()) -> List[int]:
        """Token ids of a conversation (a string, messages, or a data.Example) with this System's prompt."""
        if hasattr(messages, "prompt"):  # a data.Example
            messages = list(messages.context) + [{"role": "user", "content": messages.prompt}]
        return chat_ids(self.tokenizer, messages, system=self.system_prompt)

    def logprobs_along(self, ids: List[int], targets: List[int]) -> mx.array:
        """[T, V] log-probs of the next token at each target position (call inside bound())."""
        x = mx.array([list(ids) + list(targets[:-1])], dtype=mx.int32)
        logits = self.model(x, cache=copy_cache(self.cache))[0]
        logits = logits[len(ids) - 1:len(ids) - 1 + len(targets)].astype(mx.float32)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    def complete(self, messages, cfg: Optional[GenerationConfig] = None):
        """One answer (a generate.Completion) to a conversation; the dual system asks its guard first.
        Call inside bound() (or on a held System)."""
        cfg = cfg or GenerationConfig()
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if self.kind == "dual":
            return self.dual_complete(messages, cfg)[0]
        return complete(self.model, self.tokenizer, self.ids(messages), self.cache, cfg)

    def dual_complete(self, messages, cfg: GenerationConfig):
        """(Completion, u) of the dual system: the guard reads the request, then refusal or the base."""
        from .guards import dual_complete

        if self.guard is None:
            raise ValueError("not a dual system (no guard)")
        return dual_complete(self.model, self.tokenizer, self.guard, messages, cfg, refusal=self.refusal,
                             threshold=self.threshold, system=self.system_prompt)


# ---------------------------------------------------------------- building one


def base_system(model, tokenizer, config, name: str = "base") -> System:
    return System(model, tokenizer, config, name=name)


def with_method(base: System, path=None, name: Optional[str] = None, expect=None, loaded=None,
                cache=None) -> System:
    """Base + a method file (any method; `expect` restricts which), checked against the base.
    `loaded`/`cache`: the file already read and its prefix cache already made (a bundle's)."""
    loaded = loaded or methods.load(path, base.model, base.config, expect)
    method, params, f = loaded.method, loaded.params, loaded.file
    n, nbytes = method.size(params)
    cache = cache if cache is not None else method.prefix_cache(base.model, params)
    info = {"file": str(path) if path is not None else None, **_file_meta(f), **method.describe()}
    return System(base.model, base.tokenizer, base.config, cache=cache, name=name or file_label(f), kind="method",
                  method=method, params=params, file=f, added_params=n, added_bytes=nbytes,
                  info={k: v for k, v in info.items() if v is not None}, binds=cache is None)


def with_params(base: System, method: methods.Method, params: dict, name: str) -> System:
    """Base + a method and params held in memory (a candidate being selected, not a file)."""
    n, nbytes = method.size(params)
    cache = method.prefix_cache(base.model, params)
    return System(base.model, base.tokenizer, base.config, cache=cache, name=name, kind="method", method=method,
                  params=params, added_params=n, added_bytes=nbytes, info=method.describe(), binds=cache is None)


def with_system_prompt(base: System, text: str, name: str = "system-prompt") -> System:
    """Base + a textual system prompt: no parameters, but extra prompt tokens on every request."""
    if not text or not text.strip():
        raise UserError("--system-prompt: empty text")
    extra = len(chat_ids(base.tokenizer, "x", system=text)) - len(chat_ids(base.tokenizer, "x"))
    return System(base.model, base.tokenizer, base.config, cache=base.cache, name=name, kind="system-prompt",
                  system_prompt=text, info={"system_prompt": text, "added_prompt_tokens": max(extra, 0)})


def with_guard(base: System, guard, threshold: float = DEFAULT_THRESHOLD, refusal: str = DEFAULT_REFUSAL,
               name: str = "dual") -> System:
    """Base + guard in front (input moderation): the dual system, the reference for safety and cost."""
    g = getattr(guard, "model", None)
    flat = [v for _, v in _flat(g.parameters())] if g is not None else []
    return System(base.model, base.tokenizer, base.config, cache=base.cache, name=name, kind="dual", guard=guard,
                  threshold=threshold, refusal=refusal, system_prompt=base.system_prompt,
                  added_params=sum(int(v.size) for v in flat), added_bytes=sum(int(v.nbytes) for v in flat),
                  info={"guard": guard.spec.id if hasattr(guard, "spec") else str(guard)})


def _flat(tree):
    from mlx.utils import tree_flatten

    return [(k, v) for k, v in tree_flatten(tree) if isinstance(v, mx.array)]


def _file_meta(f) -> dict:
    keep = ("method", "objective", "guard", "num_virtual_tokens")
    return {k: f.metadata[k] for k in keep if k in f.metadata}


def file_label(f) -> str:
    """A method file's display name: method-objective (a fitted method has no objective)."""
    obj = f.metadata.get("objective")
    return f"{f.method}-{obj}" if obj and methods.METHODS.get(f.method, methods.Method).trainable else f.method


# ---------------------------------------------------------------- opening one for use


def open_system(model: Optional[str], method_file: Optional[Path] = None, name: Optional[str] = None) -> System:
    """Load a base (MLX dir, hub id) or a bundle directory, with an optional method file, ready to
    serve: a precomputable method's cache made (or read from the bundle), any other method bound."""
    if model is None:
        raise UserError("--model is required (an MLX model directory, hub id or bundle directory)")
    path = Path(model)
    if bundle.is_bundle(path):
        opened = bundle.read_bundle(path, method_file)
        base = System(opened.model, opened.tokenizer, opened.config, name=name or opened.name)
        if opened.loaded is None:
            return base
        return with_method(base, opened.path, name=name or opened.name, loaded=opened.loaded,
                           cache=opened.cache).hold()
    m, tok, config = models.load(model)
    base = System(m, tok, config, name=name or str(model))
    if method_file is None:
        return base
    return with_method(base, method_file, name=name or str(model)).hold()
