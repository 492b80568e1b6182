"""Tokenisation: chattune (batched fast tokenizer, cached) vs the tutorials' per-example slow encoding.

    python benchmarks/tokenize_speed.py [--rows 3729] [--reference transformers4|slowbpe]

The reference is what the tutorials ran: transformers 4's pure-Python slow tokenizer, one call per
prompt and per answer (installed once into a side folder, run in a subprocess: see slow_tokenizer.py).
Where it cannot be installed the benchmark falls back to common.SlowBPE and says so: SlowBPE is about
twice as fast as the real slow tokenizer, so the ratio it gives is too small.

chattune's first run starts from the loaded tokenizer and includes the renderer, the cache key and
writing the cache entry; the second run loads that entry. Prints rows/s of both sides, the ratios,
and how many of the reference's encoded texts the fast tokenizer encodes differently (must be 0).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from common import SYSTEM, SlowBPE, machine, reference_features, role_play_rows, timed
from slow_tokenizer import install, run_reference, side_folder

from chattune.config import ModelConfig
from chattune.data.cache import render_cached
from chattune.data.formats import Conversation
from chattune.data.render import ChatRenderer
from chattune.model.load import load_tokenizer
from chattune.model.sources import resolve_model_dir

MAX_LENGTH = 384


def reference(rows: list[dict[str, str]], model_dir: Path, tok, end_id: int, which: str) -> tuple[list[list[int]], float, str]:
    """(ids of every text the tutorials' loop encoded, seconds, what ran)."""
    why = "--reference slowbpe"
    if which == "transformers4":
        folder = side_folder()
        why = install(folder)
        if why is None:
            out = run_reference(rows, model_dir, end_id, MAX_LENGTH, folder)
            return out["ids"], out["seconds"], (f"transformers {out['transformers']} {out['tokenizer']} (the slow, pure-Python "
                                                f"tokenizer), per example, in a subprocess from {folder}")
    slow = SlowBPE(tok)
    seen: list[list[int]] = []

    def encode(text: str) -> list[int]:
        ids = slow.encode(text)
        seen.append(ids)
        return ids

    _, seconds = timed(lambda: reference_features(rows, encode, end_id, MAX_LENGTH))
    loud = f"reference: SlowBPE fallback, ~2x faster than the real slow tokenizer ({why}); the ratios below are too small"
    print(f"!!! {loud}", file=sys.stderr, flush=True)
    return seen, seconds, f"!!! {loud}"


def import_what_train_has_imported() -> None:
    """The libraries `chattune train` has loaded before it tokenises, so that neither side's time holds imports.

    pyarrow imports pandas on its first array (0.2-0.4 s here); in `chattune train` transformers' Trainer has
    imported it long before. The reference's seconds count its encoding loop only, not its imports, either.
    """
    import pyarrow as pa

    pa.array([0], pa.int32())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=3729)
    ap.add_argument("--reference", choices=["transformers4", "slowbpe"], default="transformers4")
    args = ap.parse_args()
    load_before = os.getloadavg()
    rows, source = role_play_rows(args.rows)
    model_dir = resolve_model_dir("smollm2-135m")
    tok = load_tokenizer(model_dir, ModelConfig())
    end_id = tok.eos_token_id

    ref_ids, ref_s, what = reference(rows, model_dir, tok, end_id, args.reference)
    replay, texts = iter(ref_ids), []
    ref = reference_features(rows, lambda t: (texts.append(t), next(replay))[1], end_id, MAX_LENGTH)

    convs = [Conversation([{"role": "system", "content": SYSTEM},
                           {"role": "user", "content": r["instruction"] + r["input"]},
                           {"role": "assistant", "content": r["output"]}], f"row {i}") for i, r in enumerate(rows)]
    import_what_train_has_imported()
    with tempfile.TemporaryDirectory() as cache_dir:
        run = lambda: render_cached(ChatRenderer(tok), convs, cache_dir=Path(cache_dir), max_length=MAX_LENGTH)  # noqa: E731
        (ours, _, hit1), ours_s = timed(run)
        (again, _, hit2), cached_s = timed(run)
    assert not hit1 and hit2 and [s.input_ids for s in again] == [s.input_ids for s in ours]
    load_after = os.getloadavg()

    # After the timed runs, so chattune's first run starts with the fast tokenizer's word cache empty.
    fast_ids = tok(texts, add_special_tokens=False)["input_ids"]
    mismatches = sum(a != b for a, b in zip(ref_ids, fast_ids))

    print(f"# tokenize — {len(rows)} rows of {Path(source).name}; {machine()}")
    print(f"load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print(f"reference: {what}" if not what.startswith("!!!") else what)
    print(f"reference vs fast tokenizer: {mismatches} of {len(texts)} encoded texts differ")
    print(f"tutorial (per-example slow encoding): {ref_s:7.2f}s  {len(rows) / ref_s:8.0f} rows/s")
    print(f"chattune (batched, first run):        {ours_s:7.2f}s  {len(rows) / ours_s:8.0f} rows/s   ratio {ref_s / ours_s:5.1f}x")
    print(f"chattune (cached second run):         {cached_s:7.2f}s  {len(rows) / cached_s:8.0f} rows/s   ratio {ref_s / cached_s:5.1f}x")
    print(f"tokens: tutorial {sum(len(f['input_ids']) for f in ref)}, chattune {sum(len(s.input_ids) for s in ours)}")


if __name__ == "__main__":
    main()
