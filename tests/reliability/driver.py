"""Runs `chattune` in a subprocess and hurts it on purpose at a chosen optimizer step.

    python driver.py ACTION STEP chattune-args...

ACTION: kill (SIGKILL itself before training step STEP+1), kill-in-save (SIGKILL itself while
the checkpoint of step STEP is half written), kill-in-probes (SIGKILL itself while answering the
probes after epoch STEP), sigint (Ctrl-C to itself while optimizer step STEP runs: the run must
finish that step, save it and stop there). STEP is a global step.
"""

import os
import signal
import sys

from chattune.train.callbacks import PredictionProbes
from chattune.train.trainer import ChattuneTrainer

action, at = sys.argv[1], int(sys.argv[2])
step_orig = ChattuneTrainer.training_step
save_rng_orig = ChattuneTrainer._save_rng_state
answer_orig = PredictionProbes.answer


def training_step(self, *a, **k):
    if action == "kill" and self.state.global_step == at:
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "sigint" and self.state.global_step == at - 1:  # steps 1..at-1 are done: step `at` starts
        os.kill(os.getpid(), signal.SIGINT)
    return step_orig(self, *a, **k)


def save_rng_state(self, output_dir):
    # Model and optimizer are on disk by now, the RNG state and trainer_state.json are not.
    if action == "kill-in-save" and self.state.global_step == at:
        os.kill(os.getpid(), signal.SIGKILL)
    return save_rng_orig(self, output_dir)


def answer(self, model, epoch, step, **kw):
    if action == "kill-in-probes" and epoch == at:
        os.kill(os.getpid(), signal.SIGKILL)
    return answer_orig(self, model, epoch, step, **kw)


PredictionProbes.answer = answer
ChattuneTrainer.training_step = training_step
ChattuneTrainer._save_rng_state = save_rng_state

from chattune import cli  # noqa: E402

sys.exit(cli.main(sys.argv[3:]))
