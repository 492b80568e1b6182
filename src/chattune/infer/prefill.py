"""Padding-free prefill: a batch's prompts in one packed forward, handed to generate() as a static KV cache.

A left-padded batch runs every prompt at the longest prompt's length: on the
role-play data a batch of 32 prompts (50-142 tokens) computes 4544 positions
for 2579 real ones, and the prefill is about half of the batch's time on a CPU.
Here the prompts (all but their last token) go through the model as one row,
each with its own causal attention (`sdpa_packed`), so the prefill costs what
the real tokens cost. Their keys and values are then laid out left-padded in a
preallocated `StaticCache`, exactly where a padded prefill would have put them,
and `generate()` carries on from the last prompt token with the usual attention
mask and position ids. The static cache also spares the decode loop the
per-step copy of the whole cache that `DynamicCache` makes (torch.cat per layer).
generate() runs under the same attention function, which on a CPU computes each
decoding step's attention as two small matmuls (model/packed_attention.py).

Only for models whose attention goes through transformers' attention interface
(SDPA), with global attention in every layer; anything else (a model's own
code, sliding windows, eager attention) falls back to the padded prefill.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from chattune.model.packed_attention import NAME as PACKED, base_model, packed_attention


def can_prefill_packed(model: Any, rows: Sequence[Sequence[int]], max_new_tokens: int) -> bool:
    """True when the packed prefill gives this model what a padded prefill gives it."""
    base = base_model(model)
    config = getattr(base, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(config, "_attn_implementation", None) not in ("sdpa", PACKED):
        return False  # eager keeps its own kernel; a model's own code (trust_remote_code) never sees cu_seq_lens
    if not type(base).__module__.startswith("transformers.models."):
        return False
    layer_types = getattr(config, "layer_types", None) or ()
    if any(t != "full_attention" for t in layer_types):
        return False  # sliding or linear attention layers keep other caches
    window = getattr(config, "sliding_window", None)
    longest = max((len(r) for r in rows), default=0)
    if window is not None and getattr(config, "use_sliding_window", True) and longest + max_new_tokens > window:
        return False
    return bool(rows) and min(len(r) for r in rows) >= 2


def prefill_packed(model: Any, rows: Sequence[Sequence[int]], max_new_tokens: int) -> Any:
    """A StaticCache holding every row's prompt but its last token, left-padded to the longest such prefix.

    Pass it to generate() together with the left-padded full prompts and their attention mask: generate()
    then only runs the last prompt token of each row before decoding.
    """
    from transformers import StaticCache

    base = base_model(model)
    heads = [list(r[:-1]) for r in rows]
    lengths = [len(h) for h in heads]
    width = max(lengths)
    packed = prefill_prefixes(model, heads)
    cache = StaticCache(config=base.config, max_cache_len=width + 1 + max_new_tokens)
    for index, layer in enumerate(packed.layers):
        cache.update(_left_padded(layer.keys, lengths, width), _left_padded(layer.values, lengths, width), index)
        layer.keys = layer.values = None  # free the packed copy layer by layer
    return cache


def prefill_prefixes(model: Any, heads: Sequence[Sequence[int]], **forward: Any) -> Any:
    """The keys and values of every token sequence in `heads` (all non-empty), from one packed forward.

    Returns a DynamicCache whose layers hold the sequences one after another along the length axis
    ([1, kv_heads, sum(lengths), dim]); split them with the lengths. `forward` goes to the model's call
    (the server passes peft's adapter_names there).
    """
    from transformers import DynamicCache

    base = base_model(model)
    device = next(model.parameters()).device
    lengths = [len(h) for h in heads]
    width = max(lengths)
    flat = torch.tensor([t for h in heads for t in h], dtype=torch.long, device=device)[None]
    positions = torch.cat([torch.arange(n, device=device) for n in lengths])[None]
    cu = torch.tensor([0, *lengths], device=device).cumsum(0).to(torch.int32)
    with packed_attention(model):
        out = model(input_ids=flat, position_ids=positions, past_key_values=DynamicCache(config=base.config),
                    use_cache=True, logits_to_keep=1, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                    max_length_q=width, max_length_k=width, **forward)
    return out.past_key_values


def _left_padded(states: torch.Tensor, lengths: list[int], width: int) -> torch.Tensor:
    """[1, heads, sum(lengths), dim] -> [rows, heads, width, dim], each row right-aligned, zeros before it."""
    out = states.new_zeros((len(lengths), states.shape[1], width, states.shape[3]))
    for row, part in enumerate(states.split(lengths, dim=2)):
        out[row, :, width - part.shape[2]:] = part[0]
    return out
