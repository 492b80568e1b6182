"""Generation metrics: BLEU-4, ROUGE-1/2/L and exact match, computed as LLaMA-Factory and ms-swift do.

Per row, on a 0-100 scale, then averaged over rows:
- ROUGE-1/2/L F-scores from rouge-chinese over words: jieba words for Chinese
  text, words and punctuation marks for other text. rouge-chinese counts each
  distinct n-gram once (sets), as in LLaMA-Factory.
- BLEU-4 from nltk's sentence_bleu with smoothing method 3 (NIST), over
  characters for Chinese text (as LLaMA-Factory and ms-swift do) and over words
  for other text.
- exact match: 100 when prediction and reference are equal up to whitespace.
A row counts as Chinese when its prediction or its reference has a Han character,
so both sides are always cut the same way.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from typing import Iterable, Sequence

from chattune.errors import ConfigError, MissingDependencyError

METRICS = ("bleu", "rouge", "exact")
# Column names in results, in display order.
KEYS = {"bleu": ["bleu-4"], "rouge": ["rouge-1", "rouge-2", "rouge-l"], "exact": ["exact"]}

_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]")
_WORD = re.compile(r"\w+|[^\w\s]")


def parse_metrics(text: str | Iterable[str]) -> list[str]:
    """'bleu,rouge' -> ['bleu', 'rouge']; unknown names are a ConfigError."""
    names = [s.strip().lower() for s in (text.split(",") if isinstance(text, str) else text) if s.strip()]
    bad = [n for n in names if n not in METRICS]
    if bad or not names:
        raise ConfigError(f"unknown metric(s): {', '.join(bad) or '(none)'}", where="--metrics",
                          fix=f"use a comma list of {', '.join(METRICS)}")
    return list(dict.fromkeys(names))


def check_installed(metrics: Sequence[str]) -> None:
    """Fail before any model loads when the libraries behind the asked metrics are missing."""
    needed = {"bleu": ["nltk", "jieba"], "rouge": ["rouge_chinese", "jieba"]}
    missing = sorted({mod for m in metrics for mod in needed.get(m, []) if importlib.util.find_spec(mod) is None})
    if missing:
        raise MissingDependencyError(", ".join(missing), pip="pip install 'chattune[eval]'", where="--metrics",
                                     what=f"the metric libraries {', '.join(missing)} are not installed",
                                     otherwise="pass --metrics exact")


def is_chinese(text: str) -> bool:
    """True when the text has at least one Han character."""
    return bool(_HAN.search(text))


def words(text: str, chinese: bool | None = None) -> list[str]:
    """ROUGE tokens: jieba words for Chinese text, words and punctuation marks otherwise (never whitespace)."""
    if chinese is None:
        chinese = is_chinese(text)
    if chinese:
        return [w for w in _jieba().cut(text) if w.strip()]
    return _WORD.findall(text)


def bleu_tokens(text: str, chinese: bool | None = None) -> list[str]:
    """BLEU tokens: characters for Chinese text, words and punctuation marks otherwise."""
    if chinese is None:
        chinese = is_chinese(text)
    return [c for c in text if not c.isspace()] if chinese else _WORD.findall(text)


def bleu4(prediction: str, reference: str) -> float:
    """Sentence BLEU-4 (0-100), smoothing method 3."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    zh = is_chinese(prediction) or is_chinese(reference)
    hyp, ref = bleu_tokens(prediction, zh), bleu_tokens(reference, zh)
    if not hyp or not ref:
        return 0.0
    return 100.0 * sentence_bleu([ref], hyp, smoothing_function=SmoothingFunction().method3)


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F-scores (0-100)."""
    from rouge_chinese import Rouge

    zh = is_chinese(prediction) or is_chinese(reference)
    hyp, ref = words(prediction, zh), words(reference, zh)
    if not hyp or not ref:
        return {k: 0.0 for k in KEYS["rouge"]}
    scores = Rouge().get_scores(" ".join(hyp), " ".join(ref))[0]
    return {k: 100.0 * scores[k]["f"] for k in KEYS["rouge"]}


def exact_match(prediction: str, reference: str) -> float:
    """100 when equal after collapsing whitespace, else 0."""
    return 100.0 if prediction.split() == reference.split() else 0.0


def score_row(prediction: str, reference: str, metrics: Sequence[str]) -> dict[str, float]:
    """Every asked metric for one prediction, rounded to 4 decimals."""
    out: dict[str, float] = {}
    if "bleu" in metrics:
        out["bleu-4"] = bleu4(prediction, reference)
    if "rouge" in metrics:
        out.update(rouge(prediction, reference))
    if "exact" in metrics:
        out["exact"] = exact_match(prediction, reference)
    return {k: round(v, 4) for k, v in out.items()}


def average(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over rows (the corpus number LLaMA-Factory reports)."""
    if not rows:
        return {}
    return {k: round(sum(r[k] for r in rows) / len(rows), 4) for k in rows[0]}


def _jieba():
    import jieba

    # jieba announces building its dictionary on every first use; our own log says what runs.
    jieba.setLogLevel(logging.WARNING)
    return jieba
