"""A model's shape, read without loading its weights: the numbers `chattune plan` estimates from.

A local folder (or a packaged alias) is built on PyTorch's meta device from its
config.json, so every linear layer is counted as training will see it. A hub id
that is not downloaded yet is read from the hub's config.json alone, and where
even that cannot be fetched (offline), from KNOWN_SHAPES: the models the seed
recipes in configs/ name, with their published sizes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chattune.errors import ModelError

# hidden, intermediate, layers, heads, kv heads, vocab, tied embeddings (from each model's config.json).
# Qwen-7B-Chat's config says intermediate_size 22016: its w1 and w2 are each half of that.
KNOWN_SHAPES: dict[str, tuple[int, int, int, int, int, int, bool]] = {
    "qwen/qwen-7b-chat": (4096, 11008, 32, 32, 32, 151936, False),
    "qwen/qwen1.5-7b-chat": (4096, 11008, 32, 32, 32, 151936, False),
    "qwen/qwen2.5-0.5b-instruct": (896, 4864, 24, 14, 2, 151936, True),
    "qwen/qwen2.5-1.5b-instruct": (1536, 8960, 28, 12, 2, 151936, True),
    "qwen/qwen2.5-3b-instruct": (2048, 11008, 36, 16, 2, 151936, True),
    "qwen/qwen2.5-7b-instruct": (3584, 18944, 28, 28, 4, 152064, False),
    "qwen/qwen2.5-14b-instruct": (5120, 13824, 48, 40, 8, 152064, False),
    "qwen/qwen2.5-coder-7b-instruct": (3584, 18944, 28, 28, 4, 152064, False),
    "thudm/glm-4-9b-chat-hf": (4096, 13696, 40, 32, 2, 151552, False),
}


@dataclass
class Shape:
    """What memory and time depend on. `linears`: (short name, in, out) of each decoder-layer linear, one layer."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    linears: list[tuple[str, int, int]] = field(default_factory=list)
    other_params: int = 0  # embeddings, norms, lm_head: never quantised
    source: str = ""

    @property
    def linear_params(self) -> int:
        return self.layers * sum(i * o for _, i, o in self.linears)

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params

    def lora_params(self, r: int, targets: list[str] | str) -> int:
        """LoRA A and B of every targeted linear: r x (in + out) each."""
        chosen = [(i, o) for n, i, o in self.linears if targets == "all-linear" or n in targets]
        return self.layers * sum(r * (i + o) for i, o in chosen)


def from_numbers(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int,
                 tied: bool, *, head_dim: int | None = None, source: str = "") -> Shape:
    """A Llama-style decoder (q/k/v/o, gate/up/down) from its config numbers."""
    hd = head_dim or hidden // heads
    q, kv = heads * hd, kv_heads * hd
    linears = [("q_proj", hidden, q), ("k_proj", hidden, kv), ("v_proj", hidden, kv), ("o_proj", q, hidden),
               ("gate_proj", hidden, intermediate), ("up_proj", hidden, intermediate), ("down_proj", intermediate, hidden)]
    other = vocab * hidden * (1 if tied else 2) + hidden * (2 * layers + 1)
    return Shape(layers, hidden, intermediate, heads, kv_heads, hd, vocab, tied, linears, other, source)


def from_config_dict(cfg: dict[str, Any], *, source: str) -> Shape:
    """Read the numbers of a config.json (text_config for multimodal wrappers) without building the model."""
    c = cfg.get("text_config") or cfg
    try:
        hidden, layers, heads = c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"]
    except KeyError as exc:
        raise ModelError(f"config.json has no {exc.args[0]}", where=source,
                         fix="give a Hugging Face decoder model (its config.json names hidden_size, "
                             "num_hidden_layers and num_attention_heads)") from None
    return from_numbers(hidden, c.get("intermediate_size") or 4 * hidden, layers, heads,
                        c.get("num_key_value_heads") or c.get("multi_query_group_num") or heads,
                        c["vocab_size"] if "vocab_size" in c else c.get("padded_vocab_size", 0),
                        bool(c.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))),
                        head_dim=c.get("head_dim") or c.get("kv_channels"), source=source)


def from_model_dir(model_dir: Path, *, trust_remote_code: bool = False) -> Shape:
    """Build the model on the meta device (no memory, no weights read) and count what training will see."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    try:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, ImportError, OSError):  # an architecture transformers cannot build: its numbers
        return from_config_dict(json.loads((model_dir / "config.json").read_text(encoding="utf-8")), source=str(model_dir))
    shape = from_config_dict(config.to_dict(), source=str(model_dir))
    blocks = _decoder_blocks(model)
    first = blocks[0]
    shape.linears = [(n.rsplit(".", 1)[-1], m.in_features, m.out_features)
                     for n, m in first.named_modules() if isinstance(m, torch.nn.Linear)]
    shape.layers = len(blocks)
    total = sum(p.numel() for p in model.parameters())
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if shape.tied and out is not None and out.weight is not inp.weight:  # not tied on the meta device
        total -= out.weight.numel()
    shape.other_params = total - shape.linear_params
    return shape


def _decoder_blocks(model: Any) -> Any:
    """The repeated decoder layers: the longest ModuleList in the model."""
    import torch

    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    return max(lists, key=len)


def known_shape(name: str) -> Shape | None:
    numbers = KNOWN_SHAPES.get(name.lower())
    return from_numbers(*numbers, source=f"chattune's table of known models ({name})") if numbers else None
