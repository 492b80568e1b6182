"""RowAttention (model/row_attention.py): a packed row's causal attention as one autograd node.

Held against the per-sample autograd version it replaced (causal_matmul_attention, one call per sample)
and against a float32 reference: float32 inputs give the same bits, bfloat16 inputs an error no larger
than the per-sample version's, with and without a sliding window.
"""

from __future__ import annotations

import pytest
import torch

import chattune.model.packed_attention as pa
from chattune.model.row_attention import row_attention

BOUNDS = [0, 17, 23, 64, 65, 90]  # a one-token sample and lengths on both sides of the window below


def _inputs(dtype, seed=0, heads=6, kv_heads=2, dim=16):
    g = torch.Generator().manual_seed(seed)
    tokens = BOUNDS[-1]
    # as the model makes them: [1, T, heads, d] projections viewed as [1, heads, T, d]
    q, k, v = (torch.randn(1, tokens, h, dim, generator=g) for h in (heads, kv_heads, kv_heads))
    grad = torch.randn(1, tokens, heads, dim, generator=g)
    return [t.to(dtype) for t in (q, k, v, grad)]


def _run(fn, q, k, v, grad):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fn(*(t.transpose(1, 2) for t in leaves))
    out.backward(grad)
    return [out.detach()] + [t.grad for t in leaves]


def _per_sample(window):
    def fn(q, k, v):
        outs = [pa.causal_matmul_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], 0.25, window)
                for a, b in zip(BOUNDS[:-1], BOUNDS[1:])]
        return torch.cat(outs, dim=1)
    return fn


def _row(window):
    return lambda q, k, v: row_attention(q, k, v, BOUNDS, 0.25, window)


@pytest.mark.parametrize("window", [None, 9])
def test_float32_is_bit_identical_to_the_per_sample_version(window):
    ours = _run(_row(window), *_inputs(torch.float32))
    theirs = _run(_per_sample(window), *_inputs(torch.float32))
    for name, a, b in zip(("output", "dq", "dk", "dv"), ours, theirs):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("window", [None, 9])
def test_bfloat16_error_is_no_larger_than_the_per_sample_versions(window):
    reference = _run(_per_sample(window), *_inputs(torch.float32, seed=1))
    ours = _run(_row(window), *_inputs(torch.bfloat16, seed=1))
    theirs = _run(_per_sample(window), *_inputs(torch.bfloat16, seed=1))
    for name, r, a, b in zip(("output", "dq", "dk", "dv"), reference, ours, theirs):
        err_ours = (a.float() - r).abs().max() / r.abs().max()
        err_theirs = (b.float() - r).abs().max() / r.abs().max()
        assert err_ours < 0.02, name  # bf16 rounding, not a wrong formula
        assert err_ours <= 1.5 * err_theirs + 1e-3, f"{name}: {err_ours:.4f} vs {err_theirs:.4f}"


def test_gradients_are_laid_out_as_the_projections_made_them():
    """The gradients come back [T, heads, d]-contiguous: the model's transposes then need no copy."""
    q, k, v, grad = _inputs(torch.bfloat16)
    out, dq, dk, dv = _run(_row(None), q, k, v, grad)
    assert out.shape == (1, BOUNDS[-1], 6, 16)
    for g in (dq, dk, dv):
        assert g.is_contiguous()


def test_a_packed_row_of_short_samples_takes_one_row_attention_per_layer(monkeypatch):
    """_per_sample_attention hands rows whose samples are all <= MATH_MAX_LEN to row_attention, others not."""
    calls = []
    real = pa.row_attention
    monkeypatch.setattr(pa, "row_attention", lambda *a: calls.append(a[3]) or real(*a))

    class Layer(torch.nn.Module):
        is_causal = True
        num_key_value_groups = 3  # 6 query heads over 2 key/value heads, for transformers' SDPA path

    q, k, v, _ = (t.transpose(1, 2).requires_grad_() for t in _inputs(torch.float32))
    pa._per_sample_attention(Layer(), q, k, v, BOUNDS, {"scaling": 0.25})
    assert calls == [BOUNDS]
    monkeypatch.setattr(pa, "MATH_MAX_LEN", 30)  # the 41-token sample is too long: the per-sample loop
    pa._per_sample_attention(Layer(), q, k, v, BOUNDS, {"scaling": 0.25})
    assert calls == [BOUNDS]


def test_under_checkpointing_the_probabilities_are_recomputed_not_kept():
    """Every tensor the backward needs goes through save_for_backward, so checkpointing's hooks see them all."""
    from torch.utils.checkpoint import checkpoint

    q, k, v, grad = _inputs(torch.float32)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t.shape) or t, lambda t: t):
        _run(_row(None), q, k, v, grad)
    sizes = [(b - a) for a, b in zip(BOUNDS[:-1], BOUNDS[1:])]
    # q, k, v, then one [kv_heads, group x n, n] probability matrix per sample (6 query heads over 2: group 3)
    assert len(packed) == 3 + len(sizes) and [s[-2:] for s in packed[3:]] == [(3 * n, n) for n in sizes]
    plain = _run(_row(None), q, k, v, grad)
    recomputed = _run(lambda *t: checkpoint(_row(None), *t, use_reentrant=False), q, k, v, grad)
    for a, b in zip(plain, recomputed):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float32_inputs_under_autocast_run_as_the_autograd_ops_would(dtype):
    """fp32 q/k/v under low-precision autocast (fp16 training rotates in fp32): matmuls in the autocast dtype,
    the output in it too, gradients back in fp32, close to the per-sample version under the same autocast."""
    q, k, v, grad = _inputs(torch.float32, seed=2)
    with torch.autocast("cpu", dtype=dtype):
        ours = _run(_row(None), q, k, v, grad)
        theirs = _run(_per_sample(None), q, k, v, grad)
    assert ours[0].dtype == theirs[0].dtype == dtype
    for name, a, b in zip(("output", "dq", "dk", "dv"), ours, theirs):
        assert a.dtype == b.dtype, name
        assert (a.float() - b.float()).abs().max() <= 0.02 * b.float().abs().max(), name
