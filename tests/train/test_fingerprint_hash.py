"""The checkpoints' data fingerprint is hashed item by item, with the value hashing the whole JSON text gives."""

import hashlib
import json

from chattune.train.resume import _sha


def whole_text_sha(*parts) -> str:  # how the fingerprint was computed before: every part as one JSON string
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True, ensure_ascii=False, default=str).encode())
    return h.hexdigest()[:16]


def test_item_by_item_hash_equals_the_whole_text_hash():
    messages = [[{"role": "user", "content": f"问题 {i}"}, {"role": "assistant", "content": "ok", "z": i}] for i in range(5)]
    for parts in ((messages,), ([],), ([messages[0]],), ("template", {"b": 1, "a": [2, 3]}), (b"raw", messages)):
        assert _sha(*parts) == whole_text_sha(*parts)
    assert _sha(messages) != _sha(messages[:4])


def test_a_generator_of_items_hashes_like_their_list():
    messages = [[{"role": "user", "content": f"q{i}"}] for i in range(4)]
    assert _sha(m for m in messages) == _sha(messages) == whole_text_sha(messages)
