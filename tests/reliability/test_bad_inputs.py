"""The bad-input matrix: every user mistake exits with status 2 and one paragraph saying where, what and how to fix.

Each case runs the CLI (`chattune train`, in-process; a few in a subprocess) on the tiny model and reads
the message as a newcomer would: the file (and line or record index, and key), what is wrong, and a fix
after the dash. Never a traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chattune import cli

from .conftest import FIX


@pytest.fixture
def train(tmp_path, tiny_model_dir):
    """train(*overrides, config=None) -> cli.main's status for a quick run of the tiny model."""
    def run(*overrides: str, config: Path | None = None) -> int:
        if config is None:
            config = tmp_path / "c.yaml"
            config.write_text(f"model:\n  name_or_path: {tiny_model_dir}\n  dtype: fp32\n"
                              f"data:\n  train: {FIX / 'alpaca.json'}\n")
        return cli.main(["train", str(config), f"output_dir={tmp_path / 'run'}", "train.max_steps=1",
                         "train.batch_size=1", "train.grad_accum=1", "tracking.backends=[none]", "tracking.probe_size=0",
                         *overrides])
    return run


def message(capsys, status: int, *needles: str) -> str:
    """The error paragraph, after checking the exit status, the shape and that every needle is in it."""
    err = capsys.readouterr().err
    assert status == 2, err[-2000:]
    assert "Traceback" not in err
    text = err[err.index("error: "):].strip()
    assert "\n\n" not in text, "one paragraph"
    assert " — " in text, f"a fix follows the dash: {text}"
    for needle in needles:
        assert needle in text, f"{needle!r} not in: {text}"
    return text


def data(train, capsys, path: Path | str, *needles: str, extra: tuple[str, ...] = ()) -> str:
    return message(capsys, train(f"data.train={path}", *extra), *needles)


# ---------------------------------------------------------------------------
# data files


def test_malformed_json_names_the_line(train, capsys):
    data(train, capsys, FIX / "bad_json.json", "bad_json.json:3", "not valid JSON", "Expecting ',' delimiter", ".jsonl")


def test_bad_jsonl_line_names_the_line(train, capsys):
    data(train, capsys, FIX / "bad_line.jsonl", "bad_line.jsonl:2", "not valid JSON", "one complete JSON object")


def test_wrong_top_level_type(train, capsys):
    data(train, capsys, FIX / "wrong_top.json", "wrong_top.json", "the top level is an object", "[ ... ]")


def test_missing_field_names_record_and_key(train, capsys):
    data(train, capsys, FIX / "missing_output.json", "missing_output.json[0]", 'field "output" is missing',
         "data.on_bad_record=skip")


def test_empty_field_names_record_and_key(train, capsys):
    data(train, capsys, FIX / "empty_output.json", "empty_output.json[0]", 'field "output" is empty')


def test_non_string_field_shows_the_value(train, capsys):
    data(train, capsys, FIX / "non_string.json", "non_string.json[0]", 'field "output" is a number (2)',
         "double quotes")


def test_unknown_data_format_lists_the_choices(train, capsys):
    message(capsys, train("data.format=xml"), "data.format", "'alpaca', 'sharegpt' or 'messages'", "got 'xml'")


def test_unknown_file_type(train, capsys, tmp_path):
    (tmp_path / "rows.txt").write_text("question? answer.\n")
    data(train, capsys, tmp_path / "rows.txt", "rows.txt", "unsupported file type '.txt'", ".jsonl")


def test_unknown_record_layout_lists_the_keys(train, capsys, tmp_path):
    (tmp_path / "qa.jsonl").write_text('{"question": "Why?", "answer": "Because."}\n')
    data(train, capsys, tmp_path / "qa.jsonl", "qa.jsonl:1", "keys: question, answer", "alpaca (instruction/input/output)")


def test_empty_file(train, capsys):
    data(train, capsys, FIX / "empty.json", "empty.json", "file is empty")


def test_non_utf8_bytes_name_line_and_byte(train, capsys):
    data(train, capsys, FIX / "latin1.jsonl", "latin1.jsonl:1", "not valid UTF-8", "0xe8", "iconv")


def test_sharegpt_roles_out_of_order(train, capsys):
    data(train, capsys, FIX / "sharegpt_order.json", "sharegpt_order.json[0]", "two assistant turns in a row",
         "alternate")


