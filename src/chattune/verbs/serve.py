"""`chattune serve`: an OpenAI-compatible HTTP API for a run directory or a merged model folder.

    GET  /health                 {"status": "ok", ...}  (no key needed)
    GET  /v1/models              the one model served
    POST /v1/chat/completions    non-streaming, or streaming as server-sent events ("stream": true)

The prompt is rendered with the exact training template and the training system
prompt (when the request has none), and generation stops at every end-of-turn
id, so answers match `chattune chat`. Greedy unless the request sets a
temperature above 0. One worker thread owns the model; requests wait in a
bounded queue, so any number of clients may connect at once. Only the standard
library serves HTTP: there is nothing extra to install.
"""

from __future__ import annotations

import hmac
import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import torch

from chattune.errors import ModelError
from chattune.options import GENERATION, SERVE

log = logging.getLogger("chattune")

_DRAIN_LIMIT = 64 * 2**20  # refused bodies up to this size are read and dropped before answering
DEFAULT_MAX_TOKENS = GENERATION.max_new_tokens  # what `chattune chat` uses when a request names no max_tokens
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


# ---------------------------------------------------------------------------
# the model side


@dataclass
class Engine:
    """A model ready to answer, with the training template, stop ids and default system prompt."""

    model: Any
    renderer: Any
    eos_ids: list[int]
    system: str | None
    name: str
    max_positions: int | None = None

    @property
    def tokenizer(self) -> Any:
        return self.renderer.tokenizer


def load_engine(path: str | Path) -> Engine:
    """A run directory (base + adapter) or a merged model folder (its template, generation_config eos ids)."""
    path = Path(path)
    if (path / "run_config.yaml").is_file():
        from chattune.infer.session import load_session

        session = load_session(path)
        model, renderer, system = session.model, session.renderer, session.system
        eos = renderer.end_of_turn_ids()
    elif (path / "config.json").is_file():
        model, renderer, system, eos = _load_model_folder(path)
    else:
        raise ModelError("neither a chattune run directory (run_config.yaml) nor a model folder (config.json)",
                         where=str(path), fix="pass a run directory such as runs/demo, or the --out of `chattune merge`")
    if torch.cuda.is_available():
        model = model.to("cuda")
    model.eval()
    config = getattr(model, "config", None)
    return Engine(model, renderer, eos, system, path.resolve().name,
                  getattr(config, "max_position_embeddings", None))


def _load_model_folder(path: Path) -> tuple[Any, Any, str | None, list[int]]:
    """A plain HF folder: chattune.json (written by merge) gives the system prompt and template variables."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from chattune.data.render import ChatRenderer
    from chattune.model.load import resolve_dtype

    info_file = path / "chattune.json"
    info = json.loads(info_file.read_text(encoding="utf-8")) if info_file.is_file() else {}
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=resolve_dtype(info.get("run_dtype", "auto")))
    except Exception as exc:  # transformers raises many types for a broken folder
        raise ModelError(f"cannot load the model folder: {' '.join(str(exc).split())[:300]}", where=str(path),
                         fix="check that it is a complete Hugging Face model folder (config.json, *.safetensors, tokenizer)")
    renderer = ChatRenderer(tok, info.get("template_kwargs") or {})  # raises TemplateError without a template
    eos = list(renderer.end_of_turn_ids())
    try:
        gen_eos = GenerationConfig.from_pretrained(str(path)).eos_token_id
    except OSError:
        gen_eos = None
    for i in [gen_eos] if isinstance(gen_eos, int) else (gen_eos or []):
        if i not in eos:
            eos.append(i)
    return model, renderer, info.get("system"), eos


@dataclass
class Job:
    """One request on its way through the worker; events carry ('delta', text), ('done', info) or ('error', msg)."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None = None
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)


class _JobStreamer:
    """Receives new token ids from generate(), decodes them, and forwards complete text pieces."""

    def __init__(self, engine: Engine, job: Job):
        self.engine, self.job = engine, job
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.hit_stop = False
        self._prompt_seen = False
        # A stop string may arrive split over tokens: hold back that many characters until it is ruled out.
        self.holdback = max((len(s) for s in job.stop), default=1) - 1

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt itself
            self._prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        text = self.engine.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return
        for s in self.job.stop:
            at = text.find(s)
            if at >= 0:
                text, self.hit_stop = text[:at], True
        self.text = text
        upto = len(text) if self.hit_stop else max(self.sent, len(text) - self.holdback)
        self._emit(upto)

    def _emit(self, upto: int) -> None:
        piece = self.text[self.sent:upto]
        if not self.sent:
            piece = piece.lstrip()  # answers start at their first visible character, as in `chattune chat`
            if not piece:
                return
        if piece:
            self.job.events.put(("delta", piece))
            self.sent = upto

    def end(self) -> None:
        if not self.hit_stop:
            self.text = self.engine.tokenizer.decode(self.ids, skip_special_tokens=True)
        self._emit(len(self.text.rstrip()))
        stopped = self.hit_stop or (bool(self.ids) and self.ids[-1] in self.engine.eos_ids)
        self.job.events.put(("done", {"finish_reason": "stop" if stopped else "length",
                                      "completion_tokens": len(self.ids), "prompt_tokens": len(self.job.prompt_ids)}))


