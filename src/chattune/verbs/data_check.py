"""`chattune data check CONFIG`: look at the data as training will see it, before spending GPU hours on it.

Reads the config's data files with the same loaders and renderer training uses,
and reports: rows per file, every invalid row with its location, duplicates,
token lengths (statistics, a terminal histogram and a PNG), what max_length
will cut (samples truncated, response tokens and end-of-turn tokens lost), and
a coloured preview of the label mask (which tokens the loss is computed on).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from chattune.config import RunConfig
from chattune.data.formats import Conversation, detect_format, to_conversation
from chattune.data.render import IGNORE, ChatRenderer, RenderStats, Sample, render_all
from chattune.data.stream import BadRecord, iter_records
from chattune.errors import DataError
from chattune.files import write_json

log = logging.getLogger("chattune")

SHOWN_INVALID = 10
PREVIEW_EDGE = 384  # tokens shown at each end of a long previewed sample


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
        return {name: _summary(values) for name, values in asdict(self).items()}


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
    png: str | None = None


def run(cfg: RunConfig, *, preview: int = 2, out: str | Path | None = None, bins: int = 16) -> CheckReport:
    """Check cfg's training (and eval) data with cfg's tokenizer, template and max_length; print and save the findings."""
    from rich.console import Console

    console = Console(highlight=False)
    d = cfg.data
    files, conversations = scan_files(cfg)
    show_files(console, files)
    if not conversations:
        raise DataError("no usable records in the training data", where=", ".join(d.train),
                        fix="fix the rows listed above, or check data.format and the column names "
                            "(`chattune data convert --map` renames them)")
    duplicates, conflicts = find_duplicates(conversations)
    renderer = load_renderer(cfg)
    full, _ = render_all(renderer, conversations, max_length=1 << 62, train_on=d.train_on)
    _, stats = render_all(renderer, conversations, max_length=d.max_length, overlength=d.overlength, train_on=d.train_on)
    lengths = sample_lengths(full)
    lost_samples, lost_tokens = lost_response(full, d.max_length) if d.overlength == "truncate" else (0, 0)
    hist = histogram(lengths.total, bins)
    out_dir = Path(out) if out else default_out(cfg)
    report = CheckReport(files=files, conversations=len(conversations), duplicates=duplicates, conflicts=conflicts,
                         max_length=d.max_length, overlength=d.overlength, render=asdict(stats),
                         lengths=lengths.percentiles(), lost_response_samples=lost_samples,
                         lost_response_tokens=lost_tokens, histogram=hist)
    show_duplicates(console, duplicates, conflicts)
    show_lengths(console, report, stats, sum(lengths.supervised))
    show_histogram(console, hist, d.max_length)
    report.png = _try_png(lengths.total, d.max_length, out_dir / "token_lengths.png", len(full))
    if preview:
        show_previews(console, renderer, full[:preview], d.max_length)
    write_json(out_dir / "check.json", asdict(report))
    console.print(f"\nsaved: {out_dir / 'check.json'}" + (f", {report.png}" if report.png else ""), markup=False)
    verdict(report, cfg)
    return report


# ---------------------------------------------------------------------------
# reading


def scan_files(cfg: RunConfig) -> tuple[list[FileReport], list[Conversation]]:
    """Read every train and eval file record by record, keeping the good ones and noting each bad one."""
    d = cfg.data
    files: list[FileReport] = []
    conversations: list[Conversation] = []
    for role, paths in (("train", d.train), ("eval", d.eval)):
        for path in paths:
            rep = FileReport(path=str(path), role=role)
            files.append(rep)
            fmt = None if d.format == "auto" else d.format
            try:
                for rec in iter_records(path):
                    if role == "train" and d.limit and len(conversations) >= d.limit:
                        break  # training reads no further (data.limit)
                    rep.rows += 1
                    if isinstance(rec, BadRecord):
                        rep.invalid.append((rec.where, rec.reason))
                        continue
                    try:
                        fmt = fmt or detect_format(rec.data, rec.where)
                        conv = to_conversation(rec.data, rec.where, fmt, system=d.system, instruction_as=d.instruction_as)
                    except DataError as exc:
                        rep.invalid.append((rec.where, exc.what))
                        continue
                    rep.valid += 1
                    if role == "train":
                        conversations.append(conv)
            except DataError as exc:
                rep.error = exc.render()
    return files, conversations


def find_duplicates(conversations: Sequence[Conversation]) -> tuple[list[list[str]], list[list[str]]]:
    """(groups of identical conversations, groups with the same prompt but different answers), as locations."""
    same: dict[str, list[str]] = defaultdict(list)
    prompts: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for c in conversations:
        same[json.dumps(c.messages, ensure_ascii=False)].append(c.where)
        prompts[json.dumps(c.prompt, ensure_ascii=False)][c.reference].append(c.where)
    duplicates = [w for w in same.values() if len(w) > 1]
    conflicts = [[ws[0] for ws in answers.values()] for answers in prompts.values() if len(answers) > 1]
    return duplicates, conflicts


def load_renderer(cfg: RunConfig) -> ChatRenderer:
    """The tokenizer and chat template training would use."""
    from chattune.model.load import load_tokenizer
    from chattune.model.sources import resolve_model_dir

    m = cfg.model
    model_dir = resolve_model_dir(m.name_or_path, source=m.source, revision=m.revision, trust_remote_code=m.trust_remote_code)
    return ChatRenderer(load_tokenizer(model_dir, m), cfg.data.template_kwargs)


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


def histogram(values: Sequence[int], bins: int) -> list[tuple[int, int, int]]:
    """Equal-width bins as (low, high, count), high exclusive; widths rounded to whole tokens."""
    if not values:
        return []
    lo, hi = min(values), max(values)
    width = max(1, -(-(hi - lo + 1) // bins))
    counts = [0] * (-(-(hi - lo + 1) // width))
    for v in values:
        counts[(v - lo) // width] += 1
    return [(lo + i * width, lo + (i + 1) * width, c) for i, c in enumerate(counts)]


def _summary(values: Sequence[int]) -> dict[str, float]:
    if not values:
        return {}
    s = sorted(values)

    def pct(p: float) -> int:
        return s[min(len(s) - 1, int(p / 100 * len(s)))]

    return {"min": s[0], "mean": round(sum(s) / len(s), 1), "p50": pct(50), "p90": pct(90), "p99": pct(99), "max": s[-1]}


# ---------------------------------------------------------------------------
# the terminal


def show_files(console: Any, files: Sequence[FileReport]) -> None:
    """Rows per file, then the first invalid rows with their locations and reasons."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="data files")
    for col in ("file", "role", "rows", "usable", "invalid"):
        table.add_column(col, justify="left" if col in ("file", "role") else "right")
    for f in files:
        if f.error:
            table.add_row(escape(f.path), f.role, "-", "-", "[red]unreadable[/]")
        else:
            table.add_row(escape(f.path), f.role, str(f.rows), str(f.valid), f"[red]{len(f.invalid)}[/]" if f.invalid else "0")
    console.print(table)
    for f in files:
        if f.error:
            console.print(f"[red]cannot read[/] {escape(f.error)}")
    invalid = [i for f in files for i in f.invalid]
    if invalid:
        console.print(f"[red]{len(invalid)} invalid row(s)[/] (all in check.json):")
        for where, reason in invalid[:SHOWN_INVALID]:
            console.print(f"  {where}: {reason}", markup=False)
        if len(invalid) > SHOWN_INVALID:
            console.print(f"  ... and {len(invalid) - SHOWN_INVALID} more")


