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
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from rich.console import Console

from chattune.config import RunConfig
from chattune.data.check import CheckReport, default_out
from chattune.data.preference import check_layout
from chattune.data.render import ChatRenderer
from chattune.data.split import held_out
from chattune.data.tally import Scan, Tally, dropped, duplicate_groups, render_pass, scan, streamed_report
from chattune.errors import ChattuneError, DataError
from chattune.files import write_json
from chattune.infer.session import config_renderer
from chattune.report import check_view as view
from chattune.report.plots import length_histogram_png
from chattune.train.inputs import split_eval_data, split_probes
from chattune.train.planner import DataSize, make_plan

log = logging.getLogger("chattune")


def run(cfg: RunConfig, *, preview: int = 2, out: str | Path | None = None, bins: int = 16) -> CheckReport:
    """Check cfg's training (and eval) data with cfg's tokenizer, template and max_length; print and save the findings.

    A sweep config whose grid varies model.name_or_path is checked with each model's tokenizer and template
    (one check.json per model, in a folder named after it); the first model's report is returned.
    The files are streamed (data/tally.py): memory stays bounded whatever their size.
    """
    console = Console(highlight=False)
    d = cfg.data
    check_layout(d.train_paths, cfg.train.method)  # preference data for sft, or sft data for dpo: the layout expected
    scanned = scan(cfg)
    view.show_files(console, scanned.files)
    if not scanned.conversations:
        raise DataError("no usable records in the training data", where=", ".join(d.train_paths),
                        fix="fix the rows listed above, or check data.format and the column names "
                            "(`chattune data convert --map` renames them)")
    out_dir = Path(out) if out else default_out(cfg)
    models = sweep_models(cfg)
    trained = training_rows(cfg, scanned.conversations)
    groups = duplicate_groups(scanned.digests, conflicts=cfg.train.method == "sft")  # a pair answers twice on purpose
    reports = [check_with_model(console, cfg.model_copy(update={"model": cfg.model.model_copy(
                   update={"name_or_path": m})}), scanned, groups, trained,
                   out_dir / _slug(m) if len(models) > 1 else out_dir, preview=preview, bins=bins,
                   named=len(models) > 1) for m in models]
    return reports[0]


def check_with_model(console: Console, cfg: RunConfig, scanned: Scan, groups: tuple[list[list[int]], list[list[int]]],
                     trained: "TrainingRows", out_dir: Path, *, preview: int, bins: int, named: bool) -> CheckReport:
    """Render the data with cfg.model's tokenizer and template; print, save and judge what training would get."""
    d = cfg.data
    if named:
        console.rule(f"tokenizer and template of {cfg.model.name_or_path}")
    renderer = load_renderer(cfg)
    if cfg.train.method != "sft":  # the first pairs, chosen then rejected: both sides' supervised tokens
        preview *= 2
    tally, wheres = render_pass(cfg, renderer, preview=preview, wanted={i for kind in groups for g in kind for i in g})
    report = streamed_report(cfg, scanned, tally, groups, wheres, bins)
    lengths = tally.arrays()
    view.show_duplicates(console, report.duplicates, report.conflicts)
    view.show_lengths(console, report, tally.stats, int(lengths["supervised"].sum()))
    view.show_histogram(console, report.fates, d.max_length, model=cfg.model.name_or_path if named else "")
    report.png = _try_png(lengths["total"], d.max_length, out_dir / "token_lengths.png", len(lengths["total"]))
    if preview:
        view.show_previews(console, renderer, tally.previews, d.max_length)
    write_json(out_dir / "check.json", asdict(report))
    console.print(f"\nsaved: {out_dir / 'check.json'}" + (f", {report.png}" if report.png else ""), markup=False)
    used = int(np.count_nonzero(trained.rows[lengths["row"]] & ~dropped(tally)))
    verdict(report, cfg, used=used, trained=trained,
            model=cfg.model.name_or_path if named else "")
    if cfg.train.method == "sft":  # a pair's estimate is `chattune plan`'s (both answers in one batch)
        _plan_headline(cfg, tally)
    return report


