"""The chat metadata of an exported GGUF: the run's exact template and its end-of-turn ids, set and read back.

llama.cpp's converter copies the template from tokenizer_config.json (the merged folder carries the
run's own) and takes eos from the tokenizer, but has no idea which token closes a turn under a template
chattune chose (glm4's <|user|>, ChatML's <|im_end|> on a base whose eos is <|endoftext|>). So the
converted file is copied once with tokenizer.chat_template, eos and eot set from the run, and read back.

The copy works on the file's layout (GGUF v2/v3: header, key/values, tensor infos, aligned data) and
copies every other key/value, tensor info and the tensor data byte for byte: gguf-py's reader parses a
150k-token vocabulary item by item (minutes on a busy 2-core machine), this reads it in one pass.
"""

from __future__ import annotations

import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from chattune.errors import ChattuneError

TEMPLATE, EOS, EOT, BOS, ADD_BOS, TOKENS, ARCH, ALIGN = (
    "tokenizer.chat_template", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
    "tokenizer.ggml.bos_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.tokens",
    "general.architecture", "general.alignment")
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


@dataclass
class Layout:
    """Where each part of a GGUF file is, and the scalar/string values of its keys."""

    version: int
    n_tensors: int
    kv: list[tuple[str, int, int]] = field(default_factory=list)  # (key, start, end) byte ranges
    values: dict[str, Any] = field(default_factory=dict)
    tokens: dict[int, str] = field(default_factory=dict)          # texts of the wanted token ids
    tensor_infos: tuple[int, int] = (0, 0)
    data_start: int = 0


def _read(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ChattuneError("the GGUF file ends early", where=str(getattr(f, "name", "?")),
                            fix="the file is truncated: export it again")
    return struct.unpack(fmt, data)[0]


def _string(f: BinaryIO) -> str:
    return f.read(_read(f, "<Q")).decode("utf-8", "replace")


def _value(f: BinaryIO, kind: int, key: str, wanted: set[int], layout: Layout) -> Any:
    if kind == _STRING:
        return _string(f)
    if kind != _ARRAY:
        return _read(f, _SCALAR[kind])
    item, count = _read(f, "<I"), _read(f, "<Q")
    if item == _STRING:
        for i in range(count):
            text = _string(f)
            if key == TOKENS and i in wanted:
                layout.tokens[i] = text
    else:
        f.seek(count * struct.calcsize(_SCALAR[item]), 1)
    return None


def scan(path: Path, wanted: set[int] = frozenset()) -> Layout:
    """The layout of a GGUF file, with its scalar and string values and the texts of the `wanted` token ids."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ChattuneError("not a GGUF file", where=str(path), fix="pass a .gguf file")
        layout = Layout(_read(f, "<I"), 0)
        layout.n_tensors, n_kv = _read(f, "<Q"), _read(f, "<Q")
        for _ in range(n_kv):
            start = f.tell()
            key = _string(f)
            kind = _read(f, "<I")
            value = _value(f, kind, key, wanted, layout)
            if value is not None:
                layout.values[key] = value
            layout.kv.append((key, start, f.tell()))
        start = f.tell()
        for _ in range(layout.n_tensors):
            _string(f)
            f.seek(_read(f, "<I") * 8 + 4 + 8, 1)  # dims, type, offset
        layout.tensor_infos = (start, f.tell())
        layout.data_start = _aligned(f.tell(), layout.values.get(ALIGN, 32))
    return layout


def _aligned(pos: int, alignment: int) -> int:
    return pos + (-pos % alignment)


def _kv_bytes(key: str, value: int | str) -> bytes:
    name = key.encode("utf-8")
    head = struct.pack("<Q", len(name)) + name
    if isinstance(value, str):
        text = value.encode("utf-8")
        return head + struct.pack("<IQ", _STRING, len(text)) + text
    return head + struct.pack("<II", _UINT32, value)


@dataclass(frozen=True)
class ChatMetadata:
    """What a runtime needs to chat like training: the template, the stop ids and their texts."""

    architecture: str
    chat_template: str | None
    eos: int | None
    eot: int | None
    bos: int | None
    add_bos: bool | None
    token_texts: dict[int, str]

    def as_json(self) -> dict[str, Any]:
        return {"architecture": self.architecture, "eos_token_id": self.eos, "eot_token_id": self.eot,
                "bos_token_id": self.bos, "add_bos_token": self.add_bos,
                "stop_tokens": {str(i): t for i, t in self.token_texts.items() if i in (self.eos, self.eot)},
                "chat_template_chars": len(self.chat_template or "")}


def read_chat_metadata(path: Path, wanted: list[int] = ()) -> ChatMetadata:
    """Architecture, chat template, bos/eos/eot ids of a GGUF file, and the texts of those (and `wanted`) tokens."""
    first = scan(path)
    ids = {first.values.get(k) for k in (EOS, EOT, BOS)} - {None}
    layout = scan(path, set(ids) | set(wanted))
    v = layout.values
    return ChatMetadata(str(v.get(ARCH)), v.get(TEMPLATE), v.get(EOS), v.get(EOT), v.get(BOS),
                        None if v.get(ADD_BOS) is None else bool(v.get(ADD_BOS)), layout.tokens)


def stop_ids(end_of_turn: list[int]) -> tuple[int, int]:
    """(eot, eos) for a run's end-of-turn ids: the template's turn closer is eot; the tokenizer's eos stays eos."""
    if not end_of_turn:
        raise ChattuneError("the run's template has no end-of-turn token", where="chat_template.jinja",
                            fix="train with a template whose assistant turn ends in a special token")
    return end_of_turn[0], end_of_turn[-1]


def write_chat_metadata(src: Path, dst: Path, template: str, end_of_turn: list[int]) -> None:
    """Copy GGUF src to dst with the run's template as tokenizer.chat_template and its end-of-turn ids as eot/eos."""
    eot, eos = stop_ids(end_of_turn)
    new = {TEMPLATE: template, EOT: eot, EOS: eos}
    layout = scan(src)
    # Named templates (tokenizer.chat_template.tool_use ...) go too: the file carries one template, the run's.
    kept = [(k, s, e) for k, s, e in layout.kv if k not in new and not k.startswith(TEMPLATE + ".")]
    alignment = layout.values.get(ALIGN, 32)
    with open(src, "rb") as f, open(dst, "wb") as out:  # dst: a temporary name (the caller's files.atomic_path)
        out.write(b"GGUF" + struct.pack("<IQQ", layout.version, layout.n_tensors, len(kept) + len(new)))
        for _, start, end in kept:
            f.seek(start)
            out.write(f.read(end - start))
        for key, value in new.items():
            out.write(_kv_bytes(key, value))
        f.seek(layout.tensor_infos[0])
        out.write(f.read(layout.tensor_infos[1] - layout.tensor_infos[0]))
        out.write(b"\0" * (-out.tell() % alignment))
        f.seek(layout.data_start)
        shutil.copyfileobj(f, out, 16 << 20)
