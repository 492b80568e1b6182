"""On-disk cache of rendered samples, and multi-process rendering for large data.

The key covers everything rendering depends on: the conversations themselves
(so data content, format options, probe hold-out and limits all count), the
tokenizer's vocabulary and merges, the chat template and its variables,
max_length, overlength and train_on. A second run on the same inputs maps
the entry (data/store.py) instead of re-tokenising; any change makes a new key.
An entry is rendered and written STORE_CHUNK conversations at a time, and what
training gets back is the memory-mapped entry, never a list of every sample.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from chattune.data.formats import Conversation
from chattune.data.render import RENDER_CHUNK, ChatRenderer, RenderStats, Sample, apply_max_length, render_all
from chattune.data.store import SampleStore, write_samples
from chattune.files import atomic_open

RENDER_VERSION = "2"  # bump when the rendering rules or the entry's format change (2: Arrow, was .npz)
STORE_CHUNK = 1024  # conversations rendered and written to the cache entry at a time (~25 MB of Python lists)
# Conversations below which render_parallel stays in one process. Measured on 2 cores (huanhuan rows made
# unique, SmolLM2 tokenizer): one process 0.43 s / 2.1 s / 4.8 s for 3729 / 20k / 40k conversations, two
# processes 0.47 s / 3.2 s / 7.6 s; the fast tokenizer already keeps both cores busy and forked renderers
# only oversubscribe them. So render_cached uses one process unless asked for more (workers=), and even
# then only from 20k conversations, where the fork is cheap next to the work; untested on many cores.
PARALLEL_MIN = 20_000


def tokenizer_fingerprint(renderer: ChatRenderer) -> str:
    """Hash of what turns text into ids: the tokenizer model, its special tokens, the template and its variables."""
    tok = renderer.tokenizer
    h = hashlib.sha256()
    files = getattr(tok, "chattune_files_sha256", None)  # set by model.load.load_tokenizer: hashing files is cheap
    if files:
        h.update(files.encode())
    else:
        backend = getattr(tok, "backend_tokenizer", None)
        h.update(backend.to_str().encode() if backend is not None else json.dumps(sorted(tok.get_vocab().items())).encode())
    h.update(json.dumps([tok.chat_template, renderer.template_kwargs, sorted(renderer.special_ids)], sort_keys=True, default=str).encode())
    return h.hexdigest()


def cache_key(renderer: ChatRenderer, conversations: Sequence[Conversation], **settings: object) -> str:
    """The cache key of rendering these conversations with these settings."""
    h = hashlib.sha256(RENDER_VERSION.encode())
    h.update(tokenizer_fingerprint(renderer).encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    for conv in conversations:
        h.update(json.dumps(conv.messages, ensure_ascii=False).encode())
        h.update(conv.where.encode())
    return h.hexdigest()[:32]


def _rendered_chunks(renderer: ChatRenderer, conversations: Sequence[Conversation], *, max_length: int,
                     overlength: str, train_on: str) -> Iterator[tuple[list[Sample], RenderStats]]:
    """render_all's output, STORE_CHUNK conversations at a time: only one chunk's samples are ever in memory."""
    for k in range(0, len(conversations), STORE_CHUNK):
        chunk = list(conversations[k:k + STORE_CHUNK])  # decoded once, if packed
        yield render_all(renderer, chunk, max_length=max_length, overlength=overlength, train_on=train_on)


# What forked workers render: set by render_parallel just before forking, so the renderer and the
# conversations reach the workers by inheritance instead of being pickled for every chunk.
_FORKED: tuple[ChatRenderer, Sequence[Conversation], str] | None = None


def _texts_of_range(bounds: tuple[int, int]) -> list[str]:
    renderer, conversations, train_on = _FORKED
    return renderer.texts_of(conversations[bounds[0]:bounds[1]], train_on=train_on)


def render_parallel(
    renderer: ChatRenderer,
    conversations: Sequence[Conversation],
    *,
    workers: int,
    max_length: int,
    overlength: str = "truncate",
    train_on: str = "all_assistant",
) -> tuple[list[Sample], RenderStats]:
    """render_all with the chat templates rendered in forked worker processes; same samples in the same order.

    Only the template rendering (pure Python, one core) is split: workers return texts, and the parent
    tokenises them as they arrive (the fast tokenizer already spreads its work over every core) and builds
    the samples. The parent renders the first share itself while the workers render the rest.
    """
    global _FORKED
    n = len(conversations)
    if workers <= 1 or n < PARALLEL_MIN or "fork" not in multiprocessing.get_all_start_methods():
        return render_all(renderer, conversations, max_length=max_length, overlength=overlength, train_on=train_on)
    own = n // workers
    step = RENDER_CHUNK
    mine = [(i, min(i + step, own)) for i in range(0, own, step)]
    theirs = [(i, min(i + step, n)) for i in range(own, n, step)]
    _FORKED = (renderer, conversations, train_on)
    try:
        with multiprocessing.get_context("fork").Pool(workers - 1) as pool:
            arriving = pool.imap(_texts_of_range, theirs)
            chunks = itertools.chain((_texts_of_range(b) for b in mine), arriving)
            rendered = renderer.samples_from_text_chunks(conversations, chunks, train_on=train_on)
    finally:
        _FORKED = None
    return apply_max_length(rendered, n, max_length=max_length, overlength=overlength)


def render_cached(
    renderer: ChatRenderer,
    conversations: Sequence[Conversation],
    *,
    cache_dir: Path | None,
    max_length: int,
    overlength: str = "truncate",
    train_on: str = "all_assistant",
    workers: int | None = None,
) -> tuple[Sequence[Sample], RenderStats, bool]:
    """(samples, stats, cache hit): map a previous rendering of the same inputs, or render, store and map it.

    Without cache_dir the samples are rendered into a list in memory.

    workers > 1 renders the templates of 20k+ conversations in forked processes (see PARALLEL_MIN).
    """
    settings = {"max_length": max_length, "overlength": overlength, "train_on": train_on}
    path = cache_dir / f"{cache_key(renderer, conversations, **settings)}.arrow" if cache_dir else None
    if path is not None and path.is_file():
        try:
            store = SampleStore(path)
            return store, store.stats, True
        except (OSError, ValueError, KeyError, TypeError):  # pyarrow's errors are ValueErrors or OSErrors
            path.unlink(missing_ok=True)  # a damaged entry is rebuilt, never trusted
    workers = workers if workers is not None else 1  # see PARALLEL_MIN
    if path is None or (workers > 1 and len(conversations) >= PARALLEL_MIN):
        samples, stats = render_parallel(renderer, conversations, workers=workers, **settings)
        chunks: Iterable[tuple[list[Sample], RenderStats]] = [(samples, stats)]
        if path is None:
            return samples, stats, False
    else:
        chunks = _rendered_chunks(renderer, conversations, **settings)
    with atomic_open(path, "wb") as f:  # a crash never leaves a half-written cache entry under the real name
        stats = write_samples(f, chunks)
    return SampleStore(path), stats, False
