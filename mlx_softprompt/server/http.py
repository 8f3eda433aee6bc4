"""The HTTP side: a standard-library server hardened for a machine with a browser on it.

- Limits before work: the body's size is checked from ``Content-Length`` before
  a byte of it is read (413), its nesting before it is parsed, and a cheap
  lower bound of its token count before it is tokenized.
- Deadlines: the request line and headers must arrive within
  ``header_timeout`` seconds, the body within ``body_timeout``, every socket
  read or write within ``io_timeout``; a watchdog closes connections that
  miss a deadline, so a slow client holds one thread for a bounded time. An
  idle keep-alive connection is closed after ``keepalive_timeout`` (longer
  than clients' own expiry, httpx's 5 s, so they do not reuse a connection
  the server is closing).
- Bounded concurrency: at most ``max_connections`` connections are served at
  once and ``max_pending`` requests run or wait for the model; beyond that,
  503 with ``Retry-After``.
- DNS rebinding and cross-site requests: the ``Host`` header must name the
  bound address (or an ``--allowed-host``); a request carrying an ``Origin``
  is refused unless that origin is allowed (``--cors-origin``); POST bodies
  must be ``application/json`` (a form a web page can send without a CORS
  preflight is refused); ``OPTIONS`` preflights are answered for allowed
  origins.
"""

import ipaddress
import json
import socket
import sys
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

from .. import __version__
from . import api
from .api import ApiError
from .engine import Job

LOOPBACK_NAMES = ("localhost",)


class Watchdog:
    """Closes connections whose deadline has passed (a read blocked on them returns)."""

    def __init__(self):
        self._deadlines = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="mlx-softprompt-watchdog", daemon=True)
        self.thread.start()

    def arm(self, conn, seconds: float) -> None:
        with self._lock:
            self._deadlines[conn] = time.monotonic() + seconds

    def disarm(self, conn) -> None:
        with self._lock:
            self._deadlines.pop(conn, None)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            now = time.monotonic()
            with self._lock:
                late = [c for c, d in self._deadlines.items() if d < now]
                for c in late:
                    del self._deadlines[c]
            for c in late:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()


def _split_host(value: str):
    """'name:port' / '[v6]:port' / 'name' -> (host lowercased, port or None)."""
    value = value.strip().lower()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
    elif value.count(":") == 1:
        host, port = value.split(":")
    else:
        host, port = value, None
    return host, port


def _ip(host: str):
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


class Policy:
    """Which Host and Origin values this server answers."""

    def __init__(self, bound_host: str, port: int, allowed_hosts=(), cors_origins=()):
        self.port = str(port)
        self.bound = _ip(bound_host)
        self.bound_name = bound_host.lower()
        self.wildcard = self.bound is not None and self.bound.is_unspecified
        self.allowed = {h.lower() for h in allowed_hosts}
        self.any_host = "*" in self.allowed
        self.origins = {o.rstrip("/") for o in cors_origins}
        self.any_origin = "*" in self.origins

    def host_ok(self, header: Optional[str]) -> bool:
        if header is None:
            return False
        if self.any_host:
            return True
        host, port = _split_host(header)
        if header.strip().lower() in self.allowed or host in self.allowed:
            return port in (None, self.port) or header.strip().lower() in self.allowed
        if port not in (None, self.port):
            return False
        ip = _ip(host)
        if ip is not None:
            # an address literal cannot be rebound by DNS; it must be ours
            return ip == self.bound or self.wildcard or (self.bound is not None and self.bound.is_loopback
                                                         and ip.is_loopback)
        if host == self.bound_name:
            return True
        return host in LOOPBACK_NAMES and (self.wildcard or (self.bound is not None and self.bound.is_loopback)
                                           or self.bound_name in LOOPBACK_NAMES)

    def origin_ok(self, origin: str) -> bool:
        return self.any_origin or origin.rstrip("/") in self.origins


