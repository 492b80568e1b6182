"""The files a run writes about itself: config, data report, tokenizer and template, model info, summary.

Only the main process writes them; in the other processes these steps only log (or do nothing).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from transformers import TrainerCallback

from chattune import config as config_mod
from chattune.config import RunConfig
from chattune.errors import ConfigError
from chattune.files import read_jsonl, write_json, write_text
from chattune.model.load import count_parameters
from chattune.model.quant import describe_quantization
from chattune.rundir import RunDir
from chattune.train.inputs import TrainingData
from chattune.train.processes import is_main_process
from chattune.train.resume import prepare_files

log = logging.getLogger("chattune")


def start_run(run_dir: RunDir, cfg: RunConfig, checkpoint: Path | None) -> None:
    """run_config.yaml, and metrics / predictions / checkpoints made to match the checkpoint (or a fresh start)."""
    if is_main_process():
        config_mod.dump(cfg, run_dir.config_file)
        prepare_files(run_dir, checkpoint)


def report_data(run_dir: RunDir, cfg: RunConfig, data: TrainingData) -> None:
    """Print and store what loading and rendering kept, skipped and truncated; refuse when no sample is left."""
    load_report, stats = data.load_report, data.stats
    log.info("data: %d conversations from %s -> %d samples, %d tokens (%d supervised); %d probe rows",
             load_report.kept, ", ".join(f"{Path(k).name} ({v})" for k, v in load_report.per_file.items()),
             stats.samples, stats.tokens, stats.supervised_tokens, len(data.probes))
    for line in stats.summary(cfg.data.max_length):
        log.warning("data: %s", line)
    if load_report.skipped:
        log.warning("data: %s; every one is listed in %s", load_report.skipped_summary(), run_dir.data_report)
    if is_main_process():
        write_json(run_dir.data_report, {
            "files": load_report.per_file,
            **({"mix": load_report.mix} if load_report.mix else {}),  # rows per source: in the file, used
            "skipped": [{"where": w, "reason": r} for w, r in load_report.skipped],
            "render": {k: v for k, v in vars(stats).items()},
            **({"eval": data.eval_info} if data.eval_info else {}),
        })
    if stats.samples == 0:
        reasons = [f"{stats.dropped_overlength} longer than data.max_length={cfg.data.max_length} were dropped "
                   f"(data.overlength={cfg.data.overlength})" if stats.dropped_overlength else "",
                   f"{stats.dropped_no_labels} had a prompt that alone fills max_length" if stats.dropped_no_labels else ""]
        raise ConfigError(
            f"no training samples left: of {stats.conversations} conversation(s), "
            + ", ".join(r for r in reasons if r),
            where="data.max_length",
            fix="raise data.max_length, or set data.overlength=truncate to keep the start of long samples",
        )


def save_inference_assets(run_dir: RunDir, tokenizer: Any) -> None:
    """Tokenizer and the exact chat template, so later verbs render exactly as training did."""
    if not is_main_process():
        return
    tokenizer.save_pretrained(run_dir.tokenizer)
    write_text(run_dir.template_file, tokenizer.chat_template)


def describe_model(run_dir: RunDir, model: Any, dtype: torch.dtype) -> dict[str, Any]:
    """Print and record trainable/total parameters and the model's memory footprint."""
    trainable, total = count_parameters(model)
    footprint = model.get_memory_footprint() if hasattr(model, "get_memory_footprint") else None
    info = {"trainable_params": trainable, "total_params": total, "trainable_pct": round(100 * trainable / total, 4),
            "dtype": str(dtype).replace("torch.", ""), "quantization": describe_quantization(model),
            "memory_bytes": footprint}
    log.info("model: %s trainable of %s parameters (%.3f%%), %s%s, %.0f MiB", f"{trainable:,}", f"{total:,}",
             info["trainable_pct"], info["dtype"],
             "" if info["quantization"] == "none" else f", base weights {info['quantization']}", (footprint or 0) / 2**20)
    if is_main_process():
        write_json(run_dir.root / "model_info.json", info)
    return info


