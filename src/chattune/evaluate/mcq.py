"""Multiple-choice accuracy by option-letter likelihood: no answer parsing.

Each question is rendered with the run's chat template (system prompt, k worked
examples as earlier user/assistant turns, then the question with its options)
and the generation prompt. One forward pass gives the model's log-probability
of each option letter as the first answer token; the choice is the most likely
letter among the question's options.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from chattune.data.formats import read_records
from chattune.data.render import ChatRenderer
from chattune.errors import DataError, ModelError
from chattune.evaluate.metrics import is_chinese
from chattune.infer.generate import inference_mode, left_pad

LETTERS = "ABCDEFGHIJ"
QUESTION_KEYS = ("question", "input", "instruction", "query", "stem")
ANSWER_KEYS = ("answer", "output", "label", "answerKey", "target")
OPTION_LIST_KEYS = ("options", "choices")
HEAD_ZH = "以下是单项选择题，请直接给出正确答案的选项字母。"
HEAD_EN = "The following is a multiple-choice question. Answer with the letter of the correct option."
Z95 = 1.959963984540054  # two-sided 95 % normal quantile


@dataclass
class Question:
    """One multiple-choice question: text, options by letter, the answer letter, and where it came from."""

    question: str
    options: dict[str, str]
    answer: str
    where: str


# ---------------------------------------------------------------------------
# reading


def load_questions(path: str | Path) -> list[Question]:
    """Read a CSV/JSON/JSONL/parquet file of questions (DISC-Law layout: input, output, A, B, C, D)."""
    questions = [to_question(rec.data, rec.where) for rec in read_records(path)]
    if not questions:
        raise DataError("no questions", where=str(path), fix="add rows: question, options A-D, answer letter")
    return questions


def to_question(record: Any, where: str) -> Question:
    """One record -> Question, with errors that say which field is wrong."""
    if not isinstance(record, dict):
        raise DataError(f"record is a {type(record).__name__}, expected an object", where=where)
    question = _first_text(record, QUESTION_KEYS)
    if not question:
        raise DataError(f"no question text (looked for {', '.join(QUESTION_KEYS)})", where=where,
                        fix="name the question column question or input")
    options = _options(record, where)
    answer = _answer(record, options, where)
    return Question(question.strip(), options, answer, where)


def _first_text(record: dict, keys: Sequence[str]) -> str | None:
    for k in keys:
        v = record.get(k)
        if isinstance(v, str) and v.strip():
            return v
    return None


def _options(record: dict, where: str) -> dict[str, str]:
    for key in OPTION_LIST_KEYS:
        raw = record.get(key)
        if isinstance(raw, list):
            options = {LETTERS[i]: str(v) for i, v in enumerate(raw[: len(LETTERS)])}
            break
        if isinstance(raw, dict):
            options = {str(k).strip().upper(): str(v) for k, v in raw.items()}
            break
    else:
        # Letter columns A, B, C, ... as in the DISC-Law CSVs; stop at the first absent or empty one.
        options = {}
        for letter in LETTERS:
            v = record.get(letter, record.get(letter.lower()))
            if v is None or not str(v).strip():
                break
            options[letter] = str(v)
    if len(options) < 2 or any(k not in LETTERS for k in options):
        raise DataError(
            f"needs at least two options lettered A, B, ... (found {', '.join(options) or 'none'})",
            where=where,
            fix="give columns A, B, C, D, or an 'options' list",
        )
    return options


def _answer(record: dict, options: dict[str, str], where: str) -> str:
    raw = _first_text(record, ANSWER_KEYS)
    if raw is None:
        raise DataError(f"no answer letter (looked for {', '.join(ANSWER_KEYS)})", where=where,
                        fix="add an answer column holding the correct letter, e.g. B")
    letter = raw.strip().strip(".)）。 ").upper()
    if len(letter) > 1 and all(c in options for c in letter):
        raise DataError(f"answer {raw!r} names several options; only single-answer questions are scored", where=where,
                        fix="remove multiple-answer rows from the file")
    if letter not in options:
        raise DataError(f"answer {raw!r} is not one of the option letters {', '.join(options)}", where=where,
                        fix="the answer must be a single option letter")
    return letter


# ---------------------------------------------------------------------------
# prompts


def question_text(q: Question) -> str:
    """The user turn: an instruction line (Chinese for Chinese questions), the question, lettered options."""
    head = HEAD_ZH if is_chinese(q.question) else HEAD_EN
    return "\n".join([head, "", q.question, *(f"{k}. {v}" for k, v in q.options.items())])


def build_messages(q: Question, shots: Sequence[Question], system: str | None) -> list[dict[str, str]]:
    """System prompt, worked examples as earlier turns (answer = the letter), then the question."""
    messages = [{"role": "system", "content": system}] if system else []
    for s in shots:
        messages += [{"role": "user", "content": question_text(s)}, {"role": "assistant", "content": s.answer}]
    messages.append({"role": "user", "content": question_text(q)})
    return messages


def letter_token_ids(tokenizer: Any, letters: Sequence[str]) -> dict[str, int]:
    """The single token each option letter is written as at the start of an answer."""
    ids = {}
    for letter in letters:
        toks = tokenizer.encode(letter, add_special_tokens=False)
        if len(toks) != 1:
            raise ModelError(f"option letter {letter!r} is not a single token for this tokenizer ({toks})",
                             fix="letter-likelihood scoring needs one token per letter")
        ids[letter] = toks[0]
    return ids


# ---------------------------------------------------------------------------
# scoring


def option_logprobs(
    model: Any,
    renderer: ChatRenderer,
    prompts: Sequence[Sequence[dict[str, str]]],
    letters: Sequence[Sequence[str]],
    *,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, float]]:
    """Per prompt, log P(letter | rendered prompt + generation prompt) for each of its letters; one forward pass."""
    tok = renderer.tokenizer
    ids_of = letter_token_ids(tok, sorted({l for ls in letters for l in ls}))
    encoded = [renderer.prompt_ids(p) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # less padding per batch
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft keeps LoRA inside it
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    # With model.device_map=auto the embeddings and the head can sit on different GPUs: inputs go where the
    # embeddings are, the last hidden state where the head is.
    device = base.get_input_embeddings().weight.device
    cap = getattr(base.config, "final_logit_softcapping", None)
    letter_list = list(ids_of)
    column = {l: j for j, l in enumerate(letter_list)}
    out: list[dict[str, float]] = [{} for _ in encoded]
    with inference_mode(model):
        # The letters' logits in float32: bf16 logits are so coarse that options tie often
        # (a tie would go to whichever letter comes first).
        rows = torch.tensor([ids_of[l] for l in letter_list], device=head.weight.device)
        letter_w = head.weight[rows].float()
        letter_b = head.bias[rows].float() if getattr(head, "bias", None) is not None else None
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ids, mask = left_pad([encoded[i] for i in idx], tok.pad_token_id)
            # Left padding shifts token positions unless they are counted from each row's first real token.
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            hidden = decoder(input_ids=ids.to(device), attention_mask=mask.to(device),
                             position_ids=positions.to(device), use_cache=False).last_hidden_state[:, -1, :]
            hidden = hidden.to(head.weight.device)
            picked = torch.nn.functional.linear(hidden.float(), letter_w, letter_b)
            full = head(hidden).float()  # only for the softmax normaliser
            if cap:  # models that squash their logits (Gemma 2) do so before the softmax
                picked, full = (torch.tanh(x / cap) * cap for x in (picked, full))
            logp = (picked - torch.logsumexp(full, dim=-1, keepdim=True)).cpu()
            for row, i in enumerate(idx):
                out[i] = {l: logp[row, column[l]].item() for l in letters[i]}
            if progress is not None:
                progress(len(idx))
    return out


def choose(logprobs: dict[str, float]) -> str:
    """The most likely letter (the first one on an exact tie)."""
    return max(logprobs, key=lambda l: logprobs[l])


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95 % by default); (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # At 0 and n the bounds are exactly 0 and 1; the float sum lands a hair inside.
    lo = 0.0 if correct == 0 else max(0.0, center - half)
    hi = 1.0 if correct == n else min(1.0, center + half)
    return lo, hi


def accuracy(correct: int, n: int) -> dict[str, Any]:
    """Accuracy and its 95 % Wilson interval, in percent."""
    lo, hi = wilson_interval(correct, n)
    return {"accuracy": round(100 * correct / n, 2) if n else 0.0, "correct": correct, "n": n,
            "ci95": [round(100 * lo, 2), round(100 * hi, 2)]}
