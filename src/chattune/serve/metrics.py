"""GET /metrics: the server's counters in Prometheus' text format (version 0.0.4), written by hand.

Requests by status, the queue's depth, the running batch's size, prompt and completion tokens, and
time to first token (a histogram). Counters are updated from the event loop and the scheduler thread,
hence the lock.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Callable

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """What /metrics reports; queue depth and batch size are read live from the callables given."""

    def __init__(self, queued: Callable[[], int], running: Callable[[], int]):
        self.queued, self.running = queued, running
        self._lock = threading.Lock()
        self.requests: Counter = Counter()  # (route, status) -> count
        self.tokens = Counter()  # prompt / completion -> count
        self.ttft = [0] * (len(TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0

    def request(self, route: str, status: int) -> None:
        with self._lock:
            self.requests[(route, status)] += 1

    def finished(self, prompt_tokens: int, completion_tokens: int, ttft_s: float | None) -> None:
        with self._lock:
            self.tokens["prompt"] += prompt_tokens
            self.tokens["completion"] += completion_tokens
            if ttft_s is not None:
                self.ttft_sum += ttft_s
                self.ttft[next((i for i, b in enumerate(TTFT_BUCKETS) if ttft_s <= b), len(TTFT_BUCKETS))] += 1

    def render(self) -> str:
        """The text exposition format: HELP, TYPE, then the samples."""
        with self._lock:
            lines = ["# HELP chattune_requests_total HTTP requests answered, by route and status.",
                     "# TYPE chattune_requests_total counter"]
            lines += [f'chattune_requests_total{{route="{route}",status="{status}"}} {n}'
                      for (route, status), n in sorted(self.requests.items())]
            lines += _gauge("chattune_queue_depth", "completions waiting for a batch slot", self.queued())
            lines += _gauge("chattune_batch_size", "completions decoding in the running batch", self.running())
            for kind in ("prompt", "completion"):
                lines += [f"# HELP chattune_{kind}_tokens_total {kind.capitalize()} tokens of finished completions.",
                          f"# TYPE chattune_{kind}_tokens_total counter", f"chattune_{kind}_tokens_total {self.tokens[kind]}"]
            lines += self._ttft_lines()
        return "\n".join(lines) + "\n"

    def _ttft_lines(self) -> list[str]:
        lines = ["# HELP chattune_time_to_first_token_seconds From arrival to the first generated token.",
                 "# TYPE chattune_time_to_first_token_seconds histogram"]
        total = 0
        for bound, n in zip([*map(str, TTFT_BUCKETS), "+Inf"], self.ttft):
            total += n
            lines.append(f'chattune_time_to_first_token_seconds_bucket{{le="{bound}"}} {total}')
        lines += [f"chattune_time_to_first_token_seconds_sum {self.ttft_sum:.6f}",
                  f"chattune_time_to_first_token_seconds_count {total}"]
        return lines


def _gauge(name: str, help_: str, value: int) -> list[str]:
    return [f"# HELP {name} {help_[0].upper()}{help_[1:]}.", f"# TYPE {name} gauge", f"{name} {value}"]
