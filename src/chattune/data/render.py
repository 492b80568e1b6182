"""Conversations -> input_ids + labels, with the tokenizer's own chat template.

Labels come from diffing renders of growing prefixes: for assistant turn i, the
prompt is render(messages[:i], add_generation_prompt=True) — exactly what
inference feeds the model — and the answer is what render(messages[:i+1]) adds
after it, up to and including the turn's end-of-turn special token. If the
prompt is not a prefix of that render, training could never match inference
and we stop with a TemplateError instead of guessing.

Templates that render earlier turns differently from the last one (Qwen3 drops
<think> blocks from history) cannot supervise every turn in one sequence; such
conversations become one sample per assistant turn, each identical to its
inference context.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

from chattune.data.fastpath import SegmentEncoder, TemplateText
from chattune.data.formats import Conversation
from chattune.errors import TemplateError

IGNORE = -100
RENDER_CHUNK = 512  # conversations whose texts are tokenised together while the next ones render


@dataclass
class Sample:
    """One training sequence: token ids and labels (-100 where not supervised)."""

    input_ids: list[int]
    labels: list[int]
    where: str


@dataclass
class RenderStats:
    """Counts the terminal and the run directory report after rendering."""

    conversations: int = 0
    samples: int = 0
    split_per_turn: int = 0
    truncated: int = 0
    lost_end_of_turn: int = 0
    dropped_overlength: int = 0
    dropped_no_labels: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    examples_truncated: list[str] = field(default_factory=list)

    def summary(self, max_length: int) -> list[str]:
        """Human lines about what rendering changed; empty when nothing notable happened."""
        lines = []
        if self.split_per_turn:
            lines.append(
                f"{self.split_per_turn} multi-turn conversation(s) split into one sample per assistant turn "
                "(the template renders history differently from the last turn)"
            )
        if self.truncated:
            lines.append(
                f"{self.truncated} sample(s) longer than max_length={max_length} were truncated "
                f"({self.lost_end_of_turn} lost their end-of-turn token, e.g. {', '.join(self.examples_truncated[:3])}); "
                "raise data.max_length or set data.overlength=drop"
            )
        if self.dropped_overlength:
            lines.append(f"{self.dropped_overlength} sample(s) longer than max_length={max_length} were dropped (data.overlength=drop)")
        if self.dropped_no_labels:
            lines.append(f"{self.dropped_no_labels} sample(s) dropped: the prompt alone fills max_length={max_length}")
        return lines


def merge_stats(a: RenderStats, b: RenderStats) -> RenderStats:
    """The RenderStats of two consecutive chunks rendered as one (the first five truncated examples kept)."""
    counts = {k: getattr(a, k) + getattr(b, k) for k in vars(a) if k != "examples_truncated"}
    return RenderStats(**counts, examples_truncated=(a.examples_truncated + b.examples_truncated)[:5])


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many small lists.

    Rendering allocates millions of list cells and no reference cycles; with the collector on, a single
    full collection (walking every object of the loaded tokenizer and data) took about a third of the
    first run's time on 3729 conversations. Reference counting still frees everything as usual.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class ChatRenderer:
    """Renders conversations with one tokenizer + template, for training and for inference alike."""

    def __init__(self, tokenizer: Any, template_kwargs: dict[str, Any] | None = None):
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError(
                "the tokenizer has no chat template",
                fix="set model.chat_template to chatml, glm4, llama3, gemma or a .jinja file",
            )
        self.tokenizer = tokenizer
        self.template_kwargs = dict(template_kwargs or {})
        self.special_ids = set(tokenizer.all_special_ids)
        self.special_ids |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
        # Same text and ids as apply_chat_template and tokenizer(...), faster where provably so (see fastpath).
        self._template_text = TemplateText(tokenizer, self.template_kwargs)
        self._encoder = SegmentEncoder(tokenizer)

    # -- rendering ---------------------------------------------------------

    def text(self, messages: Sequence[dict[str, str]], *, generation_prompt: bool) -> str:
        """The template's text for these messages (what apply_chat_template(tokenize=False) gives)."""
        self._template_text.refresh()
        return self._template_text(messages, generation_prompt=generation_prompt)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, no special tokens added (what tokenizer(texts, add_special_tokens=False) gives)."""
        return self._encoder(texts)

    def ids(self, messages: Sequence[dict[str, str]], *, generation_prompt: bool) -> list[int]:
        """Token ids of the rendered messages (no extra BOS: templates write their own)."""
        return self.tokenizer(self.text(messages, generation_prompt=generation_prompt), add_special_tokens=False)["input_ids"]

    def prompt_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """What inference feeds the model: the conversation so far plus the generation prompt."""
        return self.ids(messages, generation_prompt=True)

    def end_of_turn_ids(self) -> list[int]:
        """Token ids that close an assistant turn under this template, plus the tokenizer's eos."""
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
        prompt = self.ids(probe[:1], generation_prompt=True)
        full = self.ids(probe, generation_prompt=False)
        ids = []
        end = self._answer_end(full, len(prompt))
        if end is not None:
            ids.append(full[end - 1])
        eos = self.tokenizer.eos_token_id
        if eos is not None and eos not in ids:
            ids.append(eos)
        return ids

    # -- labels ------------------------------------------------------------

    def _answer_end(self, ids: list[int], start: int) -> int | None:
        """Index after the last special token in ids[start:] (the turn's end-of-turn token)."""
        for k in range(len(ids) - 1, start - 1, -1):
            if ids[k] in self.special_ids:
                return k + 1
        return None

    def _turn_span(self, prompt: list[int], full: list[int], where: str) -> tuple[list[int], int, int]:
        """(ids through the answer, answer start, answer end) for one assistant turn, with the parity checks."""
        if full[: len(prompt)] != prompt:
            k = next((j for j, (a, b) in enumerate(zip(prompt, full)) if a != b), min(len(prompt), len(full)))
            raise TemplateError(
                "the template is not prefix-stable: the generation prompt "
                f"{self.tokenizer.decode(prompt[k:k + 12])!r} differs from how the assistant turn is rendered "
                f"{self.tokenizer.decode(full[k:k + 12])!r} (token {k}), so training would not match inference",
                where=where,
                fix="fix the template's add_generation_prompt branch, or choose another with model.chat_template",
            )
        end = self._answer_end(full, len(prompt))
        if end is None:
            raise TemplateError(
                "the assistant turn is not closed by an end-of-turn special token, so the model would never learn to stop",
                where=where,
                fix="use a template that ends assistant turns with a special token (e.g. <|im_end|>), see model.chat_template",
            )
        return full, len(prompt), end

    def render(self, conv: Conversation, *, train_on: str = "all_assistant") -> tuple[list[Sample], bool]:
        """Samples for one conversation, and whether it had to be split per assistant turn."""
        (result,) = self.render_many([conv], train_on=train_on)
        return result

    def render_many(self, convs: Sequence[Conversation], *, train_on: str = "all_assistant") -> list[tuple[list[Sample], bool]]:
        """Render many conversations: templates chunk by chunk, each chunk's text tokenised while the next renders."""
        chunks = (self.texts_of(convs[k:k + RENDER_CHUNK], train_on=train_on) for k in range(0, len(convs), RENDER_CHUNK))
        return self.samples_from_text_chunks(convs, chunks, train_on=train_on)

    def texts_of(self, convs: Sequence[Conversation], *, train_on: str = "all_assistant") -> list[str]:
        """(prompt, through-the-answer) texts of every supervised assistant turn, in order (no tokenizer call)."""
        texts: list[str] = []
        template = self._template_text
        template.refresh()
        for conv in convs:
            msgs = conv.messages
            turns = self._supervised_turns(conv, train_on)
            if turns and turns[0] > 0 and template.fast_for(msgs):  # checked once for every prefix
                render = template.render_plain
                for i in turns:
                    texts += (render(msgs[:i], True), render(msgs[: i + 1], False))
            else:
                for i in turns:
                    texts += (template(msgs[:i], generation_prompt=True), template(msgs[: i + 1], generation_prompt=False))
        return texts

    def samples_from_text_chunks(
        self, convs: Sequence[Conversation], chunks: Iterable[list[str]], *, train_on: str = "all_assistant"
    ) -> list[tuple[list[Sample], bool]]:
        """render_many's second half: tokenise texts_of(convs), given in consecutive chunks, and build the samples.

        Chunks are tokenised as they arrive, so producing the next chunk overlaps tokenising this one.
        """
        texts: list[str] = []

        def collected() -> Iterator[list[str]]:
            for chunk in chunks:
                texts.extend(chunk)
                yield chunk

        with gc_paused():
            ids = self._encoder.encode_chunks(collected())
            for k in range(0, len(texts), 2):
                ids[k + 1] = self._answer_after_prompt(texts[k], texts[k + 1], ids[k], ids[k + 1])
            out, start = [], 0
            for conv in convs:
                n = len(self._supervised_turns(conv, train_on))
                spans = [self._turn_span(ids[start + 2 * k], ids[start + 2 * k + 1], conv.where) for k in range(n)]
                out.append(self._samples(conv, spans))
                start += 2 * n
            return out

    @staticmethod
    def _supervised_turns(conv: Conversation, train_on: str) -> list[int]:
        turns = [i for i, m in enumerate(conv.messages) if m["role"] == "assistant"]
        return turns[-1:] if train_on == "last_assistant" else turns

    def _answer_after_prompt(self, prompt_text: str, full_text: str, prompt: list[int], full: list[int]) -> list[int]:
        """Ids through the answer, continuing the prompt's own ids where the text continues the prompt's text.

        An answer starting with whitespace (e.g. "\n...") can merge with the generation prompt's last
        characters into one token, so the whole render no longer starts with the prompt's ids. Inference
        feeds exactly the prompt's ids and the model writes the answer after them, so training does the same.
        """
        if full[: len(prompt)] == prompt or not full_text.startswith(prompt_text):
            return full  # the common case, or a template that really is not prefix-stable (reported later)
        return prompt + self.encode([full_text[len(prompt_text):]])[0]

    @staticmethod
    def _samples(conv: Conversation, spans: list[tuple[list[int], int, int]]) -> tuple[list[Sample], bool]:
        last_ids = spans[-1][0]
        # One sequence works when every turn's render is a prefix of the last one.
        if all(last_ids[:end] == ids[:end] for ids, _, end in spans):
            labels = [IGNORE] * len(last_ids)
            for _, start, end in spans:
                labels[start:end] = last_ids[start:end]
            stop = spans[-1][2]
            return [Sample(last_ids[:stop], labels[:stop], conv.where)], False
        return [Sample(ids[:end], [IGNORE] * start + ids[start:end], conv.where) for ids, start, end in spans], True


