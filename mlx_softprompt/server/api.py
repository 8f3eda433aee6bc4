"""The OpenAI API as clients use it: request checking and response shapes.

Every field of a request is either honoured or refused with a 400 naming it;
none is dropped silently. Fields that only describe the caller (``user``,
``metadata``) are accepted and have no effect on the answer, as with OpenAI.
"""

import json
import re
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_DEPTH = 32  # JSON nesting; a chat request needs 4
_STRINGS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)  # JSON strings (unrolled: linear and fast)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None, kind: str = "invalid_request_error", headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Request:
    """A checked request of either endpoint."""

    kind: str  # "chat" | "text"
    messages: Optional[List[dict]] = None  # chat
    prompt: Optional[str] = None  # text, as a string
    prompt_ids: Optional[List[int]] = None  # text, as token ids
    max_tokens: int = 256
    temp: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stream: bool = False
    include_usage: bool = False
    stop: List[str] = field(default_factory=list)
    logprobs: Optional[int] = None  # None: off; k: chosen token's logprob and k alternatives
    echo: bool = False
    model: Optional[str] = None

    def content_chars(self) -> int:
        if self.kind == "chat":
            return sum(len(m["content"]) for m in self.messages)
        return len(self.prompt or "")


# ---------------------------------------------------------------- the body


def json_depth(raw: bytes) -> int:
    """Maximum nesting of a JSON text, computed without parsing it (linear, vectorised)."""
    skeleton = np.frombuffer(_STRINGS.sub(b'""', raw), dtype=np.uint8)
    steps = np.zeros(len(skeleton), dtype=np.int32)
    steps[(skeleton == ord("[")) | (skeleton == ord("{"))] = 1
    steps[(skeleton == ord("]")) | (skeleton == ord("}"))] = -1
    return int(np.cumsum(steps).max(initial=0))


def parse_body(raw: bytes) -> dict:
    if json_depth(raw) > MAX_DEPTH:
        raise ApiError(400, f"request body is nested more than {MAX_DEPTH} levels deep")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ApiError(400, f"request body is not valid JSON ({e})".splitlines()[0])
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


# ---------------------------------------------------------------- fields


def _number(body, key, lo, hi, default):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ApiError(400, f"'{key}' must be a number, got {type(v).__name__}", key)
    if not lo <= v <= hi:
        raise ApiError(400, f"'{key}' must be between {lo} and {hi}, got {v}", key)
    return float(v)


def _integer(body, key, lo, default, hi=None):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(400, f"'{key}' must be an integer, got {type(v).__name__}", key)
    if v < lo or (hi is not None and v > hi):
        raise ApiError(400, f"'{key}' must be " + (f"between {lo} and {hi}" if hi is not None else f">= {lo}")
                       + f", got {v}", key)
    return v


def _bool(body, key, default=False):
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(400, f"'{key}' must be a boolean", key)
    return v


def _refuse(key, why):
    raise ApiError(400, f"'{key}' is not supported by this server ({why}); remove it", key, "unsupported_parameter")


# Fields accepted by each endpoint (anything else is refused by name), and the
# fields accepted only at a value that changes nothing.
_COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stream", "stream_options", "stop", "n",
           "logprobs", "user", "metadata", "store", "presence_penalty", "frequency_penalty", "logit_bias",
           "service_tier"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                         "parallel_tool_calls", "functions", "function_call", "response_format", "modalities",
                         "audio", "prediction", "reasoning_effort", "web_search_options", "verbosity",
                         "prompt_cache_key", "safety_identifier"}
TEXT_FIELDS = _COMMON | {"prompt", "echo", "suffix", "best_of"}


