"""SDPA over packed rows, one causal attention per sample instead of one masked attention per row.

A padding-free batch is a single row of concatenated samples. transformers' SDPA
path keeps them apart with a block-diagonal mask over the whole row, so the
attention costs (sum of lengths)^2 and the kernel cannot use its causal fast
path. With the sample boundaries the collator already knows (`cu_seq_lens_q`,
the kwargs flash-attention takes), each sample gets its own causal SDPA call:
the same numbers as a sample alone in its own batch, at sum(length^2) cost,
which is what lets larger per-device batches pay off on CPUs. On a CUDA GPU
(sm80+, fp16/bf16) all samples of a row go to one varlen flash-attention call
per layer instead (model/varlen.py), with no host sync; the per-sample loop is
the fallback (CPU, fp32, older GPUs).

Sliding windows are kept: a layer that passes `sliding_window` (Gemma 3's local
layers, SWA Qwen2, Mistral) gets the same band of keys as the model's own mask
gives it alone, in every path (the varlen kernel's window, a banded mask for
the matmuls, an explicit band for SDPA when a sample is longer than the window).
Packed rows never build transformers' whole-row [1, 1, T, T] mask: it is
deferred and built only for calls that have no boundaries.

Calls without boundaries (generation, padded batches) go to transformers' own
SDPA unchanged, so a model can keep this implementation for its whole life.

Training on a CPU: torch's CPU flash-attention backward costs 3.5-4.5x its
forward (measured at 128-512 tokens, bf16), more than all of a sample's other
attention work. When gradients are needed and a sample has at most
MATH_MAX_LEN tokens, its attention is computed as two batched matmuls with a
float32 softmax in between (the arithmetic of transformers' eager attention,
GQA heads grouped instead of repeated): forward and backward together take
about a third of the flash kernel's time at 190 tokens. The score matrix it
keeps for the backward grows with length², hence the limit. When every sample of the
row is that short, the whole row is one autograd node (model/row_attention.py).

Also here: check_padding_free, which refuses packed rows for a model whose own code
(trust_remote_code) has an attention that would let the samples of a row see each other.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

import torch

from chattune.errors import ModelError
from chattune.model.row_attention import MATH_MAX_LEN, causal_scores, hidden_mask, row_attention
from chattune.model.varlen import deferred_sdpa_mask, resolve_mask, varlen_attention, varlen_fits

NAME = "sdpa_packed"
_BOUNDARY_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
_last: list[Any] = [None, None]  # (cu_seq_lens tensor, its list): one conversion per forward, not per layer


def _boundaries(cu: torch.Tensor) -> list[int]:
    if _last[0] is not cu:
        _last[0], _last[1] = cu, cu.tolist()
    return _last[1]


def _softmax_fp32(scores: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Softmax over the keys in float32, probabilities back in the inputs' dtype (what eager attention does)."""
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)


def causal_matmul_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            scaling: float | None, window: int | None = None) -> torch.Tensor:
    """Causal attention of one sample: [1, heads, T, d] q and [1, kv_heads, T, d] k/v -> [1, T, heads, d].

    Scores from one baddbmm per key/value head (the query heads that share it stacked, so keys are never
    repeated), the future (and with a sliding window, what lies beyond it) masked, softmax in float32,
    probabilities back in the input dtype, one bmm with V.
    """
    _, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    q = query.reshape(kv_heads, group * length, dim)
    scores = causal_scores(q, key[0], dim ** -0.5 if scaling is None else scaling, window)
    probs = _softmax_fp32(scores, query.dtype)
    out = torch.bmm(probs, value[0])  # [kv_heads, group * T, d]
    return out.view(heads, length, dim).transpose(0, 1).unsqueeze(0)


def _matmul_attention_fits(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, kwargs: dict) -> bool:
    """Training on a CPU, no attention dropout, no softcap, equal head dims (a sliding window is applied)."""
    return (query.device.type == "cpu" and torch.is_grad_enabled() and query.requires_grad
            and not (module.training and kwargs.get("dropout", 0.0)) and _plain(query, key, kwargs, window_ok=True))


def _plain(query: torch.Tensor, key: torch.Tensor, kwargs: dict, *, window_ok: bool = False) -> bool:
    return (kwargs.get("softcap") is None and (window_ok or kwargs.get("sliding_window") is None)
            and kwargs.get("position_bias") is None and query.shape[-1] == key.shape[-1]
            and query.shape[1] % key.shape[1] == 0)


def _one_token_on_cpu(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, kwargs: dict) -> bool:
    """A decoding step on a CPU: one new token per row, no gradients, a boolean (or no) padding mask."""
    return (query.shape[2] == 1 and query.device.type == "cpu" and not torch.is_grad_enabled()
            and (mask is None or (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == mask.shape[2] == 1))
            and _plain(query, key, kwargs))


def decode_matmul_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            mask: torch.Tensor | None, scaling: float | None) -> torch.Tensor:
    """One query token per row against the cache: [B, heads, 1, d] -> [B, 1, heads, d].

    On a CPU the flash kernel spends more on its blocking than on the work here (a few hundred keys per
    row); two matmuls over the key/value heads, with the query heads that share one stacked, cost about
    half. mask: [B, 1, 1, keys], True where a key may be seen (left padding and unused cache slots are False).
    """
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    q = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(q, key.transpose(-1, -2)).mul_(dim ** -0.5 if scaling is None else scaling)
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    probs = _softmax_fp32(scores, query.dtype)
    return torch.matmul(probs, value).view(batch, 1, heads, dim)


