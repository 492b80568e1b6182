"""Helpers of the distributed tests: the shared overrides and `torchrun ... chattune train` in a subprocess."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
WORKER = Path(__file__).with_name("worker.py")
STEPS = 4
PER_DEVICE = 4
TRAIN_ROWS = 98  # persona.json's 100 rows minus the 2 probe rows held out


def overrides(model_dir: Path, out: Path, batch_size: int, *extra: str) -> list[str]:
    return [f"model.name_or_path={model_dir}", "model.dtype=fp32", f"output_dir={out}", f"train.max_steps={STEPS}",
            f"train.batch_size={batch_size}", "train.grad_accum=1", "train.logging_steps=1", "train.save_steps=2",
            "train.learning_rate=1e-2",
            # Each process draws its own dropout masks: without dropout 2 x 4 and 1 x 8 samples are the same math.
            "lora.dropout=0",
            "tracking.backends=[none]", "tracking.probe_size=2", "tracking.probe_max_new_tokens=4", *extra]


def torchrun(nproc: int, argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node N chattune train ...` (through tests/distributed/worker.py)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(WORKER),
           *argv]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
