"""SDPA over packed rows, one causal attention per sample instead of one masked attention per row.

A padding-free batch is a single row of concatenated samples. transformers' SDPA
path keeps them apart with a block-diagonal mask over the whole row, so the
attention costs (sum of lengths)^2 and the kernel cannot use its causal fast
path. With the sample boundaries the collator already knows (`cu_seq_lens_q`,
the kwargs flash-attention takes), each sample gets its own causal SDPA call:
the same numbers as a sample alone in its own batch, at sum(length^2) cost,
which is what lets larger per-device batches pay off on CPUs.

Calls without boundaries (generation, padded batches) go to transformers' own
SDPA unchanged, so a model can keep this implementation for its whole life.
"""

from __future__ import annotations

from typing import Any

import torch

NAME = "sdpa_packed"
_BOUNDARY_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
_last: list[Any] = [None, None]  # (cu_seq_lens tensor, its list): one conversion per forward, not per layer


def _boundaries(cu: torch.Tensor) -> list[int]:
    if _last[0] is not cu:
        _last[0], _last[1] = cu, cu.tolist()
    return _last[1]


def packed_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function: per-sample causal SDPA when the batch is one packed row."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    bounds = _boundaries(cu) if cu is not None else None
    for name in _BOUNDARY_KWARGS:
        kwargs.pop(name, None)
    if bounds is None or query.shape[0] != 1 or not query.shape[2] == key.shape[2] == bounds[-1]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    # split, not slicing: the backward of a slice zero-fills a whole-row gradient per sample, split's is one cat
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    parts = zip(query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2))
    outs = [sdpa_attention_forward(module, q, k, v, None, is_causal=True, **kwargs)[0] for q, k, v in parts]
    return torch.cat(outs, dim=1), None  # [1, tokens, heads, head_dim], as sdpa_attention_forward returns


def register() -> None:
    """Make NAME a valid attn_implementation (idempotent). Masks are built as for sdpa; packed calls ignore them."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, packed_sdpa_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def use_packed_attention(model: Any) -> bool:
    """Switch a model (or a peft wrapper of one) from sdpa to NAME; False when it runs another kernel."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "_attn_implementation", None) != "sdpa":
        return False  # eager stays eager; flash_attention_2 takes cu_seq_lens natively
    register()
    base.set_attn_implementation(NAME)
    return True
