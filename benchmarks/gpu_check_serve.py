"""gpu_check: `chattune serve` on a GPU: continuous batching with two adapters, and the vLLM engine end to end.

Both checks share two short runs of SmolLM2-135M (fp32, 2 LoRA steps each, different system prompts and
seeds) trained through the real CLI by the first check that needs them.

- serve_batching: the scheduler on the GPU: 8 greedy requests over two adapters and the base, arriving one
  after another into a running batch, must each equal that prompt generated alone (figures: identical
  answers, batched vs one-at-a-time completion tokens/s).
- serve_vllm: `chattune serve RUN RUN --engine vllm --check`, which probes chattune's path and vLLM's and
  refuses to serve on any difference; passes when it reports serving. Skipped without vllm or a GPU.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

_STATE: dict[str, Any] = {}
QUESTIONS = ["Who are you?", "Name three colours.", "What is 2 + 2?", "Tell me a short story about a cat.",
             "Say hello.", "Why is the sky blue?", "Give me a tip for sleeping well.", "What is a LoRA adapter?"]


def result(name: str, status: str, detail: str, **figures: float) -> dict[str, Any]:
    return {"name": name, "status": status, "detail": detail, "figures": figures}


def _env(ctx: Any) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ctx.repo / "src"), os.environ.get("PYTHONPATH", "")]),
                PYTHONUNBUFFERED="1", CHATTUNE_API_KEY="")


def runs(ctx: Any) -> list[Path]:
    """Two 2-step SmolLM2 runs (trained once per gpu_check run)."""
    if "runs" in _STATE:
        return _STATE["runs"]
    made = []
    for name, system, seed in (("pirate", "You are a pirate.", 1), ("butler", "You are a formal butler.", 2)):
        cfg = ctx.workdir / f"{name}.yaml"
        data = ctx.repo / "src/chattune/resources/persona.json"
        steps, batch, length = (1, 1, 48) if ctx.smoke else (2, 4, 128)  # --cpu-smoke: as little training as runs
        cfg.write_text(f"model:\n  name_or_path: smollm2-135m\n  dtype: fp32\ndata:\n  train: {data}\n  system: {system}\n"
                       f"  max_length: {length}\ntrain:\n  max_steps: {steps}\n  batch_size: {batch}\n  seed: {seed}\n"
                       f"tracking:\n  backends: [none]\n  probe_size: 0\noutput_dir: {ctx.workdir / name}\n")
        subprocess.run([ctx.python, "-m", "chattune.cli", "train", str(cfg)], check=True, capture_output=True,
                       env=_env(ctx), timeout=600, cwd=ctx.workdir)
        made.append(ctx.workdir / name)
    _STATE["runs"] = made
    return made


def check_serve_batching(ctx: Any) -> dict[str, Any]:
    import torch

    from chattune.infer.generate import generate_batch
    from chattune.infer.session import with_system
    from chattune.serve.adapters import load_engines
    from chattune.serve.completion import Completion
    from chattune.serve.scheduler import Scheduler

    engines = {e.name: e for e in load_engines([str(p) for p in runs(ctx)])}
    names = list(engines)
    jobs = [(engines[names[i % len(names)]], q, 8 if ctx.smoke else 32) for i, q in enumerate(QUESTIONS)]
    started = time.monotonic()
    alone = []
    for e, q, n in jobs:
        prompt = with_system([{"role": "user", "content": q}], e.system)
        if e.adapter == "__base__":
            with e.model.disable_adapter():
                alone.append(generate_batch(e.model, e.renderer, [prompt], max_new_tokens=n)[0])
        else:
            e.model.set_adapter(e.adapter)
            alone.append(generate_batch(e.model, e.renderer, [prompt], max_new_tokens=n)[0])
    alone_s = time.monotonic() - started
    scheduler = Scheduler(engines[names[0]].model, engines)
    started = time.monotonic()
    completions = []
    for e, q, n in jobs:
        ids = e.renderer.prompt_ids(with_system([{"role": "user", "content": q}], e.system))
        completions.append(Completion(ids, n, 0.0, 1.0, [], model=e.name, eos_ids=tuple(e.eos_ids)))
        scheduler.submit(completions[-1])
        time.sleep(0.02)
    got, tokens = [], 0
    for c in completions:
        parts = []
        while (event := c.events.get(timeout=300))[0] == "delta":
            parts.append(event[1])
        assert event[0] == "done", event
        tokens += event[1]["completion_tokens"]
        got.append("".join(parts).strip())
    batched_s = time.monotonic() - started
    scheduler.stop(timeout=60)
    same = sum(a == b for a, b in zip(got, alone))
    device = next(engines[names[0]].model.parameters()).device.type
    status = "pass" if same == len(jobs) and device == ctx.device else "fail"
    return result("serve_batching", status, f"{same}/{len(jobs)} greedy answers identical to alone, on {device}; "
                  f"{len(engines) - 1} adapters + base in one batch", identical=same, total=len(jobs),
                  batched_tokens_per_s=tokens / batched_s, alone_tokens_per_s=tokens / alone_s)


check_serve_batching.budget_s = 240


def check_serve_vllm(ctx: Any) -> dict[str, Any]:
    if importlib.util.find_spec("vllm") is None:
        return result("serve_vllm", "skip", "vllm is not installed in this environment (pip install 'vllm==0.33.0')")
    if ctx.device != "cuda":
        return result("serve_vllm", "skip", "no CUDA GPU: vLLM needs one")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = ctx.workdir / "vllm.log"
    started = time.monotonic()
    with log.open("w") as f:
        proc = subprocess.Popen([ctx.python, "-m", "chattune.cli", "serve", *map(str, runs(ctx)), "--engine", "vllm",
                                 "--check", "--port", str(port)], stdout=f, stderr=subprocess.STDOUT, env=_env(ctx),
                                cwd=ctx.workdir)
    try:
        while proc.poll() is None and "via vLLM on" not in log.read_text() and time.monotonic() - started < 420:
            time.sleep(2)
        text = log.read_text()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    found = re.search(r"greedy agreement with chattune: (\d+)/(\d+)", text)
    ready = "via vLLM on" in text
    same, total = (int(found.group(1)), int(found.group(2))) if found else (0, 0)
    tail = " | ".join(text.strip().splitlines()[-3:])
    return result("serve_vllm", "pass" if ready and found and same == total else "fail",
                  f"agreement {same}/{total}; {'serving' if ready else 'not ready: ' + tail}",
                  identical=same, total=total, ready_s=time.monotonic() - started)


check_serve_vllm.budget_s = 480

CHECKS = [check_serve_batching, check_serve_vllm]
