"""`chattune train`: the spine. Each step is a small named function below it."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from transformers import set_seed

from chattune import config as config_mod
from chattune.config import RunConfig
from chattune.data.collate import SampleDataset, make_collate
from chattune.data.formats import Conversation, LoadReport, load_conversations
from chattune.data.cache import render_cached
from chattune.data.render import ChatRenderer, RenderStats, Sample, render_all
from chattune.data.split import split_eval
from chattune.errors import ConfigError, RunDirError
from chattune.model.load import count_parameters, load_model, load_tokenizer, resolve_dtype
from chattune.model.lora import apply_lora
from chattune.model.packed_attention import check_padding_free, use_packed_attention
from chattune.model.placement import training_device_map
from chattune.model.quant import describe_quantization, prepare_for_kbit_training
from chattune.model.sources import cache_root, resolve_model_dir
from chattune.files import read_jsonl, write_json
from chattune.rundir import RunDir
from chattune.track import make_trackers
from chattune.track.base import TrackingCallback, run_info
from chattune.train import distributed as dist
from chattune.train import resume as resume_mod
from chattune.train.callbacks import PredictionProbes, ProgressAndMetrics, TokenCounter
from chattune.train.throughput import lora_flops_per_token

log = logging.getLogger("chattune")


def run(cfg: RunConfig, *, overwrite: bool = False, resume: bool = False, resume_force: bool = False) -> RunDir:
    """Fine-tune cfg.model on cfg.data with LoRA and write a complete run directory (resuming an unfinished one)."""
    dist.setup(cfg)  # several processes: checks, process group, one log (see train/distributed.py)
    with dist.main_process_first():  # the main process creates or clears the folder; the others then read it
        run_dir = prepare_run_dir(cfg, overwrite=overwrite and dist.is_main_process(), resume=resume)
    checkpoint = resume_mod.plan_resume(run_dir, resume=resume)
    with dist.main_process_first():  # a packaged model is converted once, by the main process
        model_dir = resolve_model_dir(cfg.model.name_or_path, source=cfg.model.source, revision=cfg.model.revision,
                                      trust_remote_code=cfg.model.trust_remote_code)
    tokenizer = load_tokenizer(model_dir, cfg.model)
    renderer = ChatRenderer(tokenizer, cfg.data.template_kwargs)
    conversations, load_report = load_training_data(cfg)
    conversations, eval_conversations = split_eval_data(cfg, conversations)
    probes, conversations = split_probes(cfg, conversations, eval_conversations)
    with dist.main_process_first():  # the others reuse the main process's tokenised cache
        samples, stats = render_training_data(cfg, renderer, conversations)
    eval_samples, eval_info = render_eval_data(cfg, renderer, eval_conversations)
    fingerprints = resume_mod.fingerprints(cfg, renderer, conversations, model_dir)
    if checkpoint is not None:  # before anything in the run directory is rewritten
        resume_mod.check_resume(run_dir, checkpoint, fingerprints, force=resume_force)
    if dist.is_main_process():  # only the main process writes the run directory
        config_mod.dump(cfg, run_dir.config_file)
        resume_mod.prepare_files(run_dir, checkpoint)
    report_data(run_dir, load_report, stats, cfg, n_probes=len(probes), eval_info=eval_info)
    save_inference_assets(run_dir, cfg, tokenizer)
    dtype = resolve_dtype(cfg.model.dtype)
    set_seed(cfg.train.seed)  # LoRA's initial weights come from the global RNG: same seed, same run
    check_padding_free(model_dir, padding_free=cfg.train.padding_free, trust_remote_code=cfg.model.trust_remote_code)
    model = load_model(model_dir, cfg.model, dtype=dtype, device_map=training_device_map(cfg.model))
    model = prepare_for_kbit_training(model, dtype)  # QLoRA: a no-op unless model.quantization is 8bit/4bit
    model = apply_lora(model, cfg.lora, gradient_checkpointing=use_gradient_checkpointing(cfg, model))
    model_info = describe_model(run_dir, model, dtype)
    trainer = build_trainer(cfg, run_dir, model, tokenizer, samples, probes, renderer, dtype, eval_samples=eval_samples)
    trainer.chattune_fingerprints = fingerprints  # stored in every checkpoint's marker
    started = time.perf_counter()
    with resume_mod.GracefulInterrupt().installed() as interrupt:
        trainer.add_callback(dist.synced(interrupt))  # several processes stop after the same step
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    dist.save_adapter(trainer, run_dir.adapter)  # gathered from shards where needed, written by the main process
    if interrupt.requested and trainer.state.global_step < trainer.state.max_steps:
        if dist.is_main_process():
            resume_mod.report_interrupt(run_dir, trainer.state.global_step, trainer.state.max_steps)
        raise KeyboardInterrupt
    return finish(run_dir, result, started, model_info, trainer)


# ---------------------------------------------------------------------------
# the steps


def prepare_run_dir(cfg: RunConfig, *, overwrite: bool, resume: bool = False) -> RunDir:
    """Create the run directory; refuse to train over a finished run unless told to.

    An unfinished run is kept: run() resumes it from its last checkpoint (see train/resume.py).
    """
    run_dir = RunDir(Path(cfg.output_dir))
    if overwrite and resume:
        raise ConfigError("--overwrite and --resume contradict each other", where="chattune train",
                          fix="--resume continues the run in output_dir, --overwrite deletes it first: pass one")
    if run_dir.is_finished() and not overwrite:
        raise RunDirError(
            "a finished run is already there" + (", so there is nothing to resume" if resume else ""),
            where=str(run_dir.root),
            fix="pass --overwrite to replace it, or choose another output_dir (e.g. output_dir=runs/demo2)",
        )
    if run_dir.root.exists() and overwrite:
        shutil.rmtree(run_dir.root)
    run_dir.root.mkdir(parents=True, exist_ok=True)
    return run_dir


def load_training_data(cfg: RunConfig) -> tuple[list[Conversation], LoadReport]:
    """Training files -> conversations, with the config's format rules."""
    d = cfg.data
    return load_conversations(d.train, fmt=d.format, system=d.system, instruction_as=d.instruction_as,
                              on_bad_record=d.on_bad_record, limit=d.limit)


