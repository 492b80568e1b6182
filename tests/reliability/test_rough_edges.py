"""Errors that point at the real cause, and outputs without rough edges (docs/reliability.md, "Rough edges")."""

from __future__ import annotations

import csv
import importlib.abc
import importlib.machinery
import io
import logging
import sys
from pathlib import Path

import pytest

from chattune import cli
from chattune.config import ModelConfig
from chattune.errors import MissingDependencyError, ModelError
from chattune.model import sources
from chattune.report.table import write_csv

from .conftest import FIX


@pytest.fixture
def no_hub(monkeypatch):
    """Fail the test if anything asks the Hugging Face Hub."""
    def refuse(*a, **k):
        raise AssertionError("the hub was asked")
    monkeypatch.setattr(sources, "_hf_snapshot_download", refuse)


@pytest.fixture
def ok_config(tmp_path) -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  name_or_path: smollm2-135m\ndata:\n  train: {FIX / 'alpaca.json'}\n")
    return cfg


@pytest.mark.parametrize("typo,meant", [("smollm2-135", "smollm2-135m"), ("SmolLM2-135M-", "smollm2-135m"),
                                        ("gemma3-270", "gemma3-270m")])
def test_a_typod_alias_asks_did_you_mean(typo, meant, no_hub):
    with pytest.raises(ModelError, match=f"did you mean {meant}\\?"):
        sources.resolve_model_dir(typo)


def test_a_missing_relative_folder_is_not_looked_up_on_the_hub(tmp_path, monkeypatch, no_hub, ok_config, capsys):
    monkeypatch.chdir(tmp_path)  # no ./models here
    assert cli.main(["train", str(ok_config), "model.name_or_path=models/my-model",
                     f"output_dir={tmp_path / 'runs' / 'x'}"]) == 2
    err = capsys.readouterr().err
    assert "no such local folder" in err and str(tmp_path / "models" / "my-model") in err
    assert not (tmp_path / "runs" / "x").exists(), "a failed run leaves no empty output folder behind"
    assert not any((tmp_path / "runs").glob(".x.lock")), "nor its lock"


def test_hub_ids_still_go_to_the_hub(monkeypatch):
    asked = []
    monkeypatch.setattr(sources, "_hf_snapshot_download", lambda repo, **k: asked.append(repo) or "/nonexistent")
    with pytest.raises(ModelError):
        sources.resolve_model_dir("Qwen/Qwen2.5-0.5B-Instruct")
    assert asked == ["Qwen/Qwen2.5-0.5B-Instruct"]


