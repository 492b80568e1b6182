"""`chattune plan CONFIG`: how much memory and time a training run will take, before it starts.

Reads the model's shape without loading its weights (train/shape.py), the data's token
lengths with the tokenizer training will use when the model is on disk, and prints each
part of the peak memory (train/plan.py), the time per epoch, and, with --memory, the
fastest settings that fit: quantisation, batch size, gradient checkpointing.
"""

from __future__ import annotations

import re

from rich.console import Console
from rich.table import Table

from chattune.config import RunConfig
from chattune.errors import ConfigError
from chattune.options import PLAN
from chattune.train import plan as est
from chattune.train.planner import Plan, data_size, duration, make_plan

_PART_HELP = {
    "weights": "base model ({quant})",
    "lora": "LoRA weights, gradients, AdamW state (fp32)",
    "activations": "kept for the backward pass{gc}",
    "attention": "CPU matmul attention scores (samples <= 384 tokens)",
    "logits": "lm_head at supervised positions, with gradient",
    "runtime": "the process: Python, torch, libraries (GPU: the CUDA context)",
}


def run(cfg: RunConfig, *, memory: str | None = PLAN.memory, device: str = PLAN.device, gpu: str | None = PLAN.gpu,
        tflops: float | None = PLAN.tflops, quiet: bool = False) -> Plan:
    """Estimate cfg's peak memory and time per epoch; with memory, list the settings that fit it."""
    limit = parse_memory(memory) if memory else None
    plan = make_plan(cfg, data_size(cfg), device=device, gpu=gpu, tflops=tflops, limit=limit)
    if not quiet:
        show(plan)
    return plan


def parse_memory(text: str) -> float:
    """'24GiB', '24G', '24' (GiB), '512MiB' -> bytes; '80GB' is decimal."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)(b?)\s*", text.lower())
    if not m or (m.group(3) and not m.group(2)):
        raise ConfigError(f"cannot read {text!r} as an amount of memory", where="--memory",
                          fix="write e.g. 24GiB, 80GB or 16 (GiB)")
    number, prefix, binary, byte = m.groups()
    if not prefix:
        return float(number) * 2**30
    power = "kmgt".index(prefix) + 1
    return float(number) * ((1000 ** power) if byte and not binary else (1024 ** power))


def show(plan: Plan) -> None:
    console = Console(highlight=False)
    s = plan.setting
    table = Table(title=f"peak memory of one training process on {s.device}", title_justify="left")
    for col, kw in (("part", {}), ("GiB", {"justify": "right"}), ("what", {})):
        table.add_column(col, **kw)
    for part, value in plan.estimate.parts().items():
        what = _PART_HELP[part].format(quant=s.quantization if s.quantization != "none" else f"{s.dtype_bytes * 8}-bit",
                                       gc=", gradient checkpointing" if s.gradient_checkpointing else "")
        table.add_row(part, f"{value / est.GIB:.2f}", what)
    table.add_row("total", f"{plan.estimate.total / est.GIB:.2f}", setting_text(s), style="bold")
    console.print(table)
    console.print(f"model: {plan.shape.params / 1e9:.2f}B parameters, shape from {plan.shape.source}", markup=False, soft_wrap=True)
    console.print(f"data: {plan.data.describe()}", markup=False, soft_wrap=True)
    console.print(f"time per epoch: about {duration(plan.epoch_seconds)} at an effective "
                  f"{plan.speed / 1e12:.2f} TFLOP/s (an estimate: --tflops sets the speed)", markup=False, soft_wrap=True)
    if plan.limit is not None:
        show_fits(console, plan)


def show_fits(console: Console, plan: Plan) -> None:
    """The candidate settings, fastest first, down to the first that fits the limit."""
    fit = plan.first_fit()
    table = Table(title=f"settings against {plan.limit / est.GIB:.1f} GiB, fastest first", title_justify="left")
    for col in ("quantization", "batch x accum", "grad. ckpt", "GiB", "fits"):
        table.add_column(col)
    for s, e in plan.suggestions:
        table.add_row(s.quantization, f"{s.batch_size} x {s.grad_accum}", "on" if s.gradient_checkpointing else "off",
                      f"{e.total / est.GIB:.1f}", "yes" if e.total <= plan.limit else "no")
        if fit and s == fit[0]:
            break
    console.print(table)
    if fit is None:
        console.print("nothing fits: use a smaller model, a shorter data.max_length, or more devices "
                      "(train.distributed=deepspeed_zero3 with train.cpu_offload=true)", markup=False, soft_wrap=True)
    elif fit[0] == plan.setting:
        console.print("the config as written fits", markup=False, soft_wrap=True)
    else:
        console.print(f"suggested: {overrides(fit[0])}", markup=False, soft_wrap=True)


def overrides(s: est.Setting) -> str:
    return (f"model.quantization={s.quantization} train.batch_size={s.batch_size} train.grad_accum={s.grad_accum} "
            f"train.gradient_checkpointing={str(s.gradient_checkpointing).lower()}")


def setting_text(s: est.Setting) -> str:
    return f"batch {s.batch_size} x {s.max_length} tokens, grad. ckpt {'on' if s.gradient_checkpointing else 'off'}"
