"""One chat completion on its way through the scheduler, and the decoder that turns its tokens into text pieces."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from chattune.infer.generate import whole_characters


@dataclass
class Completion:
    """One chat completion on its way through the scheduler.

    Its events carry ('delta', text), ('done', info) or ('error', message). `model` is the served name that
    picks the adapter; eos_ids are that model's end-of-turn ids.
    """

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None = None
    model: str = ""
    eos_ids: tuple[int, ...] = ()
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None


class TextPieces:
    """Receives a completion's new token ids, decodes them, and forwards complete text pieces as events."""

    def __init__(self, tokenizer: Any, completion: Completion):
        self.tokenizer, self.completion = tokenizer, completion
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.hit_stop = False
        # A stop string may arrive split over tokens: hold back that many characters until it is ruled out.
        self.holdback = max((len(s) for s in completion.stop), default=1) - 1

    @property
    def finished(self) -> bool:
        """An end-of-turn id, a stop string or max_tokens ended the answer."""
        c = self.completion
        return self.hit_stop or len(self.ids) >= c.max_tokens or (bool(self.ids) and self.ids[-1] in c.eos_ids)

    def put(self, token: int) -> None:
        self.ids.append(token)
        if self.completion.first_token_at is None:
            self.completion.first_token_at = time.monotonic()
        if token in self.completion.eos_ids:
            return
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
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

    def end(self) -> dict[str, Any]:
        """Send what is left and the 'done' event; returns its info."""
        if not self.hit_stop:  # an answer cut at max_tokens ends at its last whole character
            self.text = whole_characters(self.tokenizer.decode(self.ids, skip_special_tokens=True))
        self._emit(len(self.text.rstrip()))
        stopped = self.hit_stop or (bool(self.ids) and self.ids[-1] in self.completion.eos_ids)
        info = {"finish_reason": "stop" if stopped else "length", "completion_tokens": len(self.ids),
                "prompt_tokens": len(self.completion.prompt_ids)}
        self.completion.events.put(("done", info))
        return info