def show_duplicates(console: Any, duplicates: list[list[str]], conflicts: list[list[str]]) -> None:
    """Identical conversations and prompts answered differently, with a few locations."""
    from rich.markup import escape

    duplicates = [[escape(w) for w in g] for g in duplicates]
    conflicts = [[escape(w) for w in g] for g in conflicts]
    extra = sum(len(g) - 1 for g in duplicates)
    if duplicates:
        console.print(f"[yellow]{extra} duplicate conversation(s)[/] in {len(duplicates)} group(s), e.g. "
                      + "; ".join(" = ".join(g[:3]) for g in duplicates[:3]))
    else:
        console.print("duplicates: none")
    if conflicts:
        console.print(f"[yellow]{len(conflicts)} prompt(s) with different answers[/], e.g. "
                      + "; ".join(" vs ".join(g[:3]) for g in conflicts[:3]))


def show_lengths(console: Any, report: CheckReport, stats: RenderStats, supervised_total: int) -> None:
    """Length statistics and what max_length does to the samples."""
    from rich.table import Table

    table = Table(title=f"tokens per sample ({stats.samples + stats.dropped_overlength + stats.dropped_no_labels} samples "
                        f"from {report.conversations} conversations, before max_length)")
    keys = ("min", "mean", "p50", "p90", "p99", "max")
    table.add_column("")
    for k in keys:
        table.add_column(k, justify="right")
    for name, label in (("total", "whole sample"), ("prompt", "prompt (ignored)"), ("supervised", "answer (supervised)")):
        table.add_row(label, *(f"{report.lengths[name].get(k, 0):g}" for k in keys))
    console.print(table)
    m = report.max_length
    if stats.split_per_turn:
        console.print(f"{stats.split_per_turn} multi-turn conversation(s) become one sample per assistant turn "
                      "(the template renders history differently from the last turn)")
    if report.overlength == "drop":
        console.print(f"max_length={m}, overlength=drop: [{'red' if stats.dropped_overlength else 'green'}]"
                      f"{stats.dropped_overlength} sample(s) dropped[/]")
    else:
        colour = "red" if stats.truncated else "green"
        pct = 100 * report.lost_response_tokens / max(supervised_total, 1)
        console.print(f"max_length={m}: [{colour}]{stats.truncated} sample(s) truncated[/]; "
                      f"{report.lost_response_samples} lose response tokens ({report.lost_response_tokens} tokens, "
                      f"{pct:.1f}% of all supervised tokens), [{colour}]{stats.lost_end_of_turn} lose the end-of-turn "
                      f"token[/] (the model would not learn to stop on them)")
    if stats.dropped_no_labels:
        console.print(f"[red]{stats.dropped_no_labels} sample(s) dropped[/]: the prompt alone fills max_length={m}")
    for line in stats.summary(m):
        log.debug("render: %s", line)


