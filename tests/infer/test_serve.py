"""`chattune serve` talked to with the official openai client, on a free loopback port."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from chattune.infer.generate import generate_batch
from chattune.infer.session import load_session, with_system

from .conftest import SYSTEM

KEY = "test-key-123"
LIMIT_TOKENS = 32
LIMIT_BODY = 20_000
START_TIMEOUT_S = 180
REQUEST_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    """`chattune serve RUN` in a subprocess; yields its base URL; stopped at the end."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with log.open("w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "chattune.cli", "serve", str(tiny_run), "--port", str(port), "--api-key", KEY,
             "--max-tokens-limit", str(LIMIT_TOKENS), "--max-body-bytes", str(LIMIT_BODY)],
            stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "CHATTUNE_API_KEY": ""})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"server exited: {log.read_text()}"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    if json.load(r)["status"] == "ok":
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"server did not start in {START_TIMEOUT_S}s: {log.read_text()}"
            time.sleep(0.5)
        yield url
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
    assert [m.id for m in client.models.list().data] == ["run"]


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
