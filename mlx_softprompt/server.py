"""An OpenAI-compatible HTTP server with the soft prompt always in front.

Why not mlx-lm's server: its handler tokenizes the request itself and its
generator batches prompts (left padding) and shares prefixes through an LRU
cache keyed by token ids. P enters neither as token ids nor through a padded
batch: it is a key/value cache at offset 0..n. Making mlx-lm's server keep P
in front would mean patching its tokenizer step, its cache lookup and its
batch prefill; a small handler on the same standard-library server
(``ThreadingHTTPServer``) is simpler and easy to audit.

- ``POST /v1/chat/completions`` (plain JSON, or SSE with ``"stream": true``),
  ``GET /v1/models``, ``GET /health``.
- Every request starts from its own copy of P's cache; a client's ``system``
  message is just a message after P, so no request can remove the soft prompt.
- One generation worker drains a queue (MLX runs one graph at a time anyway);
  HTTP threads only parse, validate and stream.
- Bad requests get a 4xx with an OpenAI-style ``{"error": {...}}`` body; an
  unexpected failure is a 500 with the same shape; the server keeps running.
"""

import json
import queue
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import List, Optional

import mlx.core as mx

from . import __version__
from .generate import GenerationConfig, chat_ids, copy_cache, stream

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_BODY = 8 * 1024 * 1024


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    model_id: Optional[str] = None  # default: the System's name
    max_tokens: int = 256  # when a request names none
    temp: float = 0.0
    top_p: float = 1.0
    context_length: Optional[int] = None  # default: the base's max_position_embeddings
    max_queue: int = 64
    log: bool = True


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    messages: List[dict]
    cfg: GenerationConfig
    stream: bool = False
    include_usage: bool = False
    stop: List[str] = field(default_factory=list)


# ---------------------------------------------------------------- validation


def _number(body, key, lo, hi, default):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ApiError(400, f"'{key}' must be a number, got {type(v).__name__}", key)
    if not lo <= v <= hi:
        raise ApiError(400, f"'{key}' must be between {lo} and {hi}, got {v}", key)
    return float(v)


