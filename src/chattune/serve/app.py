"""HTTP for `chattune serve`, on FastAPI: routes, the API key, body limits, JSON answers and server-sent events.

    GET  /health                 {"status": "ok", "model": the first name, "queued": N}  (no key needed)
    GET  /metrics                Prometheus text format (no key needed; no prompt text in it)
    GET  /v1/models              every served name (each run, and `base` when runs are served)
    POST /v1/chat/completions    a JSON answer, or server-sent events with "stream": true

Every error is OpenAI-shaped ({"error": {"message", "type", "param", "code"}}). One access-log line per
request: method, route, status, model, tokens and time, never the prompt unless --log-prompts.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations (Request) at runtime, and
# fastapi is imported inside create_app.
import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from chattune.serve.api import ApiError, Limits, build_completion, unauthorised, usage
from chattune.serve.completion import Completion
from chattune.serve.engine import Engine
from chattune.serve.metrics import Metrics
from chattune.serve.scheduler import Scheduler

log = logging.getLogger("chattune")

DRAIN_LIMIT = 64 * 2**20  # refused bodies up to this size are read and dropped before answering
RETRY_AFTER_S = 1  # what a 503 tells the client to wait


@dataclass
class ServeState:
    """What the routes need: the served engines by name, the scheduler, the limits and the key."""

    engines: dict[str, Engine]
    scheduler: Scheduler
    limits: Limits
    api_key: str | None
    metrics: Metrics
    log_prompts: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def first(self) -> str:
        return next(iter(self.engines))


class AsyncEvents:
    """A completion's events, put by the scheduler thread and awaited on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()

    def put(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def get(self) -> Any:
        return await self.queue.get()


def create_app(state: ServeState) -> Any:
    """The FastAPI application; its routes close over `state`."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="chattune", docs_url=None, redoc_url=None, openapi_url=None)

    def answer(request: Request, status: int, body: dict, started: float, **extra: Any) -> JSONResponse:
        access(state, request, status, started, **extra)
        return JSONResponse(body, status_code=status, headers=extra.pop("headers", None))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        err = ApiError(exc.status_code, f"no route {request.method} {request.url.path}" if code else
                       "method not allowed", code=code)
        return answer(request, err.status, err.body(), time.monotonic())

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "model": state.first, "queued": state.scheduler.waiting.qsize()})

    @app.get("/metrics")
    async def metrics(request: Request) -> PlainTextResponse:
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        if not authorised(state, request):
            return answer(request, 401, unauthorised().body(), time.monotonic())
        return JSONResponse({"object": "list", "data": [model_card(state, n) for n in state.engines]})

    @app.get("/v1/models/{name}")
    async def model(request: Request, name: str) -> JSONResponse:
        if not authorised(state, request):
            return answer(request, 401, unauthorised().body(), time.monotonic())
        if name not in state.engines:
            return answer(request, 404, unknown_model(state, name).body(), time.monotonic())
        return JSONResponse(model_card(state, name))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        return await chat_completion(state, request)

    return app


def model_card(state: ServeState, name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": state.created, "owned_by": "chattune"}


def unknown_model(state: ServeState, name: Any) -> ApiError:
    return ApiError(404, f"the model {name!r} does not exist here; this server has: {', '.join(state.engines)}",
                    param="model", code="model_not_found")


def authorised(state: ServeState, request: Any) -> bool:
    """The bearer key, compared in constant time (never logged)."""
    if not state.api_key:
        return True
    given = request.headers.get("authorization", "")
    token = given[7:].strip() if given[:7].lower() == "bearer " else ""
    return hmac.compare_digest(token.encode(), state.api_key.encode())


def access(state: ServeState, request: Any, status: int, started: float, **extra: Any) -> None:
    """One access-log line per request, and the request counted in /metrics."""
    state.metrics.request(request.url.path, status)
    fields = " ".join(f"{k}={v}" for k, v in extra.items() if k != "headers" and v is not None)
    client = request.client.host if request.client else "-"
    log.info("%s %s %s %d %.3fs %s", client, request.method, request.url.path, status, time.monotonic() - started, fields)


async def read_body(state: ServeState, request: Any) -> Any:
    """The JSON body within the size limit: 411 without a length, 413 above the limit (the body read and dropped)."""
    length = request.headers.get("content-length")
    if length is None:
        raise ApiError(411, "a Content-Length header is required")
    try:
        n = int(length)
    except ValueError:
        raise ApiError(400, "bad Content-Length header") from None
    if n > state.limits.max_body_bytes:
        if n <= DRAIN_LIMIT:  # the client sees our answer rather than a reset connection
            async for _ in request.stream():
                pass
        raise ApiError(413, f"the request body is {n} bytes, above this server's limit of "
                       f"{state.limits.max_body_bytes}", code="request_too_large")
    raw = await request.body()
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc})") from None


async def chat_completion(state: ServeState, request: Any) -> Any:
    """Validate, queue, and answer: JSON or server-sent events."""
    from fastapi.responses import JSONResponse, StreamingResponse

    started = time.monotonic()
    try:
        if not authorised(state, request):
            raise unauthorised()
        body = await read_body(state, request)
        engine = pick_engine(state, body)
        completion, stream, options = build_completion(body, engine, state.limits)
    except ApiError as err:
        access(state, request, err.status, started)
        return JSONResponse(err.body(), status_code=err.status)
    completion.model, completion.eos_ids = engine.name, tuple(engine.eos_ids)
    completion.events = AsyncEvents(asyncio.get_running_loop())
    if not state.scheduler.submit(completion):
        err = ApiError(503, "the server is busy; retry shortly", type_="server_error", code="server_busy")
        access(state, request, 503, started, model=engine.name)
        return JSONResponse(err.body(), status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
    prompt = body["messages"] if state.log_prompts else None
    if stream:
        events = sse_events(state, request, completion, bool(options.get("include_usage")), started, prompt)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    status, answer = await complete(state, request, completion)
    access(state, request, status, started, model=engine.name, completion_tokens=answer.get("usage", {}).get(
        "completion_tokens"), prompt=json.dumps(prompt, ensure_ascii=False) if prompt else None)
    return JSONResponse(answer, status_code=status)


def pick_engine(state: ServeState, body: Any) -> Engine:
    """The engine the request's `model` names; 404 with the served names otherwise."""
    name = body.get("model") if isinstance(body, dict) else None
    if name in state.engines:
        return state.engines[name]
    raise unknown_model(state, name)


async def next_event(request: Any, completion: Completion) -> tuple[str, Any] | None:
    """The next event, or None once the client has gone (its slot is then freed)."""
    while True:
        try:
            return await asyncio.wait_for(completion.events.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                completion.cancelled.set()
                return None


async def complete(state: ServeState, request: Any, completion: Completion) -> tuple[int, dict[str, Any]]:
    parts = []
    while (event := await next_event(request, completion)) is not None:
        kind, value = event
        if kind == "delta":
            parts.append(value)
        elif kind == "error":
            return 500, ApiError(500, value, type_="server_error").body()
        else:
            return 200, {
                "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": completion.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts).strip()},
                             "finish_reason": value["finish_reason"], "logprobs": None}],
                "usage": usage(value),
            }
    return 499, {}  # the client closed the connection: nobody reads this


async def sse_events(state: ServeState, request: Any, completion: Completion, include_usage: bool, started: float,
                     prompt: Any) -> AsyncIterator[bytes]:
    """The answer as server-sent events, OpenAI's chunk objects; the client leaving frees the slot."""
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": completion.model}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return sse({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]})

    status, tokens = 499, None
    try:
        yield chunk({"role": "assistant", "content": ""})
        while (event := await next_event(request, completion)) is not None:
            kind, value = event
            if kind == "delta":
                yield chunk({"content": value})
                continue
            if kind == "error":
                status = 500
                yield sse({"error": ApiError(500, value, type_="server_error").body()["error"]})
            else:
                status, tokens = 200, value["completion_tokens"]
                yield chunk({}, value["finish_reason"])
                if include_usage:
                    yield sse({**base, "choices": [], "usage": usage(value)})
            yield b"data: [DONE]\n\n"
            return
    finally:
        if status == 499:
            completion.cancelled.set()  # the client left mid-answer: its row leaves the batch
        access(state, request, status, started, model=completion.model, completion_tokens=tokens, stream=True,
               prompt=json.dumps(prompt, ensure_ascii=False) if prompt else None)


def sse(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode("utf-8")