def packed_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function.

    A packed row: on CUDA one varlen flash call for all samples (model/varlen.py); otherwise one causal
    attention per sample (matmuls when training on a CPU, else SDPA). Each keeps the layer's sliding window.
    A decoding step on a CPU: decode_matmul_attention. Anything else: transformers' SDPA with its mask.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu, max_length = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    for name in _BOUNDARY_KWARGS:
        kwargs.pop(name, None)
    packed = (cu is not None and query.shape[0] == 1 and query.shape[2] == key.shape[2] > 0
              and getattr(module, "is_causal", True) is not False)
    if packed and varlen_fits(module, query, key, value, max_length, kwargs):
        out = varlen_attention(query, key, value, cu, max_length, scaling=kwargs.get("scaling"),
                               window=kwargs.get("sliding_window"))
        if out is not None:
            return out, None
    bounds = _boundaries(cu) if packed else None  # the loop below needs the lengths on the host
    if bounds is None or bounds[-1] != query.shape[2]:
        mask = resolve_mask(attention_mask)
        if _one_token_on_cpu(query, key, mask, kwargs):
            return decode_matmul_attention(query, key, value, mask, kwargs.get("scaling")), None
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)
    return _per_sample_attention(module, query, key, value, bounds, kwargs), None


def _per_sample_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          bounds: list[int], kwargs: dict) -> torch.Tensor:
    """One causal attention per sample (the fallback where varlen cannot run): [1, tokens, heads, head_dim]."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kwargs.pop("is_causal", None)
    window = kwargs.pop("sliding_window", None)
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    matmul = _matmul_attention_fits(module, query, key, kwargs)
    if matmul and max(lengths) <= MATH_MAX_LEN:  # the whole row in one autograd node (model/row_attention.py)
        return row_attention(query, key, value, bounds, kwargs.get("scaling"), window)
    # split, not slicing: the backward of a slice zero-fills a whole-row gradient per sample, split's is one cat
    parts = zip(query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2))
    outs = []
    for q, k, v in parts:
        n = q.shape[2]
        if matmul and n <= MATH_MAX_LEN:
            outs.append(causal_matmul_attention(q, k, v, kwargs.get("scaling"), window))
        elif window is None or n <= window:  # the window reaches the whole sample: plain causal
            outs.append(sdpa_attention_forward(module, q, k, v, None, is_causal=True, **kwargs)[0])
        else:  # SDPA has no window argument: the band as an explicit mask (True = may attend)
            band = ~hidden_mask(n, window, q.device)
            outs.append(sdpa_attention_forward(module, q, k, v, band[None, None], is_causal=False, **kwargs)[0])
    return torch.cat(outs, dim=1)  # [1, tokens, heads, head_dim], as sdpa_attention_forward returns


def register() -> None:
    """Make NAME a valid attn_implementation (idempotent). Its masks are sdpa's, built only when a call needs one."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(NAME, packed_sdpa_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, deferred_sdpa_mask)


def base_model(model: Any) -> Any:
    """The transformers model inside a peft wrapper (or the model itself): where the attention setting lives."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def use_packed_attention(model: Any) -> bool:
    """Switch a model (or a peft wrapper of one) from sdpa to NAME; False when it runs another kernel."""
    base = base_model(model)
    if getattr(base.config, "_attn_implementation", None) != "sdpa":
        return False  # eager stays eager; flash_attention_2 takes cu_seq_lens natively
    register()
    base.set_attn_implementation(NAME)
    return True


@contextlib.contextmanager
def packed_attention(model: Any) -> Iterator[None]:
    """Run the model with NAME for the duration, then give it back its previous attention implementation."""
    base = base_model(model)
    old = base.config._attn_implementation
    if old == NAME:
        yield
        return
    register()
    base.set_attn_implementation(NAME)
    try:
        yield
    finally:
        base.set_attn_implementation(old)


def check_padding_free(model_dir: str | Path, *, padding_free: bool, trust_remote_code: bool) -> None:
    """Refuse padding-free batches for a model whose own code (trust_remote_code) would let samples attend to each other.

    Padding-free training puts a whole batch in one row and relies on transformers' attention building one
    causal block per sample from the restarting position_ids. Code shipped with a model (auto_map) has its
    own attention, which sees one long sequence.
    """
    if not (padding_free and trust_remote_code):
        return
    try:
        conf = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # no readable config: loading reports that itself
    auto_map = conf.get("auto_map") if isinstance(conf, dict) else None
    if not (isinstance(auto_map, dict) and "AutoModelForCausalLM" in auto_map):
        return
    raise ModelError(
        f"train.padding_free=true puts each batch in one row and needs transformers' own attention to keep the "
        f"samples apart, but this model runs its own code ({auto_map['AutoModelForCausalLM']}, "
        "model.trust_remote_code=true), whose attention would let every sample see the ones before it",
        where="train.padding_free",
        fix="set train.padding_free=false (batches are padded instead; same results, a little slower)",
    )
