"""Padding-free prefill: the cache it builds is the padded prefill's cache, and generation gives the same answers."""

import pytest
import torch

from chattune.infer.generate import generate_batch, inference_mode, left_pad
from chattune.infer.prefill import can_prefill_packed, prefill_packed
from chattune.infer.session import load_session

from .test_predict import _prompts


@pytest.fixture(scope="module")
def session(tiny_run):
    return load_session(tiny_run)


def _rows(session):
    return [session.renderer.prompt_ids(p) for p in _prompts(session.system)]


def test_packed_cache_holds_the_padded_prefills_keys_and_values(session):
    model, rows = session.model, _rows(session)
    assert can_prefill_packed(model, rows, 4)
    heads = [r[:-1] for r in rows]
    ids, mask = left_pad(heads, session.renderer.tokenizer.pad_token_id)
    with inference_mode(model):
        padded = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                       use_cache=True).past_key_values
        packed = prefill_packed(model, rows, 4)
    width = ids.shape[1]
    real = mask.bool()[:, None, :, None]  # pad positions hold zeros in ours and arbitrary values in the padded cache
    for ours, theirs in zip(packed.layers, padded.layers):
        assert ours.keys.shape[2] == width + 1 + 4  # room for the last prompt token and every new one
        for got, want in ((ours.keys, theirs.keys), (ours.values, theirs.values)):
            got = got[:, :, :width]
            torch.testing.assert_close(got.masked_fill(~real, 0), want.masked_fill(~real, 0), atol=1e-5, rtol=1e-5)
            assert not got.masked_select(~real).any()
        assert int(ours.get_seq_length()) == width


def test_packed_prefill_answers_like_the_padded_prefill_and_like_plain_generate(session):
    model, renderer = session.model, session.renderer
    prompts = _prompts(session.system)
    packed = generate_batch(model, renderer, prompts, max_new_tokens=12, batch_size=8)
    padded = generate_batch(model, renderer, prompts, max_new_tokens=12, batch_size=8, packed_prefill=False)
    tok = renderer.tokenizer
    plain = []
    with inference_mode(model):
        for p in prompts:  # transformers' own generate, one prompt at a time, no cache handed in
            ids = torch.tensor([renderer.prompt_ids(p)])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                 do_sample=False, eos_token_id=renderer.end_of_turn_ids(), pad_token_id=tok.pad_token_id)
            plain.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    assert packed == padded == plain
    assert len(set(plain)) > 1 and any(plain), "the comparison must not be vacuous"


def test_packed_prefill_leaves_the_attention_implementation_as_it_was(session):
    base = session.model.get_base_model()
    before = base.config._attn_implementation
    generate_batch(session.model, session.renderer, _prompts(session.system)[:2], max_new_tokens=2)
    assert base.config._attn_implementation == before == "sdpa"


def test_models_the_packed_prefill_cannot_serve_fall_back(session):
    model, rows = session.model, _rows(session)
    config = model.get_base_model().config
    assert not can_prefill_packed(model, [[1], *rows], 4), "a one-token prompt has nothing to prefill"
    old = config._attn_implementation
    try:
        config._attn_implementation = "eager"
        assert not can_prefill_packed(model, rows, 4)
    finally:
        config._attn_implementation = old
    config.layer_types = ["sliding_attention"] * len(config.layer_types)
    try:
        assert not can_prefill_packed(model, rows, 4)
    finally:
        config.layer_types = ["full_attention"] * len(config.layer_types)


def test_decoding_steps_on_cpu_use_the_matmul_attention_with_sdpas_results(session, monkeypatch):
    import chattune.model.packed_attention as pa

    calls = []
    real = pa.decode_matmul_attention
    monkeypatch.setattr(pa, "decode_matmul_attention", lambda q, *a: calls.append(q.shape[0]) or real(q, *a))
    prompts = _prompts(session.system)
    generate_batch(session.model, session.renderer, prompts, max_new_tokens=5, batch_size=8)
    assert calls and set(calls) == {8}, "every decoding step of the batch"

    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(3, 6, 1, 16, generator=g), torch.randn(3, 2, 9, 16, generator=g), torch.randn(3, 2, 9, 16, generator=g)
    mask = torch.ones(3, 1, 1, 9, dtype=torch.bool)
    mask[0, ..., :4] = False  # left padding
    mask[2, ..., 7:] = False  # unused static-cache slots
    ours = real(q, k, v, mask, 0.25)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1),
                                                           attn_mask=mask, scale=0.25)
    torch.testing.assert_close(ours, ref.transpose(1, 2), atol=1e-6, rtol=1e-5)
