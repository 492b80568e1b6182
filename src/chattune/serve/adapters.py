"""Several runs on one base: the base model is loaded once, each run's adapter is added to it by name.

Each served name keeps its own run's template, system prompt and end-of-turn ids; `base` answers with the
adapters switched off (the first run's template and system prompt, as `chattune chat --compare-base`).
Runs trained on different base models (or dtypes, or quantisation) cannot share one model and are refused.
"""

from __future__ import annotations

from pathlib import Path

from chattune.errors import ConfigError
from chattune.infer.session import load_run_renderer
from chattune.rundir import RunDir
from chattune.serve.batch import BASE_ADAPTER
from chattune.serve.engine import Engine, load_engine

BASE_NAME = "base"


def parse_names(paths: list[str], names: list[str] | None) -> list[tuple[str, str]]:
    """(name, path) per served path: `--name a=runs/a` names a path, the rest are named after their folder."""
    given: dict[str, str] = {}
    for item in names or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--name {item!r} is not NAME=PATH", where="--name", fix="write e.g. --name tutor=runs/a")
        given[str(Path(path).resolve())] = name
    out = [(given.pop(str(Path(p).resolve()), Path(p).resolve().name), p) for p in paths]
    if given:
        raise ConfigError(f"--name names {', '.join(given)}, which is not among the paths served", where="--name",
                          fix="pass that path too, or drop its --name")
    seen = [n for n, _ in out]
    dupes = sorted({n for n in seen if seen.count(n) > 1 or n == BASE_NAME})
    if dupes:
        raise ConfigError(f"two served models would be called {', '.join(dupes)} ('base' is the base model's name)",
                          where="chattune serve", fix="tell them apart with --name NAME=PATH")
    return out


def load_engines(paths: list[str], names: list[str] | None = None) -> list[Engine]:
    """One engine per path; with run directories the first one's base model carries every adapter, plus `base`."""
    named = parse_names(paths, names)
    runs = [(n, p) for n, p in named if (Path(p) / "run_config.yaml").is_file()]
    if len(named) == 1 and not runs:
        return [load_engine(named[0][1], named[0][0])]
    if len(runs) != len(named):
        folders = [p for n, p in named if (n, p) not in runs]
        raise ConfigError(f"{', '.join(folders)}: several models are served only as run directories on one base",
                          where="chattune serve", fix="serve a merged model folder on its own")
    first = load_engine(runs[0][1], runs[0][0])
    engines = [first]
    for name, path in runs[1:]:
        engines.append(_add_adapter(first, name, path))
    base = Engine(first.model, first.renderer, first.eos_ids, first.system, BASE_NAME, first.max_positions, BASE_ADAPTER)
    return [*engines, base]


def _add_adapter(first: Engine, name: str, path: str) -> Engine:
    run_dir = RunDir(Path(path))
    cfg = run_dir.load_config()
    run_dir.require_adapter()
    mine, theirs = first.session.cfg.model, cfg.model
    for key in ("name_or_path", "source", "revision", "dtype", "quantization"):
        if getattr(mine, key, None) != getattr(theirs, key, None):
            raise ConfigError(f"{path} was trained on model.{key}={getattr(theirs, key, None)!r}, but {first.name} on "
                              f"{getattr(mine, key, None)!r}: runs served together must share one base model",
                              where=str(run_dir.config_file),
                              fix="serve them with separate `chattune serve` processes (different --port)")
    first.model.load_adapter(str(run_dir.adapter), adapter_name=name)
    renderer = load_run_renderer(run_dir, cfg)
    return Engine(first.model, renderer, list(renderer.end_of_turn_ids()), cfg.data.system, name, first.max_positions,
                  name)
