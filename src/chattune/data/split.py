"""Hold evaluation rows out of the training conversations, reproducibly."""

from __future__ import annotations

import random
from typing import Sequence, TypeVar

from chattune.errors import ConfigError

T = TypeVar("T")


def eval_count(n: int, *, ratio: float = 0.0, size: int = 0) -> int:
    """How many of n rows go to evaluation: size, or ratio * n rounded (at least 1 when ratio > 0)."""
    if size:
        return size
    if ratio:
        return max(1, round(ratio * n))
    return 0


def split_eval(rows: Sequence[T], *, ratio: float = 0.0, size: int = 0, seed: int = 42) -> tuple[list[T], list[T]]:
    """(training rows, eval rows): a seeded random choice of rows, each list in file order, no row in both."""
    held = held_out(len(rows), ratio=ratio, size=size, seed=seed)
    if hasattr(rows, "select"):  # a PackedConversations stays packed: no row is decoded
        return rows.select(i for i in range(len(rows)) if i not in held) if held else rows, rows.select(sorted(held))
    train = [r for i, r in enumerate(rows) if i not in held]
    evals = [r for i, r in enumerate(rows) if i in held]
    return train, evals


def held_out(n: int, *, ratio: float = 0.0, size: int = 0, seed: int = 42) -> set[int]:
    """The indices of the eval rows split_eval holds out of n rows (empty when no eval split is asked for)."""
    k = eval_count(n, ratio=ratio, size=size)
    if k == 0:
        return set()
    if k >= n:
        key = "data.eval_size" if size else "data.eval_ratio"
        raise ConfigError(
            f"holding out {k} eval rows leaves no training data (there are {n} rows)",
            where=key,
            fix=f"lower {key}, or name separate eval files with data.eval",
        )
    # Our own Random instance: the split depends on the seed and the row count only, not on
    # whatever else consumed the global random state before.
    return set(random.Random(seed).sample(range(n), k))
