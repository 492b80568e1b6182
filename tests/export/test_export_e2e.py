"""`chattune export` end to end with llama.cpp: GGUF + Modelfile + parity for each family chattune trains.

Needs the [gguf] extra (llama-cpp-python, built from source) and llama.cpp's converter (`make setup`);
skipped with the reason otherwise. Slow: each test merges, converts and answers with two runtimes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chattune import cli
from chattune.errors import installed
from chattune.export import gguf_build, parity


def _skip_reason() -> str | None:
    if not installed("llama_cpp"):
        return "llama-cpp-python is not installed (pip install 'chattune[gguf]'; builds llama.cpp from source once)"
    from chattune.export.llamacpp import converter_dir

    try:
        converter_dir()
    except ImportError as exc:
        return f"llama.cpp's converter is not installed: {exc}"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))]


def _gguf_metadata(path: Path) -> dict:
    import gguf

    r = gguf.GGUFReader(str(path))
    keys = ("tokenizer.chat_template", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
    return {k: r.fields[k].contents() for k in keys if k in r.fields}


def _export(run: Path, *args: str) -> int:
    return cli.main(["export", str(run), "--check-max-new-tokens", "12", *args])


@pytest.fixture(scope="module")
def tiny_export(tiny_run):
    """The tiny Qwen2 run (ChatML) exported for Ollama at f16."""
    assert _export(tiny_run, "--to", "ollama", "--quant", "f16") == 0
    return tiny_run / "export" / "f16"


def test_f16_export_carries_the_runs_template_and_stop_ids(tiny_export, tiny_run):
    (gguf_file,) = tiny_export.glob("*.gguf")
    assert gguf_file.name == "run-f16.gguf"
    meta = _gguf_metadata(gguf_file)
    assert meta["tokenizer.chat_template"] == (tiny_run / "chat_template.jinja").read_text()
    assert meta["tokenizer.ggml.eot_token_id"] == 151645, "<|im_end|> closes the turn"
    assert not [p for p in tiny_export.parent.iterdir() if p.name.startswith(".")], "no temporary folder left"
    assert not (tiny_export / ".merged").exists() and not list(tiny_export.glob("*.tmp"))


def test_f16_parity_agrees_and_stops(tiny_export):
    result = json.loads((tiny_export / "parity.json").read_text())
    assert result["strict"] and result["passed"] and result["agreement"] >= parity.MIN_AGREEMENT
    assert all(r["same_prompt_ids"] for r in result["rows"]), "llama.cpp rendered and tokenised the same prompt"
    assert result["stops_where_chattune_stops"]


def test_modelfile_for_ollama(tiny_export, capsys):
    text = (tiny_export / "Modelfile").read_text()
    assert "FROM ./run-f16.gguf" in text and 'PARAMETER stop "<|im_end|>"' in text
    assert 'SYSTEM """You are a terse test bot."""' in text and "<|im_start|>{{ $m.Role }}" in text


def test_quantised_export_reports_without_failing(tiny_run, tiny_export, capsys):
    assert _export(tiny_run, "--quant", "q8_0", "--name", "q8") == 0
    folder = tiny_run / "export" / "q8"
    result = json.loads((folder / "parity.json").read_text())
    assert result["strict"] is False and result["passed"] is None and result["repack"] is False
    assert 0 <= result["mean_matching_tokens"] and "agreement" in capsys.readouterr().out
    assert (folder / "run-q8_0.gguf").stat().st_size < (tiny_export / "run-f16.gguf").stat().st_size
    assert not (folder / "Modelfile").exists(), "--to gguf writes no Modelfile"


def test_quantised_files_load_without_repacking_and_the_switch_is_restored(tiny_run, tiny_export):
    import llama_cpp

    from chattune.export.llamacpp import open_model

    (q8,) = (tiny_run / "export" / "q8").glob("*.gguf")
    llm = open_model(q8, n_ctx=128)
    try:
        assert llm.model_params.use_extra_bufts is False, "loaded as llama.cpp --no-repack"
        assert len(list(zip(range(3), llm.generate(llm.tokenize(b"hi"), top_k=1, temp=0.0)))) == 3, "it decodes"
    finally:
        llm.close()
    assert llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts is True, "llama.cpp's default is left as is"


def test_a_failed_strict_check_exits_3_and_keeps_the_files(tiny_run, monkeypatch, capsys):
    real_ours, real_theirs = parity.chattune_answers, parity.llama_answers

    def stopping(*args):  # chattune's answers end with the end-of-turn token ...
        return [parity.Answer(a.text, a.ids, True, a.prompt_ids, a.prompt_text) for a in real_ours(*args)]

    def runaway(*args):  # ... and llama.cpp's run on, as if it did not know that token
        return [parity.Answer(a.text + " more", a.ids, False, a.prompt_ids, a.prompt_text) for a in real_theirs(*args)]

    monkeypatch.setattr("chattune.verbs.export.chattune_answers", stopping)
    monkeypatch.setattr("chattune.verbs.export.llama_answers", runaway)
    assert _export(tiny_run, "--name", "broken") == 3
    err = capsys.readouterr().err
    assert "likely cause: stop ids" in err
    assert json.loads((tiny_run / "export" / "broken" / "parity.json").read_text())["passed"] is False


def test_existing_export_and_disk_space(tiny_run, tiny_export, monkeypatch, capsys):
    assert _export(tiny_run, "--to", "ollama", "--quant", "f16") == 2
    assert "--overwrite" in capsys.readouterr().err
    monkeypatch.setattr(gguf_build.shutil, "disk_usage", lambda p: type("U", (), {"free": 1 << 20})())
    assert _export(tiny_run, "--name", "nospace") == 2
    assert "not enough disk space" in capsys.readouterr().err and not (tiny_run / "export" / "nospace").exists()


# ---------------------------------------------------------------- the other families


def _train(tmp: Path, model: str, *overrides: str) -> Path:
    fixture = Path(__file__).parents[1] / "fixtures" / "data" / "alpaca.json"
    cfg = tmp / "c.yaml"
    cfg.write_text(f"model:\n  name_or_path: {model}\n  dtype: fp32\ndata:\n  train: {fixture}\n  system: Be brief.\n")
    assert cli.main(["train", str(cfg), f"output_dir={tmp / 'run'}", "train.max_steps=2", "train.batch_size=2",
                     "train.grad_accum=1", "tracking.probe_size=2", "tracking.probe_max_new_tokens=4",
                     "tracking.backends=[none]", *overrides]) == 0
    return tmp / "run"


def _check_family(run: Path, eot_text: str) -> None:
    assert _export(run, "--to", "ollama", "--quant", "f16") == 0
    folder = run / "export" / "f16"
    result = json.loads((folder / "parity.json").read_text())
    assert result["passed"], result["rows"]
    (gguf_file,) = folder.glob("*.gguf")
    meta = json.loads((folder / "export.json").read_text())["gguf"]
    assert meta["stop_tokens"][str(meta["eot_token_id"])] == eot_text
    assert f'PARAMETER stop "{eot_text}"' in (folder / "Modelfile").read_text()


def test_smollm2(tmp_path, use_session_cache):
    _check_family(_train(tmp_path, "smollm2-135m"), "<|im_end|>")


def test_gemma3(tmp_path, use_session_cache, gemma3_dir):
    _check_family(_train(tmp_path, "gemma3-270m", "model.chat_template=gemma"), "<end_of_turn>")


def test_glm4_layout_on_a_tiny_glm4_model(tmp_path):
    import torch
    from transformers import AutoTokenizer, Glm4Config, Glm4ForCausalLM

    from ..conftest import qwen3_tokenizer_dir

    out = tmp_path / "glm4"
    tok = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir())
    tok.add_special_tokens({"additional_special_tokens": ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>",
                                                         "<|observation|>"]}, replace_extra_special_tokens=False)
    tok.eos_token, tok.chat_template = "<|endoftext|>", None
    tok.save_pretrained(out)
    torch.manual_seed(0)
    cfg = Glm4Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    Glm4ForCausalLM(cfg).save_pretrained(out)
    _check_family(_train(tmp_path, str(out), "model.chat_template=glm4"), "<|user|>")

