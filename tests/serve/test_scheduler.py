"""Continuous batching: completions that join and leave a running batch answer exactly as they would alone."""

import threading
import time

import pytest

from chattune.infer.generate import generate_batch
from chattune.infer.session import with_system
from chattune.serve.adapters import load_engines
from chattune.serve.completion import Completion
from chattune.serve.scheduler import Scheduler

from .conftest import SYSTEM_B, TINY_RUN_SYSTEM

QUESTIONS = ["Hi", "What is the capital of France, and why is it famous?", "Count from one to ten in words please",
             "Tell me a long story about a dragon who learned to bake bread in a small village", "2+2?", "Why?"]


@pytest.fixture(scope="module")
def engines(run_a, run_b):
    return {e.name: e for e in load_engines([str(run_a), str(run_b)], [f"a={run_a}", f"b={run_b}"])}


def _completion(engine, question, max_tokens, **kw):
    ids = engine.renderer.prompt_ids(with_system([{"role": "user", "content": question}], engine.system))
    return Completion(ids, max_tokens, 0.0, 1.0, [], model=engine.name, eos_ids=tuple(engine.eos_ids), **kw)


def _alone(engine, question, max_tokens):
    """What generate_batch answers for this prompt alone, with this engine's adapter (or none for base)."""
    model = engine.model
    prompt = with_system([{"role": "user", "content": question}], engine.system)
    if engine.adapter == "__base__":
        with model.disable_adapter():
            return generate_batch(model, engine.renderer, [prompt], max_new_tokens=max_tokens)[0]
    model.set_adapter(engine.adapter)
    return generate_batch(model, engine.renderer, [prompt], max_new_tokens=max_tokens)[0]


def _text(completion):
    parts, info = [], None
    while info is None:
        kind, value = completion.events.get(timeout=120)
        assert kind != "error", value
        if kind == "delta":
            parts.append(value)
        else:
            info = value
    return "".join(parts).strip(), info


def test_engines_share_one_base_and_keep_their_own_prompts(engines):
    assert list(engines) == ["a", "b", "base"]
    assert len({id(e.model) for e in engines.values()}) == 1, "the base model is loaded once"
    assert (engines["a"].system, engines["b"].system, engines["base"].system) == (TINY_RUN_SYSTEM, SYSTEM_B, TINY_RUN_SYSTEM)
    assert (engines["a"].adapter, engines["b"].adapter, engines["base"].adapter) == ("default", "b", "__base__")


def test_staggered_mixed_adapter_requests_answer_as_they_would_alone(engines):
    jobs = [(name, q, n) for name, (q, n) in zip(["a", "b", "base", "a", "b", "a"], zip(QUESTIONS, [5, 12, 9, 16, 3, 20]))]
    want = [_alone(engines[name], q, n) for name, q, n in jobs]
    same_question = {_alone(engines[name], QUESTIONS[1], 12) for name in engines}
    assert len(same_question) == 3, "the adapters and the base answer differently, so a routing mistake would show"
    scheduler = Scheduler(engines["a"].model, engines, max_batch=4)
    try:
        completions = []
        for name, q, n in jobs:  # arrive one after another, while earlier ones are decoding
            completions.append(_completion(engines[name], q, n))
            assert scheduler.submit(completions[-1])
            time.sleep(0.05)
        got = [_text(c) for c in completions]
    finally:
        scheduler.stop(timeout=60)
    assert [text for text, _ in got] == want
    assert [info["prompt_tokens"] for _, info in got] == [len(c.prompt_ids) for c in completions]
    assert all(0 < info["completion_tokens"] <= n for (_, info), (_, _, n) in zip(got, jobs))
    assert not scheduler.thread.is_alive() and scheduler.running == 0


def test_a_cancelled_completion_leaves_the_batch_and_the_others_finish(engines):
    scheduler = Scheduler(engines["a"].model, engines, max_batch=4)
    try:
        long = _completion(engines["a"], QUESTIONS[3], 30)
        short = _completion(engines["b"], QUESTIONS[1], 6)
        assert scheduler.submit(long) and scheduler.submit(short)
        assert long.events.get(timeout=60)[0] in ("delta", "done")
        long.cancelled.set()
        text, _ = _text(short)
        deadline = time.monotonic() + 60
        while scheduler.running and time.monotonic() < deadline:
            time.sleep(0.02)
        assert scheduler.running == 0, "the cancelled row left the batch"
    finally:
        scheduler.stop(timeout=60)
    assert text == _alone(engines["b"], QUESTIONS[1], 6)


def test_a_full_queue_refuses_and_a_stopping_scheduler_finishes_what_it_took(engines):
    scheduler = Scheduler(engines["a"].model, engines, max_queue=2, max_batch=1)
    hold = threading.Event()
    try:
        jobs = [_completion(engines["a"], q, 8) for q in QUESTIONS[:4]]
        accepted = [scheduler.submit(c) for c in jobs]
        assert accepted.count(False) >= 1, "the bounded queue refused the overflow"
    finally:
        scheduler.stop(timeout=120)
        hold.set()
    for c, ok in zip(jobs, accepted):
        if ok:
            assert _text(c)[1]["completion_tokens"] > 0, "taken completions are finished before the thread ends"
    assert not scheduler.submit(_completion(engines["a"], "late", 2)), "a stopped scheduler takes nothing new"


def test_the_batch_cache_grows_left_for_a_longer_prompt_and_shrinks_when_rows_leave(engines):
    import torch

    from chattune.infer.generate import inference_mode
    from chattune.serve.batch import Batch, Row
    from chattune.serve.completion import TextPieces
    from chattune.serve.scheduler import prefix_states

    e = engines["a"]
    short, long = (_completion(e, q, 4) for q in (QUESTIONS[0], QUESTIONS[3]))
    batch = Batch(e.model, e.model.get_base_model().config)
    rows = [Row(c, TextPieces(e.tokenizer, c), "default", c.prompt_ids[-1], len(c.prompt_ids) - 1)
            for c in (short, long)]
    with inference_mode(e.model):
        batch.add(rows[:1], prefix_states(e.model, [short.prompt_ids[:-1]], {}))
        assert batch.width == len(short.prompt_ids) - 1 and rows[0].start == 0
        batch.step()
        batch.add(rows[1:], prefix_states(e.model, [long.prompt_ids[:-1]], {}))
        grow = len(long.prompt_ids) - 1 - len(short.prompt_ids)
        assert batch.width == len(long.prompt_ids) - 1 and rows[0].start == grow and rows[1].start == 0
        logits = batch.step()
        alone = e.model(input_ids=torch.tensor([long.prompt_ids])).logits[0, -1]
        torch.testing.assert_close(logits[1], alone.float(), rtol=1e-4, atol=1e-4)
        batch.remove([rows[1]])
        assert batch.width == len(short.prompt_ids) + 1 and rows[0].start == 0, "the long row's columns are cut"
        assert all(layer.keys.shape[:3] == (1, layer.keys.shape[1], batch.width) for layer in batch.cache.layers)
        batch.remove([rows[0]])
        assert batch.cache is None and batch.width == 0 and len(batch) == 0
