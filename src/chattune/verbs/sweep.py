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
import itertools
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import yaml

from chattune import config as config_mod
from chattune.errors import ChattuneError, ConfigError
from chattune.files import write_json
from chattune.rundir import RunDir

log = logging.getLogger("chattune")

# Short names for run folders: lora.r=64 -> r64, train.learning_rate=1e-4 -> lr0.0001.
_SHORT = {"learning_rate": "lr", "batch_size": "bs", "grad_accum": "ga", "max_length": "len", "max_steps": "steps",
          "epochs": "ep", "dropout": "drop", "target_modules": "tm", "quantization": "q"}
_RESERVED = ("output_dir", "sweep")


@dataclass
class Point:
    """One combination of grid values: its run folder name and the overrides that make it."""

    name: str
    values: dict[str, Any]
    overrides: list[str]
    status: str = "planned"
    error: str | None = None
    wall_s: float | None = None
    command: list[str] = field(default_factory=list)


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


# ---------------------------------------------------------------------------
# the grid


def parse_grid_args(items: Sequence[str]) -> dict[str, list[Any]]:
    """['lora.r=8,64', 'model.name_or_path=a,b'] -> {'lora.r': [8, 64], 'model.name_or_path': ['a', 'b']}."""
    axes: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ConfigError(f"--grid {item!r} is not KEY=V1,V2,...", where="--grid",
                              fix="write e.g. --grid lora.r=8,64 or --grid model.name_or_path=smollm2-135m,gemma3-270m")
        axes[key] = [_yaml(v) for v in split_values(values)]
    return axes


def split_values(text: str) -> list[str]:
    """Split on commas outside brackets, braces and quotes: 'a,[b,c],{d: 1}' -> ['a', '[b,c]', '{d: 1}']."""
    parts, depth, quote, cur = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur).strip())
    return [p for p in parts if p]


