"""A sweep's grid: `--grid key=a,b` and sweep.grid parsed, expanded into every combination, each named.

Pure functions over config keys and values; `chattune sweep` (verbs/sweep.py) trains the points.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from chattune.errors import ConfigError

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


def column_keys(axes: dict[str, list[Any]]) -> list[str]:
    """The config keys the grid sets (a section axis contributes each key its mappings set)."""
    keys: list[str] = []
    for key, values in axes.items():
        sub = [o.split("=", 1)[0] for v in values for o in to_overrides(key, v)]
        keys += [k for k in dict.fromkeys(sub) if k not in keys]
    return keys
