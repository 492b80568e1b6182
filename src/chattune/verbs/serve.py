"""`chattune serve`: an OpenAI-compatible HTTP API for one or several runs on one base, or a merged model folder.

The prompt is rendered with each run's exact training template and training system prompt (when the
request has none), and generation stops at that run's end-of-turn ids, so answers match `chattune chat`.
Greedy unless the request sets a temperature above 0. One scheduler thread owns the model and decodes
every request in flight in one batch (continuous batching); requests wait in a bounded queue. With
`--engine vllm` the runs are handed to vLLM's own server instead. The parts live in chattune/serve/.
"""

from __future__ import annotations

import functools
import inspect
import logging
import signal

from chattune.options import SERVE
from chattune.serve import vllm
from chattune.serve.adapters import load_engines
from chattune.serve.engine import load_engine
from chattune.serve.server import bind_server

__all__ = ["load_engine", "load_engines", "make_server", "run"]

log = logging.getLogger("chattune")

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def run(paths: str | list[str], *, names: list[str] | None = None, host: str = SERVE.host, port: int = SERVE.port,
        api_key: str | None = SERVE.api_key, max_tokens_limit: int = SERVE.max_tokens_limit,
        max_body_bytes: int = SERVE.max_body_bytes, max_batch: int = SERVE.max_batch, max_queue: int = SERVE.max_queue,
        log_prompts: bool = SERVE.log_prompts, engine: str = SERVE.engine, check: bool = SERVE.check) -> None:
    """Entry point of `chattune serve`: load once, then answer until interrupted (SIGTERM finishes what is in flight)."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    if engine == "vllm":
        return vllm.serve(paths, names, host=host, port=port, api_key=api_key, check=check)
    engines = load_engines(paths, names)
    server = bind_server(engines, host=host, port=port, api_key=api_key, max_tokens_limit=max_tokens_limit,
                         max_body_bytes=max_body_bytes, max_batch=max_batch, max_queue=max_queue, log_prompts=log_prompts)
    warn_if_exposed(host, api_key)
    # The port bound, not the one asked for: with --port 0 the system picks a free one, and scripts read it here.
    bound_host, bound_port = server.server_address[:2]
    print(f"serving {', '.join(e.name for e in engines)} on http://{bound_host}:{bound_port}/v1 (OpenAI-compatible; "
          f"{'API key required' if api_key else 'no API key'}); Ctrl-C stops", flush=True)
    # uvicorn takes SIGTERM while serving (stop accepting, finish what is in flight) and raises it again after:
    # this handler then makes it a clean exit (status 0) through the finally below.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        print("serve: stopped (requests in flight were finished)", flush=True)


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def warn_if_exposed(host: str, api_key: str | None) -> None:
    if host not in LOOPBACK:
        log.warning("serve: listening on %s, reachable from other machines%s", host,
                    "" if api_key else "; anyone who can reach it can use it (set --api-key)")


# A bound server for library callers (tests, notebooks) with `chattune serve`'s defaults: run()'s, the only ones.
make_server = functools.partial(bind_server, **{k: v for k, v in run.__kwdefaults__.items()
                                                if k in inspect.signature(bind_server).parameters})
