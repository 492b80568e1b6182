"""`chattune serve` talked to with the official openai client, on a loopback port the server picks itself;
its request checks on their own, without a model."""

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import openai
import pytest

from chattune.infer.generate import generate_batch
from chattune.infer.session import load_session, with_system
from chattune.serve.api import ApiError, Limits, build_completion

from .conftest import SYSTEM

KEY = "test-key-123"
LIMIT_TOKENS = 32
LIMIT_BODY = 20_000
START_TIMEOUT_S = 180
REQUEST_TIMEOUT_S = 120
SERVING = re.compile(r"serving .+? on (http://[^\s/]+)/v1 ")


def _wait_for_url(proc: subprocess.Popen, log) -> str:
    """The base URL the server prints once it listens: it bound port 0, so the port is its own and nobody else's."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (found := SERVING.search(log.read_text())):
        assert proc.poll() is None, f"server exited: {log.read_text()}"
        assert time.monotonic() < deadline, f"server did not start in {START_TIMEOUT_S}s: {log.read_text()}"
        time.sleep(0.2)
    return found.group(1)


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    """`chattune serve RUN --port 0` in a subprocess; yields the base URL it reports; stopped at the end."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with log.open("w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "chattune.cli", "serve", str(tiny_run), "--port", "0", "--api-key", KEY,
             "--max-tokens-limit", str(LIMIT_TOKENS), "--max-body-bytes", str(LIMIT_BODY)],
            stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "CHATTUNE_API_KEY": ""})
    try:
        yield _wait_for_url(proc, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, timeout=REQUEST_TIMEOUT_S, max_retries=0)


@pytest.fixture(scope="module")
def expected(tiny_run):
    """What `chattune chat` / predict answer (greedy, the run's system prompt), for a question and a token limit."""
    session = load_session(tiny_run)

    def answer(question: str, max_tokens: int) -> str:
        prompt = with_system([{"role": "user", "content": question}], SYSTEM)
        return generate_batch(session.model, session.renderer, [prompt], max_new_tokens=max_tokens)[0]

    answer.prompt_tokens = lambda q: len(session.renderer.prompt_ids(with_system([{"role": "user", "content": q}], SYSTEM)))
    return answer


def _ask(client, question, **kw):
    return client.chat.completions.create(model="run", messages=[{"role": "user", "content": question}], **kw)


def test_health_and_models(server, client):
    with urllib.request.urlopen(f"{server}/health", timeout=10) as r:
        assert json.load(r) == {"status": "ok", "model": "run", "queued": 0}
    assert [m.id for m in client.models.list().data] == ["run", "base"], "the run, and its base model without the adapter"


def test_completion_matches_chat(client, expected):
    r = _ask(client, "Hello there", max_tokens=10)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected("Hello there", 10)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == expected.prompt_tokens("Hello there")
    assert 0 < r.usage.completion_tokens <= 10 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_completion_matches_the_plain_one(client, expected):
    chunks = list(_ask(client, "Tell me a story", max_tokens=12, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == expected("Tell me a story", 12)
    assert sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) > 1, "streamed in pieces"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] in (["stop"], ["length"])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_wrong_or_missing_api_key_is_401(server):
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", timeout=REQUEST_TIMEOUT_S, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as exc:
        _ask(bad, "Hello")
    assert exc.value.status_code == 401
    req = urllib.request.Request(f"{server}/v1/models")
    with pytest.raises(urllib.error.HTTPError) as http:
        urllib.request.urlopen(req, timeout=10)
    assert http.value.code == 401 and json.load(http.value)["error"]["code"] == "invalid_api_key"


def test_requests_over_the_limits_are_4xx_with_an_openai_error(client):
    with pytest.raises(openai.BadRequestError) as exc:
        _ask(client, "Hello", max_tokens=LIMIT_TOKENS + 1)
    assert exc.value.status_code == 400 and "limit" in exc.value.message
    with pytest.raises(openai.APIStatusError) as exc:
        _ask(client, "x" * (LIMIT_BODY + 1), max_tokens=4)
    assert exc.value.status_code == 413 and exc.value.body["code"] == "request_too_large"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="run", messages=[{"role": "assistant", "content": "no user turn"}])


