"""Padding-free batches are exact: same logits and loss as padded batches, no cross-sample attention."""

import torch

from chattune.data.collate import flat_collate, padded_collate
from chattune.data.render import IGNORE


def features(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(10, vocab, (n,), generator=g).tolist()
        labels = [IGNORE] * (n // 2) + ids[n // 2:]
        out.append({"input_ids": ids, "labels": labels})
    return out


def load(tiny_model_dir, attn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=attn)
    model.config.use_cache = False  # what training sets; needed for exact packed boundaries
    return model.eval()


def test_flattened_logits_equal_per_sequence_logits(tiny_model_dir):
    for attn in ("sdpa", "eager"):
        model = load(tiny_model_dir, attn)
        feats = features([7, 12, 5], model.config.vocab_size)
        flat = flat_collate()(feats)
        assert flat["input_ids"].shape[0] == 1 and "attention_mask" not in flat
        with torch.no_grad():
            packed = model(input_ids=flat["input_ids"], position_ids=flat["position_ids"]).logits[0]
            start = 0
            for f in feats:
                alone = model(input_ids=torch.tensor([f["input_ids"]])).logits[0]
                n = len(f["input_ids"])
                torch.testing.assert_close(packed[start:start + n], alone, atol=1e-5, rtol=1e-4)
                start += n


def test_padding_free_loss_equals_padded_loss(tiny_model_dir):
    model = load(tiny_model_dir, "sdpa")
    feats = features([9, 4, 15, 6], model.config.vocab_size, seed=1)
    with torch.no_grad():
        flat_loss = model(**flat_collate()(feats)).loss
        padded_loss = model(**padded_collate(0)(feats)).loss
    torch.testing.assert_close(flat_loss, padded_loss, atol=1e-5, rtol=1e-5)


def test_flattening_never_supervises_across_boundaries(tiny_model_dir):
    feats = features([5, 5], 1000)
    flat = flat_collate()(feats)
    # The first token of every sample is unsupervised, so no sample learns to predict the next one's start.
    assert flat["labels"][0, 0] == IGNORE and flat["labels"][0, 5] == IGNORE
    assert flat["position_ids"][0].tolist() == list(range(5)) * 2


def test_per_sample_attention_equals_per_sequence_logits_and_grads(tiny_model_dir):
    """model/packed_attention.py: each sample attends alone; logits and input grads match unpacked runs."""
    from chattune.model.packed_attention import NAME, use_packed_attention

    model = load(tiny_model_dir, "sdpa")
    assert use_packed_attention(model) and model.config._attn_implementation == NAME
    feats = features([7, 12, 5, 9], model.config.vocab_size, seed=3)
    flat = flat_collate()(feats)
    assert flat["cu_seq_lens_q"].tolist() == [0, 7, 19, 24, 33]
    emb = model.get_input_embeddings()
    packed_in = emb(flat["input_ids"]).detach().requires_grad_(True)
    packed = model(inputs_embeds=packed_in, position_ids=flat["position_ids"], cu_seq_lens_q=flat["cu_seq_lens_q"],
                   cu_seq_lens_k=flat["cu_seq_lens_k"], max_length_q=flat["max_length_q"],
                   max_length_k=flat["max_length_k"]).logits[0]
    packed.pow(2).mean(-1).sum().backward()
    start = 0
    for f in feats:
        n = len(f["input_ids"])
        alone_in = emb(torch.tensor([f["input_ids"]])).detach().requires_grad_(True)
        alone = model(inputs_embeds=alone_in).logits[0]
        alone.pow(2).mean(-1).sum().backward()
        torch.testing.assert_close(packed[start:start + n], alone, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(packed_in.grad[0, start:start + n], alone_in.grad[0], atol=1e-5, rtol=1e-4)
        start += n


def test_per_sample_attention_calls_sdpa_once_per_sample_and_passes_generation_through(tiny_model_dir, monkeypatch):
    import transformers.integrations.sdpa_attention as sdpa

    from chattune.model.packed_attention import use_packed_attention

    model = load(tiny_model_dir, "sdpa")
    use_packed_attention(model)
    lengths = []
    real = sdpa.sdpa_attention_forward

    def spy(module, q, k, v, mask, **kw):
        lengths.append((q.shape[2], mask is None))
        return real(module, q, k, v, mask, **kw)

    monkeypatch.setattr(sdpa, "sdpa_attention_forward", spy)
    flat = flat_collate()(features([6, 10], model.config.vocab_size))
    with torch.no_grad():
        model(**{k: v for k, v in flat.items() if k != "labels"})
    layers = model.config.num_hidden_layers
    assert lengths == [(6, True), (10, True)] * layers
    lengths.clear()
    model.config.use_cache = True
    out = model.generate(torch.tensor([[11, 12, 13]]), max_new_tokens=3, do_sample=False)
    assert out.shape[1] == 6 and lengths[0][0] == 3, "generation runs transformers' SDPA on the whole prompt"


def test_packed_attention_keeps_other_kernels(tiny_model_dir):
    from chattune.model.packed_attention import use_packed_attention

    model = load(tiny_model_dir, "eager")
    assert not use_packed_attention(model) and model.config._attn_implementation == "eager"


def _logits_and_input_grads(model, flat):
    emb = model.get_input_embeddings()
    inputs = emb(flat["input_ids"]).detach().requires_grad_(True)
    logits = model(inputs_embeds=inputs, position_ids=flat["position_ids"], cu_seq_lens_q=flat["cu_seq_lens_q"],
                   cu_seq_lens_k=flat["cu_seq_lens_k"], max_length_q=flat["max_length_q"],
                   max_length_k=flat["max_length_k"]).logits
    logits.pow(2).mean(-1).sum().backward()
    return logits.detach(), inputs.grad


def test_training_attention_on_cpu_is_two_matmuls_per_sample_with_sdpas_results(tiny_model_dir, monkeypatch):
    """With gradients on a CPU, samples up to MATH_MAX_LEN skip the flash kernel (slow backward); same numbers."""
    import chattune.model.packed_attention as pa

    model = load(tiny_model_dir, "sdpa")
    pa.use_packed_attention(model)
    flat = flat_collate()(features([7, 30, 5], model.config.vocab_size, seed=4))
    calls = []
    real = pa.causal_matmul_attention
    monkeypatch.setattr(pa, "causal_matmul_attention", lambda q, *a: calls.append(q.shape[2]) or real(q, *a))
    monkeypatch.setattr(pa, "MATH_MAX_LEN", 16)  # the 30-token sample takes the flash kernel
    ours = _logits_and_input_grads(model, flat)
    assert calls == [7, 5] * model.config.num_hidden_layers
    monkeypatch.setattr(pa, "MATH_MAX_LEN", 0)
    calls.clear()
    flash = _logits_and_input_grads(model, flat)
    assert not calls
    for a, b in zip(ours, flash):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # no gradients (evaluation, generation): the flash kernel's forward is the faster one
        model(**{k: v for k, v in flat.items() if k != "labels"})
    assert not calls


def test_matmul_attention_is_causal_attention_with_grouped_heads():
    from chattune.model.packed_attention import causal_matmul_attention

    g = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 4e-2)):
        q, k, v = (torch.randn(1, h, 40, 16, generator=g).to(dtype).requires_grad_() for h in (6, 2, 2))
        ours = causal_matmul_attention(q, k, v, 0.3)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
        torch.testing.assert_close(ours, ref.transpose(1, 2), atol=tol, rtol=tol)
        grad = torch.randn(ours.shape, generator=g).to(dtype)
        for a, b in zip(torch.autograd.grad(ours, (q, k, v), grad), torch.autograd.grad(ref.transpose(1, 2), (q, k, v), grad)):
            torch.testing.assert_close(a, b, atol=tol, rtol=tol)