class Handler(BaseHTTPRequestHandler):
    server_version = f"mlx-softprompt/{__version__}"
    protocol_version = "HTTP/1.1"
    app = None  # set on the subclass made by make_server

    def setup(self):
        self.timeout = self.app.cfg.io_timeout
        super().setup()
        # headers and body are separate writes: without this, Nagle's algorithm and the client's delayed
        # ACK hold the body back ~40 ms on every keep-alive request
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, fmt, *args):
        if self.app.cfg.log:
            sys.stderr.write(f"{self.address_string()} - {fmt % args}\n")

    # ------------------------------------------------------------ plumbing

    def handle_one_request(self):
        cfg, watch = self.app.cfg, self.app.watchdog
        self.served = getattr(self, "served", 0) + 1
        if self.served > 1:  # an idle keep-alive connection: wait for the next request's first byte
            try:
                self.connection.settimeout(cfg.keepalive_timeout)
                if not self.rfile.peek(1):
                    self.close_connection = True
                    return
            except OSError:
                self.close_connection = True
                return
            finally:
                self.connection.settimeout(cfg.io_timeout)
        watch.arm(self.connection, cfg.header_timeout)
        try:
            super().handle_one_request()
        except OSError:  # reset by the client or closed by the watchdog
            self.close_connection = True
        finally:
            watch.disarm(self.connection)

    def _cors_headers(self) -> None:
        origin = self.headers.get("Origin")
        if origin is not None and self.app.policy.origin_ok(origin):
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Vary", "Origin")

    def _json(self, status: int, obj: dict, headers: Optional[dict] = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self._cors_headers()
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _guard(self, fn) -> None:
        try:
            self._check_host_and_origin()
            fn()
        except ApiError as e:
            try:
                self._json(e.status, e.body(), e.headers)
                if e.status == 413:
                    self._discard_body()
            except OSError:
                self.close_connection = True
        except OSError:
            self.close_connection = True
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            self.close_connection = True
            try:
                self._json(500, ApiError(500, f"internal error: {type(e).__name__}: {e}".splitlines()[0],
                                         kind="server_error").body())
            except OSError:
                pass

    def _check_host_and_origin(self) -> None:
        policy = self.app.policy
        if not policy.host_ok(self.headers.get("Host")):
            self.close_connection = True
            raise ApiError(421 if self.headers.get("Host") else 400,
                           f"Host {self.headers.get('Host')!r} is not served here (start the server with "
                           "--allowed-host to allow it)", code="host_not_allowed")
        origin = self.headers.get("Origin")
        if origin is not None and not policy.origin_ok(origin):
            self.close_connection = True
            raise ApiError(403, f"Origin {origin!r} is not allowed (start the server with --cors-origin to allow "
                                "a web front end)", code="origin_not_allowed")

    def _discard_body(self, seconds: float = 2.0, limit: int = 64 << 20) -> None:
        """Read and drop what the client is still sending (bounded), so that it reads our 413 instead of a
        reset connection (closing a socket with unread data resets it). Nothing is parsed."""
        deadline, got = time.monotonic() + seconds, 0
        try:
            while got < limit and time.monotonic() < deadline:
                self.connection.settimeout(max(deadline - time.monotonic(), 0.01))
                chunk = self.connection.recv(1 << 16)
                if not chunk:
                    break
                got += len(chunk)
        except OSError:
            pass

    def _route(self) -> str:
        return self.path.split("?")[0].rstrip("/")

    # ------------------------------------------------------------ methods

    def do_OPTIONS(self):
        def preflight():
            if self.headers.get("Origin") is None:
                self.send_response(204)
                self.send_header("Allow", "GET, POST, OPTIONS")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            asked = self.headers.get("Access-Control-Request-Headers", "")
            allowed = ", ".join(h.strip() for h in asked.split(",") if h.strip() and
                                all(c.isalnum() or c in "-_" for c in h.strip()))
            self.send_response(204)
            self._cors_headers()
            self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
            if allowed:
                self.send_header("Access-Control-Allow-Headers", allowed)
            self.send_header("Access-Control-Max-Age", "600")
            self.send_header("Content-Length", "0")
            self.end_headers()

        self._guard(preflight)

    def do_GET(self):
        self._guard(self._get)

    def do_POST(self):
        self._guard(self._post)

    def _other(self):
        self.close_connection = True
        raise ApiError(405, f"method {self.command} is not allowed", code="method_not_allowed",
                       headers={"Allow": "GET, POST, OPTIONS"})

    def do_PUT(self):
        self._guard(self._other)

    do_DELETE = do_PATCH = do_HEAD = do_PUT

    def _get(self):
        path, app = self._route(), self.app
        if path == "/v1/models":
            self._json(200, {"object": "list", "data": [app.model_card()]})
        elif path.startswith("/v1/models/"):
            name = path[len("/v1/models/"):]
            from urllib.parse import unquote

            if not app.knows_model(unquote(name)):
                raise ApiError(404, f"The model '{unquote(name)}' does not exist", "model", "model_not_found")
            self._json(200, app.model_card())
        elif path == "/health":
            self._json(200, {"status": "ok"})
        else:
            raise ApiError(404, f"no route GET {path}", code="not_found")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise ApiError(411, "send the body with a Content-Length (chunked bodies are not accepted)")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            raise ApiError(411, "a Content-Length header is required")
        limit = self.app.cfg.max_body
        if length < 0 or length > limit:
            self.close_connection = True  # the body is never read
            raise ApiError(413, f"request body of {length} bytes is over the limit of {limit} bytes",
                           code="body_too_large")
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            self.close_connection = True
            raise ApiError(415, f"Content-Type must be application/json, got {ctype or 'none'!r}")
        self.app.watchdog.arm(self.connection, self.app.cfg.body_timeout)
        data = self.rfile.read(length)
        self.app.watchdog.disarm(self.connection)
        if len(data) != length:
            self.close_connection = True
            raise OSError("body cut short")
        return data

    def _post(self):
        path, app = self._route(), self.app
        if path not in ("/v1/chat/completions", "/v1/completions"):
            self.close_connection = True
            raise ApiError(404, f"no route POST {path}", code="not_found")
        body = api.parse_body(self._read_body())
        req = app.parse(path, body)
        job, ids = app.start(req)
        try:
            if req.stream:
                self._stream(req, job, len(ids))
            else:
                self._complete(req, job, len(ids))
        finally:
            job.cancelled.set()

    # ------------------------------------------------------------ answers

    def _check_alive(self) -> None:
        """Raise if the client has gone away (readable with no data = closed)."""
        import select

        r, _, _ = select.select([self.connection], [], [], 0)
        if r and not self.connection.recv(1, socket.MSG_PEEK):
            raise ConnectionResetError("client went away")

    def _tokens(self, job: Job):
        while True:
            ev = job.events.get()
            if ev is None:
                return
            if isinstance(ev, BaseException):
                raise ev
            yield ev

    def _answer(self, req, job):
        """(text piece, token or None, finish) as the answer is generated, stop strings applied."""
        tok = self.app.system.tokenizer
        detok = tok.detokenizer
        stops = api.StopScanner(req.stop)
        for t in self._tokens(job):
            if t.finish_reason == "stop":  # the end-of-sequence token: not part of the answer
                detok.finalize()
                piece = stops.feed(detok.last_segment)
                yield piece + ("" if stops.hit else stops.flush()), None, "stop"
                return
            detok.add_token(t.id)
            if t.finish_reason == "length":
                detok.finalize()
            piece = stops.feed(detok.last_segment)
            if stops.hit:
                job.cancelled.set()
                yield piece, t, "stop"
                return
            if t.finish_reason == "length":
                yield piece + stops.flush(), t, "length"
                return
            yield piece, t, None
        yield stops.flush(), None, "length"  # the engine ended early (client gone, shutdown)

    def _complete(self, req, job, prompt_tokens: int) -> None:
        app, tok = self.app, self.app.system.tokenizer
        if not req.stop:  # nothing to cut early: wake once, not once per token (the GIL is shared)
            while not job.done.wait(1.0):
                self._check_alive()
        text, count, finish = [], 0, "length"
        entries, text_lp = [], api.TextLogprobs()
        offset = len(req.prompt) if (req.kind == "text" and req.echo) else 0
        for piece, t, finish in self._answer(req, job):
            if t is not None:
                count += 1
                if req.logprobs is not None:
                    if req.kind == "chat":
                        entries.append(api.chat_logprob_entry(tok, t.id, t.logprob, t.top))
                    else:
                        text_lp.add(tok, t.id, t.logprob, t.top, offset + len("".join(text)))
            text.append(piece)
        answer = "".join(text)
        base = {"id": app.new_id(req), "created": int(time.time()), "model": app.model_id,
                "system_fingerprint": app.fingerprint, "usage": api.usage(prompt_tokens, count)}
        if req.kind == "chat":
            lp = {"content": entries, "refusal": None} if req.logprobs is not None else None
            choice = {"index": 0, "message": {"role": "assistant", "content": answer, "refusal": None},
                      "logprobs": lp, "finish_reason": finish}
            self._json(200, dict(base, object="chat.completion", choices=[choice]))
        else:
            if req.echo:
                answer = req.prompt + answer
            lp = text_lp.as_dict() if req.logprobs is not None else None
            choice = {"index": 0, "text": answer, "logprobs": lp, "finish_reason": finish}
            self._json(200, dict(base, object="text_completion", choices=[choice]))

    def _stream(self, req, job, prompt_tokens: int) -> None:
        app, tok = self.app, self.app.system.tokenizer
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self._cors_headers()
        self.end_headers()
        self.close_connection = True
        chat = req.kind == "chat"
        base = {"id": app.new_id(req), "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": app.model_id, "system_fingerprint": app.fingerprint}

        def send(obj):
            self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
            self.wfile.flush()

        def chunk(piece, finish, t=None, role=False):
            c = {"index": 0, "finish_reason": finish, "logprobs": None}
            if chat:
                c["delta"] = ({"role": "assistant", "content": piece} if role else
                              ({"content": piece} if piece or finish is None else {}))
                if req.logprobs is not None and t is not None:
                    c["logprobs"] = {"content": [api.chat_logprob_entry(tok, t.id, t.logprob, t.top)],
                                     "refusal": None}
            else:
                c["text"] = piece
                if req.logprobs is not None and t is not None:
                    lp = api.TextLogprobs()
                    lp.add(tok, t.id, t.logprob, t.top, sent[0])
                    c["logprobs"] = lp.as_dict()
            obj = dict(base, choices=[c])
            if req.include_usage:
                obj["usage"] = None
            send(obj)

        sent, count = [0], 0
        if chat:
            chunk("", None, role=True)
        elif req.echo:
            chunk(req.prompt, None)
        try:
            for piece, t, finish in self._answer(req, job):
                count += t is not None
                if piece or t is not None and req.logprobs is not None:
                    chunk(piece, None, t)
                    sent[0] += len(piece)
                if finish is not None:
                    chunk("", finish)
        except OSError:
            raise
        except Exception as e:  # headers are sent: report in the stream, as OpenAI does
            traceback.print_exc(file=sys.stderr)
            send(ApiError(500, f"internal error: {type(e).__name__}: {e}".splitlines()[0], kind="server_error").body())
        else:
            if req.include_usage:
                send(dict(base, choices=[], usage=api.usage(prompt_tokens, count)))
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


class Server(ThreadingHTTPServer):
    """ThreadingHTTPServer with a cap on connections served at once (503 beyond it)."""

    daemon_threads = True
    request_queue_size = 64
    app = None

    def __init__(self, address, handler, app):
        self.app = app
        self._slots = threading.BoundedSemaphore(app.cfg.max_connections)
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            try:
                request.settimeout(1.0)
                body = json.dumps(ApiError(503, "too many connections; retry later", kind="server_error",
                                           code="server_busy").body()).encode()
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Retry-After: 1\r\nConnection: close\r\nContent-Length: "
                                + str(len(body)).encode() + b"\r\n\r\n" + body)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