class _StopWhen:
    """A stopping criterion: a stop string was seen, or the client went away."""

    def __init__(self, streamer: _JobStreamer):
        self.streamer = streamer

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kw: Any) -> torch.Tensor:
        done = self.streamer.hit_stop or self.streamer.job.cancelled.is_set()
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class Worker:
    """The one thread that runs the model; jobs wait in a bounded queue."""

    def __init__(self, engine: Engine, max_queue: int = 64):
        self.engine = engine
        self.jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self.thread = threading.Thread(target=self._loop, name="chattune-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> bool:
        """Queue a job; False when the queue is full."""
        try:
            self.jobs.put_nowait(job)
            return True
        except queue.Full:
            return False

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():
                continue
            try:
                self._generate(job)
            except Exception as exc:  # reported to that one client; the server keeps serving
                log.exception("generation failed")
                job.events.put(("error", f"{type(exc).__name__}: {exc}"))

    def stop(self) -> None:
        self.jobs.put(None)

    def _generate(self, job: Job) -> None:
        from transformers import StoppingCriteriaList

        from chattune.infer.generate import inference_mode

        e = self.engine
        device = next(e.model.parameters()).device
        ids = torch.tensor([job.prompt_ids], dtype=torch.long, device=device)
        streamer = _JobStreamer(e, job)
        sampling: dict[str, Any] = {"do_sample": False}
        if job.temperature > 0:
            sampling = {"do_sample": True, "temperature": job.temperature, "top_p": job.top_p}
            if job.seed is not None:
                torch.manual_seed(job.seed)
        with inference_mode(e.model):
            e.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=job.max_tokens,
                             eos_token_id=e.eos_ids, pad_token_id=e.tokenizer.pad_token_id, use_cache=True,
                             streamer=streamer, stopping_criteria=StoppingCriteriaList([_StopWhen(streamer)]),
                             **sampling)  # generate() calls streamer.end() itself


# ---------------------------------------------------------------------------
# requests


class ApiError(Exception):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    """What one request may ask for."""

    max_tokens: int = SERVE.max_tokens_limit
    max_body_bytes: int = SERVE.max_body_bytes


def parse_messages(raw: Any) -> list[dict[str, str]]:
    """OpenAI messages -> plain {role, content} turns (text parts joined); 400 for anything else."""
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}]: role must be one of {', '.join(ROLES)}", param=f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise ApiError(400, f"messages[{i}]: only text content parts are supported", param=f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}]: content must be text", param=f"messages[{i}].content")
        out.append({"role": ROLES[m["role"]], "content": content})
    if out[-1]["role"] != "user":
        raise ApiError(400, "the last message must be the user's", param="messages")
    return out


def _number(body: dict, key: str, default: Any, kind: type, lo: float, hi: float | None = None) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and int(value) != value):
        raise ApiError(400, f"'{key}' must be {'an integer' if kind is int else 'a number'}", param=key)
    if value < lo or (hi is not None and value > hi):
        raise ApiError(400, f"'{key}' must be between {lo} and {hi}" if hi is not None else f"'{key}' must be at least {lo}",
                       param=key)
    return kind(value)