@dataclass
class TrainingRows:
    """Which conversations training learns from once the eval rows and probes are held out."""

    rows: np.ndarray  # one bool per conversation: True where training learns from it
    eval_held: int
    probes_held: int
    eval_key: str


def training_rows(cfg: RunConfig, n: int) -> TrainingRows:
    """The split training itself makes (train/inputs.py) of n conversations: eval rows, then probes."""
    d = cfg.data
    if d.eval:  # separate eval files: loaded (and their errors raised) as training loads them
        _, evals = split_eval_data(cfg, [])
        held: set[int] = set()
    else:
        held = held_out(n, ratio=d.eval_ratio, size=d.eval_size, seed=cfg.train.seed)
        evals = sorted(held)
    _, rest = split_probes(cfg, range(n), evals)  # a range in, a range out: the probes are the first rows
    rows = np.ones(n, dtype=bool)
    rows[: n - len(rest)] = False
    rows[list(held)] = False
    key = f"data.eval_size={d.eval_size}" if d.eval_size else f"data.eval_ratio={d.eval_ratio:g}"
    return TrainingRows(rows, len(held), n - len(rest), key)


def sweep_models(cfg: RunConfig) -> list[str]:
    """The models a sweep trains (its grid's model.name_or_path values), else the config's one model."""
    grid = cfg.sweep.grid or {}
    models = grid.get("model.name_or_path") or [cfg.model.name_or_path]
    return [str(m) for m in dict.fromkeys(models)]


def _slug(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name.strip("/")) or "model"


def load_renderer(cfg: RunConfig) -> ChatRenderer:
    """The tokenizer and chat template training would use."""
    return config_renderer(cfg)


def verdict(report: CheckReport, cfg: RunConfig, *, used: int | None = None, trained: TrainingRows | None = None,
            model: str = "") -> None:
    """Fail (exit 2) when training on this data would stop; otherwise say it would run, and on how many samples."""
    unreadable = [f for f in report.files if f.error]
    if unreadable:
        raise DataError(f"{len(unreadable)} file(s) cannot be read; training would stop", where=unreadable[0].path,
                        fix=unreadable[0].error or "")
    invalid = [i for f in report.files for i in f.invalid]
    if invalid and cfg.data.on_bad_record == "error":
        where, reason = invalid[0]
        raise DataError(f"{len(invalid)} invalid row(s); training would stop at the first: {reason}", where=where,
                        fix="fix the rows listed above, or set data.on_bad_record=skip to train without them")
    with_model = f" with the tokenizer of {model}" if model else ""
    if report.render["samples"] == 0 or used == 0:
        raise DataError(f"no training samples left after max_length{with_model}", where="data.max_length",
                        fix="raise data.max_length or set data.overlength=truncate")
    held = []
    if trained and trained.eval_held:
        held.append(f"{trained.eval_held} conversation(s) held out for eval by {trained.eval_key}")
    if trained and trained.probes_held:
        held.append(f"{trained.probes_held} held out as probes (tracking.probe_size)")
    if invalid:
        held.append(f"{len(invalid)} invalid row(s) skipped")
    n = report.render["samples"] if used is None else used
    print(f"ok: training would use {n} samples{with_model}" + (f" ({'; '.join(held)})" if held else ""))


def _plan_headline(cfg: RunConfig, tally: Tally) -> None:
    """One line of `chattune plan`: peak memory and time per epoch for these samples on this machine."""
    d = cfg.data
    a = tally.arrays()
    keep = (a["total"] <= d.max_length) | (d.overlength == "truncate")  # DataSize.from_samples' rule
    size = DataSize(np.minimum(a["total"][keep], d.max_length).tolist(),
                    int((a["supervised"] - a["lost"])[keep].sum()), True)
    try:
        plan = make_plan(cfg, size)
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
