"""Evaluation generation: chattune's batched generation vs the tutorials' one-prompt-at-a-time loop.

    python benchmarks/eval_generation.py [--prompts 32] [--max-new-tokens 64] [--dtype fp32]

Same model, same prompts, greedy. Prints both times, the ratio and how many of
the answers are identical.
"""

from __future__ import annotations

import argparse

import torch
from common import SYSTEM, machine, role_play_rows, timed

from chattune.config import ModelConfig
from chattune.data.render import ChatRenderer
from chattune.infer.generate import generate_batch
from chattune.model.load import load_model, load_tokenizer, resolve_dtype
from chattune.model.sources import resolve_model_dir


def one_by_one(model, tok, prompts, max_new_tokens, eos):
    """The tutorials' loop: render, generate and decode each prompt on its own."""
    answers = []
    for messages in prompts:
        enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                                 pad_token_id=tok.pad_token_id)
        answers.append(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return answers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="fp32", choices=["auto", "bf16", "fp32"])
    args = ap.parse_args()
    rows, source = role_play_rows(args.prompts)
    prompts = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": r["instruction"] + r["input"]}] for r in rows]
    model_dir = resolve_model_dir("smollm2-135m")
    tok = load_tokenizer(model_dir, ModelConfig())
    renderer = ChatRenderer(tok)
    model = load_model(model_dir, ModelConfig(), dtype=resolve_dtype(args.dtype)).eval()

    ref, ref_s = timed(lambda: one_by_one(model, tok, prompts, args.max_new_tokens, renderer.end_of_turn_ids()))
    ours, our_s = timed(lambda: generate_batch(model, renderer, prompts, max_new_tokens=args.max_new_tokens,
                                               batch_size=len(prompts)))
    same = sum(a == b for a, b in zip(ref, ours))
    print(f"# eval_generation — {len(prompts)} prompts of {source.rsplit('/', 1)[-1]}, max_new_tokens {args.max_new_tokens}, "
          f"{args.dtype}; {machine()}")
    print(f"tutorial loop (one at a time): {ref_s:7.1f}s")
    print(f"chattune (one batch):          {our_s:7.1f}s   ratio {ref_s / our_s:.1f}x")
    print(f"identical greedy answers: {same} of {len(prompts)}")
    for a, b in zip(ref, ours):
        if a != b:
            print(f"  differs: {a[:60]!r} vs {b[:60]!r}")


if __name__ == "__main__":
    main()
