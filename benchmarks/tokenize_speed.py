"""Tokenisation: chattune (batched fast tokenizer, cached) vs the tutorials' per-example slow encoding.

    python benchmarks/tokenize_speed.py [--rows 3729]

Prints rows/s of both sides, the ratio, and the cached second run.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import SYSTEM, SlowBPE, machine, reference_features, role_play_rows, timed

from chattune.config import ModelConfig
from chattune.data.cache import render_cached
from chattune.data.formats import Conversation
from chattune.data.render import ChatRenderer
from chattune.model.load import load_tokenizer
from chattune.model.sources import resolve_model_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=3729)
    args = ap.parse_args()
    rows, source = role_play_rows(args.rows)
    tok = load_tokenizer(resolve_model_dir("smollm2-135m"), ModelConfig())
    slow = SlowBPE(tok)

    check = [r["instruction"] + r["input"] + r["output"] for r in rows[:200]]
    mismatches = sum(slow.encode(t) != tok(t, add_special_tokens=False)["input_ids"] for t in check)
    slow.cache.clear()

    ref, ref_s = timed(lambda: reference_features(rows, slow.encode, tok.eos_token_id, 384))

    convs = [Conversation([{"role": "system", "content": SYSTEM},
                           {"role": "user", "content": r["instruction"] + r["input"]},
                           {"role": "assistant", "content": r["output"]}], f"row {i}") for i, r in enumerate(rows)]
    renderer = ChatRenderer(tok)
    with tempfile.TemporaryDirectory() as cache_dir:
        (ours, _, hit1), ours_s = timed(lambda: render_cached(renderer, convs, cache_dir=Path(cache_dir), max_length=384))
        (again, _, hit2), cached_s = timed(lambda: render_cached(renderer, convs, cache_dir=Path(cache_dir), max_length=384))
    assert not hit1 and hit2 and len(again) == len(ours)

    print(f"# tokenize — {len(rows)} rows of {Path(source).name}; {machine()}")
    print(f"slow BPE vs fast tokenizer: {mismatches} of {len(check)} texts differ")
    print(f"tutorial (per-example slow encoding): {ref_s:7.2f}s  {len(rows) / ref_s:8.0f} rows/s")
    print(f"chattune (batched, first run):        {ours_s:7.2f}s  {len(rows) / ours_s:8.0f} rows/s   ratio {ref_s / ours_s:5.1f}x")
    print(f"chattune (cached second run):         {cached_s:7.2f}s  {len(rows) / cached_s:8.0f} rows/s   ratio {ref_s / cached_s:5.1f}x")
    print(f"tokens: tutorial {sum(len(f['input_ids']) for f in ref)}, chattune {sum(len(s.input_ids) for s in ours)}")


if __name__ == "__main__":
    main()