def _integer(body, key, lo, default):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(400, f"'{key}' must be an integer, got {type(v).__name__}", key)
    if v < lo:
        raise ApiError(400, f"'{key}' must be >= {lo}, got {v}", key)
    return v


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
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def parse_chat_request(raw: bytes, model_id: str, cfg: ServerConfig) -> ChatRequest:
    """Validate a /v1/chat/completions body; any problem is an ApiError naming the field."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON ({e})".splitlines()[0])
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", "model")
    if model not in (None, model_id):
        raise ApiError(404, f"The model '{model}' does not exist; this server serves '{model_id}'",
                       "model", "model_not_found")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    messages = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object", f"messages[{i}]")
        role = m.get("role")
        if role not in ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of {sorted(ROLES)}, got {role!r}",
                           f"messages[{i}].role")
        messages.append({"role": ROLES[role], "content": _content(m, i)})
    n = _integer(body, "n", 1, 1)
    if n != 1:
        raise ApiError(400, "only n=1 is supported", "n")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, key, 1, cfg.max_tokens)
    temp = _number(body, "temperature", 0.0, 2.0, cfg.temp)
    top_p = _number(body, "top_p", 0.0, 1.0, cfg.top_p)
    if top_p == 0.0:
        raise ApiError(400, "'top_p' must be > 0", "top_p")
    seed = _integer(body, "seed", -(2 ** 63), None)
    if seed is not None:
        seed %= 2 ** 32
    streaming = body.get("stream", False)
    if streaming is None:
        streaming = False
    if not isinstance(streaming, bool):
        raise ApiError(400, "'stream' must be a boolean", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
        raise ApiError(400, "'stream_options' must be an object with a boolean 'include_usage'", "stream_options")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of up to 4 non-empty strings", "stop")
    return ChatRequest(messages, GenerationConfig(max_tokens=max_tokens, temp=temp, top_p=top_p, seed=seed),
                       stream=streaming, include_usage=bool(opts.get("include_usage", False)), stop=stop)


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


# ---------------------------------------------------------------- the worker


@dataclass
class Job:
    ids: List[int]
    cfg: GenerationConfig
    events: "queue.Queue" = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)


class Engine:
    """One generation thread; each job continues its own copy of P's cache."""

    def __init__(self, system, max_queue: int = 64):
        self.system = system
        self.jobs: "queue.Queue" = queue.Queue(maxsize=max_queue)
        self.thread = threading.Thread(target=self._run, name="mlx-softprompt-generate", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> Job:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise ApiError(503, "the server is busy (request queue full); retry later", kind="server_error")
        return job

    def _run(self) -> None:
        s = self.system
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():
                job.events.put(("done", None))
                continue
            try:
                for r in stream(s.model, s.tokenizer, job.ids, copy_cache(s.cache), job.cfg):
                    job.events.put(("token", r))
                    if job.cancelled.is_set():
                        break
            except Exception as e:  # report to the waiting request; keep serving
                traceback.print_exc(file=sys.stderr)
                job.events.put(("error", e))
            job.events.put(("done", None))

    def close(self, timeout: float = 10.0) -> None:
        self.jobs.put(None)
        self.thread.join(timeout)


# ---------------------------------------------------------------- HTTP


class Handler(BaseHTTPRequestHandler):
    server_version = f"mlx-softprompt/{__version__}"
    app: "App" = None  # set on the subclass made by make_server

    def log_message(self, fmt, *args):
        if self.app.cfg.log:
            sys.stderr.write(f"{self.address_string()} - {fmt % args}\n")

    def _json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _guard(self, fn) -> None:
        try:
            fn()
        except ApiError as e:
            self._json(e.status, e.body())
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            try:
                self._json(500, ApiError(500, f"internal error: {type(e).__name__}: {e}".splitlines()[0],
                                         kind="server_error").body())
            except OSError:
                pass

    def do_GET(self):
        self._guard(self._get)

    def do_POST(self):
        self._guard(self._post)

    def _get(self):
        path = self.path.split("?")[0].rstrip("/")
        if path == "/v1/models":
            self._json(200, {"object": "list", "data": [self.app.model_card()]})
        elif path == "/health":
            self._json(200, {"status": "ok"})
        else:
            raise ApiError(404, f"no route GET {path}", code="not_found")

    def _read_body(self) -> bytes:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise ApiError(411, "a Content-Length header is required")
        if length < 0 or length > MAX_BODY:
            raise ApiError(413, f"request body over {MAX_BODY} bytes")
        return self.rfile.read(length)

    def _post(self):
        path = self.path.split("?")[0].rstrip("/")
        if path != "/v1/chat/completions":
            raise ApiError(404, f"no route POST {path}", code="not_found")
        app = self.app
        req = parse_chat_request(self._read_body(), app.model_id, app.cfg)
        ids = app.tokenize(req.messages)
        room = app.context_length - app.n - len(ids)
        if room < 1:
            raise ApiError(400, f"This model's maximum context length is {app.context_length} tokens; the "
                                f"request needs {app.n} (soft prompt) + {len(ids)} (messages)",
                           "messages", "context_length_exceeded")
        req.cfg.max_tokens = min(req.cfg.max_tokens, room)
        job = app.engine.submit(Job(ids, req.cfg))
        try:
            (self._stream if req.stream else self._complete)(req, job, len(ids))
        finally:
            job.cancelled.set()

    def _events(self, job: Job):
        while True:
            kind, value = job.events.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value

    def _complete(self, req: ChatRequest, job: Job, prompt_tokens: int) -> None:
        stops = StopScanner(req.stop)
        text, count, finish = [], 0, "length"
        for r in self._events(job):
            count += 1 if r.finish_reason != "stop" else 0
            text.append(stops.feed(r.text))
            if stops.hit:
                finish = "stop"
                job.cancelled.set()
                break
            if r.finish_reason:
                finish = r.finish_reason
        text.append(stops.flush())
        self._json(200, {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.app.model_id, "system_fingerprint": self.app.fingerprint,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                         "logprobs": None, "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": count,
                      "total_tokens": prompt_tokens + count},
        })

    def _stream(self, req: ChatRequest, job: Job, prompt_tokens: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.app.model_id, "system_fingerprint": self.app.fingerprint}

        def send(delta, finish=None, **extra):
            chunk = dict(base, choices=[{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                         **extra)
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()

        stops = StopScanner(req.stop)
        send({"role": "assistant", "content": ""})
        count, finish = 0, "length"
        try:
            for r in self._events(job):
                count += 1 if r.finish_reason != "stop" else 0
                piece = stops.feed(r.text)
                if piece:
                    send({"content": piece})
                if stops.hit:
                    finish = "stop"
                    job.cancelled.set()
                    break
                if r.finish_reason:
                    finish = r.finish_reason
        except (BrokenPipeError, ConnectionResetError):
            raise
        except Exception as e:  # headers are sent: report in the stream, as OpenAI does
            traceback.print_exc(file=sys.stderr)
            err = ApiError(500, f"internal error: {type(e).__name__}: {e}".splitlines()[0], kind="server_error")
            self.wfile.write(f"data: {json.dumps(err.body())}\n\n".encode())
        else:
            tail = stops.flush()
            if tail:
                send({"content": tail})
            send({}, finish)
            if req.include_usage:
                chunk = dict(base, choices=[], usage={"prompt_tokens": prompt_tokens, "completion_tokens": count,
                                                      "total_tokens": prompt_tokens + count})
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


class App:
    """What the handlers share: the system, its worker, and the served model's identity."""

    def __init__(self, system, cfg: ServerConfig):
        self.system, self.cfg = system, cfg
        self.model_id = cfg.model_id or system.name
        self.n = int(system.prompt.shape[0]) if system.prompt is not None else 0
        self.context_length = int(cfg.context_length or system.config.get("max_position_embeddings")
                                  or (system.config.get("text_config") or {}).get("max_position_embeddings")
                                  or 4096)
        meta = system.prompt_file.metadata if system.prompt_file is not None else {}
        self.fingerprint = f"mlx-softprompt-{__version__}-{meta.get('base_embedding_hash', 'base')}-n{self.n}"
        self.created = int(time.time())
        self._tok_lock = threading.Lock()
        # the worker thread cannot evaluate arrays still pending on this thread's stream
        mx.eval([c.state for c in system.cache], system.model.parameters())
        self.engine = Engine(system, cfg.max_queue)

    def tokenize(self, messages) -> List[int]:
        with self._tok_lock:
            try:
                return chat_ids(self.system.tokenizer, messages)
            except Exception as e:  # a template that rejects this conversation (e.g. role order)
                raise ApiError(400, f"the chat template rejected the messages: {e}".splitlines()[0], "messages")

    def model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "mlx-softprompt"}


def make_server(system, cfg: Optional[ServerConfig] = None):
    """A bound (not yet serving) ThreadingHTTPServer and its App; port 0 picks a free port."""
    cfg = cfg or ServerConfig()
    app = App(system, cfg)
    handler = type("BoundHandler", (Handler,), {"app": app})
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    server_class = type("Server", (ThreadingHTTPServer,), {"address_family": family, "daemon_threads": True})
    try:
        httpd = server_class((cfg.host, cfg.port), handler)
    except BaseException:
        app.engine.close()
        raise
    return httpd, app


def serve(system, cfg: ServerConfig) -> None:
    """Serve until interrupted."""
    try:
        httpd, app = make_server(system, cfg)
    except OSError as e:
        from .errors import UserError

        raise UserError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}")
    host, port = httpd.server_address[:2]
    print(f"serving {app.model_id!r} (soft prompt: {app.n} virtual tokens, always applied) on "
          f"http://{host}:{port}/v1", file=sys.stderr, flush=True)
    if host not in ("127.0.0.1", "::1", "localhost"):
        print(f"warning: listening on {host}, not loopback: anyone who can reach this port can use the model",
              file=sys.stderr, flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
        app.engine.close()
