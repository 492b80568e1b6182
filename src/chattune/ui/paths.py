"""Which folders the page may read and write: the working folder and the folders given with --allow."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from chattune.errors import ChattuneError


class PathNotAllowedError(ChattuneError):
    """A path outside the working folder and the --allow folders."""


@dataclass(frozen=True)
class Allowed:
    """The page's folders: every path it reads or writes must lie inside one of them."""

    roots: tuple[Path, ...] = field(default_factory=tuple)

    @classmethod
    def of(cls, cwd: Path, extra: list[str] | tuple[str, ...] = ()) -> "Allowed":
        return cls(tuple(dict.fromkeys(Path(p).expanduser().resolve() for p in [cwd, *extra])))

    @property
    def cwd(self) -> Path:
        return self.roots[0]

    def check(self, path: str | Path, *, what: str = "path") -> Path:
        """The path made absolute (relative ones from the working folder); refused when it leaves the allowed folders."""
        text = str(path).strip()
        if not text:
            raise ChattuneError(f"no {what} given", where=what, fix="type a path or pick a file")
        p = Path(text).expanduser()
        full = (p if p.is_absolute() else self.cwd / p).resolve()  # resolves .. and symlinks
        if not any(full == r or r in full.parents for r in self.roots):
            raise PathNotAllowedError(
                f"{text} is outside the folders this page may use", where=what,
                fix=f"use a path under {', '.join(map(str, self.roots))}, or restart with `chattune ui --allow DIR`")
        return full

    def shown(self, path: Path) -> str:
        """A path as the page shows it: relative to the working folder when inside it."""
        try:
            return str(path.relative_to(self.cwd))
        except ValueError:
            return str(path)
