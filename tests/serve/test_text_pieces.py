"""serve's token-to-text decoder: an answer cut at max_tokens in the middle of a multi-byte character ends at the
last whole character (as `chattune chat` and predict do), and nothing of a half character is ever streamed."""

from __future__ import annotations

from chattune.serve.completion import Completion, TextPieces


class ByteTokenizer:
    """One token per UTF-8 byte, decoded the way byte-level tokenizers decode a cut sequence (U+FFFD at the end)."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def _events(c: Completion) -> list:
    out = []
    while not c.events.empty():
        out.append(c.events.get())
    return out


def test_an_answer_cut_inside_a_character_ends_at_the_last_whole_one():
    data = "好的".encode()  # 6 bytes (3 a character); max_tokens=4 cuts the second character after its first byte
    c = Completion(prompt_ids=[1], max_tokens=4, temperature=0.0, top_p=1.0, stop=[])
    pieces = TextPieces(ByteTokenizer(), c)
    for b in data[:4]:
        pieces.put(b)
    info = pieces.end()
    text = "".join(p for kind, p in _events(c) if kind == "delta")
    assert text == "好" and "\ufffd" not in text
    assert info["finish_reason"] == "length" and info["completion_tokens"] == 4
