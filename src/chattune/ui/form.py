"""The Configure form, generated from the config schema (the same pydantic tree `chattune keys` lists).

Each leaf key of RunConfig becomes one field: a choice for a Literal, a switch for a bool, a text box holding
a YAML value otherwise (what `key=value` takes on the command line). The form's result is the list of
key=value overrides on top of the chosen preset, so the page validates and trains exactly as
`chattune train PRESET key=value ...` would.
"""

from __future__ import annotations

import shlex
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from chattune import config


@dataclass(frozen=True)
class FieldSpec:
    """One config key as a form field."""

    key: str  # e.g. lora.r
    kind: str  # "choice", "bool" or "text"
    default: Any
    help: str
    choices: tuple[str, ...] = ()

    @property
    def section(self) -> str:
        return self.key.split(".")[0] if "." in self.key else ""


def _choices(annotation: Any) -> tuple[str, ...] | None:
    """The choices of a Literal (or a union of Literals and bool) as the texts a user would type; None otherwise."""
    if get_origin(annotation) is Literal:
        return tuple(to_text(c) for c in get_args(annotation))
    if get_origin(annotation) in (Union, types.UnionType):
        parts = [_choices(a) if a is not bool else ("true", "false") for a in get_args(annotation)]
        if all(p is not None for p in parts):
            return tuple(c for p in parts for c in p)
    return None


def fields(model: type[BaseModel] = config.RunConfig, prefix: str = "") -> Iterator[FieldSpec]:
    """One FieldSpec per leaf key, in the schema's order, with its default, help and choices."""
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from fields(ann, f"{prefix}{name}.")
            continue
        default = info.get_default(call_default_factory=True)
        choices = _choices(ann)
        kind = "bool" if ann is bool else "choice" if choices else "text"
        yield FieldSpec(f"{prefix}{name}", kind, default, info.description or "", choices or ())


def to_text(value: Any) -> str:
    """A value as the form shows it: YAML, as a key=value override would spell it; None is empty."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10_000).strip().removesuffix(
        "\n...").strip()


def value_at(tree: dict[str, Any], key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def initial_texts(specs: list[FieldSpec], cfg: config.RunConfig) -> list[Any]:
    """The form's values for a loaded config: texts, and booleans for switches."""
    tree = cfg.model_dump(mode="json")
    return [bool(value_at(tree, s.key)) if s.kind == "bool" else to_text(value_at(tree, s.key)) for s in specs]


def overrides(specs: list[FieldSpec], initial: list[Any], values: list[Any]) -> list[str]:
    """key=value for every field whose value differs from the preset's (an emptied field is null)."""
    out = []
    for spec, before, now in zip(specs, initial, values):
        if spec.kind == "bool":
            now, before = bool(now), bool(before)
            if now != before:
                out.append(f"{spec.key}={'true' if now else 'false'}")
            continue
        now = "" if now is None else str(now)
        if not same(now, str(before)):
            out.append(f"{spec.key}={now.strip() if now.strip() else 'null'}")
    return out


def same(a: str, b: str) -> bool:
    """Two field texts that mean the same value (3 and 3.0, [a] and [ a ])."""
    if a.strip() == b.strip():
        return True
    try:
        return yaml.safe_load(a) == yaml.safe_load(b) and bool(a.strip()) == bool(b.strip())
    except yaml.YAMLError:
        return False


@dataclass
class Checked:
    """A preset plus overrides, validated as the CLI would: the config, or every problem by key."""

    cfg: config.RunConfig | None
    problems: list[tuple[str, str]]  # (key, message); key '' or a section for rules over several keys


def check(preset: Path | None, extra: list[str]) -> Checked:
    """Validate like `chattune train PRESET key=value ...`; ConfigError for a file that cannot be read at all."""
    raw = config.read_raw(preset, extra)
    try:
        config.RunConfig.model_validate(raw)
    except ValidationError as exc:
        return Checked(None, config.problems(exc, raw))
    return Checked(config.load(preset, extra), [])


def command(preset: Path | None, extra: list[str], cwd: Path) -> str:
    """The `chattune train ...` command line that trains this configuration."""
    shown = str(preset.relative_to(cwd)) if preset and preset.is_relative_to(cwd) else str(preset or "")
    return shlex.join(["chattune", "train", *([shown] if shown else []), *extra])


def yaml_text(cfg: config.RunConfig) -> str:
    """The config as run_config.yaml would hold it."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
