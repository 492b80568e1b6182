"""`chattune sweep CONFIG --grid key=a,b ...`: train every combination of a grid, one after another, and compare.

Each combination is a normal run directory under the config's output_dir, named
after its values (e.g. runs/legal-sizes/Qwen2.5-7B-Instruct). All runs share
one SwanLab project (tracking.swanlab.project, default: the output_dir's name)
and one swanlog/ folder, so `chattune dashboard OUTPUT_DIR` shows them together.
A failed run is recorded and the sweep goes on; finished runs are kept when the
sweep is started again, so an interrupted sweep continues where it stopped.

OUTPUT_DIR/
  <run>/ ...              one run directory per combination
  sweep.json              the plan and each run's status, command, error and time
  logs/<run>.log          each run's terminal output (subprocess mode)
  comparison.md, .csv     final / best train loss, eval loss and scores, tokens/s, wall time, parameters
  loss_curves.png         the runs' loss curves overlaid
  report.html             the same comparison plus every run's curves and probe answers (`chattune report`)
"""

from __future__ import annotations

import gc
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.table import Table

from chattune import config as config_mod
from chattune.errors import ChattuneError, ConfigError
from chattune.files import write_json, write_text
from chattune.report import html
from chattune.report.plots import loss_curves_png
from chattune.report.runs import RunData, load_run
from chattune.report.table import comparison_rows, fmt, shown_columns, to_markdown, write_csv
from chattune.rundir import RunDir
from chattune.train.grid import Point, column_keys, merge_grid, parse_grid_args, plan, yaml_value
from chattune.verbs import train as train_verb

log = logging.getLogger("chattune")

def run(config_path: str, overrides: Sequence[str] = (), *, grid: Sequence[str] = (), overwrite: bool = False,
        in_process: bool = False, dry_run: bool = False) -> Path:
    """Train every grid combination under output_dir, then write comparison.md/.csv, loss_curves.png and report.html."""
    base = config_mod.load(config_path, list(overrides))
    axes = merge_grid(base.sweep.grid, parse_grid_args(grid))
    root = Path(base.output_dir)
    if (root / "run_config.yaml").is_file():
        raise ConfigError("output_dir is a run directory; a sweep puts one run directory per combination inside it",
                          where=f"output_dir={root}", fix=f"give the sweep its own folder, e.g. output_dir={root}-sweep")
    project = base.tracking.swanlab.project or root.resolve().name
    points = plan(axes)
    shared = [*overrides, f"tracking.swanlab.project={project}", "sweep.grid={}"]
    configs = validate_points(config_path, points, shared, root)
    for p in points:
        p.command = train_command(config_path, run_overrides(p, shared, root), overwrite=overwrite)
    show_plan(points, root, project, overwrite=overwrite)
    if dry_run:
        return root
    root.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    save_state(root, config_path, overrides, axes, points, started)
    try:
        for i, p in enumerate(points, start=1):
            if RunDir(root / p.name).is_finished() and not overwrite:
                p.status = "kept"
                log.info("sweep %d/%d: %s already finished, kept (--overwrite retrains it)", i, len(points), p.name)
                continue
            log.info("sweep %d/%d: %s (%s)", i, len(points), p.name, " ".join(p.overrides))
            p.status = "running"
            save_state(root, config_path, overrides, axes, points, started)
            t0 = time.perf_counter()
            try:
                if in_process:
                    train_in_process(configs[p.name], overwrite=overwrite)
                else:
                    train_subprocess(p.command, root / "logs" / f"{p.name}.log")
                p.status = "finished"
            except KeyboardInterrupt:
                p.status = "interrupted"
                raise
            except ChattuneError as exc:
                p.status, p.error = "failed", exc.render()
                log.error("sweep: %s failed: %s", p.name, p.error)
            except Exception as exc:  # a bug or an out-of-memory in one run must not cost the others
                p.status, p.error = "failed", f"{type(exc).__name__}: {exc}"
                log.exception("sweep: %s failed", p.name)
            finally:
                p.wall_s = round(time.perf_counter() - t0, 1)
                save_state(root, config_path, overrides, axes, points, started)
    finally:
        # Also after Ctrl+C: the runs that finished are worth a table.
        save_state(root, config_path, overrides, axes, points, started)
        write_comparison(root, points, axes, configs, title=f"sweep of {config_path}")
    failed = [p for p in points if p.status == "failed"]
    if failed:
        raise ChattuneError(f"{len(failed)} of {len(points)} runs failed: {', '.join(p.name for p in failed)}",
                            where=str(root / "sweep.json"),
                            fix="see each run's error there and its log in " + str(root / "logs")
                                + "; run the sweep again to retry only the runs that did not finish")
    return root


def run_overrides(p: Point, shared: Sequence[str], root: Path) -> list[str]:
    """All overrides of one run: the user's, the grid point's, its folder, and the shared tracking project."""
    return [*shared, *p.overrides, f"output_dir={root / p.name}"]


def validate_points(config_path: str, points: Sequence[Point], shared: Sequence[str], root: Path) -> dict[str, Any]:
    """Load every run's config before training any, and report every bad one at once."""
    configs, problems = {}, {}
    for p in points:
        try:
            configs[p.name] = config_mod.load(config_path, run_overrides(p, shared, root))
        except ConfigError as exc:
            problems.setdefault(exc.what, []).append(p.name)
    if problems:
        text = "\n".join(f"{', '.join(names)}: {what}" for what, names in problems.items())
        raise ConfigError(f"{sum(map(len, problems.values()))} of {len(points)} run config(s) are invalid:\n{text}",
                          where=config_path, fix="fix the grid values or the config; `chattune keys` lists every key")
    return configs


