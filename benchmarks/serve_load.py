"""`chattune serve` under load: 1, 4, 16 and 32 concurrent clients against one server, over real HTTP.

    python benchmarks/serve_load.py RUN [RUN...] [--clients 1,4,16,32] [--max-tokens 48] [--rounds 2]

Starts `chattune serve RUN... --port 0` in a subprocess (continuous batching, up to 32 rows), then for each
concurrency level runs that many clients, each sending `rounds` streamed, greedy chat completions one
after another (the openai client). Level 1 sends one request per question (16 questions) and its answers
are the reference: every answer at every level must be identical to it. Prints per level the aggregate
completion tokens/s, p50/p95 latency, p50 time to first token, and the ratio to one client. With several
runs the requests go round-robin over their model names (mixed-adapter batches).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
from common import machine

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "Who are you?", "What can you help me with today?", "Give me a tip for learning a new language.",
    "What is a good name for a cat?", "How do I boil an egg?", "Tell me something about the moon.",
    "What should I read this weekend?", "How can I sleep better?", "Describe your favourite season.",
    "What is the capital of Italy?", "Explain what a computer does.", "How do plants grow?",
    "Suggest a short walk route idea.", "What makes a good friend?", "Why is the sky blue?", "Say hello in French.",
]
SERVING = re.compile(r"serving .+? on (http://[^\s/]+)/v1 ")


def start_server(runs: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "CHATTUNE_API_KEY": ""}
    proc = subprocess.Popen([sys.executable, "-m", "chattune.cli", "serve", *runs, "--port", "0", "--max-batch", "32"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 600
    while not (found := SERVING.search(log.read_text())):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not start:\n{log.read_text()}")
        time.sleep(0.5)
    return proc, found.group(1)


def ask(client: openai.OpenAI, model: str, question: str, max_tokens: int) -> dict:
    """One streamed completion: its text, completion tokens, latency and time to first token."""
    started = time.monotonic()
    first, parts, tokens = None, [], 0
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                            max_tokens=max_tokens, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.monotonic()
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    end = time.monotonic()
    return {"text": "".join(parts).strip(), "tokens": tokens, "latency": end - started,
            "ttft": (first or end) - started, "model": model, "question": question}


def level(client: openai.OpenAI, models: list[str], clients: int, rounds: int, max_tokens: int) -> tuple[list[dict], float]:
    """`clients` concurrent clients, each sending its requests one after another; (results, wall seconds)."""
    def one_client(c: int) -> list[dict]:
        n = len(QUESTIONS) if clients == 1 else rounds
        return [ask(client, models[(c + r * clients) % len(models)], QUESTIONS[(c + r * clients) % len(QUESTIONS)],
                    max_tokens) for r in range(n)]

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = [r for rs in pool.map(one_client, range(clients)) for r in rs]
    return results, time.monotonic() - started


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories (one base) or a merged model folder")
    ap.add_argument("--clients", default="1,4,16,32")
    ap.add_argument("--rounds", type=int, default=2, help="requests per client above one client")
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args()
    log = Path(tempfile.mkdtemp(prefix="serve-load-")) / "serve.log"
    proc, url = start_server(args.runs, log)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=1200, max_retries=0)
        models = [m.id for m in client.models.list().data if m.id != "base"] or ["base"]
        print(f"{machine()}; load average before: {os.getloadavg()[0]:.1f}; models {', '.join(models)}; "
              f"max_tokens {args.max_tokens}\n")
        print("| clients | requests | completion tokens/s | ratio to 1 client | p50 latency s | p95 latency s "
              "| p50 TTFT s | identical greedy answers |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        reference, base_rate = {}, None
        for clients in [int(c) for c in args.clients.split(",")]:
            results, wall = level(client, models, clients, args.rounds, args.max_tokens)
            rate = sum(r["tokens"] for r in results) / wall
            if clients == 1:
                reference, base_rate = {(r["model"], r["question"]): r["text"] for r in results}, rate
            same = sum(reference.get((r["model"], r["question"])) == r["text"] for r in results)
            lat, ttft = [r["latency"] for r in results], [r["ttft"] for r in results]
            print(f"| {clients} | {len(results)} | {rate:.1f} | {rate / base_rate:.2f}x | {pct(lat, 50):.2f} | "
                  f"{pct(lat, 95):.2f} | {pct(ttft, 50):.2f} | {same}/{len(results)} |", flush=True)
        print(f"\nload average after: {os.getloadavg()[0]:.1f}")
    finally:
        proc.terminate()
        proc.wait(timeout=120)


if __name__ == "__main__":
    main()
