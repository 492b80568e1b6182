"""HTML the page shows: the data check report, a sample's label mask, a run's live state, the runs table.

Built from the same numbers and readers as the CLI's views (data/check.py, report/html.py); nothing here
imports Gradio. Every user-given text is escaped.
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any, Callable, Sequence

from chattune.data.check import CheckReport, mask_segments
from chattune.data.render import IGNORE, Sample
from chattune.report import html as report_html
from chattune.report.runs import RunData
from chattune.report.table import comparison_rows

T = Callable[[str], str]  # a label looked up in the page's language (strings.t bound to one language)

CSS = report_html.CSS + """
.mask{white-space:pre-wrap;word-break:break-word;font:13px/1.6 ui-monospace,monospace;background:#fff;
  border:1px solid #e2e8f0;border-radius:6px;padding:10px}
.chattune .sup{background:#bbf7d0;color:#14532d;border-bottom:2px solid #16a34a}
.chattune .ign{color:#64748b}
.chattune .cut{color:#b91c1c;text-decoration:line-through}
.chattune .eot{background:#16a34a;color:#fff;font-weight:600}
.hist{display:grid;grid-template-columns:max-content 1fr max-content;gap:2px 8px;font-size:12px;max-width:640px}
.hist .bar{background:#0ea5e9;height:12px;border-radius:2px}
.hist .bar.over{background:#dc2626}
.err{color:#b91c1c;font-weight:600}
.ok{color:#15803d;font-weight:600}
"""


def page(body: str) -> str:
    """A fragment with the report's style sheet (each HTML component is styled on its own)."""
    return f"<style>{CSS}</style><div class='chattune'>{body}</div>"


def error(text: str) -> str:
    return page(f'<p class="err" data-error="1">{escape(text)}</p>')


def check_report(report: CheckReport, t: T) -> str:
    """Files (kept / skipped with file:line), duplicates, length statistics, histogram and truncation."""
    rows = [{t("check.file"): f.path, t("check.role"): f.role, t("check.rows"): f.rows, t("check.kept"): f.valid,
             t("check.skipped"): len(f.invalid), t("check.error"): f.error or ""} for f in report.files]
    parts = [f"<h3>{t('check.files')}</h3>", report_html.table(rows, css="files")]
    invalid = [i for f in report.files for i in f.invalid]
    if invalid:
        items = "".join(f"<li><code>{escape(w)}</code>: {escape(r)}</li>" for w, r in invalid[:50])
        parts.append(f"<h3 class='err'>{t('check.skipped_rows')} ({len(invalid)})</h3><ul class='skipped'>{items}</ul>")
    dups = "; ".join(" = ".join(g[:3]) for g in report.duplicates[:5]) or t("check.none")
    parts.append(f"<h3>{t('check.duplicates')}</h3><p>{escape(dups)}</p>")
    if report.conflicts:
        parts.append(f"<p>{t('check.conflicts')}: {escape('; '.join(' vs '.join(g[:3]) for g in report.conflicts[:5]))}</p>")
    stats = [{"": name, **report.lengths.get(name, {})} for name in ("total", "prompt", "supervised")]
    parts += [f"<h3>{t('check.lengths')}</h3>", report_html.table(stats, css="lengths"),
              histogram(report.histogram, report.max_length), truncation(report, t)]
    return page("".join(parts))


def histogram(hist: Sequence[tuple[int, int, int]], max_length: int) -> str:
    if not hist:
        return ""
    top = max(c for _, _, c in hist) or 1
    cells = []
    for lo, hi, c in hist:
        over = " over" if hi - 1 > max_length else ""
        cells.append(f"<span>{lo}–{hi - 1}</span><div><div class='bar{over}' style='width:{100 * c / top:.1f}%'></div>"
                     f"</div><span>{c}</span>")
    return f"<div class='hist' data-hist='{len(hist)}'>{''.join(cells)}</div>"


def truncation(report: CheckReport, t: T) -> str:
    r = report.render
    text = (f"max_length={report.max_length} ({report.overlength}): {t('check.truncated')} {r.get('truncated', 0)}, "
            f"{t('check.lost_eot')} {r.get('lost_end_of_turn', 0)}, {t('check.dropped')} "
            f"{r.get('dropped_overlength', 0) + r.get('dropped_no_labels', 0)}, {t('check.lost_tokens')} "
            f"{report.lost_response_tokens}")
    bad = r.get("truncated") or r.get("lost_end_of_turn")
    return f"<p class='{'err' if bad else 'ok'}' data-truncation='1'>{escape(text)}</p>"


def mask(tokenizer: Any, sample: Sample, max_length: int, end_of_turn: Sequence[int], t: T) -> str:
    """One sample's text, supervised tokens highlighted; the end-of-turn token stands out on its own."""
    eot = set(end_of_turn)
    spans = []
    for seg in mask_segments(tokenizer, sample, max_length):
        cls = "cut" if seg.cut else "sup" if seg.supervised else "ign"
        if seg.supervised and not seg.cut:
            spans.append(_supervised(tokenizer, seg.text, eot))
        else:
            spans.append(f"<span class='{cls}'>{escape(seg.text)}</span>")
    n_sup = sum(label != IGNORE for label in sample.labels)
    legend = (f"<p><span class='sup'>{t('mask.supervised')}</span> · <span class='eot'>{t('mask.eot')}</span> · "
              f"<span class='ign'>{t('mask.ignored')}</span> · <span class='cut'>{t('mask.cut')}</span></p>")
    head = f"<p><code>{escape(sample.where)}</code> · {len(sample.input_ids)} tokens, {n_sup} {t('mask.supervised_n')}</p>"
    return page(legend + head + f"<div class='mask'>{''.join(spans)}</div>")


def _supervised(tokenizer: Any, text: str, eot: set[int]) -> str:
    """A supervised run with each end-of-turn token marked on its own."""
    marks = [tokenizer.decode([i], skip_special_tokens=False) for i in eot]
    out, rest = [], text
    while rest:
        hits = [(rest.find(m), m) for m in marks if m and rest.find(m) >= 0]
        if not hits:
            out.append(f"<span class='sup'>{escape(rest)}</span>")
            break
        at, m = min(hits)
        if at:
            out.append(f"<span class='sup'>{escape(rest[:at])}</span>")
        out.append(f"<span class='sup eot' data-eot='1'>{escape(m)}</span>")
        rest = rest[at + len(m):]
    return "".join(out)


def live(run: RunData | None, state: str, status: str) -> str:
    """Status line, loss / learning-rate / grad-norm charts and the probe answers of a run being trained."""
    line = f"<p class='{'err' if state == 'died' else 'ok' if state == 'finished' else ''}' data-status='{state}'>" \
           f"{escape(status)}</p>"
    if run is None:
        return page(line)
    return page(line + report_html.charts(run, 0) + report_html.predictions_table(run))


def runs_table(runs: Sequence[RunData], links: dict[str, str], t: T) -> str:
    """Every run with its status, final loss and eval scores, and a link to its report.html."""
    rows = comparison_rows(runs, keys=[])
    items = "".join(f"<li><a href='{escape(links[r.name])}' target='_blank' data-report='{escape(r.name)}'>"
                    f"{escape(r.name)}: {t('runs.report')}</a></li>" for r in runs if r.name in links)
    return page(report_html.table(rows, css="runs") + f"<ul class='reports'>{items}</ul>")
