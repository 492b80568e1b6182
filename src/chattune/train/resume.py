"""Resume: continue an unfinished run from its last complete checkpoint (train/checkpoints.py writes them).

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
import shlex
import shutil
import sys
from pathlib import Path
from types import GeneratorType
from typing import Any, Sequence

from chattune.errors import RunDirError
from chattune.files import write_text
from chattune.rundir import RunDir
from chattune.train.checkpoints import MARKER, STAGING, checkpoint_step, last_checkpoint, read_marker

log = logging.getLogger("chattune")

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
# fingerprints


def _sha(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, bytes):
            h.update(p)
        elif isinstance(p, (list, GeneratorType)):  # item by item: the bytes of _json(list(p)), never all at once
            h.update(b"[")
            for i, item in enumerate(p):
                h.update((", " if i else "").encode() + _json(item).encode())
            h.update(b"]")
        else:
            h.update(_json(p).encode())
    return h.hexdigest()[:16]


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


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
        "data": f"{len(conversations)} conversations, sha256 {_sha(c.messages for c in conversations)}",
        "tokenizer": f"sha256 {_sha(vocab)}",
        "template": f"sha256 {_sha(tok.chat_template, renderer.template_kwargs)}",
        "max_length": f"max_length={d.max_length} overlength={d.overlength} train_on={d.train_on}",
        # variant and method only when not the defaults, so checkpoints written before they existed still match
        "lora": f"r={lora.r} alpha={lora.alpha:g} target_modules={targets}"
                + (f" variant={lora.variant}" if lora.variant != "lora" else "")
                + (f" method={cfg.train.method}" if cfg.train.method != "sft" else "")
                + (f" adapter={cfg.model.adapter}" if cfg.model.adapter else ""),
        "base_model": f"config sha256 {_sha(config_json.read_bytes() if config_json.is_file() else str(model_dir))}",
    }


def check_resume(run_dir: RunDir, checkpoint: Path | None, current: dict[str, str], *, force: bool) -> None:
    """Refuse to resume when a fingerprint changed (unless forced, then warn); nothing to check on a fresh start."""
    if checkpoint is None:
        return
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
        run_dir.wall_time.unlink(missing_ok=True)
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
    write_text(path, "".join(f"{line}\n" for line in kept))
    return dropped


# ---------------------------------------------------------------------------
# telling the user how to continue


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
