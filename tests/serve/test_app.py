"""The HTTP server in this process (real sockets, the openai client and raw HTTP): two adapters on one base,
unknown models, a client leaving mid-stream, a full queue, /metrics, the access log, and a bounded load test."""

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from chattune.verbs.serve import load_engines, make_server

from .test_scheduler import _alone

KEY = "k-123"
QUESTIONS = ["Hi there", "What is two plus two?", "Name a colour", "Tell me about the sea and its waves"]


def _start(engines, **kw):
    server = make_server(engines, port=0, api_key=KEY, max_tokens_limit=64, max_body_bytes=4000, **kw)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def _stop(server):
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def engines(run_a, run_b):
    return load_engines([str(run_a), str(run_b)], [f"a={run_a}", f"b={run_b}"])


@pytest.fixture(scope="module")
def served(engines):
    server, url = _start(engines)
    yield server, url
    _stop(server)


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served[1]}/v1", api_key=KEY, timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def expected(engines):
    by_name = {e.name: e for e in engines}
    cache = {}

    def answer(model, question, max_tokens):
        if (model, question, max_tokens) not in cache:
            cache[model, question, max_tokens] = _alone(by_name[model], question, max_tokens)
        return cache[model, question, max_tokens]

    return answer


def _post(url, body, *, key=KEY, raw=None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=data, headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.load(r), r.headers
    except urllib.error.HTTPError as err:
        return err.code, json.load(err), err.headers


def _ask(model, question, max_tokens=4):
    return {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens}


def test_each_model_name_answers_with_its_own_adapter_streaming_and_not(client, expected):
    assert [m.id for m in client.models.list().data] == ["a", "b", "base"]
    for model in ("a", "b", "base"):
        plain = client.chat.completions.create(**_ask(model, QUESTIONS[1], 8))
        assert plain.model == model and plain.choices[0].message.content == expected(model, QUESTIONS[1], 8)
        chunks = list(client.chat.completions.create(**_ask(model, QUESTIONS[1], 8), stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip() == plain.choices[0].message.content


def test_an_unknown_model_is_404_listing_the_names(served, client):
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(**_ask("gpt-4", "hi"))
    assert exc.value.body["code"] == "model_not_found" and "a, b, base" in exc.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    assert client.models.retrieve("b").id == "b"


def test_a_client_leaving_mid_stream_frees_its_slot(served, client):
    server, _ = served
    stream = client.chat.completions.create(**_ask("a", QUESTIONS[3], 64), stream=True)
    next(iter(stream))
    stream.close()  # the connection goes away while the answer has up to 64 tokens left
    deadline = time.monotonic() + 60
    while server.state.scheduler.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.state.scheduler.running == 0 and server.state.scheduler.waiting.qsize() == 0
    assert client.chat.completions.create(**_ask("b", "still there?", 2)).choices, "the server keeps answering"


def test_a_full_queue_is_503_with_retry_after(engines):
    server, url = _start(engines, max_batch=1, max_queue=1)
    try:
        with ThreadPoolExecutor(max_workers=5) as pool:  # one decodes 64 tokens, one waits, the rest find no room
            results = list(pool.map(lambda i: _post(url, _ask("a", QUESTIONS[3], 64)), range(5)))
    finally:
        _stop(server)
    statuses = sorted(status for status, _, _ in results)
    assert statuses.count(200) >= 2 and 503 in statuses and set(statuses) <= {200, 503}, statuses
    for status, body, headers in results:
        if status == 503:
            assert headers["Retry-After"] == "1" and body["error"]["code"] == "server_busy"


def test_metrics_are_prometheus_text(served, client):
    _, url = served
    client.chat.completions.create(**_ask("a", QUESTIONS[0], 3))
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values['chattune_requests_total{route="/v1/chat/completions",status="200"}'] >= 1
    assert values["chattune_queue_depth"] == 0 and values["chattune_batch_size"] == 0
    assert values["chattune_prompt_tokens_total"] > 0 and values["chattune_completion_tokens_total"] > 0
    assert values["chattune_time_to_first_token_seconds_count"] >= 1
    assert values['chattune_time_to_first_token_seconds_bucket{le="+Inf"}'] == values[
        "chattune_time_to_first_token_seconds_count"]


def test_the_access_log_has_one_line_per_request_without_the_prompt(engines, caplog):
    caplog.set_level("INFO", logger="chattune")
    for log_prompts in (False, True):
        server, url = _start(engines, log_prompts=log_prompts)
        try:
            caplog.clear()
            assert _post(url, _ask("b", "SECRET-QUESTION-42", 2))[0] == 200
        finally:
            _stop(server)
        lines = [r.getMessage() for r in caplog.records if "/v1/chat/completions" in r.getMessage()]
        assert len(lines) == 1 and " POST /v1/chat/completions 200 " in lines[0] and "model=b" in lines[0]
        assert ("SECRET-QUESTION-42" in lines[0]) is log_prompts
        assert KEY not in caplog.text


def test_64_mixed_requests_across_two_adapters_are_all_answered_and_the_server_lives(served, expected):
    _, url = served
    kinds = [
        ("ok-a", lambda i: _post(url, _ask("a", QUESTIONS[i % 4])), 200),
        ("ok-b", lambda i: _post(url, _ask("b", QUESTIONS[i % 4])), 200),
        ("unknown model", lambda i: _post(url, _ask("c", "hi")), 404),
        ("bad role", lambda i: _post(url, {"model": "a", "messages": [{"role": "tool", "content": "x"}]}), 400),
        ("too many tokens", lambda i: _post(url, _ask("b", "hi", 65)), 400),
        ("wrong key", lambda i: _post(url, _ask("a", "hi"), key="nope"), 401),
        ("too big", lambda i: _post(url, _ask("a", "x" * 5000)), 413),
        ("not json", lambda i: _post(url, None, raw=b"{nope"), 400),
    ]
    jobs = [(i, *kinds[i % len(kinds)]) for i in range(64)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(lambda job: job[2](job[0]), jobs))
    for (i, kind, _, want), (status, body, _) in zip(jobs, results):
        assert status == want, (kind, body)
        if status == 200:
            model = body["model"]
            assert body["choices"][0]["message"]["content"] == expected(model, QUESTIONS[i % 4], 4), (kind, i)
        else:
            assert set(body["error"]) == {"message", "type", "param", "code"}, kind
    with urllib.request.urlopen(f"{url}/health", timeout=10) as r:
        assert json.load(r)["status"] == "ok"
