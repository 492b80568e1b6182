"""The listening server: uvicorn running the FastAPI app on a socket bound here (port 0 picks a free one).

`serve_forever()` blocks until SIGINT/SIGTERM (in the main thread) or `shutdown()`: uvicorn then stops
accepting connections and waits for the requests in flight, streams included, to finish; `server_close()`
lets the scheduler finish what it holds and closes the socket.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

from chattune.errors import ConfigError
from chattune.serve.api import Limits
from chattune.serve.app import ServeState, create_app
from chattune.serve.engine import Engine
from chattune.serve.metrics import Metrics
from chattune.serve.scheduler import MAX_BATCH, QUEUE_SIZE, Scheduler

log = logging.getLogger("chattune")


class Server:
    """uvicorn + the app + the scheduler, with the bound address known before serving (server_address)."""

    def __init__(self, sock: socket.socket, state: ServeState):
        import uvicorn

        self.socket, self.state = sock, state
        self.server_address = sock.getsockname()[:2]
        config = uvicorn.Config(create_app(state), log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=None)
        self.uvicorn = uvicorn.Server(config)
        self._done = threading.Event()

    def serve_forever(self) -> None:
        try:
            self.uvicorn.run(sockets=[self.socket])
        finally:
            self._done.set()

    def shutdown(self, timeout: float = 60) -> None:
        """Stop accepting, let the requests in flight finish (from another thread than serve_forever's)."""
        self.uvicorn.should_exit = True
        self._done.wait(timeout)

    def server_close(self) -> None:
        self.state.scheduler.stop()
        self.socket.close()


def bind_server(engines: Engine | list[Engine], *, host: str, port: int, api_key: str | None, max_tokens_limit: int,
                max_body_bytes: int, max_batch: int = MAX_BATCH, max_queue: int = QUEUE_SIZE,
                log_prompts: bool = False) -> Server:
    """A bound, listening server ready for serve_forever() (port 0 picks a free port: see server.server_address)."""
    engines = [engines] if isinstance(engines, Engine) else engines
    by_name = {e.name: e for e in engines}
    sock = _listen(host, port)
    holder: dict[str, Any] = {}
    scheduler = Scheduler(engines[0].model, by_name, max_queue=max_queue, max_batch=max_batch,
                          on_finish=lambda c, info: holder["metrics"].finished(
                              info["prompt_tokens"], info["completion_tokens"],
                              None if c.first_token_at is None else c.first_token_at - c.arrived))
    metrics = holder["metrics"] = Metrics(scheduler.waiting.qsize, lambda: scheduler.running)
    state = ServeState(by_name, scheduler, Limits(max_tokens=max_tokens_limit, max_body_bytes=max_body_bytes), api_key,
                       metrics, log_prompts)
    return Server(sock, state)


def _listen(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.set_inheritable(True)
        return sock
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror})", where="--host/--port",
                          fix="choose another --port, or stop what is using it") from None
