"""Generation evaluation: answer every row (batched, greedy) and score the answers against the references."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from chattune.config import RunConfig
from chattune.data.formats import Conversation, load_conversations
from chattune.data.render import ChatRenderer
from chattune.evaluate.metrics import average, score_row
from chattune.infer.generate import generate_batch


def load_rows(path: str | Path, cfg: RunConfig, *, limit: int | None) -> list[Conversation]:
    """Rows to answer, rendered with the run's system prompt and instruction rule (any record layout)."""
    rows, _ = load_conversations([path], fmt="auto", system=cfg.data.system, instruction_as=cfg.data.instruction_as,
                                 limit=limit)
    return rows


def answer_rows(model: Any, renderer: ChatRenderer, rows: Sequence[Conversation], *, batch_size: int,
                max_new_tokens: int, desc: str) -> list[str]:
    """Greedy answers to every row's prompt, with a progress bar (rows, rate, ETA) on stderr."""
    with tqdm(total=len(rows), desc=desc, unit="row", dynamic_ncols=True) as bar:
        return generate_batch(model, renderer, [r.prompt for r in rows], max_new_tokens=max_new_tokens,
                              batch_size=batch_size, progress=bar.update)


def score_answers(answers: Sequence[str], rows: Sequence[Conversation],
                  metrics: Sequence[str]) -> tuple[list[dict[str, float]], dict[str, float]]:
    """(per-row scores, averages over rows) plus the mean answer length in characters."""
    per_row = [score_row(a, r.reference, metrics) for a, r in zip(answers, rows)]
    avg = average(per_row)
    avg["answer_chars"] = round(sum(len(a) for a in answers) / max(len(answers), 1), 1)
    return per_row, avg


def prediction_rows(rows: Sequence[Conversation], answers: dict[str, list[str]],
                    scores: dict[str, list[dict[str, float]]]) -> list[dict[str, Any]]:
    """One JSON line per row: where, question, reference, each model's answer and scores."""
    out = []
    for i, r in enumerate(rows):
        row: dict[str, Any] = {"where": r.where, "question": r.prompt[-1]["content"], "reference": r.reference}
        for who in answers:
            row[who] = answers[who][i]
        row["scores"] = {who: scores[who][i] for who in scores}
        out.append(row)
    return out
