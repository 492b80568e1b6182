"""`chattune serve runA runB` as a process: SIGTERM during a batch finishes the answers in flight, then exits 0;
`--engine vllm` without vLLM or a GPU says so in one line and exits 2."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

SERVING = re.compile(r"serving .+? on (http://[^\s/]+)/v1 ")


def _serve(args, log):
    with log.open("w") as f:
        return subprocess.Popen([sys.executable, "-m", "chattune.cli", "serve", *args], stdout=f,
                                stderr=subprocess.STDOUT, env={**os.environ, "CHATTUNE_API_KEY": ""})


def _url(proc, log, timeout=180):
    deadline = time.monotonic() + timeout
    while not (found := SERVING.search(log.read_text())):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    return found.group(1)


def _post(url, body, *, stream=False):
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps({**body, "stream": stream}).encode(),
                                 headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=120)


@pytest.mark.slow
def test_sigterm_during_a_batch_finishes_what_is_in_flight_then_exits(run_a, run_b, tmp_path):
    log = tmp_path / "serve.log"
    proc = _serve([str(run_a), str(run_b), "--name", f"a={run_a}", "--name", f"b={run_b}", "--port", "0"], log)
    try:
        url = _url(proc, log)
        results = {}

        def plain(model):
            with _post(url, {"model": model, "messages": [{"role": "user", "content": "Tell me a story"}],
                             "max_tokens": 40}) as r:
                results[model] = json.load(r)

        threads = [threading.Thread(target=plain, args=(m,)) for m in ("b", "base")]
        stream = _post(url, {"model": "a", "messages": [{"role": "user", "content": "Count to twenty"}],
                             "max_tokens": 40}, stream=True)
        for t in threads:
            t.start()
        first = stream.readline()  # the stream has begun: the batch is running
        assert first.startswith(b"data: ")
        proc.send_signal(signal.SIGTERM)
        rest = first + stream.read()
        for t in threads:
            t.join(timeout=120)
        assert proc.wait(timeout=120) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    events = [json.loads(line[6:]) for line in rest.decode().splitlines() if line.startswith("data: {")]
    assert rest.decode().rstrip().endswith("data: [DONE]"), "the stream in flight was finished"
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"][0]["finish_reason"]] in (["stop"], ["length"])
    for model in ("b", "base"):
        usage, choice = results[model]["usage"], results[model]["choices"][0]
        assert choice["finish_reason"] == "stop" or usage["completion_tokens"] == 40, "answered to the end"
    assert "stopped (requests in flight were finished)" in log.read_text()


def test_vllm_engine_without_vllm_or_a_gpu_says_what_to_install(tmp_path):
    out = subprocess.run([sys.executable, "-m", "chattune.cli", "serve", str(tmp_path), "--engine", "vllm"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip() and "WARNING" not in line]
    assert len(lines) == 1 and "pip install 'vllm==" in lines[0] and "GPU" in lines[0], out.stderr
