"""`data check` on files of any size: the data streamed through in chunks, kept only as running numbers.

Two passes over the files, neither holding the rows. The scan reads every record, notes the invalid ones
and keeps a 16-byte digest per conversation (for duplicates). The render pass, once per tokenizer, renders
RENDER_CHUNK conversations at a time and keeps four integers per sample (length, supervised tokens, first
supervised position, supervised tokens past max_length) and the RenderStats training would count; the
rendered chunk is then dropped. Memory grows by about 100 bytes per row, whatever the rows' length
(docs/reliability.md has the measurement). The numbers are those of check.py's in-memory functions.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from array import array
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np

from chattune.config import RunConfig
from chattune.data.check import (CheckReport, FileReport, dropped_at, fates_of, histogram, iter_conversations,
                                 summary)
from chattune.data.formats import Conversation
from chattune.data.render import IGNORE, RENDER_CHUNK, ChatRenderer, RenderStats, Sample, apply_max_length, merge_stats


@dataclass
class Scan:
    """The scan pass: each file's rows and problems, the number of conversations, and their digests."""

    files: list[FileReport]
    conversations: int
    digests: np.ndarray  # (conversations, 48) bytes: 16-byte digests of the whole conversation, prompt, reference


def scan(cfg: RunConfig) -> Scan:
    """Read every train and eval file record by record; keep the file reports and a digest per conversation."""
    files: list[FileReport] = []
    digests = bytearray()
    n = 0
    for conv in iter_conversations(cfg, files):
        digests += _digest(conv.messages) + _digest(conv.prompt) + _digest(conv.reference)
        n += 1
    return Scan(files, n, np.frombuffer(digests, dtype=np.uint8).reshape(n, 48))  # no copy of the digests


def _digest(value: Any) -> bytes:
    return hashlib.blake2b(json.dumps(value, ensure_ascii=False).encode(), digest_size=16).digest()


def duplicate_groups(digests: np.ndarray, *, conflicts: bool = True) -> tuple[list[list[int]], list[list[int]]]:
    """(groups of identical conversations, groups of the same prompt with different answers), as row indices.

    The same groups, in the same order, as check.find_duplicates: each group in file order, groups ordered by
    their first row; a conflict names the first row of each different answer.
    """
    n = len(digests)
    if n == 0:
        return [], []
    same = _groups(_keys(digests, 0, 16), np.arange(n))
    if not conflicts:
        return same, []
    _, first_of_pair = np.unique(_keys(digests, 16, 48), return_index=True)  # first row of each (prompt, answer)
    return same, _groups(_keys(digests[first_of_pair], 16, 32), first_of_pair)


