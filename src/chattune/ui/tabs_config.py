"""The Configure tab (a form generated from the config schema) and the Data tab (check report, label masks)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chattune import config
from chattune.data.check import build_report, render_both, scan_files
from chattune.errors import ChattuneError, ConfigError
from chattune.files import write_text
from chattune.model.sources import PACKAGED_ALIASES
from chattune.ui import form, jobs, views
from chattune.ui.context import Ctx, guard
from chattune.ui.strings import t
from chattune.verbs.data_check import load_renderer, verdict

UPLOADS = "uploads"  # uploaded data files are copied here, inside the working folder
PATH_KEYS = ("data.train", "data.eval", "tracking.probe_file", "output_dir")


@dataclass
class Form:
    """The Configure tab's parts other tabs read: the fields, their components and the preset state."""

    specs: list[form.FieldSpec]
    inputs: list[Any] = field(default_factory=list)  # state, then one component per spec
    errors: list[Any] = field(default_factory=list)


def presets(cwd: Path) -> list[str]:
    """Every YAML recipe under configs/ of the working folder."""
    return sorted(str(p.relative_to(cwd)) for p in (cwd / "configs").rglob("*.yaml")) if (cwd / "configs").is_dir() else []


def current(ctx: Ctx, fm: Form, state: dict, values: list[Any]) -> tuple[form.Checked, Path | None, list[str]]:
    """The form as a validated config (or its problems), with its preset and its key=value overrides."""
    preset = ctx.allowed.check(state["preset"], what="preset") if state.get("preset") else None
    extra = form.overrides(fm.specs, state.get("initial") or [], list(values))
    checked = form.check(preset, extra)
    if checked.cfg is not None:
        check_paths(ctx, checked.cfg)
    return checked, preset, extra


def require(ctx: Ctx, fm: Form, state: dict, values: list[Any]) -> tuple[config.RunConfig, Path | None, list[str]]:
    """As current(), but a config with problems is refused with the CLI's message."""
    checked, preset, extra = current(ctx, fm, state, values)
    if checked.cfg is None:
        raise ConfigError(f"{len(checked.problems)} problem(s):\n  " + "\n  ".join(m for _, m in checked.problems),
                          where="Configure", fix="fix the fields marked on the Configure tab")
    return checked.cfg, preset, extra


def check_paths(ctx: Ctx, cfg: config.RunConfig) -> None:
    """Every file or folder the config names must be inside the allowed folders."""
    for key in PATH_KEYS:
        value = form.value_at(cfg.model_dump(mode="json"), key)
        for p in value if isinstance(value, list) else [value]:
            if p:
                ctx.allowed.check(p, what=key)


def first_preset(ctx: Ctx) -> str | None:
    """The preset the page opens with: configs/demo.yaml when there is one."""
    choices = presets(ctx.allowed.cwd)
    return "configs/demo.yaml" if "configs/demo.yaml" in choices else (choices[0] if choices else None)


def configure_tab(ctx: Ctx, lang: Any, fm: Form, state: Any) -> Form:
    """`state` (the preset and its values) is made outside the tabs: a State inside a tab mislabels the next tab."""
    import gradio as gr

    choices = presets(ctx.allowed.cwd)
    first = first_preset(ctx)
    first_values = state.value["initial"]
    with ctx.label(gr.Tab(ctx.t("tab.configure"), id="configure"), "tab.configure"):
        with gr.Row():
            preset = ctx.label(gr.Dropdown(choices, value=first, label=ctx.t("cfg.preset"), elem_id="preset",
                                           allow_custom_value=True), "cfg.preset")
            load = ctx.label(gr.Button(ctx.t("cfg.load"), elem_id="load-preset"), "cfg.load", "value")
        with gr.Row():
            upload = ctx.label(gr.File(label=ctx.t("cfg.upload"), file_types=[".json", ".jsonl", ".csv", ".parquet"],
                                       elem_id="upload"), "cfg.upload")
            with gr.Column():
                data_path = ctx.label(gr.Textbox(label=ctx.t("cfg.data_path"), elem_id="data-path"), "cfg.data_path")
                use_path = ctx.label(gr.Button(ctx.t("cfg.use_path")), "cfg.use_path", "value")
        fields_box(ctx, fm, first_values)
        check_btn = ctx.label(gr.Button(ctx.t("cfg.validate"), variant="primary", elem_id="validate"), "cfg.validate",
                              "value")
        msg = gr.HTML(elem_id="cfg-message")
        command = ctx.label(gr.Textbox(label=ctx.t("cfg.command"), elem_id="command", interactive=False), "cfg.command")
        yaml_box = ctx.label(gr.Code(language="yaml", label=ctx.t("cfg.yaml"), elem_id="yaml"), "cfg.yaml")
        download = ctx.label(gr.DownloadButton(ctx.t("cfg.download"), elem_id="download"), "cfg.download", "value")
    fm.inputs = [state, *fm.inputs]
    outs = [msg, state, *fm.inputs[1:], *fm.errors]
    load.click(guard(ctx, len(outs))(lambda p: load_preset(ctx, fm, p)), inputs=preset, outputs=outs)
    validate_outs = [msg, command, yaml_box, download, *fm.errors]
    check_btn.click(guard(ctx, len(validate_outs), lang_arg=0)(lambda lg, *v: validate(ctx, fm, lg, v)),
                    inputs=[lang, *fm.inputs], outputs=validate_outs)
    data_field = fm.inputs[1 + [s.key for s in fm.specs].index("data.train")]
    upload.upload(guard(ctx, 2)(lambda f: use_upload(ctx, f)), inputs=upload, outputs=[msg, data_field])
    use_path.click(guard(ctx, 2)(lambda p: use_data_path(ctx, p)), inputs=data_path, outputs=[msg, data_field])
    return fm


