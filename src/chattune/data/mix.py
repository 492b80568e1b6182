"""Mixing training files: a data.train entry {path, fraction} or {path, samples} contributes part of its rows.

Rows are drawn with a fixed seed (train.seed and the entry's position), so the same config gives the same mix.
A sample count larger than the file repeats the whole file and draws the rest.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Sequence, TypeVar

from chattune.config import TrainSource

T = TypeVar("T")


def take(rows: Sequence[T], source: str | TrainSource, *, seed: int, position: int) -> list[T]:
    """The rows an entry contributes: all of them, round(fraction * n) (at least 1), or `samples` of them."""
    if isinstance(source, str) or (source.fraction is None and source.samples is None):
        return list(rows)
    want = max(1, round(source.fraction * len(rows))) if source.fraction is not None else source.samples
    rng = random.Random(f"{seed}:{position}")
    whole, rest = divmod(want, len(rows))
    picked = list(rows) * whole + rng.sample(list(rows), rest)
    return picked


def mix(sources: Sequence[str | TrainSource], load: Callable[[str], tuple[list[T], Any]], *,
        seed: int) -> tuple[list[T], dict[str, dict[str, Any]]]:
    """Load every entry with load(path) -> (rows, report), take its part; returns the rows and a report per source."""
    rows: list[T] = []
    report: dict[str, dict[str, Any]] = {}
    for position, source in enumerate(sources):
        path = source if isinstance(source, str) else source.path
        loaded, _ = load(path)
        part = take(loaded, source, seed=seed, position=position)
        rows += part
        amount = {} if isinstance(source, str) else {k: v for k, v in (("fraction", source.fraction),
                                                                         ("samples", source.samples)) if v is not None}
        report[path] = {"rows": len(loaded), "used": len(part), **amount}
    return rows, report
