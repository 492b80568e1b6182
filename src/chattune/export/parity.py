"""Does the GGUF answer like the trained model? Greedy answers from llama.cpp and from chattune, side by side.

llama.cpp's side uses only what is inside the GGUF: the template embedded in it (rendered by
llama-cpp-python's own Jinja2ChatFormatter, as its chat completion does), its tokenizer, and its
end-of-generation ids to stop. chattune's side is the merged model in transformers with the run's
renderer, greedy, stopping at the run's end-of-turn ids, as `chattune chat` answers.

At f16/bf16/f32 the two must agree on the text of at least MIN_AGREEMENT of the answers, and every
answer that stops in chattune must stop in llama.cpp too; a quantised file is only reported.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.table import Table

from chattune.data.render import ChatRenderer
from chattune.errors import ExportCheckError
from chattune.files import read_jsonl

MIN_AGREEMENT = 0.9
Messages = list[dict[str, str]]


@dataclass
class Answer:
    text: str
    ids: list[int]       # generated ids, the stop token excluded
    stopped: bool        # ended with an end-of-turn / end-of-generation token before the length limit
    prompt_ids: list[int]
    prompt_text: str


def probe_prompts(predictions: Path, system: str | None, rows: Sequence[Messages] | None = None,
                  limit: int = 8) -> list[Messages]:
    """The run's probe questions (predictions/epoch_0.jsonl), or the given rows' prompts, with the system prompt."""
    if rows is None:
        questions = [p["question"] for p in read_jsonl(predictions / "epoch_0.jsonl") if p.get("question")]
        rows = [[{"role": "user", "content": q}] for q in questions]
    out = []
    for msgs in list(rows)[:limit]:
        if system and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": system}, *msgs]
        out.append(msgs)
    return out


def chattune_answers(merged: Path, renderer: ChatRenderer, prompts: list[Messages], max_new_tokens: int,
                     dtype: Any) -> list[Answer]:
    """Greedy answers of the merged model in transformers, one prompt at a time (no padding)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=dtype).eval()
    stop = renderer.end_of_turn_ids()
    tok = renderer.tokenizer
    answers = []
    with torch.inference_mode():
        for msgs in prompts:
            ids = renderer.prompt_ids(msgs)
            out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                                 pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
            stopped = bool(out) and out[-1] in stop
            gen = out[:-1] if stopped else out
            answers.append(Answer(tok.decode(gen, skip_special_tokens=True).strip(), gen, stopped, ids,
                                  renderer.text(msgs, generation_prompt=True)))
    return answers


def llama_answers(llm: Any, prompts: list[Messages], max_new_tokens: int) -> list[Answer]:
    """Greedy answers of llama.cpp with the GGUF's own template and stop ids."""
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    meta = llm.metadata
    template = meta.get("tokenizer.chat_template")
    if not template:
        raise ExportCheckError("the GGUF carries no chat template", where=str(llm.model_path),
                          fix="report it: export writes tokenizer.chat_template from the run")
    vocab = llm._model.vocab

    def text_of(key: str) -> str:
        i = meta.get(key)
        return llm.detokenize([int(i)], special=True).decode("utf-8", "replace") if i is not None else ""

    formatter = Jinja2ChatFormatter(template=template, eos_token=text_of("tokenizer.ggml.eos_token_id"),
                                    bos_token=text_of("tokenizer.ggml.bos_token_id"), add_generation_prompt=True)
    answers = []
    for msgs in prompts:
        rendered = formatter(messages=msgs)
        ids = llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True)
        gen, stopped = [], False
        for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                stopped = True
                break
            gen.append(token)
            if len(gen) >= max_new_tokens:
                break
        text = llm.detokenize(gen, special=False).decode("utf-8", "replace").strip()
        answers.append(Answer(text, gen, stopped, ids, rendered.prompt))
    return answers