def fields_box(ctx: Ctx, fm: Form, values: list[Any]) -> None:
    """One accordion per config section; each field with its help, and a line for its problems below it."""
    import gradio as gr

    with ctx.label(gr.Accordion(ctx.t("cfg.fields"), open=True), "cfg.fields"):
        for section in dict.fromkeys(s.section for s in fm.specs):
            with gr.Accordion(section or "output_dir", open=section in ("model", "data", "train", "")):
                for i, spec in [(i, s) for i, s in enumerate(fm.specs) if s.section == section]:
                    fm.inputs.append(field_component(spec, values[i]))
                    fm.errors.append(gr.HTML("", elem_id="err-" + spec.key.replace(".", "-"), elem_classes=["field-error"],
                                             padding=False))


def field_component(spec: form.FieldSpec, value: Any) -> Any:
    import gradio as gr

    eid = "f-" + spec.key.replace(".", "-")
    if spec.kind == "bool":
        return gr.Checkbox(value=bool(value), label=spec.key, info=spec.help, elem_id=eid)
    if spec.kind == "choice":
        return gr.Dropdown(list(spec.choices), value=value, label=spec.key, info=spec.help,
                           elem_id=eid)
    if spec.key == "model.name_or_path":  # a packaged alias to pick, or any folder / hub id typed in
        return gr.Dropdown(list(PACKAGED_ALIASES), value=value, label=spec.key,
                           info=spec.help, allow_custom_value=True, elem_id=eid)
    return gr.Textbox(value=value, label=spec.key, info=spec.help, elem_id=eid, max_lines=3)


def preset_values(ctx: Ctx, fm: Form, preset: str | None) -> tuple[dict, list[Any]]:
    """The form's state and values for a preset (or the defaults); the preset's values are the overrides' baseline."""
    path = ctx.allowed.check(preset, what="preset") if preset else None
    cfg = config.load(path, [] if path else ["data.train=[placeholder.jsonl]"])
    if path is None:
        cfg.data.train = []
    values = form.initial_texts(fm.specs, cfg)
    return {"preset": str(path) if path else None, "initial": values}, values


def load_preset(ctx: Ctx, fm: Form, preset: str | None) -> tuple:
    """Fill the form from a preset (or the defaults)."""
    state, values = preset_values(ctx, fm, preset)
    shown = ctx.allowed.shown(Path(state["preset"])) if state["preset"] else t("cfg.none", ctx.lang)
    return (views.page(f"<p class='ok'>{views.escape(shown)}</p>"), state, *values, *[""] * len(fm.errors))


def validate(ctx: Ctx, fm: Form, lang: str, values: tuple) -> tuple:
    """Problems next to their fields; for a valid config the YAML, the command and a file to download."""
    import gradio as gr

    checked, preset, extra = current(ctx, fm, values[0], list(values[1:]))
    errs = field_errors(fm, checked.problems)
    if checked.cfg is None:
        listed = "".join(f"<li>{views.escape(m)}</li>" for _, m in checked.problems)
        body = views.page(f"<p class='err'>{t('cfg.problems', lang)}</p><ul class='problems'>{listed}</ul>")
        return (body, "", "", gr.update(), *errs)
    text = form.yaml_text(checked.cfg)
    name = Path(checked.cfg.output_dir).name or "run"
    saved = ctx.allowed.cwd / jobs.JOBS_DIR / f"{name}.yaml"
    write_text(saved, text)
    cmd = form.command(preset, extra, ctx.allowed.cwd)
    return (views.page(f"<p class='ok' data-valid='1'>{t('cfg.ok', lang)}</p>"), cmd, text, str(saved), *errs)


