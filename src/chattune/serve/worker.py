"""The one thread that owns the model: completions wait in a bounded queue and come back as text pieces."""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from chattune.infer.generate import inference_mode
from chattune.serve.engine import Engine

log = logging.getLogger("chattune")

QUEUE_SIZE = 64  # completions waiting for the model; one more is answered 503 (the openai client retries)


@dataclass
class Completion:
    """One chat completion on its way through the worker.

    Its events carry ('delta', text), ('done', info) or ('error', message).
    """

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None = None
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)


class _CompletionStreamer:
    """Receives new token ids from generate(), decodes them, and forwards complete text pieces."""

    def __init__(self, engine: Engine, completion: Completion):
        self.engine, self.completion = engine, completion
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.hit_stop = False
        self._prompt_seen = False
        # A stop string may arrive split over tokens: hold back that many characters until it is ruled out.
        self.holdback = max((len(s) for s in completion.stop), default=1) - 1

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt itself
            self._prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        text = self.engine.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return
        for s in self.completion.stop:
            at = text.find(s)
            if at >= 0:
                text, self.hit_stop = text[:at], True
        self.text = text
        upto = len(text) if self.hit_stop else max(self.sent, len(text) - self.holdback)
        self._emit(upto)

    def _emit(self, upto: int) -> None:
        piece = self.text[self.sent:upto]
        if not self.sent:
            piece = piece.lstrip()  # answers start at their first visible character, as in `chattune chat`
            if not piece:
                return
        if piece:
            self.completion.events.put(("delta", piece))
            self.sent = upto

    def end(self) -> None:
        if not self.hit_stop:
            self.text = self.engine.tokenizer.decode(self.ids, skip_special_tokens=True)
        self._emit(len(self.text.rstrip()))
        stopped = self.hit_stop or (bool(self.ids) and self.ids[-1] in self.engine.eos_ids)
        self.completion.events.put(("done", {"finish_reason": "stop" if stopped else "length",
                                             "completion_tokens": len(self.ids),
                                             "prompt_tokens": len(self.completion.prompt_ids)}))


class _StopWhen:
    """A stopping criterion: a stop string was seen, or the client went away."""

    def __init__(self, streamer: _CompletionStreamer):
        self.streamer = streamer

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kw: Any) -> torch.Tensor:
        done = self.streamer.hit_stop or self.streamer.completion.cancelled.is_set()
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class Worker:
    """The one thread that runs the model; completions wait in a bounded queue."""

    def __init__(self, engine: Engine, max_queue: int = QUEUE_SIZE):
        self.engine = engine
        self.waiting: queue.Queue = queue.Queue(maxsize=max_queue)
        self.thread = threading.Thread(target=self._loop, name="chattune-worker", daemon=True)
        self.thread.start()

    def submit(self, completion: Completion) -> bool:
        """Queue a completion; False when the queue is full."""
        try:
            self.waiting.put_nowait(completion)
            return True
        except queue.Full:
            return False

    def _loop(self) -> None:
        while True:
            completion = self.waiting.get()
            if completion is None:
                return
            if completion.cancelled.is_set():
                continue
            try:
                self._generate(completion)
            except Exception as exc:  # reported to that one client; the server keeps serving
                log.exception("generation failed")
                completion.events.put(("error", f"{type(exc).__name__}: {exc}"))

    def stop(self) -> None:
        self.waiting.put(None)

    def _generate(self, completion: Completion) -> None:
        from transformers import StoppingCriteriaList

        e = self.engine
        device = next(e.model.parameters()).device
        ids = torch.tensor([completion.prompt_ids], dtype=torch.long, device=device)
        streamer = _CompletionStreamer(e, completion)
        sampling: dict[str, Any] = {"do_sample": False}
        if completion.temperature > 0:
            sampling = {"do_sample": True, "temperature": completion.temperature, "top_p": completion.top_p}
            if completion.seed is not None:
                torch.manual_seed(completion.seed)
        with inference_mode(e.model):
            e.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=completion.max_tokens,
                             eos_token_id=e.eos_ids, pad_token_id=e.tokenizer.pad_token_id, use_cache=True,
                             streamer=streamer, stopping_criteria=StoppingCriteriaList([_StopWhen(streamer)]),
                             **sampling)  # generate() calls streamer.end() itself
