"""An OpenAI-compatible HTTP server with the system's addition always in front.

- ``engine``: continuous batching on mlx-lm's ``BatchGenerator``; every request
  starts from its own copy of ``System.cache`` (P's cache for a soft prompt).
- ``template``: chat prompts whose control tokens come only from the chat
  template (message text is text); a trailing assistant message is refused.
- ``api``: the OpenAI request fields, each honoured or refused by name.
- ``http``: the hardened standard-library HTTP server (limits, deadlines,
  Host/Origin checks, CORS).

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (plain JSON or
SSE with ``"stream": true``), ``GET /v1/models``, ``GET /v1/models/{id}``,
``GET /health``, ``OPTIONS`` (CORS preflight).
"""

import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

from .. import __version__
from . import api
from .api import ApiError
from .engine import Engine, EngineConfig, Job
from . import http
from .http import Handler, Policy, Server, Watchdog, new_id
from ..chat_template import ControlTokenError, builder, hf_tokenizer

__all__ = ["ServerConfig", "App", "ApiError", "make_server", "serve"]


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    model_id: Optional[str] = None  # default: the System's name
    model_path: Optional[str] = None  # the path the server was started with; also accepted as the model id
    max_tokens: int = 256  # when a request names none
    temp: float = 0.0
    top_p: float = 1.0
    context_length: Optional[int] = None  # default: the base's max_position_embeddings
    max_batch: int = 32  # sequences decoded together
    prefill_batch: int = 8
    max_pending: int = 64  # requests running or waiting; more get 503 + Retry-After
    max_connections: int = 128  # connections served at once; more get 503 + Retry-After
    max_body: int = 1 << 20  # bytes
    header_timeout: float = 10.0  # seconds for the request line and headers
    body_timeout: float = 30.0  # seconds for the body
    io_timeout: float = 60.0  # seconds for any one socket read or write
    keepalive_timeout: float = 15.0  # seconds an idle keep-alive connection is kept
    allowed_hosts: List[str] = field(default_factory=list)  # Host values besides the bound address
    cors_origins: List[str] = field(default_factory=list)  # web origins allowed to call the API
    log: bool = True


def _context_length(config: dict) -> Optional[int]:
    for c in (config, config.get("text_config") or {}):
        for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
            if isinstance(c.get(key), int):
                return c[key]
    return None


def _prefix_length(cache) -> int:
    offsets = [c.offset for c in cache or [] if isinstance(getattr(c, "offset", None), int)]
    return max(offsets, default=0)


def _longest_token(tokenizer) -> int:
    """Most characters one ordinary token can stand for (bounds tokens from below by text length)."""
    hf = hf_tokenizer(tokenizer)
    added = set(getattr(hf, "get_added_vocab", lambda: {})())
    lengths = [len(t) for t in hf.get_vocab() if t not in added]
    return max(max(lengths, default=1), 1)


