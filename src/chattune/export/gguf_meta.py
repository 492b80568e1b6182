"""The chat metadata of an exported GGUF: the run's exact template and its end-of-turn ids, set and read back.

llama.cpp's converter copies the template from tokenizer_config.json (the merged folder carries the
run's own) and takes eos from the tokenizer, but has no idea which token closes a turn under a template
chattune chose (glm4's <|user|>, ChatML's <|im_end|> on a base whose eos is <|endoftext|>). So the
converted file is copied once with tokenizer.chat_template, eos and eot set from the run (gguf-py's
reader and writer, the pinned `gguf` package), and the result is read back to prove it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from chattune.errors import ChattuneError

K = gguf.Keys.Tokenizer
_IDS = {"bos": K.BOS_ID, "eos": K.EOS_ID, "eot": K.EOT_ID}


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


def _value(reader: gguf.GGUFReader, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def read_chat_metadata(path: Path, wanted: list[int] = ()) -> ChatMetadata:
    """Architecture, chat template, bos/eos/eot ids of a GGUF file, and the texts of those (and `wanted`) tokens."""
    reader = gguf.GGUFReader(str(path))
    ids = {name: _value(reader, key) for name, key in _IDS.items()}
    tokens = reader.fields.get(K.LIST)
    texts = {}
    for i in {*wanted, *[v for v in ids.values() if v is not None]}:
        if tokens is not None and 0 <= i < len(tokens.data):
            texts[i] = tokens.contents(i)
    add_bos = _value(reader, K.ADD_BOS)
    return ChatMetadata(str(_value(reader, gguf.Keys.General.ARCHITECTURE)), _value(reader, K.CHAT_TEMPLATE),
                        ids["eos"], ids["eot"], ids["bos"], None if add_bos is None else bool(add_bos), texts)


def stop_ids(end_of_turn: list[int]) -> tuple[int, int]:
    """(eot, eos) for a run's end-of-turn ids: the template's turn closer is eot; the tokenizer's eos stays eos."""
    if not end_of_turn:
        raise ChattuneError("the run's template has no end-of-turn token", where="chat_template.jinja",
                            fix="train with a template whose assistant turn ends in a special token")
    return end_of_turn[0], end_of_turn[-1]


def write_chat_metadata(src: Path, dst: Path, template: str, end_of_turn: list[int]) -> None:
    """Copy GGUF src to dst with the run's template and its end-of-turn ids as eot and eos."""
    reader = gguf.GGUFReader(str(src))
    eot, eos = stop_ids(end_of_turn)
    new = {K.CHAT_TEMPLATE: (template, gguf.GGUFValueType.STRING), K.EOT_ID: (eot, gguf.GGUFValueType.UINT32),
           K.EOS_ID: (eos, gguf.GGUFValueType.UINT32)}
    arch = str(_value(reader, gguf.Keys.General.ARCHITECTURE))
    writer = gguf.GGUFWriter(str(dst), arch=arch, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF.") or field.name in new \
                or field.name.startswith(K.CHAT_TEMPLATE):  # named templates too: one template, the run's
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    for key, (value, kind) in new.items():
        writer.add_key_value(key, value, kind)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()
