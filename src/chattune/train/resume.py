"""Crash-safe checkpoints and resume.

A checkpoint is written under RUN/checkpoints/.staging/, gets a marker file
(chattune_checkpoint.json: step, epoch and the fingerprints of what training
depends on) once every file is on disk, and only then is renamed to
checkpoint-N. So a folder named checkpoint-N is always complete, and a crash
at any moment leaves either the previous checkpoints or the new one, never a
half-written one that resume would pick.

Re-running `chattune train` on an unfinished run resumes from its last complete
checkpoint (same step, optimizer, scheduler, RNG and data order: the HF
Trainer's own resume), after checking that the data, tokenizer, template,
max_length, LoRA shape and base model are the ones the checkpoint was trained
on. metrics.jsonl and predictions/ are cut back to the checkpoint so the curve
continues without repeated steps.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from transformers import TrainerCallback

from chattune.errors import RunDirError
from chattune.rundir import RunDir

log = logging.getLogger("chattune")

MARKER = "chattune_checkpoint.json"
STAGING = ".staging"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# What each fingerprint covers, in the words an error message uses.
FINGERPRINTS = {
    "data": "the training data",
    "tokenizer": "the tokenizer",
    "template": "the chat template (model.chat_template / data.template_kwargs)",
    "max_length": "data.max_length / data.overlength / data.train_on",
    "lora": "the LoRA shape (lora.r / lora.alpha / lora.target_modules)",
    "base_model": "the base model (model.name_or_path)",
}


# ---------------------------------------------------------------------------
# finding checkpoints


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


# ---------------------------------------------------------------------------
# fingerprints


def _sha(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True, ensure_ascii=False, default=str).encode())
    return h.hexdigest()[:16]


def fingerprints(cfg: Any, renderer: Any, conversations: Sequence[Any], model_dir: str | Path) -> dict[str, str]:
    """Short readable fingerprints of everything a checkpoint's weights depend on."""
    tok = renderer.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    vocab = backend.to_str().encode() if backend is not None else sorted(tok.get_vocab().items())
    config_json = Path(model_dir) / "config.json"
    d, lora = cfg.data, cfg.lora
    targets = lora.target_modules if isinstance(lora.target_modules, str) else ",".join(sorted(lora.target_modules))
    return {
        # Message content only: moving or renaming the file does not change what is learned.
        "data": f"{len(conversations)} conversations, sha256 {_sha([c.messages for c in conversations])}",
        "tokenizer": f"sha256 {_sha(vocab)}",
        "template": f"sha256 {_sha(tok.chat_template, renderer.template_kwargs)}",
        "max_length": f"max_length={d.max_length} overlength={d.overlength} train_on={d.train_on}",
        "lora": f"r={lora.r} alpha={lora.alpha:g} target_modules={targets}",
        "base_model": f"config sha256 {_sha(config_json.read_bytes() if config_json.is_file() else str(model_dir))}",
    }


def check_resume(run_dir: RunDir, checkpoint: Path, current: dict[str, str], *, force: bool) -> None:
    """Refuse to resume when a fingerprint changed (unless forced, then warn)."""
    stored = read_marker(checkpoint).get("fingerprints", {})
    changed = [k for k in current if stored.get(k) != current[k]]
    if not changed:
        return
    details = "; ".join(f"{FINGERPRINTS.get(k, k)} changed (checkpoint: {stored.get(k, 'unknown')}, now: {current[k]})"
                        for k in changed)
    if force:
        log.warning("resume: --resume-force: continuing from %s although %s", checkpoint.name, details)
        return
    raise RunDirError(
        f"cannot resume from {checkpoint.name}: {details}. The saved weights and optimizer state belong to the old "
        "inputs",
        where=str(run_dir.root),
        fix="undo the change to resume; or pass --overwrite to start this run again from scratch, or choose "
        "another output_dir; or pass --resume-force to continue anyway",
    )


# ---------------------------------------------------------------------------
# choosing between a fresh start and a resume


def plan_resume(run_dir: RunDir, *, resume: bool) -> Path | None:
    """The checkpoint to continue from (None: start fresh); --resume insists there is one."""
    checkpoint = last_checkpoint(run_dir)
    if resume and checkpoint is None:
        raise RunDirError(
            "--resume was given but the run has no complete checkpoint to resume from"
            + ("" if run_dir.root.exists() else " (the folder does not exist)"),
            where=str(run_dir.checkpoints),
            fix="drop --resume to start training, or check output_dir; checkpoints are written every train.save_steps "
            "steps",
        )
    return checkpoint