def split_probes(cfg: RunConfig, conversations: list[Conversation],
                 eval_conversations: list[Conversation] = ()) -> tuple[list[Conversation], list[Conversation]]:
    """(probes, training conversations): from tracking.probe_file, else the eval rows, else the first training rows."""
    t, d = cfg.tracking, cfg.data
    if t.probe_size == 0:
        return [], conversations
    if t.probe_file:
        probes, _ = load_conversations([t.probe_file], fmt=d.format, system=d.system, instruction_as=d.instruction_as)
        return probes[: t.probe_size], conversations
    if eval_conversations:  # never trained on, so nothing has to be held out
        return list(eval_conversations[: t.probe_size]), conversations
    probes = conversations[: t.probe_size]
    rest = conversations[t.probe_size:] if t.probe_holdout else conversations
    if not rest:
        raise ConfigError(
            f"holding out {t.probe_size} probe rows leaves no training data",
            where="tracking.probe_size",
            fix="lower tracking.probe_size, set tracking.probe_holdout=false, or add data",
        )
    return probes, rest


def split_eval_data(cfg: RunConfig, conversations: list[Conversation]) -> tuple[list[Conversation], list[Conversation]]:
    """(training, eval) conversations: data.eval files, or rows split off with data.eval_ratio / eval_size."""
    d = cfg.data
    if d.eval:
        evals, eval_report = load_conversations(d.eval, fmt=d.format, system=d.system, instruction_as=d.instruction_as,
                                                on_bad_record=d.on_bad_record)
        if eval_report.skipped:
            log.warning("eval data: %s", eval_report.skipped_summary())
        return conversations, evals
    return split_eval(conversations, ratio=d.eval_ratio, size=d.eval_size, seed=cfg.train.seed)


def render_eval_data(cfg: RunConfig, renderer: ChatRenderer,
                     conversations: list[Conversation]) -> tuple[list[Sample], dict[str, Any] | None]:
    """Eval conversations rendered exactly like training data, and what to report about them."""
    if not conversations:
        return [], None
    d = cfg.data
    samples, stats = render_all(renderer, conversations, max_length=d.max_length, overlength=d.overlength,
                                train_on=d.train_on)
    source = "files" if d.eval else f"split (seed {cfg.train.seed})"
    log.info("eval: %d conversations (%s) -> %d samples; loss and perplexity every %s", len(conversations), source,
             stats.samples, f"{cfg.train.eval_steps} steps" if cfg.train.eval_steps else "epoch")
    if stats.samples == 0:
        raise ConfigError("no eval samples left after rendering", where="data.eval",
                          fix="check data.max_length and data.overlength")
    return samples, {"source": source, "rows": [c.where for c in conversations], "render": vars(stats)}


def render_training_data(cfg: RunConfig, renderer: ChatRenderer, conversations: list[Conversation]) -> tuple[list[Sample], RenderStats]:
    """Tokenise with labels, reusing the on-disk cache when nothing that matters changed."""
    d = cfg.data
    started = time.perf_counter()
    samples, stats, hit = render_cached(renderer, conversations, cache_dir=cache_root() / "tokenized" if d.cache else None,
                                        max_length=d.max_length, overlength=d.overlength, train_on=d.train_on)
    log.info("data: %s %d samples in %.1fs", "reused tokenised" if hit else "tokenised", len(samples),
             time.perf_counter() - started)
    return samples, stats


