"""The Train tab (a `chattune train` process, watched live) and the Chat tab (base and tuned side by side)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

from chattune.data.check import scan_files
from chattune.errors import DataError, RunDirError
from chattune.files import write_text
from chattune.infer.session import Session, load_session, with_system
from chattune.infer.stream import base_model, stream_answer
from chattune.options import GENERATION
from chattune.report.runs import load_run
from chattune.rundir import RunDir
from chattune.ui import form, jobs, views
from chattune.ui.context import Ctx, guard
from chattune.ui.strings import t
from chattune.ui.tabs_config import Form, require

TICK_S = 2.0  # how often the Train tab reads the run's files again


def output_dir(ctx: Ctx, fm: Form, values: list[Any]) -> Path:
    """The run folder the form names (no validation needed to watch it), inside the allowed folders."""
    text = values[1 + [s.key for s in fm.specs].index("output_dir")]
    return ctx.allowed.check(text or "runs/run", what="output_dir")


def train_tab(ctx: Ctx, lang: Any, fm: Form, demo: Any) -> None:
    import gradio as gr

    with ctx.label(gr.Tab(ctx.t("tab.train"), id="train"), "tab.train"):
        with gr.Row():
            start = ctx.label(gr.Button(ctx.t("train.start"), variant="primary", elem_id="start"), "train.start",
                              "value")
            stop = ctx.label(gr.Button(ctx.t("train.stop"), variant="stop", elem_id="stop"), "train.stop", "value")
            overwrite = ctx.label(gr.Checkbox(False, label=ctx.t("train.overwrite"), elem_id="overwrite"),
                                  "train.overwrite")
        msg = gr.HTML(elem_id="train-message")
        live = gr.HTML(elem_id="live")
        timer = gr.Timer(TICK_S)  # inside the tab: any other child of gr.Tabs shifts the tab labels after it
    start.click(guard(ctx, 1, lang_arg=0)(lambda lg, ow, *v: start_training(ctx, fm, lg, ow, v)),
                inputs=[lang, overwrite, *fm.inputs], outputs=msg)
    stop.click(guard(ctx, 1, lang_arg=0)(lambda lg, *v: stop_training(ctx, fm, lg, v)),
               inputs=[lang, *fm.inputs], outputs=msg)
    timer.tick(guard(ctx, 1, lang_arg=0)(lambda lg, *v: live_view(ctx, fm, lg, v)), inputs=[lang, *fm.inputs],
               outputs=live, show_progress="hidden")


def start_training(ctx: Ctx, fm: Form, lang: str, overwrite: bool, values: tuple) -> str:
    """Validate, read the data once (a broken file stops here, with file:line), then start `chattune train`."""
    cfg, preset, extra = require(ctx, fm, values[0], list(values[1:]))
    refuse_bad_data(cfg)
    run_dir = ctx.allowed.check(cfg.output_dir, what="output_dir")
    if preset is None:  # no recipe chosen: train from the YAML the Configure tab shows
        preset = ctx.allowed.cwd / jobs.JOBS_DIR / f"{run_dir.name}.yaml"
        preset.parent.mkdir(parents=True, exist_ok=True)
        write_text(preset, form.yaml_text(cfg))
        extra = []
    shown = preset.relative_to(ctx.allowed.cwd) if preset.is_relative_to(ctx.allowed.cwd) else preset
    argv = ["train", str(shown), *extra] + (["--overwrite"] if overwrite else [])
    job = jobs.start("train", run_dir, argv, ctx.allowed.cwd)
    return views.page(f"<p class='ok' data-started='{job.pid}'>{t('train.started', lang)}: "
                      f"<code>{views.escape(form.command(preset, extra, ctx.allowed.cwd))}</code> "
                      f"({t('train.log', lang)}: {views.escape(ctx.allowed.shown(job.log))})</p>")


def refuse_bad_data(cfg: Any) -> None:
    """The data files as training reads them: an unreadable file or (with on_bad_record=error) a bad row refuses."""
    files, conversations = scan_files(cfg)
    for f in files:
        if f.error:
            raise DataError("the data file cannot be read; nothing was started", where=f.path, fix=f.error)
        if f.invalid and cfg.data.on_bad_record == "error":
            where, reason = f.invalid[0]
            raise DataError(f"{reason}; nothing was started ({len(f.invalid)} bad row(s) in this file)", where=where,
                            fix="fix the row, or set data.on_bad_record=skip")
    if not conversations:
        raise DataError("no usable records in the training data; nothing was started", where=", ".join(cfg.data.train))


def stop_training(ctx: Ctx, fm: Form, lang: str, values: tuple) -> str:
    run_dir = output_dir(ctx, fm, list(values))
    job = jobs.find(run_dir, "train")
    if job is None or not jobs.stop(job):
        return views.page(f"<p>{t('train.idle', lang)}</p>")
    return views.page(f"<p class='ok' data-stopping='1'>{t('train.stopped', lang)}</p>")


def status(run_dir: Path, lang: str) -> tuple[str, str]:
    """(state, one line): running (step, ETA), finished, stopped, died (with its last error), or idle."""
    job = jobs.find(run_dir, "train")
    if job and job.alive:
        text = t("train.running", lang)
        prog = jobs.progress(job.log)
        if prog:
            text += f" · {t('train.step', lang)} {prog[0]}/{prog[1]} · {t('train.eta', lang)} {prog[2]}"
        return "running", text
    if RunDir(run_dir).is_finished():
        return "finished", t("train.finished", lang)
    busy = jobs.run_in_use(run_dir)
    if busy:
        return "running", f"{t('train.running', lang)} ({busy})"
    if job:
        err = jobs.last_error(job.log)
        if err and "KeyboardInterrupt" not in err and not err.startswith("interrupted"):
            return "died", f"{t('train.died', lang)}: {err} ({t('train.log', lang)}: {job.log})"
        return "stopped", t("train.stopped", lang)
    return "idle", t("train.idle", lang)


def live_view(ctx: Ctx, fm: Form, lang: str, values: tuple) -> str:
    """The status, the charts from metrics.jsonl and the probe answers, read again on every tick."""
    run_dir = output_dir(ctx, fm, list(values))
    state, text = status(run_dir, lang)
    try:
        run = load_run(run_dir)
    except RunDirError:
        return views.live(None, state, text)
    speeds = [r["tokens_per_s"] for r in run.train_rows if isinstance(r.get("tokens_per_s"), (int, float))]
    if speeds:
        text += f" · {speeds[-1]:.0f} {t('train.tps', lang)}"
    return views.live(run, state, text)


# ---------------------------------------------------------------------------
# Chat tab


_SESSIONS: dict[tuple[str, float], Session] = {}


def session_for(run_dir: Path) -> Session:
    """The run loaded once per adapter version (a run trained again is loaded again)."""
    adapter = RunDir(run_dir).adapter / "adapter_model.safetensors"
    key = (str(run_dir), adapter.stat().st_mtime if adapter.is_file() else 0.0)
    if key not in _SESSIONS:
        _SESSIONS.clear()  # one model in memory at a time
        _SESSIONS[key] = load_session(run_dir)
    return _SESSIONS[key]


def chat_tab(ctx: Ctx, lang: Any, fm: Form, history: Any) -> None:
    import gradio as gr

    with ctx.label(gr.Tab(ctx.t("tab.chat"), id="chat"), "tab.chat"):
        with gr.Row():
            run_box = ctx.label(gr.Textbox(label=ctx.t("chat.run_dir"), elem_id="chat-run"), "chat.run_dir")
            system = ctx.label(gr.Textbox(label=ctx.t("chat.system"), elem_id="chat-system"), "chat.system")
            limit = ctx.label(gr.Number(value=GENERATION.max_new_tokens, precision=0, minimum=1,
                                        label=ctx.t("chat.max_new_tokens"), elem_id="chat-max"), "chat.max_new_tokens")
        with gr.Row():
            with gr.Column():
                base = ctx.label(gr.Chatbot(label=ctx.t("chat.base"), elem_id="chat-base", height=360), "chat.base")
                base_flag = gr.HTML(elem_id="flag-base")
            with gr.Column():
                tuned = ctx.label(gr.Chatbot(label=ctx.t("chat.tuned"), elem_id="chat-tuned", height=360), "chat.tuned")
                tuned_flag = gr.HTML(elem_id="flag-tuned")
        message = ctx.label(gr.Textbox(label=ctx.t("chat.message"), elem_id="chat-message"), "chat.message")
        with gr.Row():
            send = ctx.label(gr.Button(ctx.t("chat.send"), variant="primary", elem_id="chat-send"), "chat.send", "value")
            reset = ctx.label(gr.Button(ctx.t("chat.reset"), elem_id="chat-reset"), "chat.reset", "value")
        msg = gr.HTML(elem_id="chat-error")
    outs = [msg, tuned, base, tuned_flag, base_flag, history, message]
    def send_fn(lg: str, run: str, sy: str, mx: float, hist: list, st: list, sb: list, text: str, *v: Any) -> Iterator:
        yield from chat(ctx, fm, lg, run, sy, mx, hist, (st, sb), text, v)

    send_fn = guard(ctx, len(outs), lang_arg=0)(send_fn)
    for trigger in (send.click, message.submit):
        trigger(send_fn, inputs=[lang, run_box, system, limit, history, tuned, base, message, *fm.inputs],
                outputs=outs)
    reset.click(lambda: ("", [], [], "", "", [], ""), outputs=outs)


def chat(ctx: Ctx, fm: Form, lang: str, run: str, system: str, limit: float, history: list, shown: tuple,
         text: str, values: tuple) -> Iterator[tuple]:
    """Stream the tuned answer, then the base model's to the same conversation; flag whether each stopped itself."""
    if not (text or "").strip():
        return
    run_dir = ctx.allowed.check(run, what="run folder") if (run or "").strip() else output_dir(ctx, fm, list(values))
    session = session_for(run_dir)
    history = [*history, {"role": "user", "content": text.strip()}]
    messages = with_system(history, system.strip() or session.system)
    user = {"role": "user", "content": text.strip()}
    shown_t, shown_b = [*(shown[0] or []), user], [*(shown[1] or []), user]
    answers, flags = {"tuned": "", "base": ""}, {"tuned": "", "base": ""}
    gen = {"max_new_tokens": int(limit or GENERATION.max_new_tokens)}
    for who in ("tuned", "base"):
        finish: dict[str, Any] = {}
        with base_model(session.model) if who == "base" else contextlib.nullcontext():
            for piece in stream_answer(session, messages, finish=finish, **gen):
                answers[who] += piece
                yield _chat_out(shown_t, shown_b, answers, flags, history, "")
        stopped = finish.get("stopped")
        flags[who] = views.page(f"<p class='{'ok' if stopped else 'err'}' data-stopped='{int(bool(stopped))}'>"
                                f"{t('chat.stopped' if stopped else 'chat.cut', lang)}</p>")
    history = [*history, {"role": "assistant", "content": answers["tuned"].strip()}]
    yield _chat_out(shown_t, shown_b, answers, flags, history, "")


def _chat_out(shown_t: list, shown_b: list, answers: dict, flags: dict, history: list, message: str) -> tuple:
    tuned = [*shown_t, {"role": "assistant", "content": answers["tuned"]}]
    base = [*shown_b, {"role": "assistant", "content": answers["base"]}]
    return "", tuned, base, flags["tuned"], flags["base"], history, message
