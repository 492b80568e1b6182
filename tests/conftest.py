"""Shared fixtures: the packaged smollm2-135m model, converted once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CHATTUNE_CACHE shared by the whole session, so the packaged model is converted only once."""
    return tmp_path_factory.mktemp("chattune-cache")


@pytest.fixture(scope="session")
def smollm2_dir(session_cache: Path) -> Path:
    """The smollm2-135m alias converted to a plain HF folder (about half a minute, once per session)."""
    from chattune.model.sources import resolve_model_dir

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHATTUNE_CACHE", str(session_cache))
        return resolve_model_dir("smollm2-135m")


@pytest.fixture
def use_session_cache(monkeypatch: pytest.MonkeyPatch, session_cache: Path, smollm2_dir: Path) -> Path:
    """Point CHATTUNE_CACHE at the session cache for one test, with smollm2-135m already converted there."""
    monkeypatch.setenv("CHATTUNE_CACHE", str(session_cache))
    return session_cache
