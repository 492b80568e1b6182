"""Writing files so that a crash never leaves half of one: the single atomic writer every verb uses.

A file (or folder) is written under a temporary name in the same folder, flushed to disk, given the
permissions an ordinary `open()` would have given it (the umask, not mkstemp's private 0600), and only
then renamed to its real name. A reader sees the old file or the new one, never a mix. Also here: JSON
and JSON-lines helpers built on it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

from chattune.errors import StorageError

# The umask at import: the fallback where the kernel does not show it (reading it with os.umask means changing
# it for a moment, which is not thread-safe; imports happen before threads start).
_UMASK = os.umask(0)
os.umask(_UMASK)


def umask() -> int:
    """The process's umask now, read without changing it (Linux's /proc/self/status; else the one at import)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _UMASK


def file_mode() -> int:
    """The permissions open() would give a new file now (0o644 under the usual umask 022)."""
    return 0o666 & ~umask()


def dir_mode() -> int:
    """The permissions mkdir() would give a new folder now (0o755 under the usual umask 022)."""
    return 0o777 & ~umask()


def fsync_file(path: Path) -> None:
    """Flush one file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename inside it) to disk, where the filesystem allows it."""
    try:
        fsync_file(path)
    except OSError:  # not every filesystem lets a folder be fsynced
        pass


def fsync_tree(path: Path) -> None:
    """Flush every file under a folder."""
    for p in path.rglob("*"):
        if p.is_file():
            fsync_file(p)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds it is flushed and renamed to `path`.

    When the block raises, the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fsync_file(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """open() for writing that publishes the file only when the block succeeds ('w' is UTF-8 text, 'wb' bytes)."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f


def write_text(path: str | Path, text: str) -> None:
    """Write a UTF-8 text file atomically."""
    with atomic_open(path) as f:
        f.write(text)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write a binary file atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON (UTF-8, indented) atomically."""
    write_text(path, json.dumps(data, ensure_ascii=False, indent=2) + "\n")


def write_jsonl(path: str | Path, rows: Any) -> None:
    """Write JSON lines atomically (the whole file at once)."""
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def append_jsonl(path: str | Path, row: dict[str, Any]) -> None:
    """Append one JSON line and flush it, so a crash loses at most the line being written."""
    with Path(path).open("a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a JSON-lines file (empty list when missing)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `dest`; when the block succeeds it replaces `dest` whole.

    Files are flushed and given ordinary permissions first; an existing `dest` is removed only after the
    new folder is in place. When the block raises, `dest` is untouched and the temporary folder removed.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        _ordinary_permissions(tmp)
        _swap(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap(new: Path, dest: Path) -> None:
    """Put folder `new` in place of `dest`; if that fails, the old `dest` goes back under its name."""
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.replace(dest, old / dest.name)
    try:
        os.replace(new, dest)
    except BaseException:
        if old is not None:
            os.replace(old / dest.name, dest)
            shutil.rmtree(old, ignore_errors=True)
        raise
    fsync_dir(dest.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _ordinary_permissions(folder: Path) -> None:
    # mkdtemp and mkstemp make private entries (0700/0600); a run's files should be readable as usual.
    files, dirs = file_mode(), dir_mode()
    os.chmod(folder, dirs)
    for p in folder.rglob("*"):
        os.chmod(p, dirs if p.is_dir() else files)


# ---------------------------------------------------------------------------
# a write that failed because of the disk, told as one paragraph

FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # no space left, quota exceeded, file too large
DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}  # not writable, read-only filesystem


def tree_size(path: str | Path) -> int:
    """Bytes of a file, or of every file under a folder (0 when missing)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def free_bytes(path: str | Path) -> int | None:
    """Free space on the filesystem holding `path` (its nearest existing parent), None when unknown."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def storage_error(exc: BaseException, *, path: str | Path | None = None, needed: int | None = None,
                  kept: str | None = None) -> StorageError | None:
    """The one-paragraph error for a write that failed for lack of space or permission; None for other errors.

    path: what was being written (else the exception's own file name); needed: an estimate of the bytes the
    write needs; kept: what is still intact and how to continue (e.g. the last checkpoint and the resume command).
    """
    if not isinstance(exc, OSError) or exc.errno not in FULL | DENIED:
        return None
    target = Path(exc.filename or path or ".")
    where = str(exc.filename or path or "writing a file")
    if exc.errno in FULL:
        free = free_bytes(target)
        size = f"about {human_bytes(needed)} needed" if needed else "the size of the write is unknown"
        what = (f"cannot write it: {os.strerror(exc.errno).lower()} ({size}"
                + (f", {human_bytes(free)} free there" if free is not None else "") + ")")
        fix = "free some space on that disk, or choose an output folder on another disk"
    else:
        folder = target if target.is_dir() else target.parent
        what = f"cannot write it: {os.strerror(exc.errno).lower()}"
        fix = (f"make {folder} writable for this user (e.g. chmod u+w {folder}), or choose an output folder you "
               "can write to")
    if kept:
        fix += f"; {kept}"
    return StorageError(what, where=where, fix=fix)
