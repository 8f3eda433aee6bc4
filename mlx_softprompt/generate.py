"""Generation with the soft prompt in front, on top of mlx-lm's stream_generate.

P enters only through its precomputed key/value cache (``models.prefix_cache``):
the conversation's tokens start at offset n, exactly where they sit in
[P; x], so nothing P-specific runs per token.
"""

import copy
import time
from dataclasses import dataclass, field
from typing import Iterator, List, Optional

import mlx.core as mx

from . import checks, models


@dataclass
class GenerationConfig:
    max_tokens: int = 256
    temp: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None

    def __post_init__(self):
        checks.generation(self.max_tokens, self.temp, self.top_p, self.seed)


@dataclass
class Completion:
    text: str
    tokens: List[int] = field(default_factory=list)
    prompt_tokens: int = 0
    time_to_first_token: float = 0.0
    tokens_per_second: float = 0.0
    peak_memory_gb: float = 0.0
    finish_reason: Optional[str] = None

    def as_dict(self) -> dict:
        return {
            "text": self.text,
            "tokens": self.tokens,
            "prompt_tokens": self.prompt_tokens,
            "generation_tokens": len(self.tokens),
            "time_to_first_token": self.time_to_first_token,
            "tokens_per_second": self.tokens_per_second,
            "peak_memory_gb": self.peak_memory_gb,
            "finish_reason": self.finish_reason,
        }


def chat_ids(tokenizer, messages, system: Optional[str] = None) -> List[int]:
    """Token ids of a conversation with the chat template and generation prompt applied.

    Control tokens come only from the template: a message's text that reads like one
    (``<|eot_id|>``, ...) stays text (see chat_template)."""
    from .chat_template import builder

    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if system:
        messages = [{"role": "system", "content": system}] + list(messages)
    return builder(tokenizer).chat_prompt(list(messages))


def copy_cache(cache):
    """An independent copy of a prompt cache (P's cache is reused across requests)."""
    return copy.deepcopy(cache)


def stream(model, tokenizer, ids: List[int], cache, cfg: GenerationConfig) -> Iterator:
    """mlx-lm GenerationResponses for `ids` continuing `cache` (which is updated in place)."""
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    if cfg.seed is not None:
        mx.random.seed(cfg.seed)
    sampler = make_sampler(temp=cfg.temp, top_p=cfg.top_p if cfg.top_p < 1.0 else 0.0)
    yield from stream_generate(model, tokenizer, mx.array(ids), max_tokens=cfg.max_tokens,
                               sampler=sampler, prompt_cache=cache)


def complete(model, tokenizer, ids: List[int], prompt_cache, cfg: GenerationConfig) -> Completion:
    """One completion; `prompt_cache` is P's prefix cache (copied, never modified)."""
    cache = copy_cache(prompt_cache)
    mx.reset_peak_memory()
    start = time.perf_counter()
    first = None
    text, tokens, last = [], [], None
    for r in stream(model, tokenizer, ids, cache, cfg):
        if first is None:
            first = time.perf_counter() - start
        text.append(r.text)
        if r.finish_reason != "stop" or r.token not in tokenizer.eos_token_ids:
            tokens.append(int(r.token))
        last = r
    total = time.perf_counter() - start
    decode = total - (first or 0.0)
    return Completion(
        text="".join(text),
        tokens=tokens,
        prompt_tokens=len(ids),
        time_to_first_token=first or 0.0,
        tokens_per_second=(max(len(tokens) - 1, 0) / decode) if decode > 0 else 0.0,
        peak_memory_gb=mx.get_peak_memory() / 1e9,
        finish_reason=last.finish_reason if last else None,
    )


def generate(model, tokenizer, text_or_messages, prompt: Optional[mx.array] = None,
             cfg: Optional[GenerationConfig] = None, system: Optional[str] = None) -> Completion:
    """Chat-templated completion of one request, with P (if given) in front."""
    cfg = cfg or GenerationConfig()
    ids = chat_ids(tokenizer, text_or_messages, system=system)
    return complete(model, tokenizer, ids, models.prefix_cache(model, prompt), cfg)
