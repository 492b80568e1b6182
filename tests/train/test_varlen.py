"""Packed rows on CUDA: one varlen flash call per layer with no host sync, and no whole-row mask ever built.

A CPU cannot run the flash kernel, so the dispatch is shown with a stand-in that implements the kernel's
documented contract (flash-attention's window_size: a query at i sees keys i-left..i+right, -1 = unbounded);
benchmarks/gpu_check_train.py compares the real kernel with padded batches on a GPU.
"""

import torch

from chattune.data.collate import flat_collate, padded_collate
from tests.train.test_sliding_window import WINDOW, logits_and_grads, packed_pair, tiny_swa_model

KW = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def fake_varlen_attn(calls):
    """torch.nn.attention.varlen.varlen_attn's contract, computed per sample with SDPA and an explicit band."""

    def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False,
                    **_):
        assert q.dim() == 3 and isinstance(max_q, int) and cu_q.dtype == torch.int32
        calls.append((q.shape[0], window_size, enable_gqa))
        left, right = window_size
        outs = []
        for a, b in zip(cu_q.tolist()[:-1], cu_q.tolist()[1:]):
            n = b - a
            i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
            allowed = ((j <= i + right) if right >= 0 else torch.ones(n, n, dtype=torch.bool))
            if left >= 0:
                allowed &= j >= i - left
            qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))
            o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed, scale=scale,
                                                                 enable_gqa=enable_gqa)
            outs.append(o.transpose(0, 1))
        return torch.cat(outs)

    return varlen_attn


def test_cuda_dispatch_is_one_varlen_call_per_layer_without_host_sync(monkeypatch):
    from chattune.model import packed_attention as pa
    from chattune.model import varlen

    model = tiny_swa_model("qwen2")
    feats, flat = packed_pair(model.config.vocab_size)
    n_long = len(feats[0]["input_ids"])
    ref_long, ref_long_grad = logits_and_grads(model, torch.tensor([feats[0]["input_ids"]]))
    calls = []
    monkeypatch.setattr(varlen, "_varlen_function", lambda: fake_varlen_attn(calls))
    monkeypatch.setattr(pa, "varlen_fits", lambda *a: True)  # what a CUDA sm80+ bf16 call gets

    def no_sync(cu):
        raise AssertionError("the varlen path must not copy the boundaries to the host")

    monkeypatch.setattr(pa, "_boundaries", no_sync)
    assert pa.use_packed_attention(model)
    packed, grad = logits_and_grads(model, flat["input_ids"], **{k: flat[k] for k in KW})
    total = flat["input_ids"].shape[1]
    # layer types: sliding, full, sliding -> window (W-1, 0) where a sample is longer than W, else causal (-1, 0)
    assert calls == [(total, (WINDOW - 1, 0), True), (total, (-1, 0), True), (total, (WINDOW - 1, 0), True)]
    torch.testing.assert_close(packed[:n_long], ref_long, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad[:n_long], ref_long_grad, atol=1e-5, rtol=1e-4)


def test_varlen_is_never_chosen_on_a_cpu_or_in_float32():
    from chattune.model.varlen import varlen_fits

    module = torch.nn.Module()
    q, k = torch.zeros(1, 4, 10, 8, dtype=torch.bfloat16), torch.zeros(1, 2, 10, 8, dtype=torch.bfloat16)
    assert not varlen_fits(module, q, k, k, 10, {})
    assert not varlen_fits(module, q.float(), k.float(), k.float(), 10, {})


def test_packed_rows_never_build_the_whole_row_mask(tiny_model_dir, monkeypatch):
    """The [1, 1, T, T] block mask (1 GiB at T = 32k) is not built for packed rows; padded batches still get theirs."""
    import transformers.masking_utils as mu
    from transformers import AutoModelForCausalLM

    from chattune.model.packed_attention import use_packed_attention
    from tests.train.test_padding_free import features

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    use_packed_attention(model)
    built = []
    real = mu.sdpa_mask
    monkeypatch.setattr(mu, "sdpa_mask", lambda **kw: built.append(kw["q_length"]) or real(**kw))
    feats = features([9, 4, 15], model.config.vocab_size, seed=2)
    flat = flat_collate()(feats)
    loss = model(**flat).loss
    loss.backward()
    assert built == []
    padded = padded_collate(0)(feats)
    with torch.no_grad():
        padded_loss = model(**padded).loss
    assert built == [15]  # one mask per forward, shared by the layers
    torch.testing.assert_close(loss.detach(), padded_loss, atol=1e-5, rtol=1e-5)
    # a row with restarting positions but no boundaries (someone else's collator) still gets its block mask
    built.clear()
    with torch.no_grad():
        unbounded = model(input_ids=flat["input_ids"], position_ids=flat["position_ids"], labels=flat["labels"]).loss
    assert built == [flat["input_ids"].shape[1]]
    torch.testing.assert_close(unbounded, padded_loss, atol=1e-5, rtol=1e-5)


def test_a_refusing_kernel_falls_back_to_the_loop_once_and_for_all(monkeypatch):
    from chattune.model import packed_attention as pa
    from chattune.model import varlen

    model = tiny_swa_model("qwen2")
    feats, flat = packed_pair(model.config.vocab_size)
    ref = logits_and_grads(model, flat["input_ids"], position_ids=flat["position_ids"])  # block mask, no bounds
    calls = []

    def refusing(*a, **kw):
        calls.append(1)
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")

    monkeypatch.setattr(varlen, "_varlen_function", lambda: refusing)
    monkeypatch.setattr(varlen, "_refused", set())
    # a CUDA call would fit, until the kernel has refused once on device 0
    monkeypatch.setattr(pa, "varlen_fits", lambda *a: 0 not in varlen._refused)
    pa.use_packed_attention(model)
    packed = logits_and_grads(model, flat["input_ids"], **{k: flat[k] for k in KW})
    assert calls == [1] and varlen._refused == {0}  # tried once, then the loop for every later layer
    for a, b in zip(packed, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