def _keys(digests: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Bytes start:stop of each row as one fixed-width value, compared byte by byte."""
    return np.ascontiguousarray(digests[:, start:stop]).view(f"V{stop - start}").reshape(-1)


def _groups(keys: np.ndarray, rows: np.ndarray) -> list[list[int]]:
    """Rows sharing a key, for keys held by more than one row: each group sorted, groups by their first row."""
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    shared = np.flatnonzero(counts[inverse] > 1)
    if not len(shared):
        return []
    order = np.lexsort((rows[shared], inverse[shared]))
    members, owners = rows[shared][order], inverse[shared][order]
    cuts = np.flatnonzero(np.diff(owners)) + 1
    return sorted((g.tolist() for g in np.split(members, cuts)), key=lambda g: g[0])


@dataclass
class Tally:
    """The render pass's running numbers: per untruncated sample four integers and its conversation's index."""

    max_length: int
    overlength: str
    preview: int = 0  # how many first samples to keep whole, for the label-mask preview
    conversations: int = 0
    total: array = field(default_factory=lambda: array("q"))
    supervised: array = field(default_factory=lambda: array("q"))
    first: array = field(default_factory=lambda: array("q"))  # position of the first supervised token
    lost: array = field(default_factory=lambda: array("q"))  # supervised tokens at or past max_length
    row: array = field(default_factory=lambda: array("q"))  # the conversation each sample comes from
    stats: RenderStats = field(default_factory=RenderStats)  # as training counts, after max_length
    previews: list[Sample] = field(default_factory=list)

    def add(self, rendered: list[tuple[list[Sample], bool]]) -> None:
        """Count one chunk of render_many's output (conversations in file order)."""
        for k, (samples, _) in enumerate(rendered):
            for s in samples:
                labels = s.labels
                sup = len(labels) - labels.count(IGNORE)
                if sup == 0:  # dropped by training whatever max_length is, so not in the lengths either
                    continue
                self.total.append(len(s.input_ids))
                self.supervised.append(sup)
                self.first.append(next(i for i, label in enumerate(labels) if label != IGNORE))
                cut = labels[self.max_length:]
                self.lost.append(len(cut) - cut.count(IGNORE))
                self.row.append(self.conversations + k)
                if len(self.previews) < self.preview:
                    self.previews.append(s)
        _, chunk_stats = apply_max_length(rendered, len(rendered), max_length=self.max_length,
                                          overlength=self.overlength)
        self.stats = merge_stats(self.stats, chunk_stats)
        self.conversations += len(rendered)

    def arrays(self) -> dict[str, np.ndarray]:
        """The per-sample numbers as numpy arrays (no copy)."""
        names = ("total", "supervised", "first", "lost", "row")
        return {name: np.frombuffer(getattr(self, name), dtype=np.int64) for name in names}


def render_pass(cfg: RunConfig, renderer: ChatRenderer, *, preview: int = 0,
                wanted: Iterable[int] = ()) -> tuple[Tally, dict[int, str]]:
    """Render the training conversations chunk by chunk as training would; (the tally, the locations of `wanted`)."""
    d = cfg.data
    train_on = d.train_on if cfg.train.method == "sft" else "last_assistant"  # preference: each side's answer only
    tally = Tally(d.max_length, d.overlength, preview)
    wanted = set(wanted)
    wheres: dict[int, str] = {}
    for chunk in _chunks(iter_conversations(cfg, []), RENDER_CHUNK):
        for k, conv in enumerate(chunk, start=tally.conversations):
            if k in wanted:
                wheres[k] = conv.where
        tally.add(renderer.render_many(chunk, train_on=train_on))
    return tally, wheres


def _chunks(items: Iterator[Conversation], size: int) -> Iterator[list[Conversation]]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def streamed_report(cfg: RunConfig, scanned: Scan, tally: Tally, groups: tuple[list[list[int]], list[list[int]]],
                    wheres: dict[int, str], bins: int) -> CheckReport:
    """check.build_report's CheckReport, from the scan and the render pass's running numbers."""
    d = cfg.data
    a = tally.arrays()
    lost = a["lost"] if d.overlength == "truncate" else np.zeros(0, dtype=np.int64)
    duplicates, conflicts = ([[wheres[i] for i in g] for g in kind] for kind in groups)
    return CheckReport(files=scanned.files, conversations=scanned.conversations, duplicates=duplicates,
                       conflicts=conflicts, max_length=d.max_length, overlength=d.overlength,
                       render=asdict(tally.stats),
                       lengths={"total": summary(a["total"]), "prompt": summary(a["total"] - a["supervised"]),
                                "supervised": summary(a["supervised"])},
                       lost_response_samples=int(np.count_nonzero(lost)), lost_response_tokens=int(lost.sum()),
                       histogram=histogram(a["total"], bins),
                       fates=fates_of(a["total"], a["first"], d.max_length, d.overlength, bins),
                       model=cfg.model.name_or_path)


def dropped(tally: Tally) -> np.ndarray:
    """Per sample: whether training drops it at max_length (check.fate() == "dropped")."""
    a = tally.arrays()
    return dropped_at(a["total"], a["first"], tally.max_length, tally.overlength)
