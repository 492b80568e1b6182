"""Continuous batching: one thread owns the model and decodes every running completion in one forward pass.

Completions wait in a bounded queue. Between two decoding steps the scheduler takes waiting completions
(up to max_batch rows in all), prefills their prompts in one packed forward per adapter (no padding,
infer/prefill.py) and adds their keys and values to the running batch (serve/batch.py). After each step
every row gets its token; a row whose answer ended (end-of-turn id, stop string, max_tokens) or whose
client went away leaves the batch at once, so its slot is free for the next step.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Callable

import torch

from chattune.infer.generate import inference_mode
from chattune.infer.prefill import can_prefill_packed, prefill_prefixes
from chattune.model.packed_attention import base_model, packed_attention
from chattune.options import SERVE
from chattune.serve.batch import Batch, Row, new_cache
from chattune.serve.completion import Completion, TextPieces

log = logging.getLogger("chattune")

QUEUE_SIZE = SERVE.max_queue  # completions waiting for a slot; one more is answered 503 with Retry-After
MAX_BATCH = SERVE.max_batch  # rows decoded together


class Scheduler:
    """The one thread that runs the model: a bounded queue in front of a continuously refilled batch.

    engines maps a served name to its Engine (all share one model); on_finish(completion, info) is called
    for every completion that ends (metrics).
    """

    def __init__(self, model: Any, engines: dict[str, Any], *, max_queue: int = QUEUE_SIZE, max_batch: int = MAX_BATCH,
                 on_finish: Callable[[Completion, dict], None] | None = None):
        self.model, self.engines, self.max_batch = model, engines, max_batch
        self.on_finish = on_finish or (lambda c, info: None)
        self.waiting: queue.Queue = queue.Queue(maxsize=max_queue)
        self.batch = Batch(model, _base_config(model))
        self._stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="chattune-scheduler", daemon=True)
        self.thread.start()

    @property
    def running(self) -> int:
        return len(self.batch)

    def submit(self, completion: Completion) -> bool:
        """Queue a completion; False when the queue is full or the server is stopping."""
        if self._stopping.is_set():
            return False
        try:
            self.waiting.put_nowait(completion)
            return True
        except queue.Full:
            return False

    def stop(self, timeout: float | None = None) -> None:
        """Take no more completions; finish those queued and running, then end the thread."""
        self._stopping.set()
        self.thread.join(timeout)

    def _loop(self) -> None:
        with inference_mode(self.model), packed_attention(self.model):
            while not (self._stopping.is_set() and self.waiting.empty() and not self.batch.rows):
                self._admit(block=not self.batch.rows)
                if self.batch.rows:
                    self._step()

    def _admit(self, *, block: bool) -> None:
        taken: list[Completion] = []
        while len(self.batch) + len(taken) < self.max_batch:
            try:
                c = self.waiting.get(timeout=0.05) if block and not taken else self.waiting.get_nowait()
            except queue.Empty:
                break
            if not c.cancelled.is_set():
                taken.append(c)
        by_adapter: dict[Any, list[Completion]] = {}
        for c in taken:
            by_adapter.setdefault(self.engines[c.model].adapter, []).append(c)
        for adapter, group in by_adapter.items():
            try:
                self._join(adapter, group)
            except Exception as exc:  # reported to those clients; the server keeps serving
                log.exception("prefill failed")
                for c in group:
                    self._fail(c, exc)

    def _join(self, adapter: Any, group: list[Completion]) -> None:
        forward = {"adapter_names": [adapter]} if adapter is not None else {}
        states = prefix_states(self.model, [c.prompt_ids[:-1] for c in group], forward)
        rows = [Row(c, TextPieces(self.engines[c.model].tokenizer, c), adapter, c.prompt_ids[-1], len(c.prompt_ids) - 1,
                    generator=_generator(c.seed)) for c in group]
        self.batch.add(rows, states)

    def _step(self) -> None:
        try:
            logits = self.batch.step()
        except Exception as exc:
            log.exception("decoding step failed")
            for r in list(self.batch.rows):
                self._fail(r.completion, exc)
            self.batch.remove(list(self.batch.rows))
            return
        done = []
        for r, scores in zip(self.batch.rows, logits):
            r.next_token = _choose(scores, r)
            r.pieces.put(r.next_token)
            if r.pieces.finished or r.completion.cancelled.is_set():
                self.on_finish(r.completion, r.pieces.end())
                done.append(r)
        self.batch.remove(done)

    def _fail(self, completion: Completion, exc: Exception) -> None:
        completion.events.put(("error", f"{type(exc).__name__}: {exc}"))
        self.on_finish(completion, {"error": True, "prompt_tokens": len(completion.prompt_ids),
                                    "completion_tokens": 0})


def prefix_states(model: Any, heads: list[list[int]], forward: dict[str, Any]) -> list[list[tuple[Any, Any]]]:
    """Per prompt prefix, per layer, its (keys, values) [kv_heads, n, dim]: one packed forward where the model
    allows it, else one forward per prefix (neither pads)."""
    if not all(heads):
        raise ValueError("a prompt of a single token cannot be served (the chat template renders more)")
    if can_prefill_packed(model, [h + [0] for h in heads], 1):
        caches = [prefill_prefixes(model, heads, **forward)]
        lengths = [[len(h) for h in heads]]
    else:  # one forward per prefix, every layer keeping every column (sliding windows are the masks' job)
        device = next(model.parameters()).device
        caches = [model(input_ids=torch.tensor([h], device=device), past_key_values=new_cache(_base_config(model)),
                        use_cache=True, logits_to_keep=1, **forward).past_key_values for h in heads]
        lengths = [[len(h)] for h in heads]
    out: list[list[tuple[Any, Any]]] = []
    for cache, sizes in zip(caches, lengths):
        per_layer = [(layer.keys[0].split(sizes, dim=1), layer.values[0].split(sizes, dim=1)) for layer in cache.layers]
        out.extend([[(k[i], v[i]) for k, v in per_layer] for i in range(len(sizes))])
    return out


def _base_config(model: Any) -> Any:
    return base_model(model).config


def _generator(seed: int | None) -> Any:
    if seed is None:
        return None
    return torch.Generator().manual_seed(seed % 2**63)


def _choose(scores: torch.Tensor, row: Row) -> int:
    """Greedy, or sampled with the request's temperature and top_p (its own seeded generator if it gave a seed)."""
    c = row.completion
    if c.temperature <= 0:
        return int(scores.argmax())
    probs = torch.softmax(scores / c.temperature, dim=-1)
    if c.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs > c.top_p  # keep the smallest set reaching top_p
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=row.generator))
