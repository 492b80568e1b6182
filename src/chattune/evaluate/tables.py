"""`chattune eval`'s terminal tables: a glimpse of the answers and the metrics (generation), accuracy (multiple choice)."""

from __future__ import annotations

from typing import Any, Sequence

from rich.console import Console
from rich.table import Table

LABELS = {"bleu-4": "BLEU-4", "rouge-1": "ROUGE-1", "rouge-2": "ROUGE-2", "rouge-l": "ROUGE-L",
          "exact": "exact match", "answer_chars": "answer length (chars)"}


def show_generation(record: dict[str, Any], keys: Sequence[str], predictions: Sequence[dict[str, Any]],
                    examples: int = 3) -> None:
    """A glimpse of the first answers, then the metrics table (base, tuned, difference)."""
    m = record["metrics"]
    whos = [w for w in ("base", "tuned") if w in m]
    table = Table(title=f"{record['name']}: {record['rows']} rows, greedy, at most "
                        f"{record['settings']['max_new_tokens']} new tokens (scores 0-100)")
    table.add_column("metric")
    for w in whos:
        table.add_column(f"{w} model", justify="right")
    if len(whos) == 2:
        table.add_column("tuned − base", justify="right")
    for k in keys:
        cells = [f"{m[w][k]:.2f}" if k != "answer_chars" else f"{m[w][k]:.0f}" for w in whos]
        if len(whos) == 2:
            cells.append(f"{m['tuned'][k] - m['base'][k]:+.2f}" if k != "answer_chars" else "")
        table.add_row(LABELS.get(k, k), *cells)
    table.add_row("time (s)", *[f"{record['wall_s'][w]:.0f}" for w in whos], *([""] if len(whos) == 2 else []))
    console = Console()
    glimpse = Table(title=f"the first {min(examples, len(predictions))} answers (all in {record['predictions']})",
                    show_lines=True)
    for col in ("question", *(f"{w} model" for w in whos), "reference"):
        glimpse.add_column(col, overflow="fold", ratio=1)
    for p in predictions[:examples]:
        glimpse.add_row(*(_clip(p[k]) for k in ("question", *whos, "reference")))
    console.print(glimpse)
    console.print(table)


def _clip(text: str, n: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def show_mcq(record: dict[str, Any], predictions: Sequence[dict[str, Any]] = ()) -> None:
    """Accuracy with its 95 % interval for each model."""
    s = record["settings"]
    table = Table(title=f"{record['name']}: {record['rows']} questions, {s['shots']}-shot, "
                        f"chance {record['chance']:.1f}%")
    for col in ("model", "accuracy", "95% interval (Wilson)", "correct", "time (s)"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for who in ("base", "tuned"):
        r = record["metrics"].get(who)
        if r:
            lo, hi = r["ci95"]
            table.add_row(f"{who} model", f"{r['accuracy']:.1f}%", f"{lo:.1f}% – {hi:.1f}%",
                          f"{r['correct']}/{r['n']}", f"{record['wall_s'][who]:.0f}")
    Console().print(table)
