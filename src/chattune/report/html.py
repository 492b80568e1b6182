"""`chattune report RUN_DIR [RUN_DIR ...] --out report.html`: one self-contained page.

Inline CSS and inline SVG charts, no scripts, nothing loaded from anywhere: the
file can be mailed, archived or opened offline. For each run: what it was
(model, data, LoRA, training settings, the full config), its loss / learning
rate / grad-norm curves, eval results, and the probe answers before and after
training side by side. With several runs: a comparison table and overlaid curves.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from html import escape
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Sequence

import yaml

from chattune.report.table import comparison_rows, fmt, shown_columns, varying_keys
from chattune.report.runs import RunData, load_runs
from chattune.report.svg import PALETTE, Series, line_chart

log = logging.getLogger("chattune")

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI","Noto Sans","Noto Sans CJK SC","WenQuanYi Micro Hei","PingFang SC","Microsoft YaHei",sans-serif;
  margin:0;color:#1f2937;background:#f8fafc}
header{background:#0f172a;color:#f8fafc;padding:18px 28px}
header h1{margin:0 0 4px;font-size:22px}
header p{margin:0;color:#cbd5e1}
main{padding:8px 28px 40px;max-width:1500px}
section{background:#fff;border:1px solid #e2e8f0;border-radius:8px;padding:14px 20px;margin:18px 0}
h2{margin:4px 0 10px;font-size:19px}
h3{margin:18px 0 8px;font-size:15px;color:#334155}
table{border-collapse:collapse;margin:6px 0;font-size:13px}
th,td{border:1px solid #e2e8f0;padding:5px 8px;text-align:left;vertical-align:top}
th{background:#f1f5f9}
td.num{text-align:right;font-variant-numeric:tabular-nums}
table.predictions{width:100%;table-layout:fixed}
table.predictions td{white-space:pre-wrap;word-break:break-word}
table.predictions col.idx{width:2.5em}
.facts{display:flex;flex-wrap:wrap;gap:6px 18px;margin:4px 0 8px;color:#334155}
.facts b{color:#0f172a}
.charts{display:flex;flex-wrap:wrap;gap:12px}
svg.chart{background:#fff;border:1px solid #e2e8f0;border-radius:6px}
svg .title{font-size:13px;font-weight:600;fill:#0f172a}
svg .tick,svg .legend{font-size:11px;fill:#475569}
svg .axis{font-size:11px;fill:#334155}
svg .grid{stroke:#e5e7eb;stroke-width:1}
svg .frame{fill:none;stroke:#94a3b8;stroke-width:1}
svg .empty{font-size:12px;fill:#94a3b8}
.status-finished{color:#15803d;font-weight:600}
.status-unfinished{color:#b45309;font-weight:600}
pre{background:#f1f5f9;padding:10px;border-radius:6px;overflow:auto;font-size:12px}
.muted{color:#64748b}
"""


def build(runs: Sequence[RunData]) -> str:
    """The whole page as one string."""
    try:
        ver = version("chattune")
    except PackageNotFoundError:
        ver = "?"
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = runs[0].name if len(runs) == 1 else f"{len(runs)} runs"
    parts = ['<!doctype html><html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>chattune report: {escape(title)}</title><style>{CSS}</style></head><body>",
             f"<header><h1>chattune report: {escape(title)}</h1>"
             f"<p>{len(runs)} run{'s' if len(runs) != 1 else ''} · generated {when} by chattune {escape(ver)}</p></header><main>"]
    if len(runs) > 1:
        parts.append(comparison_section(runs))
    parts += [run_section(r, i) for i, r in enumerate(runs)]
    parts.append("</main></body></html>\n")
    return "".join(parts)


# ---------------------------------------------------------------------------
# sections


