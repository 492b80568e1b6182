"""What `chattune eval` runs: one EvalTask per input file (generation metrics or multiple choice), read and checked
before the model loads, then evaluated with the tuned model and, when asked, the same model with its adapter off.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager

from tqdm.auto import tqdm

from chattune.config import RunConfig
from chattune.errors import DataError
from chattune.evaluate import answers as gen
from chattune.evaluate import mcq as mc
from chattune.evaluate.metrics import KEYS, check_installed
from chattune.evaluate.tables import show_generation, show_mcq
from chattune.infer.session import Session

# (who, a context-manager factory that switches the model to it): ("tuned", no-op), ("base", adapter off)
Variants = list[tuple[str, Callable[[], ContextManager]]]


def variants(session: Session, compare_base: bool) -> Variants:
    """("tuned", no-op) and, when asked, ("base", the adapter switched off) as context-manager factories."""
    out: Variants = [("tuned", contextlib.nullcontext)]
    if compare_base:
        out.append(("base", session.model.disable_adapter))
    return out


@dataclass
class EvalTask:
    """One evaluation: its result name, the input file, the settings it records, and how to run and show it."""

    kind: str
    name: str
    path: Path
    settings: dict[str, Any]
    evaluate: Callable[[Session, Variants], tuple[dict[str, Any], list[dict[str, Any]]]]
    show: Callable[[dict[str, Any], list[dict[str, Any]]], None]


def generation_task(path: str, cfg: RunConfig, *, metrics: list[str], limit: int | None, name: str | None,
                   batch_size: int, max_new_tokens: int) -> EvalTask:
    """Answer every row greedily and score BLEU-4 / ROUGE / exact match against the reference answers."""
    check_installed(metrics)
    rows = gen.load_rows(path, cfg, limit=limit)
    settings = {"metrics": metrics, "limit": limit, "batch_size": batch_size, "max_new_tokens": max_new_tokens,
                "decoding": "greedy", "system": cfg.data.system}

    def evaluate(session: Session, models: Variants) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        answers, scores, averages, wall = {}, {}, {}, {}
        for who, ctx in models:
            started = time.perf_counter()
            with ctx():
                answers[who] = gen.answer_rows(session.model, session.renderer, rows, batch_size=batch_size,
                                               max_new_tokens=max_new_tokens, desc=f"{who}: generating")
            wall[who] = round(time.perf_counter() - started, 1)
            scores[who], averages[who] = gen.score_answers(answers[who], rows, metrics)
        record = {"kind": "generation", "rows": len(rows), "metrics": averages, "wall_s": wall}
        return record, gen.prediction_rows(rows, answers, scores)

    def show(record: dict[str, Any], predictions: list[dict[str, Any]]) -> None:
        show_generation(record, [k for m in metrics for k in KEYS[m]] + ["answer_chars"], predictions)

    return EvalTask("generation", name or Path(path).stem, Path(path), settings, evaluate, show)


def mcq_task(path: str, cfg: RunConfig, *, shots: int, limit: int | None, name: str, batch_size: int) -> EvalTask:
    """Multiple choice: the most likely option letter after the rendered prompt, zero- or k-shot."""
    questions = mc.load_questions(path)
    if shots >= len(questions):
        raise DataError(f"--shots {shots} uses every question of the file as an example, leaving none to score",
                        where=str(path), fix="lower --shots")
    examples, scored = questions[:shots], questions[shots:]
    scored = scored[:limit] if limit else scored
    prompts = [mc.build_messages(q, examples, cfg.data.system) for q in scored]
    letters = [list(q.options) for q in scored]
    chance = round(100 * sum(1 / len(q.options) for q in scored) / len(scored), 2)
    settings = {"shots": shots, "examples": [q.where for q in examples], "limit": limit, "batch_size": batch_size,
                "scoring": "log-likelihood of each option letter as the first answer token", "system": cfg.data.system}

    def evaluate(session: Session, models: Variants) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        results, choices, wall = {}, {}, {}
        for who, ctx in models:
            started = time.perf_counter()
            with ctx(), tqdm(total=len(scored), desc=f"{who}: scoring", unit="q", dynamic_ncols=True) as bar:
                logprobs = mc.option_logprobs(session.model, session.renderer, prompts, letters,
                                              batch_size=batch_size, progress=bar.update)
            wall[who] = round(time.perf_counter() - started, 1)
            choices[who] = [(mc.choose(lp), lp) for lp in logprobs]
            results[who] = mc.accuracy(sum(c == q.answer for (c, _), q in zip(choices[who], scored)), len(scored))
        predictions = [
            {"where": q.where, "question": q.question, "options": q.options, "answer": q.answer,
             **{who: {"choice": choices[who][i][0], "correct": choices[who][i][0] == q.answer,
                      "logprobs": {k: round(v, 4) for k, v in choices[who][i][1].items()}} for who in choices}}
            for i, q in enumerate(scored)
        ]
        record = {"kind": "mcq", "rows": len(scored), "chance": chance, "metrics": results, "wall_s": wall}
        return record, predictions

    return EvalTask("mcq", name, Path(path), settings, evaluate, show_mcq)
