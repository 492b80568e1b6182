"""What every tab shares: the allowed folders, the language, the translatable labels, and the error guard.

Handlers never show a traceback: a ChattuneError is shown as its one paragraph (where: what — fix);
anything else is logged with its traceback to the page's log file and shown as one line naming that file.
"""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from chattune.errors import ChattuneError
from chattune.ui import views
from chattune.ui.paths import Allowed
from chattune.ui.strings import t

log = logging.getLogger("chattune.ui")


@dataclass
class Ctx:
    """What every tab shares: the allowed folders, the first language, the translatable components."""

    allowed: Allowed
    lang: str = "en"
    log_file: Path | None = None
    labels: list[tuple[Any, str, str, str]] = field(default_factory=list)  # (component, string key, attribute, format)

    def label(self, component: Any, key: str, attr: str = "label", fmt: str = "{}") -> Any:
        """Register a component whose `attr` shows fmt.format(strings[key]); returns the component."""
        self.labels.append((component, key, attr, fmt))
        return component

    def t(self, key: str) -> str:
        return t(key, self.lang)


def message(exc: BaseException, ctx: Ctx, lang: str) -> str:
    """What the page says about a failure: a user mistake as the CLI says it, a bug as one line + the log."""
    if isinstance(exc, ChattuneError):
        return exc.render()
    log.exception("unexpected error in the page")
    return f"{t('err.unexpected', lang)}: {type(exc).__name__}: {exc} ({t('err.details', lang)} {ctx.log_file})"


def guard(ctx: Ctx, n_outputs: int, *, lang_arg: int | None = None) -> Callable:
    """Wrap a handler (plain or generator): on failure its first output shows the error, the others stay."""

    def wrap(fn: Callable) -> Callable:
        def failed(exc: BaseException, args: tuple) -> Any:
            lang = args[lang_arg] if lang_arg is not None and len(args) > lang_arg else ctx.lang
            rest = [_unchanged()] * (n_outputs - 1)
            out = views.error(message(exc, ctx, lang))
            return (out, *rest) if n_outputs > 1 else out

        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def gen(*args: Any) -> Any:
                try:
                    yield from fn(*args)
                except Exception as exc:  # noqa: BLE001 - shown on the page, traceback in the log
                    yield failed(exc, args)
            return gen

        @functools.wraps(fn)
        def plain(*args: Any) -> Any:
            try:
                return fn(*args)
            except Exception as exc:  # noqa: BLE001 - shown on the page, traceback in the log
                return failed(exc, args)
        return plain

    return wrap


def _unchanged() -> Any:
    import gradio as gr

    return gr.update()
