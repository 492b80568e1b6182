"""Which batching the server uses, measured: chattune's scheduler vs transformers' continuous batching, and
mixed-adapter batches (peft's adapter_names) vs one batch per adapter.

    python benchmarks/serve_batching.py RUN_A RUN_B [--prompts 16] [--max-new-tokens 48]

1. The base model of RUN_A, the same prompts submitted at once, greedy: chattune's Scheduler (packed
   prefill, shared KV cache, serve/scheduler.py) vs transformers' `generate_batch` (ContinuousBatchingManager,
   paged attention), run last (see main). Prints both times and both token counts.
2. Both runs' adapters: the prompts split between the adapters, decoded in one mixed batch vs the two
   halves one after the other, each with its adapter set (what grouping per adapter costs); and all the
   prompts through RUN_A's adapter alone, beside the base model's time for them (what an adapter costs).
"""

from __future__ import annotations

import argparse
import time

from common import machine

from chattune.infer.session import with_system
from chattune.serve.adapters import load_engines
from chattune.serve.completion import Completion
from chattune.serve.engine import Engine
from chattune.serve.scheduler import Scheduler
from serve_load import QUESTIONS


def run_scheduler(model, engines: dict[str, Engine], jobs: list[tuple[str, list[int]]], max_new: int) -> tuple[list, float]:
    scheduler = Scheduler(model, engines, max_batch=64, max_queue=256)
    started = time.monotonic()
    completions = [Completion(ids, max_new, 0.0, 1.0, [], model=name, eos_ids=tuple(engines[name].eos_ids))
                   for name, ids in jobs]
    for c in completions:
        scheduler.submit(c)
    out = []
    for c in completions:
        while (event := c.events.get(timeout=1800))[0] == "delta":
            pass
        out.append(event[1]["completion_tokens"])
    wall = time.monotonic() - started
    scheduler.stop(timeout=60)
    return out, wall


def transformers_cb(model, jobs: list[list[int]], eos: list[int], max_new: int) -> tuple[list, float]:
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=eos)
    started = time.monotonic()
    results = model.generate_batch(inputs=jobs, generation_config=cfg, progress_bar=False)
    wall = time.monotonic() - started
    return [len(r.generated_tokens) for r in results.values()], wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs=2)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args()
    engines = {e.name: e for e in load_engines(args.runs)}
    a, b, base = list(engines)
    model = engines[a].model
    prompts = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.prompts)]
    ids = {n: [engines[n].renderer.prompt_ids(with_system([{"role": "user", "content": q}], engines[n].system))
               for q in prompts] for n in engines}
    print(f"{machine()}; {args.prompts} prompts, {args.max_new_tokens} new tokens, greedy\n")

    ours, our_s = run_scheduler(model, engines, [(base, i) for i in ids[base]], args.max_new_tokens)
    half = args.prompts // 2
    mixed = [(a, i) for i in ids[a][:half]] + [(b, i) for i in ids[b][half:]]
    m_tokens, m_s = run_scheduler(model, engines, mixed, args.max_new_tokens)
    g1, s1 = run_scheduler(model, engines, mixed[:half], args.max_new_tokens)
    g2, s2 = run_scheduler(model, engines, mixed[half:], args.max_new_tokens)
    print("| two adapters | time s | completion tokens/s |\n| --- | --- | --- |")
    print(f"| one mixed batch (adapter_names) | {m_s:.1f} | {sum(m_tokens) / m_s:.1f} |")
    print(f"| one batch per adapter, one after the other | {s1 + s2:.1f} | {(sum(g1) + sum(g2)) / (s1 + s2):.1f} |")
    one, one_s = run_scheduler(model, engines, [(a, i) for i in ids[a]], args.max_new_tokens)
    print(f"| all prompts through adapter {a} | {one_s:.1f} | {sum(one) / one_s:.1f} |")
    print(f"ratio {(s1 + s2) / m_s:.2f}x (mixed against per adapter); the base model took {our_s:.1f} s for the same "
          f"prompts ({sum(ours)} tokens against the adapter's {sum(one)}: the tuned answers are shorter)\n")
    # transformers' generate_batch last: after it the same scheduler run is slower in this process (16 prompts
    # through one adapter: 3.1 s before, 5.5-6.2 s after), which once made the adapter rows above look 3x slower.
    with model.disable_adapter():
        plain = model.get_base_model()
        theirs, their_s = transformers_cb(plain, ids[base], engines[base].eos_ids, args.max_new_tokens)
    print("| base model | time s | completion tokens/s |\n| --- | --- | --- |")
    print(f"| chattune scheduler | {our_s:.1f} | {sum(ours) / our_s:.1f} |")
    print(f"| transformers generate_batch (paged) | {their_s:.1f} | {sum(theirs) / their_s:.1f} |")
    print(f"ratio {their_s / our_s:.2f}x; tokens {sum(ours)} vs {sum(theirs)}")


if __name__ == "__main__":
    main()
