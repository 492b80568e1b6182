"""model.source=modelscope with the real modelscope package, offline: its cache is used, a miss is a clear error."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from chattune.errors import ModelError
from chattune.model.sources import resolve_model_dir

pytestmark = pytest.mark.skipif(importlib.util.find_spec("modelscope") is None,
                                reason="the modelscope extra is not installed (pip install 'chattune[modelscope]')")

# Never real repos: with or without network, only the prepared cache can answer. Two ids, because
# modelscope remembers a resolved snapshot for the rest of the process.
MODEL_ID = "chattune-test/no-such-model"
UNCACHED_ID = "chattune-test/never-cached"


@pytest.fixture
def offline_modelscope(monkeypatch, tmp_path) -> Path:
    """An empty MODELSCOPE_CACHE, and an endpoint that refuses connections at once."""
    cache = tmp_path / "modelscope"
    monkeypatch.setenv("MODELSCOPE_CACHE", str(cache))
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", "http://127.0.0.1:9")
    return cache


def test_cached_snapshot_is_used_when_the_hub_is_unreachable(offline_modelscope):
    repo = offline_modelscope / "models" / MODEL_ID.replace("/", "--")
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot / "model.safetensors").write_bytes(b"")
    (repo / "refs").mkdir()
    (repo / "refs" / "master").write_text("0123abcd")
    assert resolve_model_dir(MODEL_ID, source="modelscope") == snapshot


def test_uncached_and_unreachable_is_one_clear_error(offline_modelscope):
    with pytest.raises(ModelError) as info:
        resolve_model_dir(UNCACHED_ID, source="modelscope")
    assert info.value.where == "model.name_or_path"
    assert f"cannot get the model {UNCACHED_ID!r} from ModelScope" in info.value.what
    assert "modelscope download --model" in info.value.fix