def _match_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def compare(prompts: list[Messages], ours: list[Answer], theirs: list[Answer], *, strict: bool) -> dict[str, Any]:
    """Per-probe rows and the totals parity.json holds; `passed` applies the strict rule at 16/32-bit."""
    rows = []
    for msgs, a, b in zip(prompts, ours, theirs):
        rows.append({"question": msgs[-1]["content"], "chattune": a.text, "llama_cpp": b.text, "same_text": a.text == b.text,
                     "chattune_stops": a.stopped, "llama_cpp_stops": b.stopped, "same_prompt_text": a.prompt_text == b.prompt_text,
                     "same_prompt_ids": a.prompt_ids == b.prompt_ids, "matching_tokens": _match_length(a.ids, b.ids),
                     "chattune_tokens": len(a.ids), "llama_cpp_tokens": len(b.ids)})
    n = max(len(rows), 1)
    agreement = sum(r["same_text"] for r in rows) / n
    stops_ok = all(r["llama_cpp_stops"] for r in rows if r["chattune_stops"])
    result = {"probes": len(rows), "agreement": agreement, "chattune_stop_rate": sum(r["chattune_stops"] for r in rows) / n,
              "llama_cpp_stop_rate": sum(r["llama_cpp_stops"] for r in rows) / n, "stops_where_chattune_stops": stops_ok,
              "mean_matching_tokens": sum(r["matching_tokens"] for r in rows) / n,
              "mean_matching_fraction": sum(r["matching_tokens"] / max(r["chattune_tokens"], 1) for r in rows) / n,
              "strict": strict, "min_agreement": MIN_AGREEMENT if strict else None, "rows": rows}
    result["passed"] = (agreement >= MIN_AGREEMENT and stops_ok) if strict else None
    return result


def likely_cause(result: dict[str, Any]) -> str:
    """The most probable reason a strict check failed, from the prompts and stops compared."""
    rows = result["rows"]
    if not all(r["same_prompt_text"] for r in rows):
        return ("template: the GGUF's embedded template renders the prompt differently from the run's "
                "(see same_prompt_text in parity.json)")
    if not all(r["same_prompt_ids"] for r in rows):
        return ("tokenizer pre-tokenizer: the same prompt text becomes different token ids in llama.cpp "
                "(the converter chose another pre-tokenizer for this tokenizer)")
    if not result["stops_where_chattune_stops"]:
        return ("stop ids: llama.cpp does not treat the run's end-of-turn token as end of generation "
                "(tokenizer.ggml.eos_token_id / eot_token_id in the GGUF)")
    cause = "numerics: same prompts and stops, different greedy choices (a near-tie in the logits or a conversion bug)"
    if result["probes"] * (1 - MIN_AGREEMENT) < 1:  # one differing answer alone fails the check
        cause += (f"; with {result['probes']} probes one near-tie fails the check: rerun with more prompts "
                  "(--check-data FILE --check-limit 30) before suspecting the conversion")
    return cause


def print_table(result: dict[str, Any], name: str, console: Console | None = None) -> None:
    """The answers side by side, then agreement and stop rates."""
    console = console or Console()
    table = Table(title=f"parity: chattune (merged, transformers) vs llama.cpp ({name})", show_lines=True)
    for col in ("question", "chattune", "llama.cpp", "same", "stops (ct / llama)"):
        table.add_column(col, overflow="fold")
    for r in result["rows"]:
        table.add_row(r["question"][:60], r["chattune"][:160], r["llama_cpp"][:160], "yes" if r["same_text"] else
                      f"no ({r['matching_tokens']} tok)", f"{'yes' if r['chattune_stops'] else 'no'} / "
                      f"{'yes' if r['llama_cpp_stops'] else 'no'}")
    console.print(table)
    console.print(f"agreement {100 * result['agreement']:.0f}% exact text over {result['probes']} probes; stops by itself: "
                  f"chattune {100 * result['chattune_stop_rate']:.0f}%, llama.cpp {100 * result['llama_cpp_stop_rate']:.0f}%; "
                  f"identical leading tokens {100 * result['mean_matching_fraction']:.0f}% on average")


def answers_json(answers: list[Answer]) -> list[dict[str, Any]]:
    return [asdict(a) for a in answers]
