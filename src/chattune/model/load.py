"""Tokenizer and model loading: dtype, chat template, pad token, attention kernel."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch

from chattune.config import ModelConfig
from chattune.errors import ModelError, TemplateError
from chattune.model.placement import check_attn_implementation, check_remote_code, explain_load_error
from chattune.model.quant import parameter_count, to_bnb_config
from chattune.model.safety import check_weight_files

log = logging.getLogger(__name__)

TEMPLATES_DIR = Path(__file__).parent / "templates"
BUILTIN_TEMPLATES = sorted(p.stem for p in TEMPLATES_DIR.glob("*.jinja"))
# Tokens that can pad without colliding with an end-of-turn token, in order of preference.
_PAD_CANDIDATES = ("<|endoftext|>", "<|finetune_right_pad_id|>", "<pad>", "<unk>", "<|fim_pad|>")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has bf16 matrix instructions (AMX or AVX512-BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def cuda_has_native_bf16() -> bool:
    """True on a GPU that computes bf16 in hardware (compute capability 8.0+: A100, L4, H100 ...).

    torch.cuda.is_bf16_supported() alone also says yes on V100 and T4, which only emulate bf16 (slowly).
    """
    import torch.cuda

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_dtype(name: str, *, device: str | None = None) -> torch.dtype:
    """Map model.dtype to a torch dtype; auto picks bf16 wherever it is fast.

    device: where the model will compute ('cuda' or 'cpu'; None: the GPU when there is one). A model kept on
    the CPU of a GPU machine is judged by the CPU's rule, never given bf16 because a GPU exists.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if name != "auto":
        if name == "bf16" and device == "cuda" and not cuda_has_native_bf16():
            log.warning("model.dtype=bf16 on a GPU without bf16 units (compute capability < 8.0, e.g. V100, T4): "
                        "it is emulated and slow; model.dtype=auto picks fp16 there")
        return _DTYPES[name]
    if device == "cuda":
        # V100/T4 (compute capability < 8) get fp16: the Trainer adds a GradScaler, LoRA weights stay fp32.
        return torch.bfloat16 if cuda_has_native_bf16() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def keep_fp16_training_stable(model: Any, dtype: torch.dtype) -> bool:
    """In fp16 training, carry the residual stream in fp32; True when a model needed it.

    fp16 tops out at 65504, and the residual stream of a deep model can pass it (NaN losses). Under autocast
    (the Trainer's fp16 steps) the embeddings' output is cast to fp32, so every residual add stays fp32
    (fp16 + fp32 is fp32) while the linear layers still run in fp16; the RMSNorms of transformers' models
    compute in fp32 themselves. Outside autocast (generation) the model runs in plain fp16, as inference does.
    """
    if dtype != torch.float16 or not hasattr(model, "get_input_embeddings"):
        return False

    def fp32_residual(module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return output.float() if torch.is_autocast_enabled(output.device.type) else output

    model.get_input_embeddings().register_forward_hook(fp32_residual)
    return True


def read_template(spec: str) -> str:
    """The Jinja text of a builtin template name or a .jinja file path."""
    if spec in BUILTIN_TEMPLATES:
        return (TEMPLATES_DIR / f"{spec}.jinja").read_text(encoding="utf-8")
    path = Path(spec).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise TemplateError(
        f"chat template {spec!r} is neither a builtin name nor a file",
        where="model.chat_template",
        fix=f"use one of {', '.join(BUILTIN_TEMPLATES)} or the path of a .jinja file",
    )


def load_tokenizer(model_dir: str | Path, cfg: ModelConfig) -> Any:
    """The model's tokenizer with the configured chat template and a pad token that is not end-of-turn."""
    from transformers import AutoTokenizer

    check_remote_code(model_dir, cfg)
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=cfg.trust_remote_code)
    except Exception as exc:  # transformers raises many types here
        raise _model_error(exc, model_dir, "tokenizer") from None
    if cfg.chat_template:
        tok.chat_template = read_template(cfg.chat_template)
    elif not tok.chat_template:
        raise TemplateError(
            "the tokenizer ships no chat template (a base model?)",
            where=str(model_dir),
            fix=f"set model.chat_template to one of {', '.join(BUILTIN_TEMPLATES)} or a .jinja file",
        )
    _choose_pad(tok)
    tok.chattune_files_sha256 = tokenizer_files_sha256(model_dir)
    return tok


def tokenizer_files_sha256(model_dir: str | Path) -> str:
    """Hash of the tokenizer files in a model folder (the tokenisation cache's tokenizer key)."""
    h = hashlib.sha256()
    for path in sorted(Path(model_dir).glob("*")):
        if path.is_file() and ("token" in path.name or path.suffix in (".model", ".tiktoken") or path.name in ("vocab.json", "merges.txt")):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def _choose_pad(tok: Any) -> None:
    # Padding with the end-of-turn token is harmless for our own labels (built
    # separately) but not for collators that mask pad ids; pick a neutral token.
    eos = tok.eos_token_id
    if tok.pad_token_id is not None and tok.pad_token_id != eos:
        return
    vocab = tok.get_vocab()
    for cand in _PAD_CANDIDATES:
        if cand in vocab and vocab[cand] != eos:
            tok.pad_token = cand
            return
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # attention masks still keep it out of every loss


def load_model(model_dir: str | Path, cfg: ModelConfig, *, dtype: torch.dtype, device_map: Any = None, **extra: Any) -> Any:
    """A causal LM from a local folder, in `dtype` (8/4-bit per model.quantization), with the configured attention kernel."""
    from transformers import AutoModelForCausalLM

    check_remote_code(model_dir, cfg)
    check_weight_files(model_dir, allow_pickle=cfg.allow_pickle)  # safetensors only unless model.allow_pickle
    check_attn_implementation(cfg.attn_implementation)
    bnb = to_bnb_config(cfg, dtype)
    if bnb is not None:
        extra.setdefault("quantization_config", bnb)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir),
            dtype=dtype,
            attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code,
            device_map=device_map,
            **extra,
        )
    except Exception as exc:
        raise _model_error(exc, model_dir, "model") from None
    return model


def _model_error(exc: Exception, model_dir: str | Path, what: str) -> ModelError:
    msg = str(exc)
    if "trust_remote_code" in msg:
        return ModelError(
            f"the {what} needs its own Python code from the model folder",
            where=str(model_dir),
            fix="set model.trust_remote_code=true if you trust this model's code",
        )
    attention = explain_load_error(msg)
    if attention is not None:
        return attention
    if "out of memory" in msg.lower():
        # Inference loads onto the first GPU whole; a larger model needs spreading or quantising.
        return ModelError(f"the {what} does not fit the GPU's memory", where=str(model_dir),
                          fix="set model.device_map=auto (layers spread over the GPUs, then CPU memory), or "
                          "model.quantization=4bit; docs/gpu.md lists what each recipe needs")
    first = msg.strip().splitlines()[0] if msg.strip() else type(exc).__name__
    return ModelError(f"cannot load the {what}: {first}", where=str(model_dir), fix="check that the folder is a complete Hugging Face model")


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts (a 4-bit weight counts its unpacked size)."""
    trainable = total = 0
    for p in model.parameters():
        n = parameter_count(p)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