def test_eight_concurrent_requests_are_all_answered(client, expected):
    questions = [f"Question number {i}: what is {i} plus {i}?" for i in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda q: _ask(client, q, max_tokens=6).choices[0].message.content, questions))
    assert answers == [expected(q, 6) for q in questions]


# The request checks alone (chattune.serve.api): a stand-in engine whose prompt is one token per character.


class _Renderer:
    def prompt_ids(self, messages):
        self.messages = messages
        return [1] * sum(len(m["content"]) for m in messages)


def _check(*, max_positions=100, **body):
    engine = SimpleNamespace(renderer=_Renderer(), system="Be brief.", max_positions=max_positions)
    body = {"messages": [{"role": "user", "content": "hi"}], **body}
    limits = Limits(max_tokens=LIMIT_TOKENS, max_body_bytes=LIMIT_BODY)
    completion, stream, options = build_completion(body, engine, limits)
    return completion, stream, options, engine.renderer.messages


def test_a_request_becomes_a_greedy_completion_with_the_training_system_prompt():
    completion, stream, options, messages = _check()
    assert messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert (completion.max_tokens, completion.temperature, completion.top_p, completion.stop, completion.seed) == (
        LIMIT_TOKENS, 0.0, 1.0, [], None), "max_tokens defaults to chat's 512, capped by the limit"
    assert completion.prompt_ids == [1] * len("Be brief.hi") and stream is False and options == {}
    completion, stream, options, messages = _check(
        messages=[{"role": "developer", "content": "Terse."}, {"role": "user", "content": [
            {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        max_completion_tokens=7, max_tokens=99, temperature=0.5, stop="\n", seed=3, stream=True,
        stream_options={"include_usage": True})
    assert messages == [{"role": "system", "content": "Terse."}, {"role": "user", "content": "ab"}]
    assert completion.max_tokens == 7, "max_completion_tokens wins over max_tokens"
    assert (completion.temperature, completion.stop, completion.seed, stream, options) == (
        0.5, ["\n"], 3, True, {"include_usage": True})


@pytest.mark.parametrize("body, param, code", [
    ({"max_tokens": LIMIT_TOKENS + 1}, "max_tokens", "max_tokens_too_large"),
    ({"max_completion_tokens": LIMIT_TOKENS + 1}, "max_completion_tokens", "max_tokens_too_large"),
    ({"max_tokens": 1.5}, "max_tokens", None),
    ({"max_tokens": True}, "max_tokens", None),
    ({"max_tokens": 0}, "max_tokens", None),
    ({"n": 2}, "n", None),
    ({"temperature": 2.5}, "temperature", None),
    ({"top_p": -0.1}, "top_p", None),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", None),
    ({"stop": [""]}, "stop", None),
    ({"stream": "yes"}, "stream", None),
    ({"messages": []}, "messages", None),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", None),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content", None),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content", None),
    ({"messages": [{"role": "assistant", "content": "no user turn"}]}, "messages", None),
    ({"messages": [{"role": "user", "content": "x" * 90}], "max_tokens": 20}, "messages", "context_length_exceeded"),
])
def test_bad_requests_are_400_naming_the_parameter(body, param, code):
    with pytest.raises(ApiError) as exc:
        _check(**body)
    err = exc.value.body()["error"]
    assert exc.value.status == 400 and err["type"] == "invalid_request_error"
    assert (err["param"], err["code"]) == (param, code), err["message"]


def test_a_body_that_is_not_an_object_is_400():
    with pytest.raises(ApiError) as exc:
        build_completion(["hi"], SimpleNamespace(), Limits(max_tokens=1, max_body_bytes=1))
    assert exc.value.status == 400 and "JSON object" in exc.value.message
