"""BLEU-4 / ROUGE / exact match against values worked out by hand (the arithmetic is in the comments)."""

import math

import pytest

from chattune.errors import ConfigError
from chattune.evaluate import metrics as m


def test_english_pair():
    pred, ref = "the cat sat on the mat", "the cat is on the mat"
    assert m.words(pred) == ["the", "cat", "sat", "on", "the", "mat"]
    s = m.score_row(pred, ref, ["bleu", "rouge", "exact"])
    # BLEU over words, 6 hyp tokens, 6 ref tokens -> brevity penalty 1.
    #   1-grams: the x2 (ref has 2), cat, on, mat match; sat does not     -> 5/6
    #   2-grams: the cat | cat sat | sat on | on the | the mat -> 3 match  -> 3/5
    #   3-grams: only "on the mat" matches                                 -> 1/4
    #   4-grams: none of 3 match; smoothing method 3: 1 / (2^1 * 3)        -> 1/6
    #   BLEU = (5/6 * 3/5 * 1/4 * 1/6) ** (1/4) = (1/48) ** 0.25 = 0.379918
    assert s["bleu-4"] == pytest.approx(100 * (1 / 48) ** 0.25, abs=1e-3)
    assert s["bleu-4"] == pytest.approx(37.9918, abs=1e-3)
    # ROUGE-1 as rouge-chinese counts it, distinct unigrams:
    #   hyp {the, cat, sat, on, mat} (5), ref {the, cat, is, on, mat} (5), shared 4 -> P = R = F = 4/5
    assert s["rouge-1"] == pytest.approx(80.0, abs=1e-4)
    # ROUGE-2: 5 distinct bigrams each side, shared {the cat, on the, the mat} = 3 -> F = 3/5
    assert s["rouge-2"] == pytest.approx(60.0, abs=1e-4)
    # ROUGE-L: LCS = "the cat on the mat" = 5 of 6 tokens on both sides -> F = 5/6
    assert s["rouge-l"] == pytest.approx(100 * 5 / 6, abs=1e-4)
    assert s["exact"] == 0.0


def test_english_punctuation_and_case_are_tokens():
    pred, ref = "Hello, world!", "hello world"
    assert m.words(pred) == ["Hello", ",", "world", "!"]
    s = m.score_row(pred, ref, ["bleu", "rouge"])
    # BLEU: hyp 4 tokens, ref 2 -> BP = 1 (hypothesis longer).
    #   1-grams: only "world" matches -> 1/4; 2/3/4-grams: 3, 2, 1 of them, none match,
    #   method 3 gives 1/(2*3), 1/(4*2), 1/(8*1)
    #   BLEU = (1/4 * 1/6 * 1/8 * 1/8) ** (1/4) = (1/1536) ** 0.25 = 0.159736
    assert s["bleu-4"] == pytest.approx(100 * (1 / 1536) ** 0.25, abs=1e-3)
    # ROUGE-1: hyp set 4, ref set 2, shared {world}: P = 1/4, R = 1/2, F = 2PR/(P+R) = 1/3
    assert s["rouge-1"] == pytest.approx(100 / 3, abs=1e-4)
    assert s["rouge-2"] == 0.0


