"""`chattune train`: the spine. Each step is a named function in the train/ layer (or right below)."""

from __future__ import annotations

import argparse
import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from transformers import set_seed

from chattune.config import RunConfig
from chattune.data.render import ChatRenderer
from chattune.model.compiled_norms import probe_cpu_in_background
from chattune.model.cpu_threads import busy_cpu_advice
from chattune.model.load import count_parameters, keep_fp16_training_stable, load_model, load_tokenizer, resolve_dtype
from chattune.model.lora import apply_lora, load_trained_adapter, start_adapter_dir
from chattune.model.packed_attention import check_padding_free
from chattune.model.placement import training_device_map
from chattune.model.quant import is_quantized, prepare_for_kbit_training
from chattune.model.sources import resolve_model_dir
from chattune.rundir import RunDir, prepare_run_dir, removed_if_left_empty, run_lock
from chattune.train import launcher, records
from chattune.train import resume as resume_mod
from chattune.train.adapter import save_adapter
from chattune.train.checkpoints import explain_full_disk
from chattune.train.inputs import prepare_data
from chattune.train.interrupt import stop_if_interrupted, train_interruptibly
from chattune.train.processes import is_main_process, main_process_first
from chattune.train.trainer import build_trainer, to_training_args  # module globals: tests/distributed/worker.py wraps them

log = logging.getLogger("chattune")


def main(cfg: RunConfig, args: argparse.Namespace) -> int | None:
    """`chattune train CONFIG`: start torchrun when several processes are asked for, else train in this process."""
    if cfg.sweep.grid:
        log.warning("this config has a sweep.grid, which `chattune train` ignores (one run, the base values); "
                    "`chattune sweep %s` trains every combination", args.config)
    if launcher.needs_launch(cfg):  # torchrun starts this same command once per device
        return launcher.launch(cfg, args)
    run(cfg, overwrite=args.overwrite, resume=args.resume, resume_force=args.resume_force)
    return None


def run(cfg: RunConfig, *, overwrite: bool = False, resume: bool = False, resume_force: bool = False) -> RunDir:
    """Fine-tune cfg.model on cfg.data with LoRA and write a complete run directory (resuming an unfinished one)."""
    launcher.setup(cfg)  # several processes: checks, process group, one log
    if cfg.model.adapter:
        start_adapter_dir(cfg.model.adapter)  # a wrong path is reported before anything is written or loaded
    with output_lock(cfg):  # a second `chattune train` into the same output_dir is refused
        run_dir = open_run_dir(cfg, overwrite=overwrite, resume=resume)
        # A run that fails before writing anything leaves no empty folder; a full disk is told as one paragraph.
        with removed_if_left_empty(run_dir.root), explain_full_disk(run_dir, resume_mod.resume_command(run_dir)):
            return train_into(cfg, run_dir, resume=resume, resume_force=resume_force)


def train_into(cfg: RunConfig, run_dir: RunDir, *, resume: bool, resume_force: bool) -> RunDir:
    """The training itself, into an opened (and locked) run directory."""
    if cfg.train.compiled_norms and not torch.cuda.is_available():
        probe_cpu_in_background()  # inductor's CPU check (child processes) runs while the model and data load
    checkpoint = resume_mod.plan_resume(run_dir, resume=resume)  # None: a fresh start
    clock = records.WallClock(run_dir, resumed=checkpoint is not None)  # wall_s counts every part of the run
    model_dir = base_model_dir(cfg)
    tokenizer = load_tokenizer(model_dir, cfg.model)
    renderer = ChatRenderer(tokenizer, cfg.data.template_kwargs)
    data = prepare_data(cfg, renderer)  # training, eval and probe rows, tokenised with labels
    fingerprints = resume_mod.fingerprints(cfg, renderer, data.conversations, model_dir)
    resume_mod.check_resume(run_dir, checkpoint, fingerprints, force=resume_force)  # before any file is rewritten
    records.start_run(run_dir, cfg, checkpoint)  # run_config.yaml; metrics and predictions cut back to the checkpoint
    records.report_data(run_dir, cfg, data)
    records.save_inference_assets(run_dir, tokenizer)
    dtype = resolve_dtype(cfg.model.dtype)
    warn_if_cpu_busy()
    # Before the model: while these arguments live, ZeRO-3 loads each weight straight into its shard (zero.Init)
    args = to_training_args(cfg, run_dir, dtype, has_eval=bool(data.eval_samples))
    model = load_lora_model(cfg, model_dir, dtype)
    model_info = records.describe_model(run_dir, model, dtype)
    trainer = build_trainer(cfg, run_dir, model, tokenizer, data, renderer, dtype, args=args, fingerprints=fingerprints,
                            resumed_from=checkpoint)
    trainer.add_callback(clock)
    result, interrupt = train_interruptibly(trainer, checkpoint)
    save_adapter(trainer, run_dir.adapter)  # gathered from shards where needed, written by the main process
    stop_if_interrupted(run_dir, trainer, interrupt)  # Ctrl-C: says how to resume, raises KeyboardInterrupt
    return records.finish(run_dir, result, clock, model_info)


