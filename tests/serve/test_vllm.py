"""--engine vllm's command line, generation config and agreement report, built from real runs (no vLLM needed)."""

import json
import shutil

import pytest

from chattune.errors import ConfigError
from chattune.serve import vllm
from chattune.serve.adapters import load_engines, parse_names

from .conftest import SYSTEM_B


def test_the_command_line_carries_base_adapters_template_and_stop_ids(run_a, run_b, tiny_model_dir, tmp_path):
    model_dir, dtype, runs = vllm.read_runs([str(run_a), str(run_b)], [f"b={run_b}"])
    assert [r.name for r in runs] == [run_a.name, "b"] and runs[1].system == SYSTEM_B
    gen = vllm.write_generation_config(runs, tmp_path)
    cmd = vllm.vllm_command(model_dir, runs, gen, host="127.0.0.1", port=8123, dtype=dtype)
    assert cmd[0].endswith("vllm") and cmd[1:3] == ["serve", str(tiny_model_dir)]
    opts = dict(zip(cmd[3::1], cmd[4::1]))
    assert (opts["--host"], opts["--port"], opts["--served-model-name"], opts["--dtype"]) == ("127.0.0.1", "8123", "base",
                                                                                             "float32")
    assert "--enable-lora" in cmd and opts["--max-loras"] == "2" and opts["--max-lora-rank"] == "8"
    at = cmd.index("--lora-modules")
    assert cmd[at + 1:at + 3] == [f"{run_a.name}={run_a / 'adapter'}", f"b={run_b / 'adapter'}"]
    assert opts["--chat-template"] == str(run_a / "chat_template.jinja") == str(runs[0].template), "the training template"
    assert opts["--generation-config"] == str(tmp_path)
    eos = json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"]
    assert eos == sorted(set(runs[0].eos_ids) | set(runs[1].eos_ids)) and eos
    assert not any("key" in part.lower() for part in cmd), "the API key goes through VLLM_API_KEY, never argv"


def test_runs_on_different_bases_are_refused_naming_both(run_a, run_b, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(run_b, other)
    cfg = other / "run_config.yaml"
    cfg.write_text(cfg.read_text().replace("dtype: fp32", "dtype: bf16"))
    with pytest.raises(ConfigError) as exc:
        vllm.read_runs([str(run_a), str(other)], None)
    assert "share one base model" in exc.value.what
    with pytest.raises(ConfigError) as exc:
        load_engines([str(run_a), str(other)])
    assert "model.dtype" in exc.value.what and "share one base model" in exc.value.what


def test_names_are_unique_and_name_served_paths(run_a, run_b):
    assert parse_names([str(run_a), str(run_b)], [f"x={run_b}"]) == [(run_a.name, str(run_a)), ("x", str(run_b))]
    for names in ([f"same={run_a}", f"same={run_b}"], [f"base={run_a}"], ["nonsense"], [f"x={run_b}/elsewhere"]):
        with pytest.raises(ConfigError):
            parse_names([str(run_a), str(run_b)], names)


def test_agreement_counts_identical_answers_and_shows_the_others():
    ours = {"a": ["x", "y", "z"], "b": ["p", "q", "r"]}
    theirs = {"a": ["x", "y", "z"], "b": ["p", "Q", "r"]}
    same, total, diffs = vllm.agreement(ours, theirs)
    assert (same, total) == (5, 6) and len(diffs) == 1 and "'q'" in diffs[0] and "'Q'" in diffs[0]