def _common(body: dict, req: Request, fields: set, default_max_tokens: int, default_temp: float,
            default_top_p: float) -> None:
    for key in body:
        if key not in fields:
            raise ApiError(400, f"unknown field '{key}'", key, "unknown_parameter")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", "model")
    req.model = model
    if _integer(body, "n", 1, 1) != 1:
        _refuse("n", "one choice per request; send several requests")
    for key in ("presence_penalty", "frequency_penalty"):
        if _number(body, key, -2.0, 2.0, 0.0) != 0.0:
            _refuse(key, "penalties are not implemented")
    if body.get("logit_bias"):
        _refuse("logit_bias", "not implemented")
    if _bool(body, "store"):
        _refuse("store", "nothing is stored")
    if body.get("metadata") is not None and not isinstance(body["metadata"], dict):
        raise ApiError(400, "'metadata' must be an object", "metadata")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise ApiError(400, "'user' must be a string", "user")
    if body.get("service_tier") not in (None, "auto", "default"):
        _refuse("service_tier", "one tier only")
    req.temp = _number(body, "temperature", 0.0, 2.0, default_temp)
    req.top_p = _number(body, "top_p", 0.0, 1.0, default_top_p)
    if req.top_p == 0.0:
        raise ApiError(400, "'top_p' must be > 0", "top_p")
    seed = _integer(body, "seed", -(2 ** 63), None, 2 ** 64 - 1)
    req.seed = None if seed is None else seed % 2 ** 32
    req.stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict) or set(opts) - {"include_usage", "include_obfuscation"}:
            raise ApiError(400, "'stream_options' must be an object with 'include_usage'", "stream_options")
        if not req.stream:
            raise ApiError(400, "'stream_options' is only allowed with 'stream': true", "stream_options")
        req.include_usage = _bool(opts, "include_usage")
        if _bool(opts, "include_obfuscation"):
            _refuse("stream_options", "include_obfuscation is not implemented")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of up to 4 non-empty strings", "stop")
    req.stop = stop
    req.max_tokens = default_max_tokens


