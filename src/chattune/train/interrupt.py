"""Ctrl-C during training: finish the step, save a checkpoint and the adapter, say how to resume, exit 130."""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Any, Iterator

from transformers import TrainerCallback

from chattune.rundir import RunDir
from chattune.train.processes import any_process, is_main_process, world
from chattune.train.resume import report_interrupt


class GracefulInterrupt(TrainerCallback):
    """First Ctrl-C: finish the current step, save a checkpoint, stop. Second Ctrl-C: stop at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)
        print("\nCtrl-C: finishing this step, then saving a checkpoint and the adapter "
              "(press Ctrl-C again to stop at once without saving)", file=sys.stderr, flush=True)

    def on_step_end(self, args, state, control, **kw):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True

    @contextmanager
    def installed(self) -> Iterator["GracefulInterrupt"]:
        """Handle SIGINT while the block runs (only the main thread may install signal handlers)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        self._previous = signal.signal(signal.SIGINT, self._handle)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)


class SyncedInterrupt(TrainerCallback):
    """Makes a Ctrl-C seen by any process stop every process after the same step (else they would deadlock)."""

    def __init__(self, inner: Any):
        self.inner = inner

    def on_step_end(self, args, state, control, **kw):
        self.inner.requested = any_process(self.inner.requested)
        return self.inner.on_step_end(args, state, control, **kw)


def synced(interrupt: Any) -> Any:
    """The interrupt callback itself in one process; wrapped so all processes agree when there are several."""
    return SyncedInterrupt(interrupt) if world().size > 1 else interrupt


def train_interruptibly(trainer: Any, checkpoint: Any) -> tuple[Any, GracefulInterrupt]:
    """trainer.train() (from `checkpoint` when resuming) with Ctrl-C handled; (its result, the interrupt)."""
    with GracefulInterrupt().installed() as interrupt:
        trainer.add_callback(synced(interrupt))  # several processes stop after the same step
        try:
            result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        finally:  # an error mid-training: end the progress bar's line before the error is printed
            for cb in trainer.callback_handler.callbacks:
                if callable(getattr(cb, "close", None)):
                    cb.close()
    return result, interrupt


def stop_if_interrupted(run_dir: RunDir, trainer: Any, interrupt: GracefulInterrupt) -> None:
    """After a Ctrl-C that cut training short: tell the user what was saved and how to resume, then stop."""
    if not (interrupt.requested and trainer.state.global_step < trainer.state.max_steps):
        return
    if is_main_process():
        report_interrupt(run_dir, trainer.state.global_step, trainer.state.max_steps)
    raise KeyboardInterrupt
