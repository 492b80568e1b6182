"""Shared pieces of the benchmarks: data, the packaged model, and the seed tutorials' recipe.

The reference side re-creates what the tutorials do, from their description:
hand-written ChatML prompt strings, per-example encoding with the slow
tokenizer, the pad token appended as the end token, DataCollatorForSeq2Seq
padding, gradient checkpointing, a bf16 model and the plain HF Trainer.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import regex

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛"


def role_play_rows(n: int) -> tuple[list[dict[str, str]], str]:
    """n alpaca rows of the role-play data (../shared/data/huanhuan.json), or the project's persona data."""
    path = SHARED / "huanhuan.json"
    if not path.is_file():
        path = ROOT / "src" / "chattune" / "resources" / "persona.json"
    rows = json.loads(path.read_text(encoding="utf-8"))
    while len(rows) < n:
        rows = rows + rows
    return rows[:n], str(path)


def machine() -> str:
    """One line describing where the numbers were measured."""
    import torch  # here, so slow_tokenizer's transformers-4 subprocess can import this module without torch

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}"


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(result, seconds)."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


class SlowBPE:
    """A lean pure-Python byte-level BPE: the offline fallback for the tutorials' slow tokenizer.

    transformers 5 dropped the Python tokenizers, so `use_fast=False` now silently
    returns the fast one. The tokenize benchmark runs the real one (transformers 4's
    GPT2Tokenizer, see slow_tokenizer.py) and uses this only where transformers 4
    cannot be installed: it gives the same ids but runs about twice as fast as the
    real slow tokenizer (2.4 s vs 4.4-5.7 s on 3729 huanhuan rows), so ratios
    against it are too small. Special tokens are split out first, as the slow tokenizers did.
    """

    # GPT-2's pre-tokenisation (ByteLevel with use_regex, as SmolLM2's tokenizer has).
    PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

    def __init__(self, fast_tokenizer: Any):
        spec = json.loads(fast_tokenizer.backend_tokenizer.to_str())
        model = spec["model"]
        self.vocab: dict[str, int] = model["vocab"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.special = {t["content"]: t["id"] for t in spec["added_tokens"]}
        self.special_re = regex.compile("(" + "|".join(regex.escape(s) for s in sorted(self.special, key=len, reverse=True)) + ")")
        self.pre = regex.compile(self.PATTERN)
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
        cs = bs[:]
        n = 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        self.byte_map = {b: chr(c) for b, c in zip(bs, cs)}
        self.cache: dict[str, list[int]] = {}

    def _bpe(self, word: str) -> list[int]:
        parts = list(word)
        while len(parts) > 1:
            pairs = [(self.ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            rank, i = min(pairs)
            if rank == 1 << 30:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return [self.vocab[p] for p in parts]

    def encode(self, text: str) -> list[int]:
        """Token ids of text, no special tokens added."""
        ids: list[int] = []
        for chunk in self.special_re.split(text):
            if not chunk:
                continue
            if chunk in self.special:
                ids.append(self.special[chunk])
                continue
            for piece in self.pre.findall(chunk):
                word = "".join(self.byte_map[b] for b in piece.encode("utf-8"))
                # transformers 4's slow tokenizers memoised words the same way.
                if word not in self.cache:
                    self.cache[word] = self._bpe(word)
                ids.extend(self.cache[word])
        return ids


def reference_features(rows: list[dict[str, str]], encode: Callable[[str], list[int]], end_id: int, max_length: int) -> list[dict[str, list[int]]]:
    """The tutorials' process_func: hand-written ChatML prompt, answer, pad-as-end token, cut at max_length."""
    feats = []
    for r in rows:
        prompt = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{r['instruction'] + r['input']}<|im_end|>\n"
                  "<|im_start|>assistant\n")
        p, a = encode(prompt), encode(r["output"])
        ids = (p + a + [end_id])[:max_length]
        labels = ([-100] * len(p) + a + [end_id])[:max_length]
        feats.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return feats