def train_command(config_path: str, overrides: Sequence[str], *, overwrite: bool) -> list[str]:
    """The `chattune train` command line of one run (what subprocess mode runs and sweep.json records)."""
    return [sys.executable, "-m", "chattune.cli", "train", str(config_path), *overrides,
            *(["--overwrite"] if overwrite else [])]


# ---------------------------------------------------------------------------
# training


def train_in_process(cfg: Any, *, overwrite: bool) -> None:
    """One run in this process; memory is handed back before the next one."""
    try:
        train_verb.run(cfg, overwrite=overwrite)
    finally:
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass


def train_subprocess(command: list[str], log_path: Path) -> None:
    """One run in a fresh Python process (nothing leaks into the next run), its output shown and kept in log_path."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log_path.open("wb") as logf:
        logf.write(("$ " + shlex.join(command) + "\n").encode())
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        try:
            assert proc.stdout is not None
            for chunk in iter(lambda: proc.stdout.read1(65536), b""):
                sys.stderr.buffer.write(chunk)
                sys.stderr.buffer.flush()
                logf.write(chunk)
            rc = proc.wait()
        except KeyboardInterrupt:
            # The child got the same Ctrl+C: let it save its adapter and stop before we do.
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    if rc != 0:
        raise ChattuneError(f"exit status {rc}: {last_error(log_path)}", where=str(log_path))


def last_error(log_path: Path) -> str:
    """The run's own one-paragraph error (the CLI's 'error: ...' line), else the last line it printed."""
    lines = [l.strip() for l in re.split(r"[\r\n]+", log_path.read_text(encoding="utf-8", errors="replace")) if l.strip()]
    errors = [l for l in lines if l.startswith("error: ")]
    if errors:
        return errors[-1][len("error: "):]
    return lines[-1] if lines else "no output"


# ---------------------------------------------------------------------------
# records and the comparison


def save_state(root: Path, config_path: str, overrides: Sequence[str], axes: dict[str, list[Any]],
               points: Sequence[Point], started: str) -> None:
    """sweep.json: what the sweep is, and where each run stands (rewritten after every run)."""
    write_json(root / "sweep.json", {
        "config": str(config_path), "overrides": list(overrides), "grid": axes, "started": started,
        "runs": [{"name": p.name, "values": p.values, "overrides": p.overrides, "status": p.status, "error": p.error,
                  "wall_s": p.wall_s, "dir": str(root / p.name), "command": shlex.join(p.command)} for p in points],
    })


def write_comparison(root: Path, points: Sequence[Point], axes: dict[str, list[Any]], configs: dict[str, Any],
                     *, title: str) -> None:
    """comparison.md, comparison.csv, loss_curves.png and report.html in the sweep's output_dir."""
    if not root.is_dir():
        return
    runs = []
    for p in points:
        folder = root / p.name
        if (folder / "run_config.yaml").is_file():
            runs.append(load_run(folder))
        else:  # failed before training wrote anything: still a row, with the values it would have used
            runs.append(RunData(root=folder, name=p.name, config=configs[p.name].model_dump(mode="json")))
    status = {p.name: p.status for p in points}
    rows = comparison_rows(runs, keys=column_keys(axes), status=status)
    table = to_markdown(rows)
    failed = [p for p in points if p.error]
    md = [f"# {title}\n", f"{len(points)} runs; grid: "
          + "; ".join(f"`{k}` = {', '.join(yaml_value(v) for v in vs)}" for k, vs in axes.items()) + "\n", table]
    if failed:
        md.append("\n## Failed runs\n")
        md += [f"- **{p.name}**: {p.error}" for p in failed]
        md.append("")
    md.append("\nLoss curves: loss_curves.png · everything per run: report.html\n")
    write_text(root / "comparison.md", "\n".join(md))
    write_csv(rows, root / "comparison.csv")
    written = [root / "comparison.md", root / "comparison.csv"]
    try:
        written.append(loss_curves_png([r for r in runs if r.metrics], root / "loss_curves.png",
                                       title=f"training loss: {root.name}"))
    except ImportError as exc:
        log.warning("sweep: no loss_curves.png (%s)", exc)
    trained = [r for r in runs if (r.root / "run_config.yaml").is_file()]
    if trained:
        write_text(root / "report.html", html.build(trained))
        written.append(root / "report.html")
    show_table(rows)
    log.info("sweep: wrote %s", ", ".join(str(p) for p in written))


def show_plan(points: Sequence[Point], root: Path, project: str, *, overwrite: bool) -> None:
    """The runs the sweep will train, with their overrides and whether they are done already."""
    table = Table(title=f"sweep: {len(points)} runs under {root} (SwanLab project {project!r})")
    for col in ("#", "run", "overrides", "state"):
        table.add_column(col, overflow="fold")
    for i, p in enumerate(points, start=1):
        done = RunDir(root / p.name).is_finished()
        state = ("retrain (--overwrite)" if overwrite else "finished: kept") if done else "to train"
        table.add_row(str(i), p.name, " ".join(p.overrides), state)
    Console(stderr=True).print(table)


def show_table(rows: Sequence[dict[str, Any]]) -> None:
    """The comparison on the terminal; as a Markdown table when stdout is a pipe or a file (a box table would be
    folded into 80 columns there, one cell over several lines)."""
    cols = shown_columns(rows)
    if not cols:
        return
    console = Console()
    if not console.is_terminal:
        print(to_markdown(rows), end="", flush=True)
        return
    table = Table(title="sweep comparison")
    for c in cols:
        table.add_column(c, overflow="fold")
    for r in rows:
        table.add_row(*(fmt(r.get(c), c) for c in cols))
    console.print(table)
