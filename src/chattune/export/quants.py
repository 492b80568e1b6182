"""The GGUF quant types `chattune export --quant` offers, and what each costs on disk.

Pure data (no llama.cpp import), so the list, the unknown-quant error and the size estimate are cheap.
f32/f16/bf16 are written by llama.cpp's converter directly; every other type is made from a 16-bit
GGUF by llama.cpp's own quantiser (llama_model_quantize).
"""

from __future__ import annotations

from dataclasses import dataclass

from chattune.errors import ConfigError


@dataclass(frozen=True)
class Quant:
    name: str
    ftype: int               # llama.cpp's LLAMA_FTYPE_* value (llama.h)
    bits_per_weight: float   # average on disk, for the free-space check (llama.cpp's quantize table)
    help: str

    @property
    def is_float(self) -> bool:
        """Written by the converter unquantised; the parity check is strict for these."""
        return self.name in FLOAT_TYPES


FLOAT_TYPES = ("f32", "f16", "bf16")
QUANTS: dict[str, Quant] = {q.name: q for q in (
    Quant("f32", 0, 32.0, "full precision, largest"),
    Quant("f16", 1, 16.0, "half precision: answers as the merged model does"),
    Quant("bf16", 32, 16.0, "bfloat16: answers as the merged model does"),
    Quant("q8_0", 7, 8.5, "8-bit, nearly lossless"),
    Quant("q6_k", 18, 6.56, "6-bit k-quant"),
    Quant("q5_k_m", 17, 5.7, "5-bit k-quant, medium"),
    Quant("q5_k_s", 16, 5.5, "5-bit k-quant, small"),
    Quant("q4_k_m", 15, 4.89, "4-bit k-quant, medium: the usual size/quality trade-off"),
    Quant("q4_k_s", 14, 4.58, "4-bit k-quant, small"),
    Quant("q4_0", 2, 4.5, "4-bit, legacy"),
    Quant("q3_k_m", 12, 3.91, "3-bit k-quant, medium"),
    Quant("q2_k", 10, 3.35, "2-bit k-quant, smallest, lossy"),
)}


def describe_quants() -> str:
    """'f32 (full precision, largest), f16 (...), ...' for help texts and errors."""
    return ", ".join(f"{q.name} ({q.help})" for q in QUANTS.values())


def get_quant(name: str) -> Quant:
    """The Quant for --quant NAME (case-insensitive), or a ConfigError listing every supported one."""
    quant = QUANTS.get(str(name).strip().lower())
    if quant is None:
        raise ConfigError(f"unknown quant type {name!r}", where="chattune export --quant",
                          fix=f"use one of: {describe_quants()}")
    return quant


def gguf_bytes(n_params: int, quant: Quant) -> int:
    """Estimated size of a GGUF holding n_params weights at this quant (metadata is small beside it)."""
    return int(n_params * quant.bits_per_weight / 8) + (1 << 20)
