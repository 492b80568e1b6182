"""What `chattune data check` finds in the data, as numbers: files read, invalid rows, duplicates, token lengths, label masks.

Pure analysis: the caller loads the tokenizer (model.load) and draws figures (report.plots); nothing here prints.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from chattune.config import RunConfig
from chattune.data.formats import Conversation, detect_format, to_conversation
from chattune.data.preference import to_pair
from chattune.data.render import IGNORE, ChatRenderer, RenderStats, Sample, render_all
from chattune.data.stream import BadRecord, Record, iter_records
from chattune.errors import DataError

@dataclass
class FileReport:
    """One data file: records read, usable, invalid; or why it could not be read at all."""

    path: str
    role: str
    rows: int = 0
    valid: int = 0
    invalid: list[tuple[str, str]] = field(default_factory=list)
    error: str | None = None


@dataclass
class LengthStats:
    """Token counts per sample before max_length: all tokens, prompt tokens, supervised (answer) tokens."""

    total: list[int]
    prompt: list[int]
    supervised: list[int]

    def percentiles(self) -> dict[str, dict[str, float]]:
        """min / mean / p50 / p90 / p99 / max of each count."""
        return {name: summary(values) for name, values in asdict(self).items()}


@dataclass
class CheckReport:
    """Everything `data check` found; written to check.json."""

    files: list[FileReport]
    conversations: int
    duplicates: list[list[str]]
    conflicts: list[list[str]]
    max_length: int
    overlength: str
    render: dict[str, Any]
    lengths: dict[str, dict[str, float]]
    lost_response_samples: int
    lost_response_tokens: int
    histogram: list[tuple[int, int, int]]
    # The same bins split by what max_length does to each sample: (low, high, kept whole, truncated, dropped).
    fates: list[tuple[int, int, int, int, int]] = field(default_factory=list)
    model: str = ""  # whose tokenizer and template the lengths are counted with
    png: str | None = None


@dataclass
class Rendered:
    """The conversations rendered twice: whole (for the lengths) and as training will cut them (for the counts)."""

    full: list[Sample]
    stats: RenderStats
    lengths: LengthStats


def render_both(renderer: ChatRenderer, conversations: Sequence[Conversation], cfg: RunConfig) -> Rendered:
    """Render without a length limit and with data.max_length / data.overlength, as training would."""
    d = cfg.data
    train_on = d.train_on if cfg.train.method == "sft" else "last_assistant"  # preference: each side's answer only
    full, _ = render_all(renderer, conversations, max_length=1 << 62, train_on=train_on)
    _, stats = render_all(renderer, conversations, max_length=d.max_length, overlength=d.overlength, train_on=train_on)
    return Rendered(full, stats, sample_lengths(full))


def build_report(cfg: RunConfig, files: list[FileReport], conversations: Sequence[Conversation], rendered: Rendered,
                 bins: int) -> CheckReport:
    """Every number of the check in one CheckReport (the png is added once it is drawn)."""
    d = cfg.data
    duplicates, conflicts = find_duplicates(conversations)
    if cfg.train.method != "sft":
        conflicts = []  # every pair answers one prompt twice, on purpose
    lost_samples, lost_tokens = lost_response(rendered.full, d.max_length) if d.overlength == "truncate" else (0, 0)
    return CheckReport(files=files, conversations=len(conversations), duplicates=duplicates, conflicts=conflicts,
                       max_length=d.max_length, overlength=d.overlength, render=asdict(rendered.stats),
                       lengths=rendered.lengths.percentiles(), lost_response_samples=lost_samples,
                       lost_response_tokens=lost_tokens, histogram=histogram(rendered.lengths.total, bins),
                       fates=fate_histogram(rendered.full, d.max_length, d.overlength, bins),
                       model=cfg.model.name_or_path)


# ---------------------------------------------------------------------------
# reading


def scan_files(cfg: RunConfig) -> tuple[list[FileReport], list[Conversation]]:
    """Read every train and eval file record by record, keeping the good ones and noting each bad one."""
    files: list[FileReport] = []
    conversations = list(iter_conversations(cfg, files))
    return files, conversations


def iter_conversations(cfg: RunConfig, files: list[FileReport]) -> Iterator[Conversation]:
    """The training conversations, one at a time in file order; appends each file's FileReport (eval files too).

    A preference pair gives two conversations, chosen then rejected. Reading stops at data.limit, as training does.
    """
    d = cfg.data
    kept = 0
    for role, paths in (("train", d.train_paths), ("eval", d.eval)):
        for path in paths:
            rep = FileReport(path=str(path), role=role)
            files.append(rep)
            fmt = None if d.format == "auto" else d.format
            try:
                for rec in iter_records(path):
                    if role == "train" and d.limit and kept >= d.limit:
                        break  # training reads no further (data.limit)
                    fmt, convs = _convert(cfg, rep, rec, fmt)
                    if role == "train":
                        kept += len(convs)
                        yield from convs
            except DataError as exc:
                rep.error = exc.render()


def _convert(cfg: RunConfig, rep: FileReport, rec: Record | BadRecord,
             fmt: str | None) -> tuple[str | None, list[Conversation]]:
    """(the file's format once known, the record's conversations); an invalid record is noted in rep."""
    d = cfg.data
    rep.rows += 1
    if isinstance(rec, BadRecord):
        rep.invalid.append((rec.where, rec.reason))
        return fmt, []
    try:
        if cfg.train.method != "sft":  # a preference pair: both sides, chosen first
            pair = to_pair(rec.data, rec.where, system=d.system)
            convs = [pair.side("chosen"), pair.side("rejected")]
        else:
            fmt = fmt or detect_format(rec.data, rec.where)
            convs = [to_conversation(rec.data, rec.where, fmt, system=d.system, instruction_as=d.instruction_as)]
    except DataError as exc:
        rep.invalid.append((rec.where, exc.what))
        return fmt, []
    rep.valid += 1
    return fmt, convs


def find_duplicates(conversations: Sequence[Conversation]) -> tuple[list[list[str]], list[list[str]]]:
    """(groups of identical conversations, groups with the same prompt but different answers), as locations."""
    # Keyed by digests, not by the texts: the keys would otherwise hold a second copy of the whole data set.
    same: dict[bytes, list[str]] = defaultdict(list)
    prompts: dict[bytes, dict[bytes, list[str]]] = defaultdict(lambda: defaultdict(list))
    for c in conversations:
        same[_digest(c.messages)].append(c.where)
        prompts[_digest(c.prompt)][_digest(c.reference)].append(c.where)
    duplicates = [w for w in same.values() if len(w) > 1]
    conflicts = [[ws[0] for ws in answers.values()] for answers in prompts.values() if len(answers) > 1]
    return duplicates, conflicts


def _digest(value: Any) -> bytes:
    return hashlib.blake2b(json.dumps(value, ensure_ascii=False).encode(), digest_size=16).digest()


def default_out(cfg: RunConfig) -> Path:
    """runs/data_check/<run name>: beside the run directory, never inside it (train may replace that)."""
    root = Path(cfg.output_dir)
    return root.parent / "data_check" / root.name


# ---------------------------------------------------------------------------
# numbers


def sample_lengths(samples: Sequence[Sample]) -> LengthStats:
    """Total, prompt and supervised token counts of each (untruncated) sample."""
    sup = [sum(l != IGNORE for l in s.labels) for s in samples]
    total = [len(s.input_ids) for s in samples]
    return LengthStats(total=total, prompt=[t - k for t, k in zip(total, sup)], supervised=sup)


def lost_response(samples: Sequence[Sample], max_length: int) -> tuple[int, int]:
    """(samples that lose supervised tokens, supervised tokens lost) when cut at max_length."""
    lost = [sum(l != IGNORE for l in s.labels[max_length:]) for s in samples]
    return sum(1 for n in lost if n), sum(lost)


def histogram(values: Sequence[int] | np.ndarray, bins: int) -> list[tuple[int, int, int]]:
    """Equal-width bins as (low, high, count), high exclusive; widths rounded to whole tokens."""
    v = np.asarray(values, dtype=np.int64)
    if not v.size:
        return []
    lo, hi = int(v.min()), int(v.max())
    width = max(1, -(-(hi - lo + 1) // bins))
    counts = np.bincount((v - lo) // width, minlength=-(-(hi - lo + 1) // width))
    return [(lo + i * width, lo + (i + 1) * width, int(c)) for i, c in enumerate(counts)]


def fate(sample: Sample, max_length: int, overlength: str) -> str:
    """What training does with an (untruncated) sample: "kept" whole, "truncated" to max_length, or "dropped"."""
    if len(sample.input_ids) <= max_length:
        return "kept"
    first = next((i for i, l in enumerate(sample.labels) if l != IGNORE), len(sample.labels))
    if overlength == "drop" or first >= max_length:  # cut to max_length nothing of the answer would be left
        return "dropped"
    return "truncated"


def fate_histogram(samples: Sequence[Sample], max_length: int, overlength: str,
                   bins: int) -> list[tuple[int, int, int, int, int]]:
    """histogram()'s bins of whole-sample lengths, each count split into (kept whole, truncated, dropped)."""
    total = np.array([len(s.input_ids) for s in samples], dtype=np.int64)
    first = np.array([next((i for i, l in enumerate(s.labels) if l != IGNORE), len(s.labels)) for s in samples],
                     dtype=np.int64)
    return fates_of(total, first, max_length, overlength, bins)


