"""Packed rows on CUDA in one kernel call per layer, and the whole-row mask packed rows never need.

varlen_attention runs torch's variable-length flash attention (torch.nn.attention.varlen, torch >= 2.10)
over every sample of a packed row at once: one launch per layer instead of one SDPA call per sample, and no
host sync (the boundaries stay on the GPU; the longest length is the Python int the collator already has).
A sliding window is the kernel's own (left, 0) window.

deferred_sdpa_mask is the mask function registered for sdpa_packed. For a packed training row
transformers would build a [1, 1, T, T] boolean block mask (1 GiB at T = 32k) that the per-sample
attention then ignores. It hands out a DeferredMask instead, built on first use, so a call that does
need it (no sample boundaries) still gets exactly what sdpa would have had.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)
_HALF = (torch.float16, torch.bfloat16)


class DeferredMask:
    """transformers' sdpa mask for one forward pass, built (once) only when an attention call asks for it."""

    def __init__(self, build: Callable[[], Any]):
        self._build: Callable[[], Any] | None = build
        self._mask: Any = None

    def get(self) -> Any:
        """The mask (a [B, 1, q, kv] boolean tensor or None), built on the first call."""
        if self._build is not None:
            self._mask, self._build = self._build(), None
        return self._mask

    @property
    def built(self) -> bool:
        return self._build is None


def deferred_sdpa_mask(*, batch_size: int, q_length: int, kv_length: int, attention_mask: Any = None,
                       q_offset: Any = 0, kv_offset: Any = 0, **kwargs: Any) -> Any:
    """sdpa_mask, deferred for one unpadded row without a cache (what a packed training batch is); else built now."""
    from transformers.masking_utils import sdpa_mask

    def build() -> Any:
        return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, attention_mask=attention_mask,
                         q_offset=q_offset, kv_offset=kv_offset, **kwargs)

    plain_offsets = isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset == kv_offset == 0
    if batch_size == 1 and attention_mask is None and q_length == kv_length and plain_offsets:
        return DeferredMask(build)
    return build()


def resolve_mask(mask: Any) -> Any:
    """A real mask (or None) for calls that need one."""
    return mask.get() if isinstance(mask, DeferredMask) else mask


@functools.lru_cache(maxsize=None)
def _varlen_function() -> Callable[..., torch.Tensor] | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch older than 2.10
        return None
    return varlen_attn


_refused: set[int] = set()  # devices whose flash kernel refused a call: the per-sample loop from then on


@functools.lru_cache(maxsize=None)
def _flash_capable(device_index: int) -> bool:
    # torch's flash kernels need Ampere or newer (sm80+); T4 (sm75) and V100 (sm70) keep the per-sample loop.
    return torch.cuda.get_device_capability(device_index) >= (8, 0)


def varlen_fits(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                max_length: Any, kwargs: dict) -> bool:
    """True when the flash varlen kernel computes exactly this call: CUDA sm80+, fp16/bf16, no attention
    dropout, no softcap or bias, head dims equal, at most 256 and a multiple of 8, whole query groups."""
    dim = query.shape[-1]
    return (query.device.type == "cuda" and query.dtype in _HALF and key.dtype == value.dtype == query.dtype
            and isinstance(max_length, int) and _varlen_function() is not None
            and not (module.training and kwargs.get("dropout", 0.0))
            and kwargs.get("softcap") is None and kwargs.get("position_bias") is None
            and key.shape[-1] == value.shape[-1] == dim and dim % 8 == 0 and dim <= 256
            and query.shape[1] % key.shape[1] == 0 and (query.device.index or 0) not in _refused
            and _flash_capable(query.device.index or 0))


def varlen_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_lens: torch.Tensor,
                     max_length: int, *, scaling: float | None, window: int | None) -> torch.Tensor | None:
    """Causal attention of every sample of a packed row in one call: [1, heads, T, d] -> [1, T, heads, d];
    None (and the per-sample loop for this device from then on) when the kernel refuses the call.

    window: transformers' sliding window W (a query sees itself and the W-1 keys before it), i.e. the
    kernel's window (W - 1, 0); None or a window no sample reaches is plain causal (-1, 0).
    """
    varlen_attn = _varlen_function()
    cu = cu_seq_lens.to(device=query.device, dtype=torch.int32, non_blocking=True)
    left = window - 1 if window is not None and window < max_length else -1
    try:
        out = varlen_attn(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), cu, cu,
                          max_length, max_length, scale=scaling, window_size=(left, 0),
                          enable_gqa=query.shape[1] != key.shape[1])
    except RuntimeError as exc:  # a GPU or build whose flash kernel does not take this call
        _refused.add(query.device.index or 0)
        log.warning("packed attention: torch's varlen flash attention refused (%s); using one SDPA call per "
                    "sample on this GPU", str(exc).splitlines()[0][:200])
        return None
    return out.unsqueeze(0)  # [1, T, heads, d], as sdpa_attention_forward returns