def render_all(
    renderer: ChatRenderer,
    conversations: Sequence[Conversation],
    *,
    max_length: int,
    overlength: str = "truncate",
    train_on: str = "all_assistant",
) -> tuple[list[Sample], RenderStats]:
    """Render every conversation, apply max_length, and count what was truncated or dropped."""
    with gc_paused():
        return apply_max_length(renderer.render_many(conversations, train_on=train_on), len(conversations),
                                max_length=max_length, overlength=overlength)


def apply_max_length(
    rendered: Sequence[tuple[list[Sample], bool]], conversations: int, *, max_length: int, overlength: str = "truncate"
) -> tuple[list[Sample], RenderStats]:
    """render_all's second half: truncate or drop what is longer than max_length, drop what has no labels, count it all."""
    stats = RenderStats(conversations=conversations)
    out: list[Sample] = []
    with gc_paused():
        for samples, split in rendered:
            stats.split_per_turn += split
            for s in samples:
                if len(s.input_ids) > max_length:
                    if overlength == "drop":
                        stats.dropped_overlength += 1
                        continue
                    stats.truncated += 1
                    if len(stats.examples_truncated) < 5:
                        stats.examples_truncated.append(s.where)
                    # Right-truncation cuts the end of the answer, and with it the end-of-turn token.
                    stats.lost_end_of_turn += s.labels[-1] != IGNORE
                    s = Sample(s.input_ids[:max_length], s.labels[:max_length], s.where)
                supervised = len(s.labels) - s.labels.count(IGNORE)
                if supervised == 0:
                    stats.dropped_no_labels += 1
                    continue
                stats.tokens += len(s.input_ids)
                stats.supervised_tokens += supervised
                out.append(s)
    stats.samples = len(out)
    return out, stats