def test_sharegpt_unknown_role_names_the_turn(train, capsys):
    data(train, capsys, FIX / "sharegpt_bad_role.json", "sharegpt_bad_role.json[0] conversations[1]",
         "unknown role 'robot'", "human", "gpt")


def test_conversation_without_an_assistant_turn(train, capsys):
    data(train, capsys, FIX / "sharegpt_no_assistant.json", "sharegpt_no_assistant.json[0]", "no assistant turn")


def test_nonexistent_file(train, capsys, tmp_path):
    data(train, capsys, tmp_path / "missing.json", "missing.json", "file not found", "relative to where you run")


def test_a_folder_instead_of_a_file(train, capsys, tmp_path):
    data(train, capsys, tmp_path, str(tmp_path), "is a folder")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file: chmod 000 is no test")
def test_unreadable_file(train, capsys, tmp_path):
    f = tmp_path / "secret.json"
    shutil.copy(FIX / "alpaca.json", f)
    f.chmod(0)
    try:
        data(train, capsys, f, "secret.json", "cannot read file", "permissions")
    finally:
        f.chmod(0o644)


def test_every_sample_too_long_to_keep(train, capsys):
    message(capsys, train("data.max_length=16", "data.overlength=drop"), "data.max_length", "no training samples left",
            "longer than data.max_length=16", "raise data.max_length")


def test_bom_loads_and_over_length_samples_are_reported_not_fatal(train, capsys, caplog, tmp_path):
    caplog.set_level("INFO", logger="chattune")
    assert train(f"data.train=[{FIX / 'bom.jsonl'}, {FIX / 'alpaca.json'}]", "data.max_length=32") == 0
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["files"][str(FIX / "bom.jsonl")] == 2, "a UTF-8 BOM is not an error"
    assert report["render"]["truncated"] > 0
    assert "longer than max_length=32 were truncated" in caplog.text and "raise data.max_length" in caplog.text


def test_skip_bad_records_reports_counts_and_writes_the_list(train, caplog, tmp_path):
    rows = [{"instruction": "Hi?", "output": "Hello."}, {"instruction": "Empty?", "output": ""},
            {"instruction": "No output?"}, {"instruction": "Again?", "output": ""}, {"instruction": "Ok?", "output": "Ok."}]
    (tmp_path / "mixed.json").write_text(json.dumps(rows))
    caplog.set_level("INFO", logger="chattune")
    assert train(f"data.train={tmp_path / 'mixed.json'}", "data.on_bad_record=skip") == 0
    assert 'skipped 3 of 5 record(s)' in caplog.text and '2x field "output" is empty' in caplog.text
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert [s["where"] for s in report["skipped"]] == [f"{tmp_path / 'mixed.json'}[{i}]" for i in (1, 2, 3)]


# ---------------------------------------------------------------------------
# the config


def test_bad_yaml_names_the_line(train, capsys, tmp_path):
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("model:\n  name_or_path: x\n data:\n  train: y.json\n")
    message(capsys, train(config=cfg), "broken.yaml:3", "not valid YAML", "indentation")


def test_missing_config_file(train, capsys, tmp_path):
    message(capsys, train(config=tmp_path / "nope.yaml"), "nope.yaml", "config file not found")


def test_unknown_key_suggests_the_right_one(train, capsys):
    message(capsys, train("train.learning_rat=1e-3"), "train.learning_rat: unknown key", "did you mean train.learning_rate?")


@pytest.mark.parametrize("override,needles", [
    ("lora.r=0", ("lora.r", "greater than or equal to 1", "got 0")),
    ("train.learning_rate=-1e-4", ("train.learning_rate", "greater than 0")),
    ("data.eval_ratio=1", ("data.eval_ratio", "less than 1", "got 1")),
    ("train.epochs=abc", ("train.epochs", "valid number", "got 'abc'")),
])
def test_out_of_range_values(train, capsys, override, needles):
    message(capsys, train(override), *needles, "chattune keys")


def test_every_problem_at_once_and_no_section_dump(train, capsys):
    text = message(capsys, train("lora.r=0", "data.eval_ratio=0.1", "data.eval_size=2"), "2 problem(s)", "lora.r",
                   "set data.eval_ratio or data.eval_size, not both")
    assert "Value error" not in text and "{" not in text, "a cross-key rule does not dump its whole section"