def prepare_files(run_dir: RunDir, checkpoint: Path | None) -> None:
    """Make metrics.jsonl, predictions/ and checkpoints/ match the checkpoint we continue from (or a fresh start)."""
    ckpts = run_dir.checkpoints
    if checkpoint is None:
        # Leftovers of a run killed before its first checkpoint would mix with the new run's files.
        run_dir.metrics.unlink(missing_ok=True)
        shutil.rmtree(run_dir.predictions, ignore_errors=True)
        shutil.rmtree(ckpts, ignore_errors=True)
        shutil.rmtree(run_dir.adapter, ignore_errors=True)
        return
    marker = read_marker(checkpoint)
    step = marker["step"]
    dropped = truncate_metrics(run_dir.metrics, step)
    epochs_done = int((marker.get("epoch") or 0.0) + 1e-6)
    stale = [p for p in run_dir.predictions.glob("epoch_*.jsonl") if _epoch_of(p) > epochs_done]
    for p in stale:
        p.unlink()
    # Half-written checkpoints and checkpoints past the one we resume from are not part of this history.
    for p in ckpts.iterdir():
        n = checkpoint_step(p)
        if p.name == STAGING or (n is not None and (n > step or not (p / MARKER).is_file())):
            shutil.rmtree(p, ignore_errors=True)
    log.info("resume: continuing from %s (step %d, epoch %.2f); metrics.jsonl kept through step %d%s", checkpoint,
             step, marker.get("epoch") or 0.0, step, f" ({dropped} later row(s) dropped)" if dropped else "")


def _epoch_of(path: Path) -> int:
    try:
        return int(path.stem.split("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def truncate_metrics(path: Path, step: int) -> int:
    """Keep the rows of metrics.jsonl up to `step` (and drop a torn last line); return how many were dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # the line being written when the process was killed
            dropped += 1
            continue
        if row.get("step", 0) <= step:
            kept.append(line)
        else:
            dropped += 1
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))
    return dropped


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file through a temporary name in the same folder, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------
# atomic checkpoints and adapters


class AtomicCheckpoints:
    """Trainer mixin: write each checkpoint under .staging/, mark it complete, rename it, keep the last N.

    Set `chattune_fingerprints` on the trainer; they go into every checkpoint's marker.
    """

    chattune_fingerprints: dict[str, str] = {}
    _chattune_staging = False

    def _get_output_dir(self, trial: Any) -> str:
        out = super()._get_output_dir(trial)
        # The Trainer asks for its output folder while saving; send that save into the staging folder.
        return os.path.join(out, STAGING) if self._chattune_staging else out

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        root = Path(self.args.output_dir)
        staging = root / STAGING
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # a previous crash's leftovers
        # Several processes: each writes into staging (its rng_state_N, its ZeRO/FSDP shards), so none may
        # start before the main process cleared it, and it is published only once all of them are done.
        self.accelerator.wait_for_everyone()
        self._chattune_staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._chattune_staging = False
        self.accelerator.wait_for_everyone()
        if not self.args.should_save:
            return
        name = f"checkpoint-{self.state.global_step}"
        publish_checkpoint(staging / name, root / name, {
            "step": self.state.global_step,
            "epoch": self.state.epoch,
            "max_steps": self.state.max_steps,
            "fingerprints": self.chattune_fingerprints,
        })
        shutil.rmtree(staging, ignore_errors=True)
        rotate_checkpoints(root, self.args.save_total_limit)


def publish_checkpoint(src: Path, dst: Path, marker: dict[str, Any]) -> None:
    """Flush a staged checkpoint to disk, write its marker last, and rename it to its final name."""
    for p in src.rglob("*"):
        if p.is_file():
            _fsync(p)
    atomic_write_text(src / MARKER, json.dumps(marker, ensure_ascii=False, indent=2) + "\n")
    if dst.exists():  # the same step saved again (e.g. an interrupt on a save step): the new one wins
        shutil.rmtree(dst)
    os.replace(src, dst)
    _fsync_dir(dst.parent)


def rotate_checkpoints(root: Path, keep: int | None) -> None:
    """Keep the newest `keep` complete checkpoints; remove older ones and incomplete leftovers."""
    done = complete_checkpoints(root)
    doomed = done[: -keep] if keep and len(done) > keep else []
    doomed += [p for p in root.iterdir() if checkpoint_step(p) is not None and not (p / MARKER).is_file()]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)


def save_adapter(model: Any, dest: Path) -> None:
    """save_pretrained into a temporary folder beside dest, then swap it in (a crash never leaves half an adapter)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        model.save_pretrained(str(tmp))
        for p in tmp.rglob("*"):
            if p.is_file():
                _fsync(p)
        old = dest.parent / f".{dest.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync(path)
    except OSError:  # not every filesystem lets a folder be fsynced
        pass


# ---------------------------------------------------------------------------
# Ctrl-C


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


def resume_command(run_dir: RunDir) -> str:
    """The command that continues this run: the user's own `chattune train ...` without --overwrite, if we know it."""
    argv = sys.argv
    if argv and Path(argv[0]).name in ("chattune", "cli.py", "__main__.py") and "train" in argv[1:]:
        return shlex.join(["chattune", *[a for a in argv[1:] if a != "--overwrite"]])
    return shlex.join(["chattune", "train", str(run_dir.config_file), "--resume"])


def report_interrupt(run_dir: RunDir, step: int, max_steps: int) -> None:
    """Tell the user what was saved and the exact command that resumes."""
    ckpt = last_checkpoint(run_dir)
    log.warning("interrupted at step %d of %d: saved %s and the adapter so far in %s", step, max_steps,
                ckpt or "no checkpoint", run_dir.adapter)
    log.warning("resume with:  %s", resume_command(run_dir))
