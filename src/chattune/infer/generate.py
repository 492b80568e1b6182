"""Batched generation: left-padded batches, greedy by default, the run's template and stop tokens.

Prompts are prefilled without padding where the model allows it (infer/prefill.py).

Used by probes during training, evaluation, predict and the server alike, so
every verb answers with the same rendering and stopping rules.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch

from chattune.data.render import ChatRenderer
from chattune.infer.prefill import can_prefill_packed, prefill_packed
from chattune.model.packed_attention import packed_attention


@contextlib.contextmanager
def inference_mode(model: Any, *, sharded: bool = False) -> Iterator[None]:
    """Eval mode (dropout off) with the KV cache on, then the previous mode and cache setting restored.

    sharded (weights split over processes, gathered on use: FSDP2, ZeRO-3): no_grad instead of inference_mode.
    FSDP2 allocates its gathered weights on first use and reuses them in training; made under inference_mode
    they are inference tensors, and the next training step fails ("Inference tensors do not track version
    counter", reproduced with FSDP2 on one CPU process).
    """
    was_training = model.training
    config = getattr(model, "config", None)
    old_cache = getattr(config, "use_cache", None)
    model.eval()
    if config is not None:
        config.use_cache = True
    try:
        with torch.no_grad() if sharded else torch.inference_mode():
            yield
    finally:
        if config is not None:
            config.use_cache = old_cache
        model.train(was_training)


def weights_sharded(model: Any) -> bool:
    """True for a model whose weights are split over processes: FSDP2 (fully_shard) or DeepSpeed ZeRO-3."""
    from torch.distributed.fsdp import FSDPModule

    first = next(iter(model.parameters()), None)
    return isinstance(model, FSDPModule) or hasattr(first, "ds_id")


def _process_count() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_available() and torch.distributed.is_initialized() else 1


def left_pad(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with every row right-aligned."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


# What a tokenizer decodes the first bytes of a character to, when the tokens holding its last bytes were
# never generated (the answer hit max_new_tokens inside a multi-byte character).
REPLACEMENT = "\ufffd"


def whole_characters(text: str) -> str:
    """`text` without a character cut off at its end (U+FFFD left by a partial UTF-8 byte sequence)."""
    return text.rstrip(REPLACEMENT)


def decode_answer(tok: Any, ids: Any) -> str:
    """The generated tokens as text: special tokens dropped, ending at the last whole character, stripped."""
    return whole_characters(tok.decode(ids, skip_special_tokens=True)).strip()


def generate_batch(
    model: Any,
    renderer: ChatRenderer,
    prompts: Sequence[Sequence[dict[str, str]]],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    progress: Any = None,
    packed_prefill: bool = True,
    sharded: bool = False,
) -> list[str]:
    """Answer every prompt (a list of messages); greedy unless do_sample. Order is preserved.

    sharded: the weights are split over the processes (ZeRO-3, FSDP) and every process calls this with its
    own share of the prompts; generation runs under no_grad and in lockstep (synced_gpus), so a process that
    finishes early keeps joining the others' weight gathers instead of leaving them waiting.

    With packed_prefill (and a model that supports it, see infer/prefill.py) the prompts are prefilled
    without padding; the padded prefill is the fallback (same answers in fp32, see docs/inference.md).
    """
    tok = renderer.tokenizer
    encoded = [renderer.prompt_ids(p) for p in prompts]
    # Sorting by length keeps padding (wasted compute) low; answers go back in input order.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    eos = renderer.end_of_turn_ids()
    device = next(model.parameters()).device
    answers: list[str] = [""] * len(encoded)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {"do_sample": False}
    sharded = sharded or weights_sharded(model)
    if sharded and _process_count() > 1:
        sampling["synced_gpus"] = True  # transformers only infers it for ZeRO-3 and its own FSDP, not accelerate's
    with inference_mode(model, sharded=sharded):
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            rows = [encoded[i] for i in idx]
            ids, mask = left_pad(rows, tok.pad_token_id)
            packed = packed_prefill and can_prefill_packed(model, rows, max_new_tokens)
            with packed_attention(model) if packed else contextlib.nullcontext():
                # disable_compile: a static cache would otherwise make generate() compile on GPUs, per batch shape
                cache = ({"past_key_values": prefill_packed(model, rows, max_new_tokens), "disable_compile": True}
                         if packed else {})
                out = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=max_new_tokens,
                    eos_token_id=eos,
                    pad_token_id=tok.pad_token_id,
                    use_cache=True,
                    **cache,
                    **sampling,
                )
            for row, i in enumerate(idx):
                answers[i] = decode_answer(tok, out[row, ids.shape[1]:])
            if progress is not None:
                progress(len(idx))
    return answers
