"""The Evaluate, Export and Runs tabs: `chattune eval` and `chattune merge` as processes, runs read back."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterator

from chattune.errors import ChattuneError, RunDirError
from chattune.export.quants import QUANTS
from chattune.options import EVAL, EXPORT, MERGE, EvalOptions, ExportOptions, MergeOptions
from chattune.report import html as report_html
from chattune.report.runs import expand_run_dirs, load_run, load_runs
from chattune.rundir import RunDir
from chattune.ui import jobs, views
from chattune.ui.context import Ctx, guard
from chattune.ui.strings import t
from chattune.ui.tabs_config import Form
from chattune.ui.tabs_run import output_dir
from chattune.verbs import report as report_verb

POLL_S = 1.0


def run_job(ctx: Ctx, name: str, run_dir: Path, argv: list[str], lang: str) -> Iterator[str]:
    """Start `chattune ARGV`, show that it runs until it ends, then its outcome (the last error if it failed)."""
    job = jobs.start(name, run_dir, argv, ctx.allowed.cwd)
    started = time.monotonic()
    while job.alive:
        yield views.page(f"<p data-job='running'>{t('job.running', lang)}: <code>chattune {views.escape(' '.join(argv))}"
                         f"</code> · {time.monotonic() - started:.0f} s</p>")
        time.sleep(POLL_S)
    status = jobs.exit_status(job)
    err = jobs.last_error(job.log)
    if status not in (0, None) or (status is None and err):
        raise ChattuneError(f"`chattune {argv[0]}` failed: {err or f'exit status {status}'}", where=str(job.log))
    yield views.page(f"<p class='ok' data-job='done'>{t('job.done', lang)}</p>")


def pick_run(ctx: Ctx, fm: Form, text: str, values: tuple) -> Path:
    """The run folder typed in, or the Configure tab's output_dir; it must hold a trained adapter."""
    run_dir = ctx.allowed.check(text, what="run folder") if (text or "").strip() else output_dir(ctx, fm, list(values))
    RunDir(run_dir).require_adapter()
    return run_dir


def evaluate_tab(ctx: Ctx, lang: Any, fm: Form) -> None:
    import gradio as gr

    with ctx.label(gr.Tab(ctx.t("tab.evaluate"), id="evaluate"), "tab.evaluate"):
        run_box = ctx.label(gr.Textbox(label=ctx.t("chat.run_dir"), elem_id="eval-run"), "chat.run_dir")
        with gr.Row():
            data = ctx.label(gr.Textbox(label=ctx.t("eval.data"), elem_id="eval-data"), "eval.data")
            mcq = ctx.label(gr.Textbox(label=ctx.t("eval.mcq"), elem_id="eval-mcq"), "eval.mcq")
        with gr.Row():
            compare = ctx.label(gr.Checkbox(True, label=ctx.t("eval.compare_base")), "eval.compare_base")
            limit = ctx.label(gr.Textbox(label=ctx.t("eval.limit"), elem_id="eval-limit"), "eval.limit")
            metrics = gr.Textbox(EVAL.metrics, label="--metrics", info=EvalOptions.model_fields["metrics"].description)
        go = ctx.label(gr.Button(ctx.t("eval.run"), variant="primary", elem_id="eval-go"), "eval.run", "value")
        out = gr.HTML(elem_id="eval-status")
        results = gr.HTML(elem_id="eval-results")
    go.click(guard(ctx, 2, lang_arg=0)(lambda lg, *a: (yield from evaluate(ctx, fm, lg, *a))),
             inputs=[lang, run_box, data, mcq, compare, limit, metrics, *fm.inputs], outputs=[out, results])


def evaluate(ctx: Ctx, fm: Form, lang: str, run: str, data: str, mcq: str, compare: bool, limit: str, metrics: str,
             *values: Any) -> Iterator[tuple[str, str]]:
    run_dir = pick_run(ctx, fm, run, values)
    argv = ["eval", str(run_dir)]
    for flag, path in (("--data", data), ("--mcq", mcq)):
        if (path or "").strip():
            argv += [flag, str(ctx.allowed.check(path, what=flag))]
    argv += ["--metrics", metrics or EVAL.metrics] + (["--compare-base"] if compare else [])
    argv += ["--limit", limit.strip()] if (limit or "").strip() else []
    for shown in run_job(ctx, "eval", run_dir, argv, lang):
        yield shown, ""
    yield shown, eval_tables(run_dir)


def eval_tables(run_dir: Path) -> str:
    """Every eval/<name>.json of the run as a table, base and tuned side by side."""
    run = load_run(run_dir)
    return views.page("".join(report_html.eval_table(name, rec) for name, rec in run.evals.items()))


# ---------------------------------------------------------------------------
# Export: one function per action (ACTIONS), each the command line of its verb.


def merge_action(ctx: Ctx, run_dir: Path, out: str, dtype: str) -> list[str]:
    """`chattune merge RUN --out DIR --dtype D`."""
    return ["merge", str(run_dir), "--out", str(ctx.allowed.check(out, what="--out")), "--dtype", dtype]


def gguf_action(ctx: Ctx, run_dir: Path, to: str, quant: str, overwrite: bool) -> list[str]:
    """`chattune export RUN --to gguf|ollama --quant Q`: merged, converted by llama.cpp, answers checked against it."""
    return ["export", str(run_dir), "--to", to, "--quant", quant] + (["--overwrite"] if overwrite else [])


ACTIONS: dict[str, Callable[..., list[str]]] = {"merge": merge_action, "export": gguf_action}


