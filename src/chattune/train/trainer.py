"""The HF Trainer as chattune runs it: TrainingArguments from the config, our loss, callbacks and checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from chattune.config import RunConfig
from chattune.data.collate import SampleDataset, make_collate
from chattune.data.render import ChatRenderer
from chattune.model.compiled_norms import compile_norms
from chattune.model.load import cuda_has_native_bf16
from chattune.model.lora import loraplus_optimizer
from chattune.model.packed_attention import use_packed_attention
from chattune.rundir import RunDir
from chattune.track import make_trackers
from chattune.track.base import TrackingCallback, run_info
from chattune.train.adapter import gather_trainable_zero3, zero3_enabled
from chattune.train.callbacks import PredictionProbes, ProgressAndMetrics, TokenCounter
from chattune.train.checkpoints import PublishCheckpoints, checkpoint_step, staging_dir
from chattune.train.engines import DistributedReport, shards_weights, training_args_kwargs
from chattune.train.inputs import TrainingData
from chattune.train.loss import keep_logits_dtype, supervised_loss
from chattune.train.preference import PairDataset, PreferenceObjective, pair_collate, reference_logps
from chattune.train.throughput import step_flops_counter


class ChattuneTrainer(Trainer):
    """HF Trainer with the supervised-positions loss and crash-safe checkpoints; everything else is the Trainer's own.

    token_counter counts the tokens trained on (for tokens/s); fingerprints go into every checkpoint's marker
    (train/checkpoints.py; args.output_dir must be the run's staging folder, as to_training_args makes it).
    """

    def __init__(self, *args: Any, token_counter: TokenCounter | None = None,
                 fingerprints: dict[str, str] | None = None, loraplus_lr_ratio: float | None = None,
                 preference: PreferenceObjective | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.token_counter = token_counter
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.preference = preference  # train.method dpo/orpo/simpo: a per-pair mean, which the Trainer scales for accumulation
        if preference is not None:
            self.loss_is_scaled_for_ga = False
        self.add_callback(PublishCheckpoints(fingerprints or {}))

    def create_optimizer(self, model=None):
        # LoRA+ (lora.variant=loraplus): B's learning rate is lora.loraplus_lr_ratio times A's.
        if self.loraplus_lr_ratio is not None and self.optimizer is None:
            self.optimizer = loraplus_optimizer(self.model if model is None else model, lr=self.args.learning_rate,
                                                ratio=self.loraplus_lr_ratio, weight_decay=self.args.weight_decay)
        return super().create_optimizer(model)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.preference is not None and "loss" in logs:
            logs.update(self.preference.pop_metrics())  # rewards/chosen, rewards/accuracies, ... since the last line
        super().log(logs, start_time)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Normalising by num_items_in_batch matches the Trainer's own rule: such a loss is
        # already scaled for gradient accumulation, a per-batch mean is divided by it later.
        if not self.model_accepts_loss_kwargs:
            num_items_in_batch = None
        if self.token_counter is not None and model.training:
            self.token_counter.add(inputs)
        keep_logits_dtype(self.model)  # no float32 copy of all kept logits (mixed precision); cheap when done
        if self.preference is not None:
            loss = self.preference.loss(model, inputs)
            return (loss, None) if return_outputs else loss
        loss, outputs = supervised_loss(model, inputs, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # Under ZeRO-3 the Trainer gathers every weight of the model at each checkpoint to save a LoRA adapter
        # of a fraction of a percent of them; gather only the trainable ones (collective, like the original).
        if not (zero3_enabled(self) and hasattr(self.model, "peft_config")):
            super().save_model(output_dir, _internal_call)
            return
        state_dict = gather_trainable_zero3(self.accelerator.unwrap_model(self.model))
        if self.args.should_save:
            self._save(output_dir or self.args.output_dir, state_dict=state_dict)


def to_training_args(cfg: RunConfig, run_dir: RunDir, dtype: torch.dtype, *, has_eval: bool = False) -> TrainingArguments:
    """transformers.TrainingArguments from the train section (pure conversion)."""
    t = cfg.train
    return TrainingArguments(
        output_dir=str(staging_dir(run_dir)),  # checkpoints are published from there (train/checkpoints.py)
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
        tf32=cuda_has_native_bf16() or None,  # fp32 matmuls (LoRA's, outside autocast) on tensor cores: Ampere+
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,  # our own bar shows loss and tokens/s
        label_names=["labels"],
        **training_args_kwargs(cfg),  # ddp backend, deepspeed=..., fsdp=... (train.distributed)
    )


def build_trainer(cfg: RunConfig, run_dir: RunDir, model: Any, tokenizer: Any, data: TrainingData,
                  renderer: ChatRenderer, dtype: torch.dtype, *, fingerprints: dict[str, str],
                  args: TrainingArguments | None = None, resumed_from: Path | None = None) -> ChattuneTrainer:
    """An HF Trainer wired with our collator, progress/metrics, tracking and probe callbacks.

    args: to_training_args(...) made before the model was loaded (what ZeRO-3 needs to load sharded); made here if None.
    """
    # Padding-free batches need use_cache=False for exact sequence boundaries; training never uses the cache.
    model.config.use_cache = False
    if cfg.train.padding_free:
        use_packed_attention(model)  # per-sample causal SDPA instead of one masked attention over the row
    if cfg.train.compiled_norms:
        compile_norms(model)  # CPU only: one fused loop per RMSNorm direction instead of ~20 passes
    counter = TokenCounter()
    collate = make_collate(cfg.train.padding_free, tokenizer.pad_token_id)
    pairs = cfg.train.method != "sft"
    trainer = ChattuneTrainer(
        model=model,
        args=args if args is not None else to_training_args(cfg, run_dir, dtype, has_eval=bool(data.eval_samples)),
        train_dataset=PairDataset(data.samples) if pairs else SampleDataset(data.samples),
        eval_dataset=SampleDataset(data.eval_samples) if data.eval_samples else None,
        data_collator=pair_collate(collate) if pairs else collate,  # eval uses the same collator
        token_counter=counter,
        fingerprints=fingerprints,
        loraplus_lr_ratio=cfg.lora.loraplus_lr_ratio if cfg.lora.variant == "loraplus" else None,
        preference=PreferenceObjective(cfg.train, None) if pairs else None,
    )
    if cfg.train.method == "dpo" and cfg.model.adapter:  # reference = the adapter as loaded, before any step
        with trainer.autocast_smart_context_manager():
            trainer.preference.reference = reference_logps(
                model, trainer.train_dataset, trainer.data_collator, batch_size=cfg.train.batch_size, adapter_off=False)
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    trainer.add_callback(DistributedReport())  # processes and global batch, logged before the progress bar
    # metrics.jsonl was emptied (fresh start) or cut back to the checkpoint (resume) by resume.prepare_files.
    # [] for tracking.backends=[none]; a resumed run continues its experiments from the checkpoint's step.
    trackers = make_trackers(cfg, run_dir, resume_step=checkpoint_step(resumed_from) if resumed_from else None)
    # Before the probes: the trackers' run must be open when the base model's answers arrive.
    trainer.add_callback(TrackingCallback(trackers, lambda: run_info(cfg, run_dir)))
    trainer.add_callback(ProgressAndMetrics(run_dir.metrics, counter, sinks=[t.log_row for t in trackers],
                                            step_flops=step_flops_counter(model)))
    trainer.add_callback(PredictionProbes(data.probes, renderer, run_dir.predictions,
                                          max_new_tokens=cfg.tracking.probe_max_new_tokens,
                                          sinks=[t.log_predictions for t in trackers],
                                          every_process=shards_weights(cfg)))
    return trainer