def build_job(body: Any, engine: Engine, limits: Limits) -> tuple[Job, bool, dict[str, Any]]:
    """Validate a chat-completions request; returns the job, whether to stream, and stream options."""
    from chattune.infer.session import with_system

    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    messages = with_system(parse_messages(body.get("messages")), engine.system)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, min(DEFAULT_MAX_TOKENS, limits.max_tokens), int, 1)
    if max_tokens > limits.max_tokens:
        raise ApiError(400, f"'{key}' is {max_tokens}, above this server's limit of {limits.max_tokens}", param=key,
                       code="max_tokens_too_large")
    if _number(body, "n", 1, int, 1) != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    temperature = _number(body, "temperature", 0.0, float, 0, 2)
    top_p = _number(body, "top_p", 1.0, float, 0, 1)
    seed = _number(body, "seed", None, int, -(2**63))
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise ApiError(400, "'stop' must be a string or a list of up to 4 non-empty strings", param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", param="stream")
    prompt_ids = engine.renderer.prompt_ids(messages)
    if engine.max_positions and len(prompt_ids) + max_tokens > engine.max_positions:
        raise ApiError(400, f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
                       f"context of {engine.max_positions} tokens", param="messages", code="context_length_exceeded")
    options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
    return Job(prompt_ids, max_tokens, temperature, top_p, stop, seed), stream, options


# ---------------------------------------------------------------------------
# HTTP


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
            return self._send_json(200, {"status": "ok", "model": e.name, "queued": self.server.worker.jobs.qsize()})
        if not self._authorised():
            return self._error(_unauthorised())
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
                raise _unauthorised()
            body = self._read_body()
            job, stream, options = build_job(body, self.server.engine, self.server.limits)
        except ApiError as err:
            # A body left unread would be taken for the next request: keep the connection only once it is read.
            return self._error(err, close=not (self._body_read or self._discard_body()))
        if not self.server.worker.submit(job):
            return self._error(ApiError(503, "the server is busy; retry shortly", type_="server_error",
                                        code="server_busy"))
        try:
            if stream:
                self._stream(job, bool(options.get("include_usage")))
            else:
                self._complete(job)
        except (BrokenPipeError, ConnectionResetError):
            job.cancelled.set()  # the client left: stop generating for it

    def do_PUT(self) -> None:
        self._error(ApiError(405, "method not allowed"), close=True)

    do_DELETE = do_PATCH = do_PUT

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.server.engine.name, "object": "model", "created": self.server.created, "owned_by": "chattune"}

    def _events(self, job: Job) -> Iterator[tuple[str, Any]]:
        while True:
            kind, value = job.events.get()
            yield kind, value
            if kind in ("done", "error"):
                return

    def _complete(self, job: Job) -> None:
        parts = []
        for kind, value in self._events(job):
            if kind == "delta":
                parts.append(value)
            elif kind == "error":
                return self._error(ApiError(500, value, type_="server_error"))
            else:
                info = value
        usage = _usage(info)
        self._send_json(200, {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.server.engine.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts).strip()},
                         "finish_reason": info["finish_reason"], "logprobs": None}],
            "usage": usage,
        })

    def _stream(self, job: Job, include_usage: bool) -> None:
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
        for kind, value in self._events(job):
            if kind == "delta":
                chunk({"content": value})
            elif kind == "error":
                self._sse({"error": ApiError(500, value, type_="server_error").body()["error"]})
            else:
                chunk({}, value["finish_reason"])
                if include_usage:
                    self._sse({**base, "choices": [], "usage": _usage(value)})
        self._write_chunk(b"data: [DONE]\n\n")
        self._write_chunk(b"")  # the chunked body's end

    def _sse(self, data: dict[str, Any]) -> None:
        self._write_chunk(f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode("utf-8"))

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode("ascii") + data + b"\r\n")
        self.wfile.flush()


def _usage(info: dict[str, Any]) -> dict[str, int]:
    p, c = info["prompt_tokens"], info["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _unauthorised() -> ApiError:
    return ApiError(401, "missing or incorrect API key (send 'Authorization: Bearer KEY')", code="invalid_api_key")


# ---------------------------------------------------------------------------
# entry point


def make_server(engine: Engine, *, host: str = SERVE.host, port: int = SERVE.port, api_key: str | None = SERVE.api_key,
                max_tokens_limit: int = SERVE.max_tokens_limit, max_body_bytes: int = SERVE.max_body_bytes) -> Server:
    """A bound server ready for serve_forever() (port 0 picks a free port: see server.server_address)."""
    from chattune.errors import ConfigError

    try:
        return Server((host, port), engine, api_key=api_key,
                      limits=Limits(max_tokens=max_tokens_limit, max_body_bytes=max_body_bytes))
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror})", where="--host/--port",
                          fix="choose another --port, or stop what is using it") from None


def run(path: str, *, host: str = SERVE.host, port: int = SERVE.port, api_key: str | None = SERVE.api_key,
        max_tokens_limit: int = SERVE.max_tokens_limit, max_body_bytes: int = SERVE.max_body_bytes) -> None:
    """Entry point of `chattune serve`: load once, then answer until interrupted."""
    engine = load_engine(path)
    server = make_server(engine, host=host, port=port, api_key=api_key, max_tokens_limit=max_tokens_limit,
                         max_body_bytes=max_body_bytes)
    bound_host, bound_port = server.server_address[:2]
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serve: listening on %s, reachable from other machines%s", host,
                    "" if api_key else "; anyone who can reach it can use it (set --api-key)")
    print(f"serving {engine.name} on http://{bound_host}:{bound_port}/v1 (OpenAI-compatible; "
          f"{'API key required' if api_key else 'no API key'}); Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