def show_histogram(console: Any, hist: list[tuple[int, int, int]], max_length: int, width: int = 40) -> None:
    """A horizontal bar per bin; bins past max_length in red."""
    if not hist:
        return
    top = max(c for _, _, c in hist)
    console.print("\ntoken length histogram (whole sample):")
    for lo, hi, c in hist:
        bar = "█" * round(width * c / top) if c else ""
        colour = "red" if hi - 1 > max_length else "cyan"
        console.print(f"  {lo:>6}–{hi - 1:<6} [{colour}]{bar:<{width}}[/] {c}")
    console.print(f"  [red]red[/]: longer than max_length={max_length}")


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


def show_previews(console: Any, renderer: ChatRenderer, samples: Sequence[Sample], max_length: int) -> None:
    """Each sample's text with supervised tokens in green and ignored ones dimmed; what max_length cuts struck out."""
    from rich.markup import escape
    from rich.text import Text

    legend = Text("\nlabel mask: ")
    legend.append("supervised (the loss is computed here)", style="bold black on green")
    legend.append("  ")
    legend.append("ignored (prompt, -100)", style="dim")
    legend.append("  ")
    legend.append("cut by max_length", style="strike red")
    console.print(legend)
    for k, s in enumerate(samples):
        text = Text()
        for seg in mask_segments(renderer.tokenizer, s, max_length, edge=PREVIEW_EDGE):
            style = ("italic yellow" if seg.elided else "strike red" if seg.cut
                     else "bold black on green" if seg.supervised else "dim")
            text.append(seg.text, style=style)
        n_sup = sum(l != IGNORE for l in s.labels)
        console.rule(f"sample {k + 1}: {escape(s.where)} · {len(s.input_ids)} tokens, {n_sup} supervised")
        console.print(text)
        if len(s.input_ids) > max_length:
            console.print(f"[red]✂ cut at max_length={max_length}: {len(s.input_ids) - max_length} tokens lost[/]")


def verdict(report: CheckReport, cfg: RunConfig) -> None:
    """Fail (exit 2) when training on this data would stop; otherwise say it would run."""
    unreadable = [f for f in report.files if f.error]
    if unreadable:
        raise DataError(f"{len(unreadable)} file(s) cannot be read; training would stop", where=unreadable[0].path,
                        fix=unreadable[0].error or "")
    invalid = [i for f in report.files for i in f.invalid]
    if invalid and cfg.data.on_bad_record == "error":
        where, reason = invalid[0]
        raise DataError(f"{len(invalid)} invalid row(s); training would stop at the first: {reason}", where=where,
                        fix="fix the rows listed above, or set data.on_bad_record=skip to train without them")
    if report.render["samples"] == 0:
        raise DataError("no training samples left after max_length", where="data.max_length",
                        fix="raise data.max_length or set data.overlength=truncate")
    print(f"ok: training would use {report.render['samples']} samples"
          + (f" ({len(invalid)} invalid row(s) skipped)" if invalid else ""))


def _try_png(lengths: Sequence[int], max_length: int, path: Path, n: int) -> str | None:
    try:
        from chattune.report.plots import length_histogram_png
    except ImportError:  # the report extra (matplotlib) is optional
        return None
    try:
        length_histogram_png(lengths, max_length, path, title=f"tokens per sample ({n} samples)")
    except ImportError as exc:
        log.warning("no PNG: %s", exc)
        return None
    return str(path)
