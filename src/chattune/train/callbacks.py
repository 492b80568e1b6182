"""Trainer callbacks: progress bar, metrics.jsonl, and prediction probes."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm
from transformers import TrainerCallback

from chattune.data.formats import Conversation
from chattune.data.render import ChatRenderer
from chattune.infer.generate import generate_batch
from chattune.files import append_jsonl, write_jsonl
from chattune.train.processes import sum_over_processes
from chattune.train.loss import predicts_label
from chattune.train.throughput import gpu_stats


class TokenCounter:
    """Counts the real (non-padding) tokens trained on; ChattuneTrainer (train/trainer.py) adds each batch as it computes its loss.

    Counting in the collator would be off by a batch: the dataloader collates one
    batch ahead, so the last step of an epoch would seem to have no tokens.
    """

    def __init__(self) -> None:
        self.tokens = 0
        self.supervised = 0  # positions whose next token is a label

    def add(self, inputs: dict) -> None:
        """Add one batch: tokens under the attention mask, or all of them for padding-free batches."""
        mask = inputs.get("attention_mask")
        self.tokens += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
        labels = inputs.get("labels")
        if labels is not None:
            self.supervised += int(predicts_label(labels).sum())  # where the loss computes logits


class ProgressAndMetrics(TrainerCallback):
    """A progress bar with loss and tokens/s, and one metrics.jsonl line per logging step."""

    def __init__(self, metrics_path: Path, counter: TokenCounter, sinks: Sequence[Callable[[dict, int], None]] = (),
                 step_flops: Callable[[int, int], float] | None = None):
        """step_flops: model FLOPs for (tokens, supervised positions), for the MFU on a GPU (train/throughput.py)."""
        self.metrics_path = metrics_path
        self.step_flops = step_flops
        self.counter = counter
        self.sinks = list(sinks)
        self.bar = None
        self._step_started = 0.0
        self._train_time = 0.0  # seconds inside optimizer steps since the last log (probes excluded)
        self._tokens0 = self._supervised0 = 0

    def on_train_begin(self, args, state, control, **kw):
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, desc="train", unit="step", dynamic_ncols=True)
        self._train_time, self._tokens0, self._supervised0 = 0.0, self.counter.tokens, self.counter.supervised

    def on_step_begin(self, args, state, control, **kw):
        self._step_started = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self._train_time += time.perf_counter() - self._step_started
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kw):
        logs = dict(logs or {})
        if "loss" not in logs:
            return
        # The batches of the step being logged were collated before on_step_begin fired, so
        # counting tokens here and time inside steps measures the same steps.
        # Several processes: tokens/s counts the tokens of all of them (MFU below stays per device).
        seconds = max(self._train_time, 1e-9)
        tokens, supervised = self.counter.tokens - self._tokens0, self.counter.supervised - self._supervised0
        tps = sum_over_processes(tokens) / seconds
        flops_per_s = self.step_flops(tokens, supervised) / seconds if self.step_flops else 0.0
        self._train_time, self._tokens0, self._supervised0 = 0.0, self.counter.tokens, self.counter.supervised
        row = {
            "step": state.global_step,
            "epoch": round(state.epoch or 0.0, 4),
            "loss": logs.get("loss"),
            "grad_norm": logs.get("grad_norm"),
            "learning_rate": logs.get("learning_rate"),
            "tokens_per_s": round(tps, 1),
            **gpu_stats(flops_per_s),  # this process's tokens: MFU per device
            **{k: v for k, v in logs.items() if "/" in k},  # preference tuning: rewards/chosen, rewards/accuracies, ...
        }
        if state.is_world_process_zero:
            append_jsonl(self.metrics_path, row)
            for sink in self.sinks:
                sink(row, state.global_step)
        if self.bar is not None:
            extra = {"mfu": f"{row['mfu']:.1%}"} if "mfu" in row else {}
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['learning_rate']:.2e}", tok_s=f"{tps:.0f}", **extra)

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        loss = (metrics or {}).get("eval_loss")
        if loss is None:
            return
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), "eval_loss": loss,
               "eval_ppl": math.exp(min(loss, 700.0))}
        if state.is_world_process_zero:
            append_jsonl(self.metrics_path, row)
            for sink in self.sinks:
                sink(row, state.global_step)
        message = f"eval at step {row['step']} (epoch {row['epoch']:g}): loss {loss:.4f}, perplexity {row['eval_ppl']:.2f}"
        if self.bar is not None:
            self.bar.write(message)

    def on_train_end(self, args, state, control, **kw):
        self.close()

    def close(self) -> None:
        """End the progress bar's line (also when training stopped with an error, so the message starts afresh)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class PredictionProbes(TrainerCallback):
    """Answers the probe questions before training (epoch 0) and after every epoch.

    Writes predictions/epoch_K.jsonl and hands the rows to the tracking sinks.
    """

    def __init__(
        self,
        probes: Sequence[Conversation],
        renderer: ChatRenderer,
        out_dir: Path,
        *,
        max_new_tokens: int,
        sinks: Sequence[Callable[[list[dict], int, int], None]] = (),
        every_process: bool = False,
    ):
        self.probes = list(probes)
        # With weights sharded over processes (ZeRO-3, FSDP) a forward pass needs them all: every process
        # generates (transformers keeps them in step), only the main one writes.
        self.every_process = every_process
        self.renderer = renderer
        self.out_dir = out_dir
        self.max_new_tokens = max_new_tokens
        self.sinks = list(sinks)
        self.done: dict[int, list[dict]] = {}

    def answer(self, model: Any, epoch: int, step: int, *, write: bool = True) -> list[dict]:
        """Generate, write and log the probe answers for one epoch (write=False: generate only)."""
        answers = generate_batch(
            model, self.renderer, [p.prompt for p in self.probes], max_new_tokens=self.max_new_tokens,
            batch_size=len(self.probes), sharded=self.every_process,
        )
        rows = [
            {"epoch": epoch, "step": step, "question": p.prompt[-1]["content"], "answer": a, "reference": p.reference, "where": p.where}
            for p, a in zip(self.probes, answers)
        ]
        if not write:
            return rows
        # Whole or not at all: resume keeps the answer files of finished epochs as they are.
        write_jsonl(self.out_dir / f"epoch_{epoch}.jsonl", rows)
        for sink in self.sinks:
            sink(rows, epoch, step)
        self.done[epoch] = rows
        return rows

    def on_train_begin(self, args, state, control, model=None, **kw):
        if not (self.probes and (state.is_world_process_zero or self.every_process)):
            return
        if state.global_step == 0:
            self.answer(model, 0, 0, write=state.is_world_process_zero)
            return
        # Resumed from the checkpoint that ends an epoch whose answers were never written (killed in between):
        # the weights are exactly that epoch's, so answer now.
        epoch = round(state.epoch or 0)
        if epoch >= 1 and abs((state.epoch or 0) - epoch) < 1e-6 and not (self.out_dir / f"epoch_{epoch}.jsonl").is_file():
            self.answer(model, epoch, state.global_step, write=state.is_world_process_zero)

    def on_epoch_end(self, args, state, control, model=None, **kw):
        if control.should_training_stop and state.global_step < state.max_steps:
            return  # interrupted mid-epoch (Ctrl-C): these weights are no epoch's, and the user is waiting
        if self.probes and (state.is_world_process_zero or self.every_process):
            self.answer(model, max(1, round(state.epoch or 0)), state.global_step, write=state.is_world_process_zero)