# ---------------------------------------------------------------------------
# small steps


def warn_if_cpu_busy() -> None:
    """Training on a CPU that other processes keep busy: say how to keep PyTorch's threads from waiting."""
    import torch

    if not torch.cuda.is_available() and is_main_process() and (advice := busy_cpu_advice(torch.get_num_threads())):
        log.warning(advice)


def output_lock(cfg: RunConfig) -> Any:
    """The lock of output_dir, held by the main process (a chattune launcher holds it for its workers)."""
    return run_lock(cfg.output_dir, "chattune train") if is_main_process() else nullcontext()


def open_run_dir(cfg: RunConfig, *, overwrite: bool, resume: bool) -> RunDir:
    """The run directory, created or cleared by the main process before the others look at it."""
    with main_process_first():
        return prepare_run_dir(cfg, overwrite=overwrite and is_main_process(), resume=resume)


def base_model_dir(cfg: RunConfig) -> Path:
    """The base model as a local Hugging Face folder (a packaged or GGUF model is converted once, by the main process)."""
    with main_process_first():
        return resolve_model_dir(cfg.model.name_or_path, source=cfg.model.source, revision=cfg.model.revision,
                                 trust_remote_code=cfg.model.trust_remote_code)


def load_lora_model(cfg: RunConfig, model_dir: Path, dtype: Any) -> Any:
    """The base model (quantised for QLoRA) with fresh LoRA adapters on the modules cfg.lora names."""
    set_seed(cfg.train.seed)  # LoRA's initial weights come from the global RNG: same seed, same run
    check_padding_free(model_dir, padding_free=cfg.train.padding_free, trust_remote_code=cfg.model.trust_remote_code)
    model = load_model(model_dir, cfg.model, dtype=dtype,
                       device_map=training_device_map(cfg.model, distributed=cfg.train.distributed))
    model = prepare_for_kbit_training(model, dtype)  # QLoRA: a no-op unless model.quantization is 8bit/4bit
    if not is_quantized(model):
        keep_fp16_training_stable(model, dtype)  # fp16 (V100/T4): an fp32 residual stream under autocast
    checkpointing = use_gradient_checkpointing(cfg, model)
    if cfg.model.adapter:  # continue an earlier run's adapter (SFT -> DPO); its own adapter_config rules
        return load_trained_adapter(model, str(start_adapter_dir(cfg.model.adapter)),
                                    gradient_checkpointing=checkpointing, shared_dropout=cfg.lora.shared_dropout)
    return apply_lora(model, cfg.lora, gradient_checkpointing=checkpointing)


def use_gradient_checkpointing(cfg: RunConfig, model: Any) -> bool:
    """Resolve train.gradient_checkpointing=auto: on for models over 1B parameters."""
    gc = cfg.train.gradient_checkpointing
    if gc == "auto":
        return count_parameters(model)[1] > 1e9
    return bool(gc)
