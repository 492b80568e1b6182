"""Faster equivalents of the two transformers calls that rendering makes thousands of times.

Each is used only where it gives exactly what the transformers call gives, and falls back to that call
everywhere else:

* `TemplateText` renders the chat template with the compiled template apply_chat_template itself uses
  (transformers' cached, sandboxed Jinja environment) and the same variables (messages, tools=None,
  documents=None, add_generation_prompt, the special-tokens map, the template kwargs), without
  apply_chat_template's per-call argument handling. Only for plain conversations: every message a dict
  of string fields and no reasoning fields (which transformers renames). Anything else — tools,
  multimodal or None content, tokenizer classes with their own apply_chat_template — goes through
  apply_chat_template.

* `SegmentEncoder` tokenises many texts by splitting each at the tokenizer's added tokens (the
  tokenizer does the same first, and encodes the pieces between them independently) and encoding each
  distinct piece once. Chat renders repeat most of their text: the system prompt in every row, each
  prompt again inside its full render, earlier turns in later turns' prompts. It is used only for
  tokenizers where the pieces are provably independent (no normalizer or a per-character one with
  non-normalized added tokens, pre-tokenizers that work per piece, added tokens without strip options
  that never overlap each other), and it checks a few texts against the tokenizer's own call on
  every batch before trusting the rest.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Sequence

log = logging.getLogger(__name__)

# Fields transformers copies under other names before rendering (_alias_reasoning_fields).
_REASONING_FIELDS = frozenset({"reasoning_content", "thinking", "reasoning"})
# Normalizers that map each piece on its own, and pre-tokenizers that split each piece on its own
# (ByteLevel only without add_prefix_space, which depends on where a piece starts).
_PIECEWISE_NORMALIZERS = frozenset({"NFC", "NFD", "NFKC", "NFKD", "Lowercase"})
_PIECEWISE_PRE_TOKENIZERS = frozenset({"ByteLevel", "Split", "Digits", "Punctuation", "Whitespace", "WhitespaceSplit", "UnicodeScripts"})
_CHECKED_TEXTS = 4  # from each end of every batch, against the tokenizer's own call


def plain_messages(messages: Sequence[Any]) -> bool:
    """True when apply_chat_template would pass these messages to the template unchanged (up to copying)."""
    if not messages:
        return False  # apply_chat_template raises on an empty conversation; let it
    for m in messages:
        if type(m) is not dict:
            return False
        for k, v in m.items():
            if type(k) is not str or type(v) is not str or k in _REASONING_FIELDS:
                return False
    return True


class TemplateText:
    """The chat template's text for plain conversations, as apply_chat_template(tokenize=False) renders it."""

    def __init__(self, tokenizer: Any, template_kwargs: dict[str, Any]):
        self.tokenizer = tokenizer
        self.template_kwargs = template_kwargs
        self._key: Any = None
        self.compiled: Any = None
        self.variables: dict[str, Any] = {}
        self.refresh()

    def refresh(self) -> None:
        """Follow changes of the tokenizer's template, special tokens or the template kwargs (cheap when none)."""
        special = dict(getattr(self.tokenizer, "special_tokens_map", {}))
        key = (getattr(self.tokenizer, "chat_template", None), special, dict(self.template_kwargs))
        if key != self._key:
            self._key = key
            self.compiled, self.variables = self._setup(self.tokenizer, key[0], {**special, **self.template_kwargs}, self.template_kwargs)
            if self.compiled is not None:
                # Template.render(**vars) builds dict(template globals, **vars) and renders it; here the
                # globals and the variables that never change are merged once, not at every render.
                self._base = {**dict(self.compiled.globals), "tools": None, "documents": None, **self.variables}

    @staticmethod
    def _setup(tokenizer: Any, template: Any, variables: dict[str, Any], template_kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        try:
            from transformers.tokenization_utils_base import PreTrainedTokenizerBase
            from transformers.utils.chat_template_utils import _compile_jinja_template, _plain_template_data
        except ImportError:  # a transformers without these internals: always the public call
            return None, {}
        cls = type(tokenizer)
        named = set(inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters) | {"messages"}
        if (
            getattr(cls, "apply_chat_template", None) is not PreTrainedTokenizerBase.apply_chat_template
            or getattr(cls, "get_chat_template", None) is not PreTrainedTokenizerBase.get_chat_template
            or not isinstance(template, str)
            or named & set(template_kwargs)  # e.g. tools=...: apply_chat_template takes it, not the template
        ):
            return None, {}
        try:
            # apply_chat_template passes {**special_tokens_map, **kwargs}, rebuilt from plain JSON types.
            compiled = _compile_jinja_template(template)
            if compiled.environment.is_async:
                return None, {}
            return compiled, _plain_template_data(variables)
        except Exception:  # noqa: BLE001 - anything unusual: the public call reports it properly
            return None, {}

    def __getstate__(self) -> dict[str, Any]:
        # The compiled template does not pickle; it is rebuilt (from transformers' cache) on the other side.
        return {"tokenizer": self.tokenizer, "template_kwargs": self.template_kwargs}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["tokenizer"], state["template_kwargs"])

    def fast_for(self, messages: Sequence[Any]) -> bool:
        """True when render_plain gives apply_chat_template's text for these messages and any non-empty prefix of them."""
        return self.compiled is not None and plain_messages(messages) and self.tokenizer.chat_template is self._key[0]

    def render_plain(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        """Template.render's work for messages that fast_for() accepted (non-empty)."""
        # The sandbox is immutable, so the template cannot change the caller's dicts: no copy needed.
        ctx = self.compiled.new_context({**self._base, "messages": messages, "add_generation_prompt": generation_prompt}, shared=True)
        env = self.compiled.environment
        try:
            return env.concat(self.compiled.root_render_func(ctx))
        except Exception:
            env.handle_exception()  # re-raises, with the template's line in the traceback, as Template.render does

    def __call__(self, messages: Sequence[dict[str, str]], *, generation_prompt: bool) -> str:
        """Text of one render; call refresh() first when the tokenizer may have changed since the last batch."""
        if not self.fast_for(messages):
            return self.tokenizer.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=generation_prompt, **self.template_kwargs
            )
        return self.render_plain(list(messages), generation_prompt)


