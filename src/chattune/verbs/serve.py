"""`chattune serve`: an OpenAI-compatible HTTP API for a run directory or a merged model folder.

The prompt is rendered with the exact training template and the training system
prompt (when the request has none), and generation stops at every end-of-turn
id, so answers match `chattune chat`. Greedy unless the request sets a
temperature above 0. One worker thread owns the model; requests wait in a
bounded queue, so any number of clients may connect at once. The parts live in
chattune/serve/ (engine, api, worker, server); this module is the spine.
"""

from __future__ import annotations

import functools
import logging

from chattune.options import SERVE
from chattune.serve.engine import load_engine
from chattune.serve.server import bind_server

__all__ = ["load_engine", "make_server", "run"]

log = logging.getLogger("chattune")

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def run(path: str, *, host: str = SERVE.host, port: int = SERVE.port, api_key: str | None = SERVE.api_key,
        max_tokens_limit: int = SERVE.max_tokens_limit, max_body_bytes: int = SERVE.max_body_bytes) -> None:
    """Entry point of `chattune serve`: load once, then answer until interrupted."""
    engine = load_engine(path)
    server = bind_server(engine, host=host, port=port, api_key=api_key, max_tokens_limit=max_tokens_limit,
                         max_body_bytes=max_body_bytes)
    if host not in LOOPBACK:
        log.warning("serve: listening on %s, reachable from other machines%s", host,
                    "" if api_key else "; anyone who can reach it can use it (set --api-key)")
    # The port bound, not the one asked for: with --port 0 the system picks a free one, and scripts read it here.
    bound_host, bound_port = server.server_address[:2]
    print(f"serving {engine.name} on http://{bound_host}:{bound_port}/v1 (OpenAI-compatible; "
          f"{'API key required' if api_key else 'no API key'}); Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


# A bound server for library callers (tests, notebooks) with `chattune serve`'s defaults: run()'s, the only ones.
make_server = functools.partial(bind_server, **run.__kwdefaults__)
