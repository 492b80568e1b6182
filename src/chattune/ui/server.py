"""`chattune ui`: check where the page may listen and who may open it, then serve it until Ctrl-C."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from chattune.errors import ChattuneError, ConfigError, require
from chattune.options import UI
from chattune.ui import app, jobs
from chattune.ui.context import Ctx
from chattune.ui.paths import Allowed

LOOPBACK = ("127.0.0.1", "localhost", "::1")
AUTH_ENV = "CHATTUNE_UI_AUTH"

log = logging.getLogger("chattune")


def parse_auth(auth: str | None, host: str) -> tuple[str, str] | None:
    """(user, password) from --auth or $CHATTUNE_UI_AUTH; required for any address but loopback."""
    auth = auth or os.environ.get(AUTH_ENV)
    if auth is None:
        if host not in LOOPBACK:
            raise ConfigError(f"listening on {host} would let anyone who reaches this machine train and run code here",
                              where="--host", fix=f"add --auth user:password (or set {AUTH_ENV}), or keep the "
                              "default --host 127.0.0.1")
        return None
    user, sep, password = auth.partition(":")
    if not sep or not user or not password:
        raise ConfigError("not user:password", where="--auth" if auth else AUTH_ENV, fix="e.g. --auth ada:long-secret")
    return user, password


def check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: a closed port in TIME_WAIT is free
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ChattuneError(f"cannot listen on {host}:{port} ({exc.strerror})", where="--port",
                                fix=f"choose another port, e.g. --port {port + 1}") from None


def log_to_file(cwd: Path) -> Path:
    """The page's log: every traceback the page does not show goes here."""
    path = cwd / jobs.JOBS_DIR / "ui.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")  # an append-only log, not a record: no atomic rewrite
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("chattune").addHandler(handler)
    return path


def run(*, host: str = UI.host, port: int = UI.port, lang: str = UI.lang, allow: list[str] | None = None,
        auth: str | None = UI.auth, block: bool = True) -> object:
    """Serve the page on host:port with the working folder and `allow` as its only folders."""
    require("gradio", extra="ui", needed_for="chattune ui")
    credentials = parse_auth(auth, host)
    allowed = Allowed.of(Path.cwd(), allow or [])
    for root in allowed.roots[1:]:
        if not root.is_dir():
            raise ConfigError("no such folder", where=f"--allow {root}", fix="name an existing folder")
    check_port_free(host, port)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    ctx = Ctx(allowed=allowed, lang=lang, log_file=log_to_file(allowed.cwd))
    demo = app.build(ctx)
    demo.queue(default_concurrency_limit=4)
    print(f"chattune ui: http://{host}:{port}  (folders: {', '.join(map(str, allowed.roots))}; log {ctx.log_file}; "
          "Ctrl-C stops)", flush=True)
    demo.launch(server_name=host, server_port=port, share=False, auth=credentials, inbrowser=False,
                allowed_paths=[str(r) for r in allowed.roots], ssr_mode=False, quiet=True, show_error=False,
                prevent_thread_lock=not block, footer_links=[], css=None)
    return demo