def report_data(run_dir: RunDir, load_report: LoadReport, stats: RenderStats, cfg: RunConfig, *, n_probes: int,
                eval_info: dict[str, Any] | None = None) -> None:
    """Print and store what loading and rendering kept, skipped and truncated."""
    log.info("data: %d conversations from %s -> %d samples, %d tokens (%d supervised); %d probe rows",
             load_report.kept, ", ".join(f"{Path(k).name} ({v})" for k, v in load_report.per_file.items()),
             stats.samples, stats.tokens, stats.supervised_tokens, n_probes)
    for line in stats.summary(cfg.data.max_length):
        log.warning("data: %s", line)
    if load_report.skipped:
        log.warning("data: %s; every one is listed in %s", load_report.skipped_summary(), run_dir.data_report)
    if dist.is_main_process():
        write_json(run_dir.data_report, {
            "files": load_report.per_file,
            "skipped": [{"where": w, "reason": r} for w, r in load_report.skipped],
            "render": {k: v for k, v in vars(stats).items()},
            **({"eval": eval_info} if eval_info else {}),
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


def save_inference_assets(run_dir: RunDir, cfg: RunConfig, tokenizer: Any) -> None:
    """Tokenizer and the exact chat template, so later verbs render exactly as training did."""
    if not dist.is_main_process():
        return
    tokenizer.save_pretrained(run_dir.tokenizer)
    run_dir.template_file.write_text(tokenizer.chat_template, encoding="utf-8")


def use_gradient_checkpointing(cfg: RunConfig, model: Any) -> bool:
    """Resolve train.gradient_checkpointing=auto: on for models over 1B parameters."""
    gc = cfg.train.gradient_checkpointing
    if gc == "auto":
        return count_parameters(model)[1] > 1e9
    return bool(gc)


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
    if dist.is_main_process():
        write_json(run_dir.root / "model_info.json", info)
    return info


def to_training_args(cfg: RunConfig, run_dir: RunDir, dtype: torch.dtype, *, has_eval: bool = False) -> Any:
    """transformers.TrainingArguments from the train section (pure conversion)."""
    from transformers import TrainingArguments

    t = cfg.train
    return TrainingArguments(
        output_dir=str(run_dir.checkpoints),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        train_sampling_strategy=t.sampling,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float below 1 is a ratio of total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy=("steps" if t.eval_steps else "epoch") if has_eval else "no",
        eval_steps=t.eval_steps,
        per_device_eval_batch_size=t.batch_size,
        prediction_loss_only=True,  # eval needs the loss only; kept logits would cost tokens x vocab floats
        seed=t.seed,
        data_seed=t.seed,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,  # our own bar shows loss and tokens/s
        label_names=["labels"],
        **dist.training_args_kwargs(cfg),  # ddp backend, deepspeed=..., fsdp=... (train.distributed)
    )


def build_trainer(cfg: RunConfig, run_dir: RunDir, model: Any, tokenizer: Any, samples: list[Sample],
                  probes: list[Conversation], renderer: ChatRenderer, dtype: torch.dtype, *,
                  eval_samples: list[Sample] | None = None) -> Any:
    """An HF Trainer wired with our collator, progress/metrics and probe callbacks."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from chattune.train.loss import ChattuneTrainer

    # Padding-free batches need use_cache=False for exact sequence boundaries; training never uses the cache.
    model.config.use_cache = False
    if cfg.train.padding_free:
        use_packed_attention(model)  # per-sample causal SDPA instead of one masked attention over the row
    counter = TokenCounter()
    trainer = ChattuneTrainer(
        model=model,
        args=to_training_args(cfg, run_dir, dtype, has_eval=bool(eval_samples)),
        train_dataset=SampleDataset(samples),
        eval_dataset=SampleDataset(eval_samples) if eval_samples else None,
        data_collator=make_collate(cfg.train.padding_free, tokenizer.pad_token_id),  # eval uses the same collator
    )
    trainer.token_counter = counter
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    trainer.add_callback(dist.DistributedReport())  # processes and global batch, logged before the progress bar
    # metrics.jsonl was emptied (fresh start) or cut back to the checkpoint (resume) by resume.prepare_files.
    trackers = make_trackers(cfg, run_dir)  # [] for tracking.backends=[none]
    # Before the probes: the trackers' run must be open when the base model's answers arrive.
    trainer.add_callback(TrackingCallback(trackers, lambda: run_info(cfg, run_dir)))
    trainer.add_callback(ProgressAndMetrics(run_dir.metrics, counter, sinks=[t.log_row for t in trackers],
                                         flops_per_token=lora_flops_per_token(model)))
    trainer.add_callback(PredictionProbes(probes, renderer, run_dir.predictions,
                                          max_new_tokens=cfg.tracking.probe_max_new_tokens,
                                          sinks=[t.log_predictions for t in trackers],
                                          every_process=dist.shards_weights(cfg)))
    return trainer


def finish(run_dir: RunDir, result: Any, started: float, model_info: dict[str, Any], trainer: Any) -> RunDir:
    """Write summary.json (the 'finished' marker) and tell the user where everything went."""
    if not dist.is_main_process():
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
        "wall_s": round(time.perf_counter() - started, 1),
        **model_info,
    }
    write_json(run_dir.summary, summary)
    log.info("done: %d steps in %.0fs, loss %s -> %s", summary["global_step"], summary["wall_s"],
             _fmt(summary["first_loss"]), _fmt(summary["final_loss"]))
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
    from rich.console import Console
    from rich.table import Table

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