def test_override_errors_name_the_override_not_the_file(ok_config, capsys):
    assert cli.main(["train", str(ok_config), "train.learning_rate=abc", "lora.r=0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: command line: 2 problem(s)") and str(ok_config) not in err
    assert "[from the command line: train.learning_rate=abc]" in err and "[from the command line: lora.r=0]" in err


def test_file_and_override_errors_together_say_both(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  name_or_path: x\ndata:\n  train: {FIX / 'alpaca.json'}\nlora:\n  r: 0\n")
    assert cli.main(["train", str(cfg), "train.epochs=-1"]) == 2
    err = capsys.readouterr().err
    assert f"error: {cfg} and the command line" in err
    assert "lora.r: Input should be greater than or equal to 1 (got 0)\n" in err  # from the file: no tag
    assert "[from the command line: train.epochs=-1]" in err


def test_an_unclosed_bracket_points_at_the_line_it_opened(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  name_or_path: x\nlora:\n  target_modules: [q_proj, v_proj\n  r: 8\n"
                   "data:\n  train: d.json\n")
    assert cli.main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"{cfg}:4: not valid YAML: a [ list opened on this line is never closed" in err


class _BrokenBitsandbytes(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """bitsandbytes that is installed (find_spec finds it) but fails to import, like a missing native library."""

    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.ModuleSpec(name, self) if name == "bitsandbytes" else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise OSError("libbitsandbytes_cpu.so: cannot open shared object file: No such file or directory")


def test_broken_bitsandbytes_is_a_dependency_problem(monkeypatch):
    import torch

    from chattune.model.quant import to_bnb_config

    monkeypatch.delitem(sys.modules, "bitsandbytes", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_BrokenBitsandbytes(), *sys.meta_path])
    with pytest.raises(MissingDependencyError) as exc:
        to_bnb_config(ModelConfig(name_or_path="x", quantization="4bit"), torch.float32)
    text = exc.value.render()
    assert "installed but broken" in text and "libbitsandbytes_cpu.so" in text
    assert "pip install --force-reinstall 'bitsandbytes==0.50.2'" in text and "model.quantization=none" in text
    assert "model folder" not in text


def test_deepspeeds_cpu_note_stays_off_stdout(caplog):
    ds = logging.getLogger("DeepSpeed")
    out = io.StringIO()
    handler = logging.StreamHandler(out)  # DeepSpeed's own handler writes to sys.stdout
    ds.addHandler(handler)
    try:
        cli.keep_deepspeed_off_stdout()
        cli.keep_deepspeed_off_stdout()  # installed once
        caplog.set_level("DEBUG", logger="chattune")
        ds.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
        ds.warning("some other DeepSpeed warning")
    finally:
        ds.removeHandler(handler)
    assert out.getvalue() == "some other DeepSpeed warning\n"
    assert "deepspeed: Setting accelerator to CPU" in caplog.text
    assert sum(type(f).__name__ == "_OffStdout" for f in ds.filters) == 1


def test_csv_floats_have_no_noise(tmp_path):
    path = write_csv([{"run": "a", "wall time (s)": 178.39999999999998, "loss": 0.1 + 0.2, "tiny": 1e-7 * 3,
                       "steps": 12, "eval": None, "big": 123456789.123456789, "loss2": 11.80251407623291}],
                     tmp_path / "t.csv")
    (row,) = csv.DictReader(path.open(encoding="utf-8"))
    assert row == {"run": "a", "wall time (s)": "178.4", "loss": "0.3", "tiny": "3e-07", "steps": "12", "eval": "",
                   "big": "123456789.12345679", "loss2": "11.80251407623291"}
    assert float(row["loss2"]) == 11.80251407623291, "a measured value reads back unchanged"


def test_the_sweep_table_is_markdown_when_stdout_is_not_a_terminal(capsys):
    from chattune.verbs.sweep import show_table

    rows = [{"run": "r8_lr1e-4", "status": "finished", "lora.r": 8, "final train loss": 1.23456, "tokens/s": 1234.5,
             "wall time (s)": 178.39999999999998},
            {"run": "r16_lr1e-4", "status": "finished", "lora.r": 16, "final train loss": 1.1, "tokens/s": 999.0,
             "wall time (s)": 200.0}]
    show_table(rows)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| run | status | lora.r | final train loss | tokens/s | wall time (s) |"
    assert lines[2] == "| r8_lr1e-4 | finished | 8 | 1.2346 | 1,234 | 178 |"
    assert len(lines) == 4, "one line per run, nothing folded"


@pytest.fixture(scope="module")
def qwen_tokenizer():
    from transformers import AutoTokenizer

    from tests.conftest import qwen3_tokenizer_dir

    return AutoTokenizer.from_pretrained(qwen3_tokenizer_dir())


@pytest.mark.parametrize("char", ["🦙", "鿰", "쀍"])
def test_an_answer_cut_inside_a_character_ends_at_the_last_whole_one(qwen_tokenizer, char):
    from chattune.infer.generate import decode_answer

    ids = qwen_tokenizer("Answer: yes " + char, add_special_tokens=False)["input_ids"]
    assert qwen_tokenizer.decode(ids[:-1]).endswith("\ufffd"), "the character spans several tokens"
    assert decode_answer(qwen_tokenizer, ids[:-1]) == "Answer: yes"
    assert decode_answer(qwen_tokenizer, ids) == "Answer: yes " + char


def test_a_streamed_answer_holds_back_a_cut_character():
    from chattune.infer.stream import whole_pieces

    assert list(whole_pieces(["Hello ", "wor", "ld \ufffd"])) == ["Hello ", "wor", "ld "]
    # a replacement character followed by more text was not a cut: it is shown with what follows
    assert "".join(whole_pieces(["a\ufffd", "b"])) == "a\ufffdb"