def fates_of(total: np.ndarray, first: np.ndarray, max_length: int, overlength: str,
             bins: int) -> list[tuple[int, int, int, int, int]]:
    """fate_histogram from each sample's length and first supervised position (fate()'s rule, on arrays)."""
    hist = histogram(total, bins)
    if not hist:
        return []
    lo, width = hist[0][0], hist[0][1] - hist[0][0]
    kept = total <= max_length
    dropped = dropped_at(total, first, max_length, overlength)
    binned = (total - lo) // width
    split = [np.bincount(binned[mask], minlength=len(hist)) for mask in (kept, ~kept & ~dropped, dropped)]
    return [(a, b, int(k), int(t), int(d)) for (a, b, _), k, t, d in zip(hist, *split)]


def dropped_at(total: np.ndarray, first: np.ndarray, max_length: int, overlength: str) -> np.ndarray:
    """Per sample, from its length and first supervised position: whether training drops it (fate() == "dropped")."""
    return (total > max_length) & ((first >= max_length) | (overlength == "drop"))


def summary(values: Sequence[int] | np.ndarray) -> dict[str, float]:
    """min / mean / p50 / p90 / p99 / max of the values ({} for none)."""
    s = np.sort(np.asarray(values, dtype=np.int64))
    if not s.size:
        return {}

    def pct(p: float) -> int:
        return int(s[min(len(s) - 1, int(p / 100 * len(s)))])

    return {"min": int(s[0]), "mean": round(int(s.sum()) / len(s), 1), "p50": pct(50), "p90": pct(90), "p99": pct(99),
            "max": int(s[-1])}


