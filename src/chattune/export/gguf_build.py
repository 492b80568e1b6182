"""From a merged HF folder to one GGUF: convert (llama.cpp's converter), set the chat metadata, quantise, prove it.

Every intermediate lives in the export's temporary folder; the final file is published under its name
only when complete (files.atomic_path), and the whole folder only when the export finished
(files.atomic_dir), so no partial GGUF is ever left under the final name.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors import safe_open

from chattune.errors import ChattuneError, RunDirError
from chattune.export.gguf_meta import ChatMetadata, read_chat_metadata, stop_ids, write_chat_metadata
from chattune.export.llamacpp import convert, quantise
from chattune.export.quants import Quant, gguf_bytes
from chattune.files import atomic_path

_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def architectures_of(model_dir: Path) -> list[str]:
    """config.json's architectures (what llama.cpp's converter dispatches on)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    return list(cfg.get("architectures") or [])


def parameter_count(model_dir: Path) -> int:
    """Weights in the base model, from its safetensors headers (no tensor is read)."""
    total = 0
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(shard), "np") as f:
            for key in f.keys():
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= d
                total += n
    return total


def needed_bytes(n_params: int, merged_dtype: str, quant: Quant) -> int:
    """Peak disk use of an export: merged folder + converted 16-bit GGUF + its metadata copy + the quantised file."""
    sixteen = gguf_bytes(n_params, Quant("f16", 1, 16.0, ""))
    final = 0 if quant.is_float else gguf_bytes(n_params, quant)
    converted = gguf_bytes(n_params, quant) if quant.is_float else sixteen
    return n_params * _BYTES.get(merged_dtype, 4) + 2 * converted + final


def check_disk_space(folder: Path, need: int) -> None:
    """RunDirError before anything is written when the file system holding `folder` has less than `need` free."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise RunDirError(
            f"not enough disk space: the export needs about {need / 2**30:.2f} GiB while it works (merged model, "
            f"16-bit GGUF, quantised file) and {free / 2**30:.2f} GiB are free", where=str(probe),
            fix="free some space, or write elsewhere with --out DIR on a larger disk")


def converter_outtype(quant: Quant) -> str:
    """What the converter writes: the float type asked for, else its highest-fidelity 16-bit ('auto') to quantise from."""
    return quant.name if quant.is_float else "auto"


def build_gguf(converter: Path, merged: Path, final: Path, quant: Quant, template: str, end_of_turn: list[int],
               work: Path) -> ChatMetadata:
    """Write `final`: converted, carrying the run's template and stop ids, quantised if asked; its metadata read back."""
    raw, chat = work / "converted.gguf", work / "with-chat-metadata.gguf"
    convert(converter, merged, raw, converter_outtype(quant), work / "convert.log")
    target = final if quant.is_float else chat
    with atomic_path(target) as tmp:
        write_chat_metadata(raw, tmp, template, end_of_turn)
    raw.unlink()
    if not quant.is_float:
        with atomic_path(final) as tmp:
            quantise(chat, tmp, quant.ftype, quant.name)
        chat.unlink()
    meta = read_chat_metadata(final, end_of_turn)
    check_metadata(meta, template, end_of_turn, final)
    return meta


def check_metadata(meta: ChatMetadata, template: str, end_of_turn: list[int], path: Path) -> None:
    """The GGUF as written holds the run's exact template and its eot/eos ids (read back, not assumed)."""
    eot, eos = stop_ids(end_of_turn)
    problems = []
    if meta.chat_template != template:
        problems.append("tokenizer.chat_template is not the run's template")
    if meta.eot != eot or meta.eos != eos:
        problems.append(f"eot/eos are {meta.eot}/{meta.eos}, expected {eot}/{eos}")
    if problems:
        raise ChattuneError("the written GGUF lost its chat metadata: " + "; ".join(problems), where=str(path),
                            fix="report it with --debug; the quantiser or converter dropped a key")