def test_chinese_pair_prefix():
    pred, ref = "我爱北京", "我爱北京天安门"
    # ROUGE tokens come from jieba words:
    assert m.words(pred) == ["我", "爱", "北京"] and m.words(ref) == ["我", "爱", "北京", "天安门"]
    # BLEU tokens are characters (as LLaMA-Factory and ms-swift compute BLEU for Chinese):
    assert m.bleu_tokens(ref) == list("我爱北京天安门")
    s = m.score_row(pred, ref, ["bleu", "rouge", "exact"])
    # BLEU over characters: the 4-character hypothesis is a prefix of the 7-character reference,
    #   so p1 = 4/4, p2 = 3/3, p3 = 2/2, p4 = 1/1; brevity penalty exp(1 - 7/4) = exp(-0.75) = 0.472367
    assert s["bleu-4"] == pytest.approx(100 * math.exp(-0.75), abs=1e-3)
    # ROUGE-1: hyp words 3, ref words 4, shared 3: P = 1, R = 3/4, F = 2*0.75/1.75 = 6/7
    assert s["rouge-1"] == pytest.approx(100 * 6 / 7, abs=1e-4)
    # ROUGE-2: hyp {我爱, 爱北京} (2), ref adds 北京天安门 (3), shared 2: P = 1, R = 2/3, F = 0.8
    assert s["rouge-2"] == pytest.approx(80.0, abs=1e-4)
    # ROUGE-L: LCS = 我 爱 北京 = 3: P = 3/3, R = 3/4 -> F = 6/7
    assert s["rouge-l"] == pytest.approx(100 * 6 / 7, abs=1e-4)


def test_chinese_pair_one_word_differs():
    pred, ref = "被告人犯盗窃罪。", "被告人犯抢劫罪。"
    assert m.words(pred) == ["被告人", "犯", "盗窃罪", "。"] and m.words(ref) == ["被告人", "犯", "抢劫罪", "。"]
    s = m.score_row(pred, ref, ["bleu", "rouge"])
    # BLEU over 8 characters each (BP = 1):
    #   1-grams 被 告 人 犯 罪 。 match, 盗 窃 do not                  -> 6/8
    #   2-grams 被告 告人 人犯 罪。 match of 7                          -> 4/7
    #   3-grams 被告人 告人犯 match of 6                                -> 2/6
    #   4-grams 被告人犯 matches of 5                                   -> 1/5
    #   BLEU = (6/8 * 4/7 * 2/6 * 1/5) ** (1/4) = 0.0285714 ** 0.25 = 0.411134
    assert s["bleu-4"] == pytest.approx(100 * (6 / 8 * 4 / 7 * 2 / 6 * 1 / 5) ** 0.25, abs=1e-3)
    # ROUGE-1: 4 words each, shared 被告人 犯 。 -> F = 3/4
    assert s["rouge-1"] == pytest.approx(75.0, abs=1e-4)
    # ROUGE-2: 3 bigrams each, shared only (被告人, 犯) -> F = 1/3
    assert s["rouge-2"] == pytest.approx(100 / 3, abs=1e-4)
    # ROUGE-L: LCS 被告人 犯 。 = 3 of 4 -> F = 3/4
    assert s["rouge-l"] == pytest.approx(75.0, abs=1e-4)


def test_mixed_row_is_cut_the_chinese_way_on_both_sides():
    # The reference is Chinese, the prediction English: both sides go through jieba, so "OK" is one word on each.
    assert m.words("OK，好的", True) == ["OK", "，", "好", "的"]
    # ROUGE-1: hyp {OK}, ref 4 words, shared 1: P = 1, R = 1/4, F = 2 * 0.25 / 1.25 = 0.4
    assert m.rouge("OK", "OK，好的")["rouge-1"] == pytest.approx(40.0, abs=1e-4)


def test_empty_prediction_scores_zero_and_exact_ignores_whitespace():
    assert m.score_row("", "答案", ["bleu", "rouge"]) == {"bleu-4": 0.0, "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    assert m.exact_match(" B\n", "B") == 100.0 and m.exact_match("B.", "B") == 0.0


def test_average_is_the_mean_of_rows():
    rows = [m.score_row("我爱北京", "我爱北京天安门", ["exact", "rouge"]), m.score_row("a", "a", ["exact", "rouge"])]
    avg = m.average(rows)
    assert avg["exact"] == 50.0
    assert avg["rouge-1"] == pytest.approx((100 * 6 / 7 + 100) / 2, abs=1e-3)


def test_parse_metrics():
    assert m.parse_metrics("bleu, ROUGE,bleu") == ["bleu", "rouge"]
    with pytest.raises(ConfigError, match="unknown metric"):
        m.parse_metrics("bleu,meteor")
