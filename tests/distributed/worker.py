"""torchrun entry for the tests: `chattune train` exactly as the CLI runs it, plus one test-only callback.

The callback writes a hash of this process's LoRA weights after every optimizer step to
$CHATTUNE_TEST_DUMP/rank{R}_step{S}.txt, so a test can see that every rank holds the same weights.
"""

import hashlib
import os
import sys
from pathlib import Path

from transformers import TrainerCallback

from chattune import cli
from chattune.verbs import train as run


class DumpLoraHash(TrainerCallback):
    def on_step_end(self, args, state, control, model=None, **kw):
        h = hashlib.sha256()
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                h.update(name.encode())
                h.update(p.detach().cpu().float().numpy().tobytes())
        out = Path(os.environ["CHATTUNE_TEST_DUMP"]) / f"rank{args.process_index}_step{state.global_step}.txt"
        out.write_text(h.hexdigest())


_build_trainer = run.build_trainer


def build_trainer(*args, **kwargs):
    trainer = _build_trainer(*args, **kwargs)
    if os.environ.get("CHATTUNE_TEST_DUMP"):
        trainer.add_callback(DumpLoraHash())
    return trainer


run.build_trainer = build_trainer

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
