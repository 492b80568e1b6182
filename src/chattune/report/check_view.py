"""`chattune data check` in the terminal: the files table, duplicates, length statistics, a histogram, label-mask previews."""

from __future__ import annotations

import logging
from typing import Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from chattune.data.check import CheckReport, FileReport, mask_segments
from chattune.data.render import IGNORE, ChatRenderer, RenderStats, Sample

log = logging.getLogger("chattune")

SHOWN_INVALID = 10
PREVIEW_EDGE = 384  # tokens shown at each end of a long previewed sample


def show_files(console: Console, files: Sequence[FileReport]) -> None:
    """Rows per file, then the first invalid rows with their locations and reasons."""
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


def show_duplicates(console: Console, duplicates: list[list[str]], conflicts: list[list[str]]) -> None:
    """Identical conversations and prompts answered differently, with a few locations."""
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


def show_lengths(console: Console, report: CheckReport, stats: RenderStats, supervised_total: int) -> None:
    """Length statistics and what max_length does to the samples."""
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


def show_histogram(console: Console, hist: list[tuple[int, int, int, int, int]], max_length: int,
                   width: int = 40, model: str = "") -> None:
    """A horizontal bar per bin, split into samples kept whole (cyan), truncated (yellow) and dropped (red)."""
    if not hist:
        return
    top = max(k + t + d for _, _, k, t, d in hist)
    console.print("\ntoken length histogram (whole sample" + (f", tokenizer of {escape(model)}" if model else "") + "):")
    for lo, hi, kept, cut, dropped in hist:
        bar = "".join(f"[{colour}]{'█' * round(width * n / top)}[/]" if n else ""
                      for colour, n in (("cyan", kept), ("yellow", cut), ("red", dropped)))
        shown = round(width * kept / top) + round(width * cut / top) + round(width * dropped / top)
        counts = f"{kept + cut + dropped}" + (f" ({cut} truncated)" if cut else "") + (f" ({dropped} dropped)" if dropped else "")
        console.print(f"  {lo:>6}–{hi - 1:<6} {bar}{' ' * max(0, width - shown)} {counts}")
    console.print(f"  [cyan]cyan[/]: kept whole, [yellow]yellow[/]: truncated to max_length={max_length}, "
                  "[red]red[/]: dropped")


def show_previews(console: Console, renderer: ChatRenderer, samples: Sequence[Sample], max_length: int) -> None:
    """Each sample's text with supervised tokens in green and ignored ones dimmed; what max_length cuts struck out."""
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
