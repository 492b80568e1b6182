"""The OpenAI chat-completions request, checked against the server's limits, and OpenAI-shaped errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from chattune.infer.session import with_system
from chattune.options import GENERATION
from chattune.serve.engine import Engine
from chattune.serve.completion import Completion

DEFAULT_MAX_TOKENS = GENERATION.max_new_tokens  # what `chattune chat` uses when a request names no max_tokens
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def unauthorised() -> ApiError:
    """The 401 for a missing or wrong bearer key."""
    return ApiError(401, "missing or incorrect API key (send 'Authorization: Bearer KEY')", code="invalid_api_key")


@dataclass
class Limits:
    """What one request may ask for (the values come from `chattune serve`'s options)."""

    max_tokens: int
    max_body_bytes: int


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


def _max_tokens(body: dict, limits: Limits) -> int:
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, min(DEFAULT_MAX_TOKENS, limits.max_tokens), int, 1)
    if max_tokens > limits.max_tokens:
        raise ApiError(400, f"'{key}' is {max_tokens}, above this server's limit of {limits.max_tokens}", param=key,
                       code="max_tokens_too_large")
    return max_tokens


def _stop_strings(body: dict) -> list[str]:
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise ApiError(400, "'stop' must be a string or a list of up to 4 non-empty strings", param="stop")
    return stop


def build_completion(body: Any, engine: Engine, limits: Limits) -> tuple[Completion, bool, dict[str, Any]]:
    """Validate a chat-completions request; returns the completion to run, whether to stream, and stream options."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    messages = with_system(parse_messages(body.get("messages")), engine.system)
    max_tokens = _max_tokens(body, limits)
    if _number(body, "n", 1, int, 1) != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    temperature = _number(body, "temperature", 0.0, float, 0, 2)
    top_p = _number(body, "top_p", 1.0, float, 0, 1)
    seed = _number(body, "seed", None, int, -(2**63))
    stop = _stop_strings(body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", param="stream")
    prompt_ids = engine.renderer.prompt_ids(messages)
    if engine.max_positions and len(prompt_ids) + max_tokens > engine.max_positions:
        raise ApiError(400, f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
                       f"context of {engine.max_positions} tokens", param="messages", code="context_length_exceeded")
    options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
    return Completion(prompt_ids, max_tokens, temperature, top_p, stop, seed), stream, options


def usage(info: dict[str, Any]) -> dict[str, int]:
    """OpenAI's usage block from the worker's 'done' info."""
    p, c = info["prompt_tokens"], info["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