def _yaml(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def merge_grid(from_config: dict[str, list[Any]], from_cli: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """The config's sweep.grid with --grid keys added or replaced; refuse keys a sweep sets itself."""
    axes = {**from_config, **from_cli}
    if not axes:
        raise ConfigError("nothing to sweep: the config has no sweep.grid and no --grid was given",
                          where="chattune sweep",
                          fix="add e.g. --grid lora.r=8,64, or a sweep: {grid: {lora.r: [8, 64]}} section to the config")
    bad = [k for k in axes if k.split(".")[0] in _RESERVED]
    if bad:
        raise ConfigError(f"{', '.join(bad)} cannot be swept: each run's output_dir is a folder under output_dir",
                          where="sweep.grid", fix="sweep other keys; set output_dir once for the whole sweep")
    return axes


def plan(axes: dict[str, list[Any]]) -> list[Point]:
    """Every combination of the axes' values, in order, each with a unique folder name."""
    points = []
    # Keys with a single value are the same in every run: they set the runs' config, not their names.
    named = [k for k, v in axes.items() if len(v) > 1] or list(axes)
    for combo in itertools.product(*axes.values()):
        values = dict(zip(axes, combo))
        overrides = [o for key, value in values.items() for o in to_overrides(key, value)]
        points.append(Point(name=point_name({k: values[k] for k in named}), values=values, overrides=overrides))
    seen: dict[str, int] = {}
    for p in points:
        if p.name in seen:
            seen[p.name] += 1
            p.name = f"{p.name}-{seen[p.name]}"
        else:
            seen[p.name] = 1
    return points


def to_overrides(key: str, value: Any) -> list[str]:
    """key=value strings for one grid value; a mapping under a section key sets several keys of that section."""
    if isinstance(value, dict):
        return [o for k, v in value.items() for o in to_overrides(f"{key}.{k}", v)]
    return [f"{key}={yaml_value(value)}"]


def yaml_value(value: Any) -> str:
    """A value as override text that config.load parses back to the same value."""
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=1 << 30)
    if text.endswith("\n...\n"):  # the end-of-document marker PyYAML adds after a plain scalar
        text = text[: -len("\n...\n")]
    return text.strip()


def point_name(values: dict[str, Any]) -> str:
    """A folder name from the grid values: Qwen2.5-7B-Instruct_r64, smollm2-135m_lr0.0001, ..."""
    parts = [_name_part(k, v) for k, v in values.items()]
    name = re.sub(r"[^\w.+=-]+", "-", "_".join(p for p in parts if p)).strip("-_.")
    return name or "run"


def _name_part(key: str, value: Any) -> str:
    if isinstance(value, dict):
        leaves = {f"{key}.{k}": v for k, v in value.items()}
        named = [k for k in leaves if k.endswith("name_or_path")]
        if named:
            return _name_part(named[0], leaves[named[0]])
        return "_".join(_name_part(k, v) for k, v in leaves.items() if v is not None)
    last = key.split(".")[-1]
    if last == "name_or_path":
        return Path(str(value).rstrip("/")).name
    if isinstance(value, list):
        value = "+".join(map(str, value))
    elif isinstance(value, float):
        value = f"{value:g}"
    return f"{_SHORT.get(last, last)}{value}"


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
    from chattune.verbs import train as train_run

    try:
        train_run.run(cfg, overwrite=overwrite)
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


def column_keys(axes: dict[str, list[Any]]) -> list[str]:
    """The config keys the grid sets (a section axis contributes each key its mappings set)."""
    keys: list[str] = []
    for key, values in axes.items():
        sub = [o.split("=", 1)[0] for v in values for o in to_overrides(key, v)]
        keys += [k for k in dict.fromkeys(sub) if k not in keys]
    return keys


def write_comparison(root: Path, points: Sequence[Point], axes: dict[str, list[Any]], configs: dict[str, Any],
                     *, title: str) -> None:
    """comparison.md, comparison.csv, loss_curves.png and report.html in the sweep's output_dir."""
    from chattune.report import html
    from chattune.report.table import comparison_rows, to_markdown, write_csv
    from chattune.report.runs import RunData, load_run

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
    (root / "comparison.md").write_text("\n".join(md), encoding="utf-8")
    write_csv(rows, root / "comparison.csv")
    written = [root / "comparison.md", root / "comparison.csv"]
    try:
        from chattune.report.plots import loss_curves_png

        written.append(loss_curves_png([r for r in runs if r.metrics], root / "loss_curves.png",
                                       title=f"training loss: {root.name}"))
    except ImportError as exc:
        log.warning("sweep: no loss_curves.png (%s)", exc)
    trained = [r for r in runs if (r.root / "run_config.yaml").is_file()]
    if trained:
        (root / "report.html").write_text(html.build(trained), encoding="utf-8")
        written.append(root / "report.html")
    show_table(rows)
    log.info("sweep: wrote %s", ", ".join(str(p) for p in written))


def show_plan(points: Sequence[Point], root: Path, project: str, *, overwrite: bool) -> None:
    """The runs the sweep will train, with their overrides and whether they are done already."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"sweep: {len(points)} runs under {root} (SwanLab project {project!r})")
    for col in ("#", "run", "overrides", "state"):
        table.add_column(col, overflow="fold")
    for i, p in enumerate(points, start=1):
        done = RunDir(root / p.name).is_finished()
        state = ("retrain (--overwrite)" if overwrite else "finished: kept") if done else "to train"
        table.add_row(str(i), p.name, " ".join(p.overrides), state)
    Console(stderr=True).print(table)


def show_table(rows: Sequence[dict[str, Any]]) -> None:
    """The comparison on the terminal."""
    from rich.console import Console
    from rich.table import Table

    from chattune.report.table import fmt, shown_columns

    cols = shown_columns(rows)
    if not cols:
        return
    table = Table(title="sweep comparison")
    for c in cols:
        table.add_column(c, overflow="fold")
    for r in rows:
        table.add_row(*(fmt(r.get(c), c) for c in cols))
    Console().print(table)