class App:
    """What the handlers share: the system, its engine, the policy and the served model's identity."""

    def __init__(self, system, cfg: ServerConfig):
        if getattr(system, "guard", None) is not None:
            raise ValueError("serving a dual system (a guard in front) is not supported: serve the base with a "
                             "method file")
        self.system, self.cfg = system, cfg
        # a textual system prompt (a System of kind "system-prompt") goes before every conversation
        self.system_prompt = getattr(system, "system_prompt", None)
        self.model_id = cfg.model_id or system.name
        self.aliases = {self.model_id, system.name}
        if cfg.model_path:
            p = Path(cfg.model_path)
            self.aliases |= {cfg.model_path, str(p.resolve()), p.resolve().name}
        self.prefix = _prefix_length(system.cache)
        self.context_length = int(cfg.context_length or _context_length(system.config) or 4096)
        self.prompts = builder(system.tokenizer)
        self.longest_token = _longest_token(system.tokenizer)
        self.vocab_size = len(hf_tokenizer(system.tokenizer))
        pfile = getattr(system, "prompt_file", None)
        meta = getattr(pfile, "metadata", None) or {}
        self.fingerprint = f"mlx-softprompt-{__version__}-{meta.get('base_embedding_hash', 'base')}-p{self.prefix}"
        self.created = int(time.time())
        self.watchdog = Watchdog()
        self.policy = Policy(cfg.host, cfg.port, cfg.allowed_hosts, cfg.cors_origins)
        self.engine = Engine(system, EngineConfig(cfg.max_batch, cfg.prefill_batch, cfg.max_pending))

    def knows_model(self, name: Optional[str]) -> bool:
        return name is None or name in self.aliases

    def model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "mlx-softprompt"}

    def new_id(self, req) -> str:
        return new_id("chatcmpl" if req.kind == "chat" else "cmpl")

    def parse(self, path: str, body: dict):
        c = self.cfg
        if path == "/v1/chat/completions":
            req = api.parse_chat(body, c.max_tokens, c.temp, c.top_p)
        else:
            req = api.parse_text(body, self.vocab_size, c.max_tokens, c.temp, c.top_p)
            if req.prompt_ids is not None:  # token ids are read as the text they stand for
                req.prompt = hf_tokenizer(self.system.tokenizer).decode(req.prompt_ids)
        if not self.knows_model(req.model):
            raise ApiError(404, f"The model '{req.model}' does not exist; this server serves '{self.model_id}'",
                           "model", "model_not_found")
        return req

    def _too_long(self, needed: str) -> ApiError:
        return ApiError(400, f"This model's maximum context length is {self.context_length} tokens; the request "
                             f"needs {self.prefix} (prefix) + {needed} (prompt)",
                        "messages" if needed else "prompt", "context_length_exceeded")

    def start(self, req) -> Tuple[Job, List[int]]:
        """Tokenize (after a cheap bound), cap max_tokens by the room left, and queue the job."""
        room = self.context_length - self.prefix
        at_least = -(-(req.content_chars() + len(self.system_prompt or "")) // self.longest_token)
        if at_least >= room:
            raise self._too_long(f"at least {at_least}")
        if req.kind == "chat" or self.prompts.has_template:
            # completions: the prompt is the user's turn (a raw continuation would go around the template)
            messages = req.messages if req.kind == "chat" else [{"role": "user", "content": req.prompt}]
            if self.system_prompt:
                messages = [{"role": "system", "content": self.system_prompt}] + list(messages)
            try:
                ids = self.prompts.chat_prompt(messages)
            except ControlTokenError as e:  # named as the client sent it (no system prompt of ours)
                where = f"messages[{e.index - bool(self.system_prompt)}].content" if req.kind == "chat" else "prompt"
                raise ApiError(400, f"{where} contains the control token {e.token!r}, and {e.what} cannot be "
                                    "rendered with it kept as plain text; remove it", where) from None
        else:
            ids = self.prompts.text_prompt(req.prompt)
        if not ids:
            raise ApiError(400, "the prompt is empty", "prompt")
        if len(ids) >= room:
            err = self._too_long(str(len(ids)))
            err.param = "messages" if req.kind == "chat" else "prompt"
            raise err
        job = Job(ids, min(req.max_tokens, room - len(ids)), req.temp, req.top_p, req.seed, req.logprobs)
        return self.engine.submit(job), ids

    def close(self) -> None:
        self.engine.close()
        self.watchdog.close()


def make_server(system, cfg: Optional[ServerConfig] = None):
    """A bound (not yet serving) server and its App; port 0 picks a free port."""
    cfg = cfg or ServerConfig()
    app = App(system, cfg)
    handler = type("BoundHandler", (Handler,), {"app": app})
    try:
        httpd = Server((cfg.host, cfg.port), handler, app)
    except BaseException:
        app.close()
        raise
    bound, port = httpd.server_address[:2]
    names = [] if http._ip(cfg.host) is not None else [cfg.host]  # a name given to --host is a Host to accept
    app.policy = Policy(bound, port, list(cfg.allowed_hosts) + names, cfg.cors_origins)
    return httpd, app


def serve(system, cfg: ServerConfig) -> None:
    """Serve until interrupted."""
    try:
        httpd, app = make_server(system, cfg)
    except OSError as e:
        from ..errors import UserError

        raise UserError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}")
    host, port = httpd.server_address[:2]
    what = (f"soft prompt: {app.prefix} virtual tokens, always applied" if getattr(system, "prompt", None) is not None
            else f"prefix cache of {app.prefix} positions" if app.prefix else "no prefix")
    print(f"serving {app.model_id!r} ({what}) on http://{host}:{port}/v1", file=sys.stderr, flush=True)
    if not app.policy.bound.is_loopback:
        print(f"warning: listening on {host}, not loopback: anyone who can reach this port can use the model",
              file=sys.stderr, flush=True)
    # Ctrl-C and SIGTERM (docker stop, systemd, kill) ask the serving loop to stop (open connections
    # closed, exit 0) rather than raise KeyboardInterrupt wherever the main thread is: raised inside
    # socketserver's request dispatch it can be turned into a logged error and the server runs on.
    def _stop(signum, frame):
        threading.Thread(target=httpd.shutdown, daemon=True).start()

    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, _stop) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        httpd.serve_forever()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        httpd.server_close()
        app.close()
