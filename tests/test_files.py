"""files.py, the one atomic writer: a file or folder appears whole or not at all, with ordinary permissions."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from chattune import files


class Boom(Exception):
    pass


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def leftovers(folder: Path) -> list[str]:
    """Temporary names the writer leaves behind (they all start with a dot)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it after."""
    old = os.umask(0o022)
    os.umask(old)

    def set_(value: int) -> None:
        os.umask(value)

    yield set_
    os.umask(old)


def test_a_file_appears_only_whole(tmp_path):
    path = tmp_path / "out.txt"
    files.write_text(path, "old\n")
    with pytest.raises(Boom):
        with files.atomic_open(path) as f:
            f.write("half of the new")
            assert path.read_text() == "old\n", "nothing is visible under the real name while writing"
            raise Boom
    assert path.read_text() == "old\n", "a failure inside the block keeps the old content"
    assert leftovers(tmp_path) == [], "and removes the temporary file"
    with files.atomic_open(path) as f:
        f.write("new\n")
    assert path.read_text() == "new\n" and leftovers(tmp_path) == []


def test_a_failure_before_the_first_write_creates_nothing(tmp_path):
    path = tmp_path / "sub" / "never.bin"
    with pytest.raises(Boom):
        with files.atomic_path(path):
            raise Boom
    assert not path.exists() and leftovers(path.parent) == []


@pytest.mark.parametrize("mask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750), (0o002, 0o664, 0o775)])
def test_permissions_follow_the_umask_not_mkstemps_0600(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)  # set after chattune.files was imported: the writer reads it when it writes
    files.write_bytes(tmp_path / "a.bin", b"\x00\x01")
    files.write_json(tmp_path / "a.json", {"k": 1})
    with files.atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "inner").mkdir()
        (tmp / "inner" / "w.txt").write_text("x")
    assert mode(tmp_path / "a.bin") == file_mode
    assert mode(tmp_path / "a.json") == file_mode
    assert mode(tmp_path / "folder") == dir_mode
    assert mode(tmp_path / "folder" / "inner") == dir_mode
    assert mode(tmp_path / "folder" / "inner" / "w.txt") == file_mode
    # The same as an ordinary open() and mkdir() under this umask.
    (tmp_path / "plain.txt").write_text("x")
    (tmp_path / "plain").mkdir()
    assert mode(tmp_path / "plain.txt") == file_mode and mode(tmp_path / "plain") == dir_mode


def test_atomic_dir_replaces_an_existing_folder_whole(tmp_path):
    dest = tmp_path / "model"
    with files.atomic_dir(dest) as tmp:
        (tmp / "old.txt").write_text("old")
        (tmp / "shared.txt").write_text("old")
    with files.atomic_dir(dest) as tmp:
        assert (dest / "old.txt").read_text() == "old", "the old folder stays in place while the new one is written"
        (tmp / "shared.txt").write_text("new")
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in dest.iterdir()) == ["new.txt", "shared.txt"], "nothing of the old folder survives"
    assert (dest / "shared.txt").read_text() == "new"
    assert leftovers(tmp_path) == []


def test_atomic_dir_keeps_the_old_folder_when_the_block_fails(tmp_path):
    dest = tmp_path / "model"
    with files.atomic_dir(dest) as tmp:
        (tmp / "a.txt").write_text("a")
    with pytest.raises(Boom):
        with files.atomic_dir(dest) as tmp:
            (tmp / "b.txt").write_text("b")
            raise Boom
    assert sorted(p.name for p in dest.iterdir()) == ["a.txt"] and leftovers(tmp_path) == []


def test_atomic_dir_puts_the_old_folder_back_when_the_swap_fails(tmp_path, monkeypatch):
    dest = tmp_path / "model"
    with files.atomic_dir(dest) as tmp:
        (tmp / "a.txt").write_text("a")
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name.startswith(".model.tmp-"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(OSError):
        with files.atomic_dir(dest) as tmp:
            (tmp / "b.txt").write_text("b")
    assert sorted(p.name for p in dest.iterdir()) == ["a.txt"], "the old folder is back under its name"
    assert leftovers(tmp_path) == []


def test_jsonl_append_and_read_round_trip(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert files.read_jsonl(path) == [], "a missing file has no rows"
    rows = [{"step": 1, "loss": 2.5}, {"step": 2, "text": "你好\nworld"}, {"nested": {"a": [1, None, True]}}]
    for row in rows:
        files.append_jsonl(path, row)
    assert files.read_jsonl(path) == rows
    assert len(path.read_text(encoding="utf-8").splitlines()) == 3, "one line per row, newlines inside text escaped"
    assert "你好" in path.read_text(encoding="utf-8"), "written as UTF-8, not \\u escapes"
    files.write_jsonl(tmp_path / "whole.jsonl", rows)
    assert files.read_jsonl(tmp_path / "whole.jsonl") == rows


def test_write_json_is_readable_json(tmp_path):
    data = {"a": [1, 2], "b": "ü"}
    files.write_json(tmp_path / "x.json", data)
    assert json.loads((tmp_path / "x.json").read_text(encoding="utf-8")) == data