def export_tab(ctx: Ctx, lang: Any, fm: Form) -> None:
    import gradio as gr

    with ctx.label(gr.Tab(ctx.t("tab.export"), id="export"), "tab.export"):
        run_box = ctx.label(gr.Textbox(label=ctx.t("chat.run_dir"), elem_id="export-run"), "chat.run_dir")
        ctx.label(gr.Markdown(f"### {ctx.t('export.merge')}"), "export.merge", "value", "### {}")
        with gr.Row():
            out = ctx.label(gr.Textbox(label=ctx.t("export.out"), elem_id="merge-out"), "export.out")
            dtype = ctx.label(gr.Dropdown(list(MergeOptions.model_fields["dtype"].annotation.__args__),
                                          value=MERGE.dtype, label=ctx.t("export.dtype")), "export.dtype")
        go = ctx.label(gr.Button(ctx.t("export.run"), variant="primary", elem_id="merge-go"), "export.run", "value")
        status = gr.HTML(elem_id="merge-status")
        gguf_section(ctx, lang, fm, run_box)  # inside the tab: gr.Tabs holds nothing but tabs
    merge = guard(ctx, 1, lang_arg=0)(lambda lg, run, o, d, *v: (yield from export(ctx, fm, lg, "merge", run, v, o, d)))
    go.click(merge, inputs=[lang, run_box, out, dtype, *fm.inputs], outputs=status)


def gguf_section(ctx: Ctx, lang: Any, fm: Form, run_box: Any) -> None:
    """GGUF for llama.cpp / LM Studio, or GGUF + Modelfile for Ollama (`chattune export`), with its parity table."""
    import gradio as gr

    ctx.label(gr.Markdown(f"### {ctx.t('export.gguf')}"), "export.gguf", "value", "### {}")
    with gr.Row():
        to = ctx.label(gr.Dropdown(list(ExportOptions.model_fields["to"].annotation.__args__), value=EXPORT.to,
                                   label=ctx.t("export.to")), "export.to")
        quant = ctx.label(gr.Dropdown(list(QUANTS), value=EXPORT.quant, label=ctx.t("export.quant")), "export.quant")
        overwrite = ctx.label(gr.Checkbox(False, label=ctx.t("export.overwrite")), "export.overwrite")
    go = ctx.label(gr.Button(ctx.t("export.gguf_run"), variant="primary", elem_id="gguf-go"), "export.gguf_run", "value")
    status = gr.HTML(elem_id="gguf-status")
    run = guard(ctx, 1, lang_arg=0)(lambda lg, r, t_, q, o, *v: (yield from export(ctx, fm, lg, "export", r, v, t_, q, o)))
    go.click(run, inputs=[lang, run_box, to, quant, overwrite, *fm.inputs], outputs=status)


def export(ctx: Ctx, fm: Form, lang: str, action: str, run: str, values: tuple, *args: Any) -> Iterator[str]:
    run_dir = pick_run(ctx, fm, run, values)
    yield from run_job(ctx, action, run_dir, ACTIONS[action](ctx, run_dir, *args), lang)


# ---------------------------------------------------------------------------
# Runs


def runs_tab(ctx: Ctx, lang: Any) -> None:
    import gradio as gr

    with ctx.label(gr.Tab(ctx.t("tab.runs"), id="runs"), "tab.runs"):
        with gr.Row():
            folder = ctx.label(gr.Textbox("runs", label=ctx.t("runs.folder"), elem_id="runs-folder"), "runs.folder")
            refresh = ctx.label(gr.Button(ctx.t("runs.refresh"), elem_id="runs-refresh"), "runs.refresh", "value")
        table = gr.HTML(elem_id="runs-table")
        with gr.Row():
            pick = ctx.label(gr.Dropdown([], multiselect=True, label=ctx.t("runs.pick"), elem_id="runs-pick"),
                             "runs.pick")
            compare = ctx.label(gr.Button(ctx.t("runs.compare"), elem_id="runs-compare"), "runs.compare", "value")
        side = gr.HTML(elem_id="runs-compare-view")
    refresh.click(guard(ctx, 2, lang_arg=0)(lambda lg, f: list_runs(ctx, lg, f)), inputs=[lang, folder],
                  outputs=[table, pick])
    compare.click(guard(ctx, 1, lang_arg=0)(lambda lg, p: compare_runs(ctx, lg, p)), inputs=[lang, pick],
                  outputs=side)


def list_runs(ctx: Ctx, lang: str, folder: str) -> tuple[str, Any]:
    """Every run under the folder: status, losses, eval scores, and its report.html (written now)."""
    import gradio as gr

    root = ctx.allowed.check(folder, what="runs folder")
    try:
        runs = load_runs([root])
    except RunDirError:
        return views.page(f"<p>{t('runs.none', lang)}</p>"), gr.update(choices=[])
    links = {}
    for r in runs:
        page = report_verb.run([str(r.root)], out=str(r.root / "report.html"))
        links[r.name] = f"/gradio_api/file={page.resolve()}"
    names = [ctx.allowed.shown(p) for p in expand_run_dirs([root])]
    return views.runs_table(runs, links, lambda k: t(k, lang)), gr.update(choices=names, value=names[:2])


def compare_runs(ctx: Ctx, lang: str, picked: list[str]) -> str:
    """The chosen runs side by side: the sweep comparison table and their loss curves overlaid."""
    runs = [load_run(ctx.allowed.check(p, what="run")) for p in picked or []]
    if len(runs) < 2:
        return views.page(f"<p>{t('runs.pick', lang)}</p>")
    return views.page(report_html.comparison_section(runs))