def test_override_without_a_value(train, capsys):
    message(capsys, train("train.epochs"), "'train.epochs' is not key=value", "train.epochs=2")


# ---------------------------------------------------------------------------
# incompatible options and models


def test_4bit_without_bitsandbytes(train, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` sees when it is not installed
    message(capsys, train("model.quantization=4bit"), "model.quantization=4bit", "bitsandbytes", "pip install")


def test_flash_attention_where_it_cannot_run(train, capsys):
    pytest.importorskip("torch")
    from transformers.utils import is_flash_attn_2_available

    if is_flash_attn_2_available():
        pytest.skip("flash-attention 2 runs on this machine")
    message(capsys, train("model.attn_implementation=flash_attention_2"), "model.attn_implementation",
            "flash_attention_2 is unavailable", "sdpa")


def test_padding_free_with_a_model_that_runs_its_own_attention(train, capsys, tmp_path, tiny_model_dir):
    remote = tmp_path / "remote-model"
    shutil.copytree(tiny_model_dir, remote)
    conf = json.loads((remote / "config.json").read_text())
    conf["auto_map"] = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (remote / "config.json").write_text(json.dumps(conf))
    message(capsys, train(f"model.name_or_path={remote}", "model.trust_remote_code=true"), "train.padding_free",
            "modeling_x.XForCausalLM", "train.padding_free=false")


def test_missing_model_folder(train, capsys, tmp_path):
    message(capsys, train(f"model.name_or_path={tmp_path / 'no-such-model'}"), "model.name_or_path",
            "no-such-model does not exist", "packaged model")


def test_folder_that_is_not_a_model(train, capsys, tmp_path):
    (tmp_path / "empty-model").mkdir()
    message(capsys, train(f"model.name_or_path={tmp_path / 'empty-model'}"), "model.name_or_path", "no config.json")


def test_truncated_safetensors(train, capsys, tmp_path, tiny_model_dir):
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    message(capsys, train(f"model.name_or_path={broken}"), str(weights), "damaged or incomplete", "cut short",
            "download or convert the model again")


def test_corrupt_gguf(train, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("CHATTUNE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "model.gguf").write_bytes(b"GGUF\x03\x00\x00\x00 not really")
    message(capsys, train(f"model.name_or_path={tmp_path / 'model.gguf'}"), "model.gguf", "cannot load",
            "as a GGUF model", "re-download")


def test_pickle_only_model_is_refused(train, capsys, tmp_path, tiny_model_dir):
    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled-model"
    shutil.copytree(tiny_model_dir, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    message(capsys, train(f"model.name_or_path={pickled}"), "pytorch_model.bin", "pickle", "model.allow_pickle=true")


def test_finished_run_needs_overwrite(train, capsys, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text("{}")
    message(capsys, train(), "a finished run is already there", "--overwrite", "output_dir=")


# ---------------------------------------------------------------------------
# a real process: status 2, the paragraph on stderr, no traceback


# "data" starts two processes that import torch and transformers and load the tokenizer: 102 s of the fast
# suite's 29 min on a shared 2-core CPU (load 10), about 30 s alone. "yaml" fails before those imports.
@pytest.mark.parametrize("case", ["yaml", pytest.param("data", marks=pytest.mark.slow)])
def test_real_process_exits_2_without_traceback(tmp_path, tiny_model_dir, case):
    cfg = tmp_path / "c.yaml"
    if case == "yaml":
        cfg.write_text("data:\n  train: [a.json\n")
        expected = "not valid YAML"
    else:
        cfg.write_text(f"model:\n  name_or_path: {tiny_model_dir}\ndata:\n  train: {FIX / 'bad_line.jsonl'}\n"
                       "tracking:\n  backends: [none]\n")
        expected = "bad_line.jsonl:2"
    proc = subprocess.run([sys.executable, "-m", "chattune.cli", "train", str(cfg), f"output_dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and expected in proc.stderr
    # With --debug the same mistake shows where in the code it was raised.
    debug = subprocess.run([sys.executable, "-m", "chattune.cli", "--debug", "train", str(cfg),
                            f"output_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