class WallClock(TrainerCallback):
    """The run's wall time over all its parts: a resumed run adds its seconds to those of the killed ones.

    Each part's seconds are rewritten to RUN/wall_time.json at every log and save, so a part killed with
    kill -9 counts up to its last log; summary.json's wall_s is their sum.
    """

    def __init__(self, run_dir: RunDir, *, resumed: bool):
        self.path = run_dir.wall_time
        self.started = time.perf_counter()
        parts = _read_parts(self.path) if resumed else []
        self.before = parts

    def seconds(self) -> float:
        """Seconds of every part so far, this one included."""
        return sum(self.before) + time.perf_counter() - self.started

    def record(self) -> None:
        """Write each part's seconds (main process only)."""
        if is_main_process():
            write_json(self.path, {"parts_s": [*self.before, round(time.perf_counter() - self.started, 1)]})

    def on_log(self, args, state, control, **kw):
        self.record()

    def on_save(self, args, state, control, **kw):
        self.record()


def _read_parts(path: Path) -> list[float]:
    try:
        parts = json.loads(path.read_text(encoding="utf-8")).get("parts_s", [])
        return [float(p) for p in parts]
    except (OSError, ValueError, AttributeError, TypeError):
        return []


def finish(run_dir: RunDir, result: Any, clock: WallClock, model_info: dict[str, Any]) -> RunDir:
    """Write summary.json (the 'finished' marker) and tell the user where everything went."""
    if not is_main_process():
        return run_dir
    rows = read_jsonl(run_dir.metrics)
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    evals = [r for r in rows if r.get("eval_loss") is not None]
    summary = {
        "global_step": result.global_step,
        "train_loss": result.training_loss,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        **({"eval_loss": evals[-1]["eval_loss"], "eval_ppl": evals[-1]["eval_ppl"]} if evals else {}),
        "wall_s": round(clock.seconds(), 1),  # every part of a resumed run
        **model_info,
    }
    clock.record()
    write_json(run_dir.summary, summary)
    # fewer steps than train.logging_steps: no step was logged, the Trainer's mean loss is all there is
    loss = (f"loss {_fmt(summary['first_loss'])} -> {_fmt(summary['final_loss'])}" if losses else
            f"mean loss {_fmt(summary['train_loss'])} (no step was logged: the run is shorter than train.logging_steps)")
    log.info("done: %d steps in %.0fs, %s", summary["global_step"], summary["wall_s"], loss)
    if evals:
        log.info("eval: loss %s -> %s, perplexity %s", _fmt(evals[0]["eval_loss"]), _fmt(evals[-1]["eval_loss"]),
                 _fmt(evals[-1]["eval_ppl"]))
    show_probe_comparison(run_dir)
    log.info("run directory: %s (adapter/, metrics.jsonl, predictions/)", run_dir.root)
    log.info("chat with it:  chattune chat %s", run_dir.root)
    return run_dir


def show_probe_comparison(run_dir: RunDir) -> None:
    """Print each probe question with the base model's answer and the tuned model's last answer."""
    epochs = sorted(int(p.stem.split("_")[1]) for p in run_dir.predictions.glob("epoch_*.jsonl"))
    if len(epochs) < 2:
        return
    before = read_jsonl(run_dir.predictions / f"epoch_{epochs[0]}.jsonl")
    after = read_jsonl(run_dir.predictions / f"epoch_{epochs[-1]}.jsonl")
    table = Table(title=f"probe answers: base model vs tuned (epoch {epochs[-1]})", show_lines=True)
    for col in ("question", "base model", "tuned model", "reference"):
        table.add_column(col, overflow="fold")
    for b, a in zip(before, after):
        table.add_row(b["question"], b["answer"], a["answer"], b["reference"])
    Console().print(table)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"