def comparison_section(runs: Sequence[RunData]) -> str:
    """The comparison table and the runs' loss curves overlaid."""
    rows = comparison_rows(runs, keys=varying_keys(runs))
    train = [Series(r.name, *r.series("loss"), colour=PALETTE[i % 10]) for i, r in enumerate(runs)]
    evals = [Series(r.name, *r.series("eval_loss"), colour=PALETTE[i % 10], markers=True) for i, r in enumerate(runs)]
    charts = [line_chart(train, title="training loss (all runs)", chart_id="compare-loss", y_label="loss",
                         width=560, height=320)]
    if any(s.xs for s in evals):
        charts.append(line_chart(evals, title="eval loss (all runs)", chart_id="compare-eval-loss", y_label="loss",
                                 width=560, height=320))
    return ('<section id="comparison"><h2>Comparison</h2>' + table(rows, css="comparison")
            + f'<div class="charts">{"".join(charts)}</div></section>')


def run_section(r: RunData, index: int) -> str:
    """One run: facts, curves, eval results, probes, data, config."""
    status = "finished" if r.finished else "unfinished"
    parts = [f'<section class="run" id="run-{index}" data-run="{escape(r.name)}">',
             f'<h2>{escape(r.name)} <span class="status-{status}">{status}</span></h2>',
             f'<p class="muted">{escape(str(r.root.resolve()))}</p>', facts(r), charts(r, index)]
    if r.evals:
        parts.append("<h3>Evaluation</h3>" + "".join(eval_table(name, rec) for name, rec in r.evals.items()))
    parts.append(predictions_table(r))
    if r.data_report:
        parts.append(data_table(r.data_report))
    config_text = yaml.safe_dump(r.config, sort_keys=False, allow_unicode=True)
    parts.append(f"<details><summary>config (run_config.yaml)</summary><pre>{escape(config_text)}</pre></details>")
    parts.append("</section>")
    return "".join(parts)


def facts(r: RunData) -> str:
    """The settings that matter most, in one line."""
    items = [
        ("model", r.get("model.name_or_path")),
        ("data", ", ".join(Path(p if isinstance(p, str) else p.get("path", "?")).name for p in r.get("data.train", []) or [])),
        ("LoRA", f"r {r.get('lora.r')}, alpha {r.get('lora.alpha')}, dropout {r.get('lora.dropout')}"),
        ("batch", f"{r.get('train.batch_size')} × {r.get('train.grad_accum')}"),
        ("learning rate", r.get("train.learning_rate")),
        ("length", f"{r.get('train.epochs'):g} epochs" if (r.get("train.max_steps") or -1) < 0 and isinstance(r.get("train.epochs"), (int, float))
         else f"max_steps {r.get('train.max_steps')}"),
        ("max_length", r.get("data.max_length")),
        ("steps", r.summary.get("global_step")),
        ("wall time", f"{r.summary['wall_s']:.0f} s" if isinstance(r.summary.get("wall_s"), (int, float)) else None),
        ("trainable params", fmt(r.model_info.get("trainable_params"), "params")
         + (f" ({r.model_info['trainable_pct']:.2f}% of {fmt(r.model_info.get('total_params'), 'params')})"
            if r.model_info.get("trainable_pct") is not None else "")),
        ("final loss", fmt(r.summary.get("final_loss"), "loss")),
        ("eval loss", fmt(r.summary.get("eval_loss"), "loss")),
    ]
    return '<div class="facts">' + "".join(
        f"<span>{escape(k)}: <b>{escape(str(v))}</b></span>" for k, v in items if v not in (None, "", "None")) + "</div>"


def charts(r: RunData, index: int) -> str:
    """Loss (train, and eval when there is some), learning rate and grad norm against the step."""
    c = PALETTE[0]
    loss = [Series("train loss", *r.series("loss"), colour=c)]
    e_steps, e_vals = r.series("eval_loss")
    if e_steps:
        loss.append(Series("eval loss", e_steps, e_vals, colour=PALETTE[1], dashed=True, markers=True))
    out = [line_chart(loss, title="loss", chart_id=f"run-{index}-loss", y_label="loss"),
           line_chart([Series("learning rate", *r.series("learning_rate"), colour=PALETTE[2])], title="learning rate",
                      chart_id=f"run-{index}-lr"),
           line_chart([Series("grad norm", *r.series("grad_norm"), colour=PALETTE[3])], title="gradient norm",
                      chart_id=f"run-{index}-grad-norm")]
    return '<div class="charts">' + "".join(out) + "</div>"


