"""torchrun entry for the tests: `chattune train` exactly as the CLI runs it, plus test-only probes.

The callback writes a hash of this process's LoRA weights after every optimizer step to
$CHATTUNE_TEST_DUMP/rank{R}_step{S}.txt, so a test can see that every rank holds the same weights.
With $CHATTUNE_TEST_LOAD_REPORT, each rank writes load_rank{R}.json: how its parameters look right after
the model was loaded (ZeRO-3 partitioned or whole), and engine_rank{R}.json: the GPU memory this process holds
once the engine is set up (on_train_begin; 0 on CPUs).
"""

import json

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


class EngineMemory(TrainerCallback):
    def on_train_begin(self, args, state, control, **kw):
        import torch

        cuda = torch.cuda.is_available()
        report = {"allocated": torch.cuda.memory_allocated() if cuda else 0,
                  "peak": torch.cuda.max_memory_allocated() if cuda else 0}
        out = Path(os.environ["CHATTUNE_TEST_LOAD_REPORT"]) / f"engine_rank{args.process_index}.json"
        out.write_text(json.dumps(report))


def build_trainer(*args, **kwargs):
    trainer = _build_trainer(*args, **kwargs)
    if os.environ.get("CHATTUNE_TEST_DUMP"):
        trainer.add_callback(DumpLoraHash())
    if os.environ.get("CHATTUNE_TEST_LOAD_REPORT"):
        trainer.add_callback(EngineMemory())
    return trainer


run.build_trainer = build_trainer

_load_lora_model = run.load_lora_model


def load_lora_model(*args, **kwargs):
    model = _load_lora_model(*args, **kwargs)
    out = os.environ.get("CHATTUNE_TEST_LOAD_REPORT")
    if out:
        import torch
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        base = [p for n, p in model.named_parameters() if "lora_" not in n]
        report = {"zero3_enabled": is_deepspeed_zero3_enabled(), "base_params": len(base),
                  "partitioned": sum(hasattr(p, "ds_id") for p in base),
                  "local_numel": sum(p.numel() for p in base),
                  "full_numel": sum(getattr(p, "ds_numel", p.numel()) for p in base),
                  "full_bytes": sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in base),
                  "cuda_allocated": torch.cuda.memory_allocated() if torch.cuda.is_available() else 0}
        (Path(out) / f"load_rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(report))
    return model


run.load_lora_model = load_lora_model

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
