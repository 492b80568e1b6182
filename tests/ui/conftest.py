"""A `chattune ui` server in this process, in a working folder of its own."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from chattune.errors import ChattuneError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(folder: Path, monkeypatch: pytest.MonkeyPatch, **kw):
    """Start the page on a free port (trying another if the port was taken meanwhile); returns (demo, url)."""
    pytest.importorskip("gradio", reason="the [ui] extra (gradio) is not installed")
    from chattune.ui import server

    monkeypatch.chdir(folder)
    for _ in range(3):
        port = free_port()
        try:
            demo = server.run(port=port, block=False, **kw)
        except ChattuneError as exc:  # the port was taken between the probe and the bind
            if "cannot listen" in str(exc):
                continue
            raise
        return demo, f"http://127.0.0.1:{port}/"
    raise AssertionError("no free port in three tries")
