"""Scores from log-likelihoods of given answers, for the tuned model and (with --compare-base) the base.

- preference (`chattune eval RUN --preference FILE`): on held-out pairs, how often the chosen answer gets a
  higher length-normalised log-likelihood (mean log-probability per supervised token) than the rejected one,
  with a 95 % Wilson interval, and the mean margin between the two (nats per token);
- loss (`chattune eval RUN --data FILE --loss`): per-token loss and perplexity of the reference answers, the
  forgetting check on general data: what tuning cost the model there.

Answers are rendered by the run's own renderer exactly as in training (prompt = what inference sends, answer
through its end-of-turn token), never truncated.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

from chattune.config import RunConfig
from chattune.data.formats import load_conversations
from chattune.data.preference import load_pairs, render_pairs
from chattune.data.render import render_all
from chattune.evaluate.mcq import accuracy
from chattune.evaluate.tasks import EvalTask, Variants
from chattune.infer.score import score_samples
from chattune.infer.session import Session

NO_LIMIT = 1 << 40


def _scored(session: Session, models: Variants, samples: list, batch_size: int, what: str) -> tuple[dict, dict]:
    """{who: (sums, counts)} and {who: seconds} for every model variant."""
    out, wall = {}, {}
    pad = session.renderer.tokenizer.pad_token_id
    for who, ctx in models:
        started = time.perf_counter()
        with ctx(), tqdm(total=len(samples), desc=f"{who}: {what}", unit="answer", dynamic_ncols=True) as bar:
            out[who] = score_samples(session.model, samples, pad, batch_size=batch_size, progress=bar.update)
        wall[who] = round(time.perf_counter() - started, 1)
    return out, wall


def preference_task(path: str, cfg: RunConfig, *, limit: int | None, name: str | None, batch_size: int) -> EvalTask:
    """Held-out pairs: chosen preferred by length-normalised log-likelihood, with its interval and the mean margin."""
    pairs, _ = load_pairs([path], system=cfg.data.system, limit=limit)
    settings = {"limit": limit, "batch_size": batch_size, "system": cfg.data.system,
                "scoring": "mean log-probability per answer token (answer through its end-of-turn token)"}

    def evaluate(session: Session, models: Variants) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        samples, _ = render_pairs(session.renderer, pairs, max_length=NO_LIMIT)
        scored, wall = _scored(session, models, samples, batch_size, "scoring pairs")
        metrics, rows = {}, [{"where": p.where} for p in pairs]
        for who, (sums, counts) in scored.items():
            avg = [s / max(c, 1) for s, c in zip(sums, counts)]
            margins = [avg[2 * k] - avg[2 * k + 1] for k in range(len(pairs))]
            metrics[who] = {**accuracy(sum(m > 0 for m in margins), len(pairs)),
                            "mean_margin": round(sum(margins) / len(margins), 4)}
            for row, m in zip(rows, margins):
                row[who] = {"margin": round(m, 4), "chosen_preferred": m > 0}
        return {"kind": "preference", "rows": len(pairs), "metrics": metrics, "wall_s": wall}, rows

    return EvalTask("preference", name or Path(path).stem, Path(path), settings, evaluate, show_preference)


def loss_task(path: str, cfg: RunConfig, *, limit: int | None, name: str | None, batch_size: int) -> EvalTask:
    """Per-token loss and perplexity of the reference answers (data.train_on turns), tuned vs base."""
    d = cfg.data
    conversations, _ = load_conversations([path], fmt=d.format, system=d.system, instruction_as=d.instruction_as,
                                          limit=limit)
    settings = {"limit": limit, "batch_size": batch_size, "system": d.system, "train_on": d.train_on,
                "scoring": "mean negative log-probability per answer token (answer through its end-of-turn token)"}

    def evaluate(session: Session, models: Variants) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        samples, _ = render_all(session.renderer, conversations, max_length=NO_LIMIT, train_on=d.train_on)
        scored, wall = _scored(session, models, samples, batch_size, "scoring answers")
        metrics = {}
        for who, (sums, counts) in scored.items():
            loss = -sum(sums) / max(sum(counts), 1)
            metrics[who] = {"loss": round(loss, 5), "ppl": round(math.exp(min(loss, 700.0)), 4), "tokens": sum(counts)}
        if "base" in metrics:
            metrics["change"] = {"loss": round(metrics["tuned"]["loss"] - metrics["base"]["loss"], 5),
                                 "ppl": round(metrics["tuned"]["ppl"] - metrics["base"]["ppl"], 4)}
        rows = [{"where": s.where, **{who: {"loss": round(-sc[0][i] / max(sc[1][i], 1), 4)} for who, sc in scored.items()}}
                for i, s in enumerate(samples)]
        record = {"kind": "loss", "rows": len(samples), "metrics": metrics, "wall_s": wall}
        return record, rows

    return EvalTask("loss", name or Path(path).stem, Path(path), settings, evaluate, show_loss)


def show_preference(record: dict[str, Any], predictions: list[dict[str, Any]] = ()) -> None:
    """Preference accuracy with its interval and the mean margin, per model."""
    table = Table(title=f"{record['name']}: {record['rows']} pairs, chosen preferred by mean log-probability per token")
    for col in ("model", "accuracy", "95% interval (Wilson)", "correct", "mean margin (nats/token)", "time (s)"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for who in ("base", "tuned"):
        r = record["metrics"].get(who)
        if r:
            lo, hi = r["ci95"]
            table.add_row(f"{who} model", f"{r['accuracy']:.1f}%", f"{lo:.1f}% – {hi:.1f}%", f"{r['correct']}/{r['n']}",
                          f"{r['mean_margin']:+.4f}", f"{record['wall_s'][who]:.0f}")
    Console().print(table)


def show_loss(record: dict[str, Any], predictions: list[dict[str, Any]] = ()) -> None:
    """Per-token loss and perplexity per model, and the change tuning made."""
    table = Table(title=f"{record['name']}: {record['rows']} answers, loss per answer token")
    for col in ("model", "loss", "perplexity", "tokens"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for who in ("base", "tuned", "change"):
        r = record["metrics"].get(who)
        if r:
            sign = "+" if who == "change" else ""
            table.add_row("tuned - base" if who == "change" else f"{who} model", f"{r['loss']:{sign}.4f}",
                          f"{r['ppl']:{sign}.3f}", str(r.get("tokens", "")))
    Console().print(table)