def eval_table(name: str, record: dict[str, Any]) -> str:
    """One eval/<name>.json: its metrics for each model that was scored."""
    metrics = record.get("metrics") or {}
    whos = [w for w in ("base", "tuned", "change") if isinstance(metrics.get(w), dict)]  # change: eval --loss
    keys = list(dict.fromkeys(k for w in whos for k, v in metrics[w].items() if not isinstance(v, (dict,))))
    head = "".join(f"<th>{'tuned − base' if w == 'change' else w + ' model'}</th>" for w in whos)
    body = []
    for k in keys:
        cells = "".join(f'<td class="num">{escape(_metric(metrics[w].get(k)))}</td>' for w in whos)
        body.append(f"<tr><th>{escape(k)}</th>{cells}</tr>")
    info = f"{record.get('kind', '')}, {record.get('rows', '?')} rows"
    return (f'<table class="eval" data-eval="{escape(name)}"><caption>{escape(name)} ({escape(info)})</caption>'
            f"<tr><th>metric</th>{head}</tr>{''.join(body)}</table>")


def _metric(v: Any) -> str:
    if isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v):
        return f"{v[0]:.1f} – {v[1]:.1f}"
    if isinstance(v, float):
        return f"{v:.2f}"
    return "" if v is None else str(v)


def predictions_table(r: RunData) -> str:
    """Each probe question with the base model's answer (epoch 0) beside the tuned model's last answer."""
    if not r.predictions:
        return '<h3>Prediction probes</h3><p class="muted">no probe answers in this run (tracking.probe_size: 0?)</p>'
    epochs = sorted(r.predictions)
    before = r.predictions[epochs[0]]
    last = epochs[-1] if len(epochs) > 1 else None
    after = r.predictions[last] if last is not None else []
    first_label = "base model (before training)" if epochs[0] == 0 else f"epoch {epochs[0]}"
    cols = ["#", "question", first_label] + ([f"tuned model (epoch {last})"] if last is not None else []) + ["reference"]
    rows = []
    for i, b in enumerate(before):
        a = after[i] if i < len(after) else {}
        cells = [str(i + 1), b.get("question", ""), b.get("answer", "")]
        if last is not None:
            cells.append(a.get("answer", ""))
        cells.append(b.get("reference", ""))
        rows.append("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in cells) + "</tr>")
    note = "" if last is not None else '<p class="muted">only the answers before training exist (no epoch finished)</p>'
    colgroup = '<colgroup><col class="idx">' + "<col>" * (len(cols) - 1) + "</colgroup>"
    return (f"<h3>Prediction probes</h3>{note}<table class=\"predictions\">{colgroup}<tr>"
            + "".join(f"<th>{escape(c)}</th>" for c in cols) + "</tr>" + "".join(rows) + "</table>")


def data_table(report: dict[str, Any]) -> str:
    """Rows per file and what rendering kept, truncated and dropped."""
    render = report.get("render") or {}
    items = [(f"rows in {Path(k).name}", v) for k, v in (report.get("files") or {}).items()]
    items += [("skipped records", len(report.get("skipped") or [])),
              ("samples", render.get("samples")), ("tokens", render.get("tokens")),
              ("supervised tokens", render.get("supervised_tokens")),
              ("truncated at max_length", render.get("truncated")),
              ("lost the end-of-turn token", render.get("lost_end_of_turn")),
              ("dropped (overlength / no labels)",
               f"{render.get('dropped_overlength', 0)} / {render.get('dropped_no_labels', 0)}")]
    body = "".join(f"<tr><th>{escape(k)}</th><td class=\"num\">{escape(str(v))}</td></tr>"
                   for k, v in items if v is not None)
    return f'<h3>Data</h3><table class="data">{body}</table>'


def table(rows: Sequence[dict[str, Any]], *, css: str) -> str:
    """A list of dicts as an HTML table (numbers right-aligned)."""
    cols = shown_columns(rows)
    if not cols:
        return ""
    head = "".join(f"<th>{escape(c)}</th>" for c in cols)
    body = []
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            num = isinstance(v, (int, float)) and not isinstance(v, bool)
            cls = ' class="num"' if num else ""
            cells.append(f"<td{cls}>{escape(fmt(v, c))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="{css}"><tr>{head}</tr>{"".join(body)}</table>'
