"""Causal attention over a packed row on a CPU, as one autograd node for all of the row's samples.

Training on a CPU attends sample by sample with two matmuls (model/packed_attention.py
says why). Written with autograd ops, each sample of each layer cost some forty small
tensor operations forward and backward: the split, the grouped query copy, the
in-place mask recorded as a copy of the scores, float32 round trips of the
probabilities and their gradient, and the cat and zero-filled slices that put the
per-sample gradients back together. RowAttention does the arithmetic in one Function:
the forward writes each sample's output into one [tokens, heads, dim] buffer, the
backward writes each sample's gradients into one buffer per input, and only the
probabilities are kept between them.

The softmax runs in the input dtype. torch's CPU softmax of bf16 scores accumulates in
float32 and rounds each probability once, as softmax(..., dtype=float32).to(bf16)
does, without the float32 copy of every score matrix and its gradient. Its backward
then reads the rounded probabilities: measured against a float32 reference, the
gradients' error is the same as the float32-softmax version's (tests/train/
test_row_attention.py). For float32 inputs nothing changes. At 8 samples of 70-320
tokens (SmolLM2's 9 query / 3 key-value heads) forward and backward take 12.6 ms per
layer here, against 17.8 ms for the per-sample autograd version.

Also here, shared with packed_attention's per-sample version: the causal (and sliding-window) mask and the
scaled, masked scores of one sample.
"""

from __future__ import annotations

import torch

MATH_MAX_LEN = 384  # samples up to this length use the matmul attention when training on a CPU

_future: dict[tuple[torch.device, int | None], torch.Tensor] = {}


def hidden_mask(n: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Boolean [n, n] mask of the keys a query may not see: the future, and with a sliding window W every key
    W or more positions back (transformers' window: a query sees itself and the W-1 keys before it).
    One per device and window, sliced for shorter samples (the pattern only depends on i - j)."""
    cached = _future.get((device, window))
    if cached is None or cached.shape[0] < n:
        size = max(n, MATH_MAX_LEN)
        cached = torch.ones(size, size, dtype=torch.bool, device=device).triu(1)
        if window is not None:
            cached |= torch.ones(size, size, dtype=torch.bool, device=device).tril(-window)
        _future[(device, window)] = cached
    return cached[:n, :n]


def causal_scores(q: torch.Tensor, k: torch.Tensor, scale: float, window: int | None) -> torch.Tensor:
    """One sample's scores: [kv_heads, group * n, d] grouped queries, [kv_heads, n, d] keys -> [kv_heads, group * n, n],
    scaled inside the baddbmm (one rounding, as SDPA's), the future (and what lies beyond a window) at -inf."""
    kv_heads, rows, _ = q.shape
    n = k.shape[1]
    scores = torch.baddbmm(q.new_empty(()).expand(kv_heads, rows, n), q, k.transpose(1, 2), beta=0.0, alpha=scale)
    mask = hidden_mask(n, window if window is not None and window < n else None, q.device)
    scores.view(kv_heads, -1, n, n).masked_fill_(mask, float("-inf"))
    return scores


def _grouped_query(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[heads, L, d] -> [kv_heads, group * L, d]: the query heads that share a key/value head stacked."""
    heads, length, dim = q.shape
    return q.reshape(kv_heads, heads // kv_heads * length, dim)


class RowAttention(torch.autograd.Function):
    """out[1, T, heads, d] = causal attention of each sample [a, b) of the row, keys and values from the same span."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")  # the backward runs under the forward's autocast, as autograd ops would
    def forward(ctx, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: list[int], scale: float,
                window: int | None) -> torch.Tensor:
        q, k, v = query[0], key[0], value[0]  # [heads, T, d], [kv_heads, T, d]
        heads, tokens, dim = q.shape
        kv_heads = k.shape[0]
        autocast = torch.is_autocast_enabled("cpu")  # fp32 q/k/v (e.g. after fp32 RoPE tables) under fp16 autocast
        out = query.new_empty(tokens, heads, dim, dtype=torch.get_autocast_dtype("cpu") if autocast else query.dtype)
        probs = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            n = b - a
            p = torch.softmax(causal_scores(_grouped_query(q[:, a:b], kv_heads), k[:, a:b], scale, window), dim=-1)
            out[a:b] = torch.bmm(p, v[:, a:b]).view(heads, n, dim).transpose(0, 1)
            probs.append(p)
        # the probabilities go through save_for_backward too: under gradient checkpointing its hooks drop them
        # after the forward and recompute them in the backward, where a ctx attribute would keep every layer's
        ctx.save_for_backward(query, key, value, *probs)
        ctx.bounds, ctx.scale = bounds, scale
        return out.unsqueeze(0)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_out: torch.Tensor):
        query, key, value, *probs = ctx.saved_tensors
        q, k, v = query[0], key[0], value[0]
        heads, tokens, dim = q.shape
        kv_heads = k.shape[0]
        # gradient buffers in the layout the projections produced ([T, heads, d] viewed as [1, heads, T, d]),
        # so the transposes' backward in the model is a view, not a copy
        dq, dk, dv = (q.new_empty(tokens, h, dim) for h in (heads, kv_heads, kv_heads))
        g = grad_out[0]  # [T, heads, d]
        for (a, b), p in zip(zip(ctx.bounds[:-1], ctx.bounds[1:]), probs):
            n = b - a
            go = _grouped_query(g[a:b].transpose(0, 1), kv_heads)  # [kv_heads, group * n, d]
            dv[a:b] = torch.bmm(p.transpose(1, 2), go).transpose(0, 1)
            dp = torch.bmm(go, v[:, a:b].transpose(1, 2))
            ds = torch._softmax_backward_data(dp, p, -1, p.dtype)
            qs = _grouped_query(q[:, a:b], kv_heads)
            dq[a:b] = torch.bmm(ds, k[:, a:b]).mul_(ctx.scale).view(heads, n, dim).transpose(0, 1)
            dk[a:b] = torch.bmm(qs.transpose(1, 2), ds).mul_(ctx.scale).permute(2, 0, 1)  # [d, n] per head -> [n, kv, d]
        return (dq.permute(1, 0, 2).unsqueeze(0), dk.permute(1, 0, 2).unsqueeze(0), dv.permute(1, 0, 2).unsqueeze(0),
                None, None, None)


def row_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: list[int],
                  scale: float | None, window: int | None) -> torch.Tensor:
    """[1, heads, T, d] q, [1, kv_heads, T, d] k/v, sample bounds [0, ..., T] -> [1, T, heads, d] (scale None: 1/sqrt(d))."""
    return RowAttention.apply(query, key, value, bounds, query.shape[-1] ** -0.5 if scale is None else scale, window)