def field_errors(fm: Form, problems: list[tuple[str, str]]) -> list[str]:
    """Each field's problems as HTML (empty when it has none); list items (data.train.0) go to their field."""
    out = []
    for spec in fm.specs:
        mine = [m for key, m in problems if key == spec.key or key.startswith(spec.key + ".")]
        lines = "".join(f"<p class='err' data-field-error='{spec.key}'>{views.escape(m)}</p>" for m in mine)
        out.append(views.page(lines) if lines else "")
    return out


def use_upload(ctx: Ctx, file: Any) -> tuple[str, str]:
    """Copy an uploaded data file into uploads/ of the working folder and train on it."""
    src = Path(file if isinstance(file, str) else file.name)
    dest = ctx.allowed.cwd / UPLOADS / src.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)  # a copy of a finished upload: nothing to make atomic
    return views.page(f"<p class='ok'>{views.escape(ctx.allowed.shown(dest))}</p>"), form.to_text([str(dest)])


def use_data_path(ctx: Ctx, path: str) -> tuple[str, str]:
    full = ctx.allowed.check(path, what="data file")
    if not full.is_file():
        raise ConfigError("no such file", where=str(full), fix="check the path")
    return views.page(f"<p class='ok'>{views.escape(ctx.allowed.shown(full))}</p>"), form.to_text([str(full)])


# ---------------------------------------------------------------------------
# Data tab


_CHECKED: dict[str, Any] = {}  # the last check: renderer and conversations, for the sample browser


def data_tab(ctx: Ctx, lang: Any, fm: Form) -> None:
    import gradio as gr

    with ctx.label(gr.Tab(ctx.t("tab.data"), id="data"), "tab.data"):
        run_check = ctx.label(gr.Button(ctx.t("data.check"), variant="primary", elem_id="check-data"), "data.check",
                              "value")
        report = gr.HTML(elem_id="check-report")
        with gr.Row():
            index = ctx.label(gr.Number(value=1, precision=0, minimum=1, label=ctx.t("data.sample"), elem_id="sample"),
                              "data.sample")
            show = ctx.label(gr.Button(ctx.t("data.show"), elem_id="show-sample"), "data.show", "value")
        sample = gr.HTML(elem_id="sample-mask")
    run_check.click(guard(ctx, 1, lang_arg=0)(lambda lg, *v: check_data(ctx, fm, lg, v)),
                    inputs=[lang, *fm.inputs], outputs=report)
    show.click(guard(ctx, 1, lang_arg=0)(lambda lg, i, *v: show_sample(ctx, fm, lg, i, v)),
               inputs=[lang, index, *fm.inputs], outputs=sample)


def check_data(ctx: Ctx, fm: Form, lang: str, values: tuple) -> str:
    """`chattune data check`'s findings for the form's config, with the verdict training would give."""
    cfg, _, _ = require(ctx, fm, values[0], list(values[1:]))
    files, conversations = scan_files(cfg)
    if not conversations:
        rows = "".join(f"<li><code>{views.escape(w)}</code>: {views.escape(r)}</li>"
                       for f in files for w, r in f.invalid[:20])
        errors = "".join(f"<p class='err'>{views.escape(f.error)}</p>" for f in files if f.error)
        return views.page(errors + f"<ul class='skipped'>{rows}</ul>")
    renderer = load_renderer(cfg)
    report = build_report(cfg, files, conversations, render_both(renderer, conversations, cfg), bins=16)
    _CHECKED.update(cfg=cfg, renderer=renderer, conversations=conversations)
    try:
        verdict(report, cfg)
        tail = ""
    except ChattuneError as exc:  # what training would stop at
        tail = f"<p class='err' data-verdict='1'>{views.escape(exc.render())}</p>"
    return views.check_report(report, lambda k: t(k, lang)) + views.page(tail)


def show_sample(ctx: Ctx, fm: Form, lang: str, index: float, values: tuple) -> str:
    """One conversation rendered with the run's template, its supervised tokens highlighted."""
    cfg, _, _ = require(ctx, fm, values[0], list(values[1:]))
    if _CHECKED.get("cfg") != cfg:
        check_data(ctx, fm, lang, values)
    convs = _CHECKED["conversations"]
    i = min(max(int(index or 1), 1), len(convs)) - 1
    renderer = _CHECKED["renderer"]
    samples, _ = renderer.render(convs[i], train_on=cfg.data.train_on)
    return "".join(views.mask(renderer.tokenizer, s, cfg.data.max_length, renderer.end_of_turn_ids(),
                              lambda k: t(k, lang)) for s in samples)
