"""On-disk cache of rendered samples, and multi-process rendering for large data.

The key covers everything rendering depends on: the conversations themselves
(so data content, format options, probe hold-out and limits all count), the
tokenizer's vocabulary and merges, the chat template and its variables,
max_length, overlength and train_on. A second run on the same inputs loads
flat int32 arrays instead of re-tokenising; any change makes a new key.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np

from chattune.data.formats import Conversation
from chattune.data.render import ChatRenderer, RenderStats, Sample, render_all

RENDER_VERSION = "1"  # bump when the rendering rules change
PARALLEL_MIN = 2_000  # conversations; below this one process is faster than forking workers


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


def _save(path: Path, samples: Sequence[Sample], stats: RenderStats) -> None:
    lengths = np.array([len(s.input_ids) for s in samples], dtype=np.int64)
    meta = json.dumps({"stats": asdict(stats), "where": [s.where for s in samples]}, ensure_ascii=False).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    with os.fdopen(fd, "wb") as f:
        np.savez(
            f,
            ids=np.fromiter((t for s in samples for t in s.input_ids), dtype=np.int32, count=int(lengths.sum())),
            labels=np.fromiter((t for s in samples for t in s.labels), dtype=np.int32, count=int(lengths.sum())),
            offsets=np.concatenate([[0], np.cumsum(lengths)]),
            meta=np.frombuffer(meta, dtype=np.uint8),
        )
    os.replace(tmp, path)  # a crash never leaves a half-written cache entry under the real name


def _load(path: Path) -> tuple[list[Sample], RenderStats]:
    with np.load(path, allow_pickle=False) as z:
        ids, labels, offsets = z["ids"].tolist(), z["labels"].tolist(), z["offsets"].tolist()
        meta = json.loads(z["meta"].tobytes().decode())
    samples = [Sample(ids[a:b], labels[a:b], w) for a, b, w in zip(offsets, offsets[1:], meta["where"])]
    return samples, RenderStats(**meta["stats"])


def _render_chunk(args: tuple) -> tuple[list[Sample], RenderStats]:
    renderer, convs, kwargs = args
    return render_all(renderer, convs, **kwargs)


def render_parallel(renderer: ChatRenderer, conversations: Sequence[Conversation], *, workers: int, **kwargs) -> tuple[list[Sample], RenderStats]:
    """render_all split over worker processes; same samples in the same order."""
    if workers <= 1 or len(conversations) < PARALLEL_MIN:
        return render_all(renderer, conversations, **kwargs)
    size = -(-len(conversations) // workers)
    chunks = [(renderer, conversations[i:i + size], kwargs) for i in range(0, len(conversations), size)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        parts = list(pool.map(_render_chunk, chunks))
    samples = [s for part, _ in parts for s in part]
    total = RenderStats()
    for _, st in parts:
        for field, value in asdict(st).items():
            setattr(total, field, getattr(total, field) + value if field != "examples_truncated" else (getattr(total, field) + value)[:5])
    return samples, total


def render_cached(
    renderer: ChatRenderer,
    conversations: Sequence[Conversation],
    *,
    cache_dir: Path | None,
    max_length: int,
    overlength: str = "truncate",
    train_on: str = "all_assistant",
    workers: int | None = None,
) -> tuple[list[Sample], RenderStats, bool]:
    """(samples, stats, cache hit): load a previous rendering of the same inputs or render and store it."""
    settings = {"max_length": max_length, "overlength": overlength, "train_on": train_on}
    path = cache_dir / f"{cache_key(renderer, conversations, **settings)}.npz" if cache_dir else None
    if path is not None and path.is_file():
        try:
            samples, stats = _load(path)
            return samples, stats, True
        except (OSError, ValueError, KeyError):
            path.unlink(missing_ok=True)  # a damaged entry is rebuilt, never trusted
    workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
    samples, stats = render_parallel(renderer, conversations, workers=workers, **settings)
    if path is not None:
        _save(path, samples, stats)
    return samples, stats, False
