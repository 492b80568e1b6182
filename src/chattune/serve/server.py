"""HTTP for `chattune serve`: routes, the API key, body limits, JSON answers and server-sent events.

    GET  /health                 {"status": "ok", ...}  (no key needed)
    GET  /v1/models              the one model served
    POST /v1/chat/completions    non-streaming, or streaming as server-sent events ("stream": true)

Only the standard library serves HTTP: there is nothing extra to install.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

from chattune.errors import ConfigError
from chattune.serve.api import ApiError, Limits, build_completion, unauthorised, usage
from chattune.serve.engine import Engine
from chattune.serve.worker import Completion, Worker

log = logging.getLogger("chattune")

_DRAIN_LIMIT = 64 * 2**20  # refused bodies up to this size are read and dropped before answering


class Server(ThreadingHTTPServer):
    """A threading HTTP server that carries the engine, the worker and the limits."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], engine: Engine, *, api_key: str | None, limits: Limits):
        super().__init__(address, Handler)
        self.engine, self.api_key, self.limits = engine, api_key, limits
        self.worker = Worker(engine)
        self.created = int(time.time())

    def server_close(self) -> None:
        self.worker.stop()
        super().server_close()


def bind_server(engine: Engine, *, host: str, port: int, api_key: str | None, max_tokens_limit: int,
                max_body_bytes: int) -> Server:
    """A bound, listening server ready for serve_forever() (port 0 picks a free port: see server.server_address)."""
    try:
        return Server((host, port), engine, api_key=api_key,
                      limits=Limits(max_tokens=max_tokens_limit, max_body_bytes=max_body_bytes))
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror})", where="--host/--port",
                          fix="choose another --port, or stop what is using it") from None


class Handler(BaseHTTPRequestHandler):
    """Routes one HTTP request."""

    server: Server
    protocol_version = "HTTP/1.1"  # keep-alive: the openai client reuses its connections
    server_version = "chattune"

    def log_message(self, fmt: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), fmt % args)

    # -- plumbing ------------------------------------------------------------

    def _send_json(self, status: int, body: dict[str, Any], *, close: bool = False) -> None:
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _error(self, err: ApiError, *, close: bool = False) -> None:
        self._send_json(err.status, err.body(), close=close)

    def _authorised(self) -> bool:
        key = self.server.api_key
        if not key:
            return True
        given = self.headers.get("Authorization", "")
        token = given[7:].strip() if given[:7].lower() == "bearer " else ""
        return hmac.compare_digest(token.encode(), key.encode())

    def _discard_body(self) -> bool:
        """Read and drop a body we refuse, so the client sees our answer rather than a reset connection."""
        try:
            left = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return False
        if left > _DRAIN_LIMIT:
            return False
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 16))
            if not chunk:
                return False
            left -= len(chunk)
        return True

    def _read_body(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(411, "a Content-Length header is required")
        try:
            n = int(length)
        except ValueError:
            raise ApiError(400, "bad Content-Length header") from None
        if n > self.server.limits.max_body_bytes:
            raise ApiError(413, f"the request body is {n} bytes, above this server's limit of "
                           f"{self.server.limits.max_body_bytes}", code="request_too_large")
        raw = self.rfile.read(n)
        self._body_read = True
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON ({exc})") from None

    # -- routes --------------------------------------------------------------

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/health":
            e = self.server.engine
            return self._send_json(200, {"status": "ok", "model": e.name, "queued": self.server.worker.waiting.qsize()})
        if not self._authorised():
            return self._error(unauthorised())
        if path == "/v1/models":
            return self._send_json(200, {"object": "list", "data": [self._model_card()]})
        if path == f"/v1/models/{self.server.engine.name}":
            return self._send_json(200, self._model_card())
        return self._error(ApiError(404, f"no route GET {path}", code="not_found"))

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        self._body_read = False
        try:
            if path != "/v1/chat/completions":
                raise ApiError(404, f"no route POST {path}", code="not_found")
            if not self._authorised():
                raise unauthorised()
            body = self._read_body()
            completion, stream, options = build_completion(body, self.server.engine, self.server.limits)
        except ApiError as err:
            # A body left unread would be taken for the next request: keep the connection only once it is read.
            return self._error(err, close=not (self._body_read or self._discard_body()))
        if not self.server.worker.submit(completion):
            return self._error(ApiError(503, "the server is busy; retry shortly", type_="server_error",
                                        code="server_busy"))
        try:
            if stream:
                self._stream(completion, bool(options.get("include_usage")))
            else:
                self._complete(completion)
        except (BrokenPipeError, ConnectionResetError):
            completion.cancelled.set()  # the client left: stop generating for it

    def do_PUT(self) -> None:
        self._error(ApiError(405, "method not allowed"), close=True)

    do_DELETE = do_PATCH = do_PUT

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.server.engine.name, "object": "model", "created": self.server.created, "owned_by": "chattune"}

    # -- answers -------------------------------------------------------------

    def _events(self, completion: Completion) -> Iterator[tuple[str, Any]]:
        while True:
            kind, value = completion.events.get()
            yield kind, value
            if kind in ("done", "error"):
                return

    def _complete(self, completion: Completion) -> None:
        parts = []
        for kind, value in self._events(completion):
            if kind == "delta":
                parts.append(value)
            elif kind == "error":
                return self._error(ApiError(500, value, type_="server_error"))
            else:
                info = value
        self._send_json(200, {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.server.engine.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts).strip()},
                         "finish_reason": info["finish_reason"], "logprobs": None}],
            "usage": usage(info),
        })

    def _stream(self, completion: Completion, include_usage: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.server.engine.name}

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> None:
            self._sse({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
                       **extra})

        chunk({"role": "assistant", "content": ""})
        for kind, value in self._events(completion):
            if kind == "delta":
                chunk({"content": value})
            elif kind == "error":
                self._sse({"error": ApiError(500, value, type_="server_error").body()["error"]})
            else:
                chunk({}, value["finish_reason"])
                if include_usage:
                    self._sse({**base, "choices": [], "usage": usage(value)})
        self._write_chunk(b"data: [DONE]\n\n")
        self._write_chunk(b"")  # the chunked body's end

    def _sse(self, data: dict[str, Any]) -> None:
        self._write_chunk(f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode("utf-8"))

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode("ascii") + data + b"\r\n")
        self.wfile.flush()
