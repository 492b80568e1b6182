"""Streaming answers for `chattune chat`: one model's answer piece by piece, or the tuned and the base
model's answers to the same conversation (`--compare-base`).

The base answer comes from the same loaded model with its adapter switched off
(peft's disable_adapter), so nothing is loaded twice.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterable, Iterator, TextIO

from chattune.infer.generate import inference_mode, left_pad, whole_characters
from chattune.infer.session import Session
from chattune.options import GENERATION

LABELS = ("tuned> ", "base>  ")


def _token_streamer(tok: Any) -> Any:
    """A TextIteratorStreamer that hands on every token's text as soon as it is whole (transformers' own waits for
    a space, so an answer without spaces would arrive in one piece); a half-decoded character waits for its rest."""
    from transformers import TextIteratorStreamer

    class TokenStreamer(TextIteratorStreamer):
        def put(self, value: Any) -> None:
            if len(value.shape) > 1:
                value = value[0]
            if self.skip_prompt and self.next_tokens_are_prompt:
                self.next_tokens_are_prompt = False
                return
            self.token_cache.extend(value.tolist())
            text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
            if text.endswith("\ufffd"):
                return
            piece, self.print_len = text[self.print_len:], len(text)
            if piece:
                self.on_finalized_text(piece)

    return TokenStreamer(tok, skip_prompt=True, skip_special_tokens=True)


def stream_answer(session: Session, messages: list[dict[str, str]], *, max_new_tokens: int = GENERATION.max_new_tokens,
                  do_sample: bool = GENERATION.sample, temperature: float = GENERATION.temperature,
                  top_p: float = GENERATION.top_p, finish: dict[str, Any] | None = None) -> Iterator[str]:
    """Yield the answer's text piece by piece as it is generated; stops at an end-of-turn token.

    With `finish`, a dict, it is given "stopped" (True when the model ended its turn itself, False when
    max_new_tokens cut it) and "tokens" (new tokens generated) once the answer is complete.
    """
    tok = session.renderer.tokenizer
    ids, mask = left_pad([session.renderer.prompt_ids(messages)], tok.pad_token_id)
    device = next(session.model.parameters()).device
    streamer = _token_streamer(tok)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {"do_sample": False}
    errors: list[BaseException] = []
    eos = session.renderer.end_of_turn_ids()

    def work() -> None:
        try:
            with inference_mode(session.model):
                out = session.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                             streamer=streamer, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                             pad_token_id=tok.pad_token_id, use_cache=True, **sampling)
            if finish is not None:
                new = out[0, ids.shape[1]:].tolist()
                finish.update(stopped=bool(new) and new[-1] in eos, tokens=len(new))
        except BaseException as exc:  # surfaced in the caller's thread below
            errors.append(exc)
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    yield from whole_pieces(streamer)
    thread.join()
    if errors:
        raise errors[0]


def whole_pieces(pieces: Iterable[str]) -> Iterator[str]:
    """Streamed text with a character cut at the end held back: U+FFFD at the end of a piece is shown only once
    more text follows it; at the end of the answer (max_new_tokens reached mid-character) it is dropped."""
    held = ""
    for piece in pieces:
        text = held + piece
        whole = whole_characters(text)
        held = text[len(whole):]
        if whole:
            yield whole


def stream_labelled(session: Session, messages: list[dict[str, str]], label: str, out: TextIO, **gen) -> str:
    """Write label + the streamed answer + newline; return the answer."""
    out.write(label)
    parts = []
    for piece in stream_answer(session, messages, **gen):
        out.write(piece)
        out.flush()
        parts.append(piece)
    out.write("\n")
    return "".join(parts).strip()


@contextlib.contextmanager
def base_model(model: Any) -> Iterator[None]:
    """Inside this block the model answers as its base (LoRA layers bypassed)."""
    with model.disable_adapter():
        yield


def answer_both(session: Any, messages: list[dict[str, str]], *, out: TextIO, **gen: Any) -> str:
    """Stream the tuned answer, then the base model's to the same messages; return the tuned one (it stays in the history)."""
    tuned = stream_labelled(session, messages, LABELS[0], out, **gen)
    with base_model(session.model):
        stream_labelled(session, messages, LABELS[1], out, **gen)
    return tuned
