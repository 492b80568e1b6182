"""The page: one Gradio Blocks with a tab per step of the loop, every label from strings.py."""

from __future__ import annotations

import functools
from typing import Any

from chattune.ui import tabs_config, tabs_results, tabs_run
from chattune.ui.context import Ctx
from chattune.ui.form import fields
from chattune.ui.strings import t


def build(ctx: Ctx) -> Any:
    """The whole page."""
    import gradio as gr

    with gr.Blocks(title="chattune", analytics_enabled=False) as demo:
        with gr.Row():
            ctx.label(gr.Markdown(f"## {ctx.t('title')}"), "title", "value", "## {}")
            lang = ctx.label(gr.Radio([("English", "en"), ("中文", "zh")], value=ctx.lang, label=ctx.t("lang"),
                                      elem_id="lang"), "lang")
        form = tabs_config.Form(list(fields()))
        # Only tabs inside gr.Tabs: any other child there (a State, a Timer) shifts the labels of the tabs after it.
        state = gr.State(tabs_config.preset_values(ctx, form, tabs_config.first_preset(ctx))[0])
        history = gr.State([])
        with gr.Tabs():
            tabs_config.configure_tab(ctx, lang, form, state)
            tabs_config.data_tab(ctx, lang, form)
            tabs_run.train_tab(ctx, lang, form, demo)
            tabs_run.chat_tab(ctx, lang, form, history)
            tabs_results.evaluate_tab(ctx, lang, form)
            tabs_results.export_tab(ctx, lang, form)
            tabs_results.runs_tab(ctx, lang)
        lang.change(functools.partial(relabel, ctx), inputs=lang, outputs=[c for c, _, _, _ in ctx.labels])
    return demo


def relabel(ctx: Ctx, lang: str) -> list[Any]:
    """Every registered component's text in the chosen language."""
    import gradio as gr

    return [gr.update(**{attr: fmt.format(t(key, lang))}) for _, key, attr, fmt in ctx.labels]