class SegmentEncoder:
    """Token ids of many texts (no special tokens added), each distinct piece between added tokens encoded once."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._setup_key: Any = None
        self.why_not: str | None = None
        self.splitter: re.Pattern | None = None
        self._disabled: str | None = None  # set when a checked text disagreed: never piecewise again

    def _refresh(self) -> None:
        """(Re)decide whether piecewise encoding is exact, whenever the tokenizer's pieces could have changed."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        added = backend.get_added_tokens_decoder() if hasattr(backend, "get_added_tokens_decoder") else {}
        tokens = tuple((t.content, t.lstrip, t.rstrip, t.single_word, t.normalized) for _, t in sorted(added.items()))
        state = lambda part: getattr(part, "__getstate__", lambda: None)() if part is not None else None  # noqa: E731
        key = (type(self.tokenizer), id(backend), tokens, getattr(self.tokenizer, "split_special_tokens", None),
               state(getattr(backend, "normalizer", None)), state(getattr(backend, "pre_tokenizer", None)))
        if key == self._setup_key:
            return
        self._setup_key = key
        self.why_not = self._disabled or self._unsupported(self.tokenizer, tokens)
        contents = sorted({t[0] for t in tokens}, key=len, reverse=True)
        self.splitter = re.compile("(" + "|".join(map(re.escape, contents)) + ")") if contents and self.why_not is None else None

    @staticmethod
    def _unsupported(tokenizer: Any, tokens: tuple) -> str | None:
        """Why the piecewise encoding could differ from the tokenizer's call, or None when it cannot."""
        try:
            from tokenizers import Tokenizer
            from transformers.tokenization_utils_base import PreTrainedTokenizerBase
            from transformers.tokenization_utils_tokenizers import TokenizersBackend
        except ImportError:
            return "transformers without TokenizersBackend"
        cls = type(tokenizer)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if not isinstance(backend, Tokenizer):
            return "not a fast tokenizer"
        if cls.__call__ is not PreTrainedTokenizerBase.__call__ or getattr(cls, "_encode_plus", None) is not TokenizersBackend._encode_plus:
            return f"{cls.__name__} has its own encoding call"
        if hasattr(tokenizer, "_switch_to_input_mode") or getattr(tokenizer, "split_special_tokens", False):
            return "input/target modes or split_special_tokens"
        if any(lstrip or rstrip or single_word or not content for content, lstrip, rstrip, single_word, _ in tokens):
            return "added tokens with strip or single-word options"
        normalizer = json.loads(backend.normalizer.__getstate__()) if backend.normalizer is not None else None
        if not _piecewise(normalizer, "normalizers", _PIECEWISE_NORMALIZERS):
            return "normalizer"
        if normalizer is not None and any(normalized for *_, normalized in tokens):
            return "normalized added tokens"  # matched after normalising the whole text
        pre = json.loads(backend.pre_tokenizer.__getstate__()) if backend.pre_tokenizer is not None else None
        if not _piecewise(pre, "pretokenizers", _PIECEWISE_PRE_TOKENIZERS):
            return "pre-tokenizer"
        if _overlapping([t[0] for t in tokens]):
            return "added tokens that overlap"
        return None

    def _plain(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []

    def __call__(self, texts: Sequence[str]) -> list[list[int]]:
        return self.encode_chunks([list(texts)])

    def encode_chunks(self, chunks: Iterable[list[str]]) -> list[list[int]]:
        """Ids of the texts of all chunks, in order.

        Each chunk's new pieces are encoded in a background thread while the caller produces the next
        chunk: the fast tokenizer releases the GIL while it encodes (on all cores).
        """
        self._refresh()
        if self.why_not is not None or self.splitter is None:
            return self._plain([t for chunk in chunks for t in chunk])
        from transformers.tokenization_utils_base import TruncationStrategy
        from transformers.utils import PaddingStrategy

        tok = self.tokenizer
        backend = tok.backend_tokenizer
        # What the tokenizer's own call sets up before encoding: no truncation, no padding, special tokens kept whole.
        tok.set_truncation_and_padding(
            padding_strategy=PaddingStrategy.DO_NOT_PAD, truncation_strategy=TruncationStrategy.DO_NOT_TRUNCATE,
            max_length=None, stride=0, pad_to_multiple_of=None, padding_side=None,
        )
        if backend.encode_special_tokens:
            backend.encode_special_tokens = False
        split = self.splitter.split
        texts: list[str] = []
        pieces: list[list[str]] = []
        table: dict[str, list[int] | None] = {}
        pending = []
        with ThreadPoolExecutor(max_workers=1) as pool:
            for chunk in chunks:
                texts += chunk
                split_chunk = [split(t) for t in chunk]
                pieces += split_chunk
                new = [p for p in dict.fromkeys(p for ps in split_chunk for p in ps if p) if p not in table]
                if new:
                    table.update(dict.fromkeys(new))
                    pending.append((new, pool.submit(backend.encode_batch_fast, new, add_special_tokens=False)))
            for new, future in pending:
                table.update(zip(new, (e.ids for e in future.result())))
        out = []
        for ps in pieces:
            ids: list[int] = []
            for p in ps:
                if p:
                    ids += table[p]
            out.append(ids)
        n = len(texts)
        checked = sorted(set(range(min(_CHECKED_TEXTS, n))) | set(range(max(0, n - _CHECKED_TEXTS), n)))
        if self._plain([texts[k] for k in checked]) != [out[k] for k in checked]:
            self._disabled = self.why_not = "piecewise ids differed from the tokenizer's on a checked text"
            log.warning("tokenising piecewise gave different ids for %s; using the tokenizer's own call", type(tok).__name__)
            return self._plain(texts)
        return out


def _piecewise(node: dict | None, children: str, allowed: frozenset[str]) -> bool:
    if node is None:
        return True
    if node.get("type") == "Sequence":
        return all(_piecewise(n, children, allowed) for n in node.get(children, []))
    if node.get("type") == "ByteLevel" and node.get("add_prefix_space"):
        return False
    return node.get("type") in allowed


def _overlapping(contents: list[str]) -> bool:
    """True when an added token contains another or ends with another's start (matches would depend on order)."""
    unique = list(dict.fromkeys(contents))
    for a in unique:
        for b in unique:
            if a is b:
                continue
            if b in a or any(ch == b[0] and b.startswith(a[i:]) for i, ch in enumerate(a) if i):
                return True
    return False
