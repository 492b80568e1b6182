"""`chattune chat --compare-base`: the tuned and the base model's answers to the same conversation.

The base answer comes from the same loaded model with its adapter switched off
(peft's disable_adapter), so nothing is loaded twice.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, TextIO

LABELS = ("tuned> ", "base>  ")


@contextlib.contextmanager
def base_model(model: Any) -> Iterator[None]:
    """Inside this block the model answers as its base (LoRA layers bypassed)."""
    with model.disable_adapter():
        yield


def answer_both(session: Any, messages: list[dict[str, str]], *, out: TextIO, **gen: Any) -> str:
    """Stream the tuned answer, then the base model's to the same messages; return the tuned one (it stays in the history)."""
    from chattune.infer.chat import stream_labelled  # chat imports this module lazily: no import cycle

    tuned = stream_labelled(session, messages, LABELS[0], out, **gen)
    with base_model(session.model):
        stream_labelled(session, messages, LABELS[1], out, **gen)
    return tuned