def _content(m, i) -> str:
    c = m.get("content")
    if c is None and m["role"] == "assistant":
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        parts = []
        for j, part in enumerate(c):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{i}].content[{j}]: only text parts are supported",
                               f"messages[{i}].content")
            if set(part) - {"type", "text"}:
                key = sorted(set(part) - {"type", "text"})[0]
                raise ApiError(400, f"messages[{i}].content[{j}].{key} is not supported", f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def parse_chat(body: dict, default_max_tokens=256, default_temp=0.0, default_top_p=1.0) -> Request:
    """A /v1/chat/completions body -> Request; any problem is an ApiError naming the field."""
    req = Request("chat")
    _common(body, req, CHAT_FIELDS, default_max_tokens, default_temp, default_top_p)
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    messages = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object", f"messages[{i}]")
        role = m.get("role")
        if role not in ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of {sorted(ROLES)}, got {role!r}"
                           + (" (tools are not supported)" if role in ("tool", "function") else ""),
                           f"messages[{i}].role")
        extra = sorted(set(m) - {"role", "content"})
        if extra:
            raise ApiError(400, f"messages[{i}].{extra[0]} is not supported by this server; remove it",
                           f"messages[{i}].{extra[0]}", "unsupported_parameter")
        messages.append({"role": ROLES[role], "content": _content(m, i)})
    if messages[-1]["role"] != "user":
        raise ApiError(400, f"the last message must be a user message, got {msgs[-1]['role']!r}: continuing an "
                            "assistant message (prefill) or answering without a user turn is not supported",
                       f"messages[{len(msgs) - 1}].role", "last_message_not_user")
    req.messages = messages
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    req.max_tokens = _integer(body, key, 1, default_max_tokens)
    if body.get("tools"):
        _refuse("tools", "tool calling is not implemented")
    if body.get("functions"):
        _refuse("functions", "function calling is not implemented")
    if body.get("tool_choice") not in (None, "none"):
        _refuse("tool_choice", "tool calling is not implemented")
    if body.get("function_call") not in (None, "none"):
        _refuse("function_call", "function calling is not implemented")
    if body.get("parallel_tool_calls") is not None and not isinstance(body["parallel_tool_calls"], bool):
        raise ApiError(400, "'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    rf = body.get("response_format")
    if rf is not None and rf != {"type": "text"}:
        _refuse("response_format", "only {\"type\": \"text\"}")
    if body.get("modalities") not in (None, ["text"]):
        _refuse("modalities", "text only")
    for key in ("audio", "prediction", "reasoning_effort", "web_search_options", "verbosity"):
        if body.get(key) is not None:
            _refuse(key, "not implemented")
    for key in ("prompt_cache_key", "safety_identifier"):
        if body.get(key) is not None and not isinstance(body[key], str):
            raise ApiError(400, f"'{key}' must be a string", key)
    if _bool(body, "logprobs"):
        req.logprobs = _integer(body, "top_logprobs", 0, 0, 20)
    elif body.get("top_logprobs") is not None:
        raise ApiError(400, "'top_logprobs' requires 'logprobs': true", "top_logprobs")
    return req


def parse_text(body: dict, vocab_size: int, default_max_tokens=16, default_temp=0.0, default_top_p=1.0) -> Request:
    """A /v1/completions body -> Request."""
    req = Request("text")
    _common(body, req, TEXT_FIELDS, default_max_tokens, default_temp, default_top_p)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        req.prompt = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise ApiError(400, f"'prompt' has token id {bad[0]} outside the vocabulary (0..{vocab_size - 1})",
                           "prompt")
        req.prompt_ids = list(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1:
        _refuse("prompt", "one prompt per request; send several requests")
    else:
        raise ApiError(400, "'prompt' must be a string (or a list of token ids)", "prompt")
    req.max_tokens = _integer(body, "max_tokens", 1, default_max_tokens)
    if _integer(body, "best_of", 1, 1) != 1:
        _refuse("best_of", "one sample per request")
    if body.get("suffix"):
        _refuse("suffix", "fill-in-the-middle is not implemented")
    req.echo = _bool(body, "echo")
    req.logprobs = _integer(body, "logprobs", 0, None, 5)
    if req.echo and req.logprobs is not None:
        _refuse("echo", "log-probabilities of the prompt are not computed; use echo or logprobs, not both")
    return req


# ---------------------------------------------------------------- the answer


class StopScanner:
    """Cut the text at the first stop string, holding back what may be the start of one."""

    def __init__(self, stops: List[str]):
        self.stops, self.buf, self.hit = stops, "", False

    def feed(self, piece: str) -> str:
        if not self.stops:
            return piece
        self.buf += piece
        found = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.buf, self.hit = self.buf[:min(found)], "", True
            return out
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.buf.endswith(s[:k])), default=0)
        out, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        return out

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def chat_logprob_entry(tokenizer, token: int, logprob: float, top) -> dict:
    """One entry of ``choices[i].logprobs.content`` (OpenAI chat format)."""

    def one(t, lp):
        s = token_text(tokenizer, t)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    return dict(one(token, logprob), top_logprobs=[one(t, lp) for t, lp in top or []])


@dataclass
class TextLogprobs:
    """``choices[i].logprobs`` of the legacy completions format."""

    tokens: List[str] = field(default_factory=list)
    token_logprobs: List[float] = field(default_factory=list)
    top_logprobs: List[dict] = field(default_factory=list)
    text_offset: List[int] = field(default_factory=list)

    def add(self, tokenizer, token: int, logprob: float, top, offset: int) -> None:
        self.tokens.append(token_text(tokenizer, token))
        self.token_logprobs.append(logprob)
        alts = {}
        for t, lp in top or []:  # best first; tokens with the same text keep the best
            alts.setdefault(token_text(tokenizer, t), lp)
        self.top_logprobs.append(alts)
        self.text_offset.append(offset)

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
                "text_offset": self.text_offset}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
