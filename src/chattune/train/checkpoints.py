"""Crash-safe checkpoints: a folder named checkpoint-N is always complete.

TrainingArguments.output_dir is RUN/checkpoints/.staging (train/trainer.py), so the Trainer writes every
file of checkpoint-N there. Right after that save the Trainer calls its callbacks' on_save, where
PublishCheckpoints flushes the files to disk, writes the marker (chattune_checkpoint.json: step, epoch and
the fingerprints of what training depends on) last, and only then renames the folder to
RUN/checkpoints/checkpoint-N. A crash at any moment leaves either the previous checkpoints or the new one,
never a half-written one that resume would pick. Both hooks are public (an argument and a callback): no
private Trainer method is overridden.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from transformers import TrainerCallback

from chattune.files import fsync_dir, fsync_tree, storage_error, tree_size, write_json
from chattune.rundir import RunDir
from chattune.train.processes import barrier

MARKER = "chattune_checkpoint.json"
STAGING = ".staging"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_step(path: Path) -> int | None:
    """N for a folder named checkpoint-N, else None."""
    m = _CHECKPOINT.match(path.name)
    return int(m.group(1)) if m else None


def complete_checkpoints(root: Path) -> list[Path]:
    """checkpoint-N folders that carry the completion marker, oldest step first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None and (p / MARKER).is_file()]
    return sorted(found, key=checkpoint_step)


def last_checkpoint(run_dir: RunDir) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    done = complete_checkpoints(run_dir.checkpoints)
    return done[-1] if done else None


def read_marker(checkpoint: Path) -> dict[str, Any]:
    """The marker of a complete checkpoint (step, epoch, fingerprints)."""
    return json.loads((checkpoint / MARKER).read_text(encoding="utf-8"))


def staging_dir(run_dir: RunDir) -> Path:
    """Where the Trainer writes a checkpoint before it is complete (TrainingArguments.output_dir)."""
    return run_dir.checkpoints / STAGING


class PublishCheckpoints(TrainerCallback):
    """After each save: mark the staged checkpoint complete, rename it into checkpoints/, keep the last N."""

    def __init__(self, fingerprints: dict[str, str]):
        self.fingerprints = dict(fingerprints)  # stored in every checkpoint's marker

    def on_save(self, args, state, control, **kw):
        staging = Path(args.output_dir)
        # Several processes: each wrote into staging (its rng_state_N, its ZeRO/FSDP shards), so the folder is
        # published only once all of them are done, and none saves again before the main process cleared it.
        barrier()
        if args.should_save:
            name = f"checkpoint-{state.global_step}"
            publish_checkpoint(staging / name, staging.parent / name, {
                "step": state.global_step,
                "epoch": state.epoch,
                "max_steps": state.max_steps,
                "fingerprints": self.fingerprints,
            })
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(staging.parent, args.save_total_limit)
        barrier()


def publish_checkpoint(src: Path, dst: Path, marker: dict[str, Any]) -> None:
    """Flush a staged checkpoint to disk, write its marker last, and rename it to its final name."""
    fsync_tree(src)
    write_json(src / MARKER, marker)
    if dst.exists():  # the same step saved again (e.g. an interrupt on a save step): the new one wins
        shutil.rmtree(dst)
    os.replace(src, dst)
    fsync_dir(dst.parent)


def rotate_checkpoints(root: Path, keep: int | None) -> None:
    """Keep the newest `keep` complete checkpoints; remove older ones and incomplete leftovers."""
    done = complete_checkpoints(root)
    doomed = done[: -keep] if keep and len(done) > keep else []
    doomed += [p for p in root.iterdir() if checkpoint_step(p) is not None and not (p / MARKER).is_file()]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)


@contextmanager
def explain_full_disk(run_dir: RunDir, resume_hint: str) -> Iterator[None]:
    """A write that fails for lack of space or permission becomes one paragraph: the path, the space a save
    needs (the size of the newest checkpoint, or of the one being written), and the checkpoint that is intact."""
    try:
        yield
    except OSError as exc:
        last = last_checkpoint(run_dir)
        needed = tree_size(last) if last else tree_size(staging_dir(run_dir))
        kept = (f"the last complete checkpoint, {last}, is intact: once there is room, `{resume_hint}` resumes "
                "from it" if last else f"no checkpoint was complete yet: `{resume_hint}` starts the run again")
        err = storage_error(exc, needed=needed or None, kept=kept)
        if err is None:
            raise
        raise err from exc
