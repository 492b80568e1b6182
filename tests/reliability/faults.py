"""Fault injection at the write boundary: the Nth write of a chosen kind fails, or kills the process, half done.

Deterministic, no timing: a fault is "the `nth` write of `kind` whose path contains `match`". When it fires,
half of what was being written is on disk (where the writer put it) and then the write either raises an
OSError (ENOSPC, EACCES) or the process is killed with SIGKILL (`kill`; use it in a child process, see
fault_driver.py). `pause` instead prints PAUSED and waits until stdin is closed (a live process caught in
the middle of its work, for the lock tests). The kinds are the places where bytes reach the disk:

    atomic       chattune.files.atomic_path: every write_text / write_json / write_jsonl / write_bytes /
                 atomic_open (run_config.yaml, summary.json, checkpoint markers, the tokenisation cache,
                 predictions/epoch_K.jsonl, eval results, CSV tables ...); the fault cuts the temporary file
                 in half before it would be renamed
    atomic_dir   chattune.files.atomic_dir (the adapter, merged models): fires after the folder was
                 filled, before it is swapped in
    append       chattune.files.append_jsonl (metrics.jsonl, predict's OUT): half a line is written
    torch_save   torch.save (optimizer.pt, scheduler.pt, rng_state.pth of a checkpoint): half the bytes
    safetensors  safetensors.torch.save_file (adapter weights, in checkpoints and adapter/): half the bytes

plain_writers() swaps the atomic writers for plain writes into the final path: the test of the tests,
under which a fault must leave damage behind that the suite notices.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

KINDS = ("atomic", "atomic_dir", "append", "torch_save", "safetensors")
ERRORS = {"enospc": (errno.ENOSPC, "No space left on device"), "eacces": (errno.EACCES, "Permission denied")}


@dataclass
class Fault:
    """Fire at the `nth` (1-based) write of `kind` whose target path contains `match`; `how` is enospc/eacces/kill."""

    kind: str
    match: str = ""
    nth: int = 1
    how: str = "enospc"
    seen: list[str] = field(default_factory=list)  # every write of this kind, in order (for the test's messages)
    fired: str | None = None  # the path it fired on

    def is_next(self, path: Any) -> bool:
        """Whether the write about to happen to `path` is the one that fails."""
        return self.fired is None and self.match in str(path) and \
            sum(self.match in p for p in self.seen) + 1 == self.nth

    def damages(self, path: Any) -> bool:
        """Whether the write about to happen is cut in half first (every fault except a pause)."""
        return self.how != "pause" and self.is_next(path)

    def check(self, path: Any) -> None:
        """Count this write; fire when it is the chosen one (half of it is already on disk)."""
        path = str(path)
        self.seen.append(path)
        if self.fired is None and self.match in path and sum(self.match in p for p in self.seen) == self.nth:
            self.fired = path
            if self.how == "kill":
                sys.stdout.flush()
                sys.stderr.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            if self.how == "pause":  # a live process in the middle of its work: wait until stdin is closed
                print("PAUSED", flush=True)
                sys.stdin.read()
                return
            code, text = ERRORS[self.how]
            raise OSError(code, text, path)


def _halve(path: Path) -> None:
    """Cut a file to half its size: what a crash in the middle of writing it leaves."""
    if path.is_file():
        size = path.stat().st_size
        with open(path, "r+b") as f:
            f.truncate(size // 2)


def _patch_everywhere(mp: pytest.MonkeyPatch, original: Any, replacement: Any, prefixes: tuple[str, ...]) -> None:
    """Replace `original` in every loaded module under `prefixes` that holds it under some name."""
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(prefixes):
            continue
        for attr, value in list(vars(module).items()):
            if value is original:
                mp.setattr(module, attr, replacement)


def _faulty_writers(fault: Fault) -> dict[str, tuple[Any, Any]]:
    """(original, faulty replacement) for each kind."""
    import safetensors.torch
    import torch

    from chattune import files

    real_path, real_dir, real_append = files.atomic_path, files.atomic_dir, files.append_jsonl
    real_save, real_st = torch.save, safetensors.torch.save_file

    @contextmanager
    def atomic_path(path: Any) -> Iterator[Path]:
        with real_path(path) as tmp:
            yield tmp
            if fault.damages(path):
                _halve(tmp)
            fault.check(path)

    @contextmanager
    def atomic_dir(dest: Any) -> Iterator[Path]:
        with real_dir(dest) as tmp:
            yield tmp
            fault.check(dest)

    def append_jsonl(path: Any, row: dict) -> None:
        import json

        if fault.damages(path):
            with open(path, "a", encoding="utf-8") as f:
                line = json.dumps(row, ensure_ascii=False)
                f.write(line[: len(line) // 2])
        else:
            real_append(path, row)
        fault.check(path)

    def torch_save(obj: Any, f: Any, *a: Any, **k: Any) -> Any:
        out = real_save(obj, f, *a, **k)
        if isinstance(f, (str, os.PathLike)):
            if fault.damages(f):
                _halve(Path(f))
            fault.check(f)
        return out

    def save_file(tensors: Any, filename: Any, *a: Any, **k: Any) -> Any:
        out = real_st(tensors, filename, *a, **k)
        if fault.damages(filename):
            _halve(Path(filename))
        fault.check(filename)
        return out

    return {"atomic": (real_path, atomic_path), "atomic_dir": (real_dir, atomic_dir),
            "append": (real_append, append_jsonl), "torch_save": (real_save, torch_save),
            "safetensors": (real_st, save_file)}


def install(mp: pytest.MonkeyPatch, fault: Fault) -> Fault:
    """Arm `fault` in this process (import the verbs you exercise first, so their bindings are patched too)."""
    original, faulty = _faulty_writers(fault)[fault.kind]
    if fault.kind in ("torch_save", "safetensors"):
        _patch_everywhere(mp, original, faulty, ("torch", "safetensors", "transformers", "peft", "accelerate"))
    else:
        _patch_everywhere(mp, original, faulty, ("chattune",))
    return fault


def plain_writers(mp: pytest.MonkeyPatch) -> None:
    """Replace the atomic writers by plain writes into the final path (what chattune must never do)."""
    from chattune import files

    @contextmanager
    def atomic_path(path: Any) -> Iterator[Path]:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        yield path

    @contextmanager
    def atomic_dir(dest: Any) -> Iterator[Path]:
        dest = Path(dest)
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        yield dest

    _patch_everywhere(mp, files.atomic_path, atomic_path, ("chattune",))
    _patch_everywhere(mp, files.atomic_dir, atomic_dir, ("chattune",))


def import_verbs() -> None:
    """Load every module that writes, so install() finds their bindings of the writers."""
    import chattune.data.cache  # noqa: F401
    import chattune.train.adapter  # noqa: F401
    import chattune.train.callbacks  # noqa: F401
    import chattune.train.checkpoints  # noqa: F401
    import chattune.verbs.eval  # noqa: F401
    import chattune.verbs.merge  # noqa: F401
    import chattune.verbs.predict  # noqa: F401
    import chattune.verbs.train  # noqa: F401


def armed(kind: str, match: str = "", nth: int = 1, how: str = "enospc") -> Callable[[pytest.MonkeyPatch], Fault]:
    """A factory the tests call with their monkeypatch: import the verbs, arm the fault, return it."""
    def arm(mp: pytest.MonkeyPatch) -> Fault:
        import_verbs()
        return install(mp, Fault(kind, match, nth, how))
    return arm
