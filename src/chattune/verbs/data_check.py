"""`chattune data check CONFIG`: look at the data as training will see it, before spending GPU hours on it.

Reads the config's data files with the same loaders and renderer training uses,
and reports: rows per file, every invalid row with its location, duplicates,
token lengths (statistics, a terminal histogram and a PNG), what max_length
will cut (samples truncated, response tokens and end-of-turn tokens lost), and
a coloured preview of the label mask (which tokens the loss is computed on).
The numbers come from data/check.py, the terminal output from report/check_view.py.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from rich.console import Console

from chattune.config import RunConfig
from chattune.data.check import CheckReport, Rendered, build_report, default_out, render_both, scan_files
from chattune.data.render import ChatRenderer
from chattune.errors import ChattuneError, DataError
from chattune.files import write_json
from chattune.model.load import load_tokenizer
from chattune.model.sources import resolve_model_dir
from chattune.report import check_view as view
from chattune.report.plots import length_histogram_png
from chattune.train.planner import DataSize, make_plan

log = logging.getLogger("chattune")


def run(cfg: RunConfig, *, preview: int = 2, out: str | Path | None = None, bins: int = 16) -> CheckReport:
    """Check cfg's training (and eval) data with cfg's tokenizer, template and max_length; print and save the findings."""
    console = Console(highlight=False)
    d = cfg.data
    files, conversations = scan_files(cfg)
    view.show_files(console, files)
    if not conversations:
        raise DataError("no usable records in the training data", where=", ".join(d.train),
                        fix="fix the rows listed above, or check data.format and the column names "
                            "(`chattune data convert --map` renames them)")
    renderer = load_renderer(cfg)
    rendered = render_both(renderer, conversations, cfg)
    report = build_report(cfg, files, conversations, rendered, bins)
    out_dir = Path(out) if out else default_out(cfg)
    view.show_duplicates(console, report.duplicates, report.conflicts)
    view.show_lengths(console, report, rendered.stats, sum(rendered.lengths.supervised))
    view.show_histogram(console, report.histogram, d.max_length)
    report.png = _try_png(rendered.lengths.total, d.max_length, out_dir / "token_lengths.png", len(rendered.full))
    if preview:
        view.show_previews(console, renderer, rendered.full[:preview], d.max_length)
    write_json(out_dir / "check.json", asdict(report))
    console.print(f"\nsaved: {out_dir / 'check.json'}" + (f", {report.png}" if report.png else ""), markup=False)
    verdict(report, cfg)
    _plan_headline(cfg, rendered)
    return report


def load_renderer(cfg: RunConfig) -> ChatRenderer:
    """The tokenizer and chat template training would use."""
    m = cfg.model
    model_dir = resolve_model_dir(m.name_or_path, source=m.source, revision=m.revision, trust_remote_code=m.trust_remote_code)
    return ChatRenderer(load_tokenizer(model_dir, m), cfg.data.template_kwargs)


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


def _plan_headline(cfg: RunConfig, rendered: Rendered) -> None:
    """One line of `chattune plan`: peak memory and time per epoch for these samples on this machine."""
    d = cfg.data
    try:
        plan = make_plan(cfg, DataSize.from_samples(rendered.full, d.max_length, d.overlength))
    except ChattuneError as exc:  # the data is fine; only the estimate could not be made
        log.warning("no memory plan: %s", exc.what)
        return
    print(plan.headline())


def _try_png(lengths: Sequence[int], max_length: int, path: Path, n: int) -> str | None:
    try:
        length_histogram_png(lengths, max_length, path, title=f"tokens per sample ({n} samples)")
    except ImportError as exc:  # the report extra (matplotlib) is optional
        log.warning("no PNG: %s", exc)
        return None
    return str(path)
