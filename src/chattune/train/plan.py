"""Peak memory and time of a training run, estimated before anything is loaded (`chattune plan`).

Memory is the sum of parts, each from the model's shape and the config:
  weights      linear layers at the quantised size, everything else at the compute dtype
  LoRA         fp32 weights + gradients + two AdamW moments: 16 bytes a parameter
  activations  what autograd keeps per token and layer (ACT_PER_TOKEN below), for the largest batch;
               with gradient checkpointing only each layer's input, plus one layer recomputed
  attention    the CPU's matmul attention keeps heads x length^2 probabilities per sample and layer
  logits       chattune computes lm_head only at supervised positions: logits, their gradient,
               and a float32 copy
  runtime      the process itself: Python, torch, transformers (CPU); the CUDA context (GPU)
The constants were fitted to peak RSS measured on this project's 2-core CPU (tests/train/test_plan.py
checks the estimate against fresh measurements, with its tolerance).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from chattune.train.shape import Shape

GIB = 2**30
# Bytes a linear-layer weight takes per parameter: bitsandbytes' int8 keeps a float32 scale per row
# (counted as 1 byte), nf4/fp4 pack two weights a byte plus an absmax per 64 (quantised again with
# double_quant).
QUANT_BYTES = {"8bit": 1.0, "4bit": 0.5 + 1 / 64}
LORA_BYTES = 16
# Elements autograd keeps per token and decoder layer, in units of (hidden, intermediate, q width,
# kv width): norms' inputs, the shared dropout outputs, q/k/v after RoPE, the attention output,
# and the MLP's gate, up, act(gate) and product (see the module docstring's test for the fit).
# Counted, these are (6, 5, 3, 2); the measured peaks need 1.28 times that (allocator slack, the LoRA path's
# own copies), so the fitted constants below are scaled by it.
ACT_PER_TOKEN = (7.7, 6.4, 3.85, 2.56)
# Bytes per logit at a supervised position (vocab x positions): the logits, their gradient and the chunked loss's
# float32 temporaries. Fitted 13 while accelerate still copied all kept logits to float32. Since #17 removed that
# copy, 10 sits between the three measured settings of tests/train/test_plan.py (estimate/measured: smollm2 b4 x 256
# 0.99, smollm2 b2 x 768 with checkpointing 0.97 here and 0.91 on the CI machine, gemma3-270m 1.06); 8 left the
# checkpointed smollm2 run 16 % under on CI.
LOGIT_BYTES = 10.0
# The CPU's matmul attention keeps the probabilities per (head, query, key). A row whose samples all fit
# MATMUL_ATTENTION_MAX is one RowAttention (model/row_attention.py): probabilities in the compute dtype only.
# Otherwise the per-sample autograd version keeps float32 scores and probabilities: 8 bytes (fitted 7.7).
SCORE_BYTES = 8
RUNTIME = {"cpu": 0.58 * GIB, "cuda": 0.5 * GIB}
MATMUL_ATTENTION_MAX = 384  # model/row_attention.py's MATH_MAX_LEN: CPU samples up to this length keep their scores


@dataclass(frozen=True)
class Setting:
    """The knobs that move the estimate; `suggest` varies them."""

    device: str  # "cpu" or "cuda"
    dtype_bytes: int  # 2 (bf16/fp16) or 4 (fp32)
    quantization: str  # none, 8bit, 4bit
    batch_size: int
    grad_accum: int
    gradient_checkpointing: bool
    max_length: int


@dataclass(frozen=True)
class Estimate:
    weights: float
    lora: float
    activations: float
    attention: float
    logits: float
    runtime: float

    @property
    def total(self) -> float:
        return sum(asdict(self).values())

    def parts(self) -> dict[str, float]:
        return asdict(self)


def estimate(shape: Shape, s: Setting, *, r: int, targets: list[str] | str, batch_lengths: list[int] | None = None,
             supervised_fraction: float = 1.0) -> Estimate:
    """Peak bytes of one training process. batch_lengths: the longest micro-batch's sample lengths
    (default: batch_size samples of max_length)."""
    lengths = batch_lengths or [s.max_length] * s.batch_size
    tokens = sum(lengths)
    w = s.dtype_bytes
    linear_bytes = QUANT_BYTES.get(s.quantization, w)
    weights = shape.linear_params * linear_bytes + shape.other_params * w
    per_token_layer = w * (ACT_PER_TOKEN[0] * shape.hidden + ACT_PER_TOKEN[1] * shape.intermediate
                           + ACT_PER_TOKEN[2] * shape.heads * shape.head_dim
                           + ACT_PER_TOKEN[3] * shape.kv_heads * shape.head_dim)
    if s.gradient_checkpointing:  # each layer's input kept, one layer's activations live during its recompute
        activations = tokens * (shape.layers * shape.hidden * w + per_token_layer)
    else:
        activations = tokens * shape.layers * per_token_layer
    per_score = w if max(lengths) <= MATMUL_ATTENTION_MAX else SCORE_BYTES
    scores = sum(n * n for n in lengths if n <= MATMUL_ATTENTION_MAX) * shape.heads * per_score
    attention = 0.0 if s.device != "cpu" else scores * (1 if s.gradient_checkpointing else shape.layers)
    supervised = tokens * supervised_fraction
    logits = supervised * shape.vocab * LOGIT_BYTES
    return Estimate(weights, shape.lora_params(r, targets) * LORA_BYTES, activations, attention, logits,
                    RUNTIME.get(s.device, 0.0))


def flops_per_token(shape: Shape, *, gradient_checkpointing: bool, supervised_fraction: float = 1.0) -> float:
    """Forward 2N + backward through the activations 2N (the base is frozen: no weight gradients), plus
    another forward 2N when checkpointing recomputes; lm_head (vocab x hidden) runs only where supervised."""
    passes = 6.0 if gradient_checkpointing else 4.0
    return passes * shape.linear_params + 4.0 * shape.vocab * shape.hidden * supervised_fraction


def seconds(shape: Shape, s: Setting, tokens: int, flops_per_s: float, *, supervised_fraction: float = 1.0) -> float:
    """Time for `tokens` training tokens at an effective (not peak) speed."""
    return tokens * flops_per_token(shape, gradient_checkpointing=s.gradient_checkpointing,
                                    supervised_fraction=supervised_fraction) / flops_per_s


QUANT_ORDER = ("none", "8bit", "4bit")


def candidates(s: Setting) -> list[Setting]:
    """Settings that keep the effective batch (batch x accumulation), roughly fastest first: the config's
    quantisation before a lighter one, checkpointing off before on, larger batches before smaller."""
    effective = s.batch_size * s.grad_accum
    batches = dict.fromkeys(b for b in (s.batch_size, s.batch_size // 2, s.batch_size // 4, 2, 1) if 1 <= b <= s.batch_size)
    quants = QUANT_ORDER[QUANT_ORDER.index(s.quantization):]
    return [replace(s, quantization=q, gradient_checkpointing=gc, batch_size=b, grad_accum=-(-effective // b))
            for q in quants for gc in dict.fromkeys([s.gradient_checkpointing, True]) for b in batches]
