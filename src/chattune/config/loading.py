"""YAML + key=value overrides -> a validated RunConfig; every problem reported at once, with its key and a fix."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Sequence

import yaml
from pydantic import BaseModel, ValidationError

from chattune.config.schema import RunConfig
from chattune.errors import ConfigError
from chattune.files import write_text


def load(path: str | Path | None, overrides: list[str] = (), *, base_dir: Path | None = None) -> RunConfig:
    """Read a YAML file (or nothing), apply key=value overrides, validate everything at once."""
    raw = read_raw(path, overrides)
    cfg = validate(raw, where=str(path) if path else "config", overrides=override_keys(overrides))
    return _resolve_paths(cfg, base_dir if base_dir is not None else Path.cwd())


def read_raw(path: str | Path | None, overrides: list[str] = ()) -> dict[str, Any]:
    """The YAML file's mapping (or {}) with the key=value overrides applied, not validated yet."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError("config file not found", where=str(path), fix="check the path, e.g. configs/demo.yaml")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise yaml_error(path, exc) from None
        if not isinstance(raw, dict):
            raise ConfigError("the top level must be a mapping of sections (model:, data:, ...)", where=str(path))
    for item in overrides:
        _apply_override(raw, item)
    return raw


def yaml_error(path: Path, exc: yaml.YAMLError) -> ConfigError:
    """Where a YAML file stops parsing; for a bracket or quote never closed, the line where it was opened."""
    mark = getattr(exc, "problem_mark", None)
    opened = getattr(exc, "context_mark", None)
    context = str(getattr(exc, "context", "") or "")
    if opened is not None and mark is not None and opened.line != mark.line and \
            ("flow" in context or "quoted" in context):
        what = "a [ list" if "sequence" in context else "a { mapping" if "mapping" in context else "a quoted text"
        return ConfigError(f"not valid YAML: {what} opened on this line is never closed (the parser gave up at "
                           f"line {mark.line + 1}: {getattr(exc, 'problem', exc)})", where=f"{path}:{opened.line + 1}",
                           fix="close it on the same line, e.g. [q_proj, v_proj]")
    loc = f"{path}:{mark.line + 1}" if mark else str(path)
    return ConfigError(f"not valid YAML ({getattr(exc, 'problem', exc)})", where=loc,
                       fix="fix the YAML syntax at or just before that line (often the indentation: the keys of one "
                       "section must line up)")


def override_keys(overrides: Sequence[str]) -> dict[str, str]:
    """key -> the key=value override that set it (errors about those keys name the override, not the file)."""
    return {item.split("=", 1)[0].strip(): item for item in overrides if "=" in item}


def _origin(key: str, overrides: dict[str, str]) -> str | None:
    """The override that set `key` or a section above it."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in overrides:
            return overrides[".".join(parts[:n])]
    return None


def validate(raw: dict[str, Any], *, where: str = "config", overrides: dict[str, str] | None = None) -> RunConfig:
    """Build a RunConfig, turning every pydantic error into one ConfigError listing all of them.

    overrides (override_keys()): a problem with a key set on the command line names that override, and
    `where` says "command line" when every problem comes from there.
    """
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        overrides = overrides or {}
        found = problems(exc, raw)
        origins = [_origin(key, overrides) for key, _ in found]
        texts = [text + (f" [from the command line: {o}]" if o else "") for (_, text), o in zip(found, origins)]
        if origins and all(origins):
            where = "command line"
        elif any(origins):
            where = f"{where} and the command line"
        raise ConfigError(
            f"{len(texts)} problem(s):\n  " + "\n  ".join(texts),
            where=where,
            fix="see `chattune keys` for every key with its help",
        ) from None


def problems(exc: ValidationError, raw: dict[str, Any]) -> list[tuple[str, str]]:
    """(key path, the CLI's message) for each problem of a failed validation; the key is '' for the whole config.

    `validate` joins the messages into one ConfigError; `chattune ui` shows each next to its field.
    """
    return [(".".join(str(p) for p in err["loc"]), _describe(err, raw)) for err in exc.errors()]


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value", fix="write e.g. train.epochs=2 or lora.r=64")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section", fix="check the key path")
    # YAML parsing gives numbers, booleans, lists ([a, b]) and null for free.
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        node[parts[-1]] = value


def _describe(err: dict[str, Any], raw: dict[str, Any]) -> str:
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        section_model = _model_at(loc[:-1])
        names = list(section_model.model_fields) if section_model else []
        close = difflib.get_close_matches(loc[-1], names, n=1)
        hint = f"; did you mean {'.'.join(loc[:-1] + close)}?" if close else f"; known keys here: {', '.join(names)}"
        return f"{key}: unknown key{hint}"
    got = _value_at(raw, err["loc"])
    # A whole section (a cross-key rule) as "got" would bury the message; the message names the keys.
    shown = f" (got {got!r})" if got is not _MISSING and not isinstance(got, dict) else ""
    msg = err["msg"].removeprefix("Value error, ")
    return f"{msg}{shown}" if not loc else f"{key}: {msg}{shown}"


_MISSING = object()


def _value_at(raw: Any, loc: tuple) -> Any:
    for p in loc:
        if isinstance(raw, dict) and p in raw:
            raw = raw[p]
        elif isinstance(raw, list) and isinstance(p, int) and p < len(raw):
            raw = raw[p]
        else:
            return _MISSING
    return raw


def _model_at(loc: list[str]) -> type[BaseModel] | None:
    model: type[BaseModel] = RunConfig
    for part in loc:
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _resolve_paths(cfg: RunConfig, base: Path) -> RunConfig:
    """Relative data paths are taken from where the command runs; keep them as given if they exist."""
    def fix(p: str | None) -> str | None:
        if p is None or Path(p).is_absolute():
            return p
        return str((base / p)) if (base / p).exists() else p

    cfg.data.train = [fix(p) if isinstance(p, str) else p.model_copy(update={"path": fix(p.path)}) for p in cfg.data.train]
    cfg.data.eval = [fix(p) for p in cfg.data.eval]
    cfg.tracking.probe_file = fix(cfg.tracking.probe_file)
    cfg.model.adapter = fix(cfg.model.adapter)
    if cfg.train.deepspeed_config:
        cfg.train.deepspeed_config = fix(cfg.train.deepspeed_config)
    return cfg


def dump(cfg: RunConfig, path: Path) -> None:
    """Write the resolved config as YAML (the run directory's run_config.yaml)."""
    write_text(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True))


def iter_keys(model: type[BaseModel] = RunConfig, prefix: str = ""):
    """Yield (key path, default, help) for every leaf key: the CLI's `chattune keys` listing."""
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from iter_keys(ann, f"{prefix}{name}.")
        else:
            default = field.get_default(call_default_factory=True)
            yield f"{prefix}{name}", default, field.description or ""