# ---------------------------------------------------------------------------
# the label mask, as runs of tokens


@dataclass
class Segment:
    """A run of tokens with one label status: its text, whether it is supervised, cut by max_length, or elided."""

    text: str
    supervised: bool
    cut: bool = False
    elided: bool = False


def mask_segments(tokenizer: Any, sample: Sample, max_length: int, edge: int | None = None) -> list[Segment]:
    """The sample as runs of tokens with one label status, decoded without hiding special tokens.

    With edge, a long sample keeps its first and last `edge` tokens and one elided Segment stands for the middle.
    """
    ids, labels = sample.input_ids, sample.labels
    n = len(ids)
    clip = edge is not None and n > 2 * edge
    bounds = {max_length, *((edge, n - edge) if clip else ())}
    out: list[Segment] = []
    start = 0
    for i in range(1, n + 1):
        if i < n and (labels[i] != IGNORE) == (labels[start] != IGNORE) and i not in bounds:
            continue
        if clip and edge <= start < n - edge:
            if not out or not out[-1].elided:
                out.append(Segment(f" [… {n - 2 * edge} tokens …] ", False, elided=True))
        else:
            out.append(Segment(tokenizer.decode(ids[start:i], skip_special_tokens=False), labels[start] != IGNORE,
                               cut=start >= max_length))
        start = i
    return out
