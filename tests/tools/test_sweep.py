"""`chattune sweep`: the grid, the run folders, the comparison table and plot, failures that do not stop it."""

import csv
import json
import struct
from pathlib import Path

import pytest
import yaml

from chattune import cli, config
from chattune.errors import ConfigError
from chattune.train import grid
from chattune.verbs import sweep

from .conftest import write_config


# ---------------------------------------------------------------------------
# the grid (no training)


def test_grid_arguments_split_on_top_level_commas_and_parse_as_yaml():
    axes = grid.parse_grid_args(["lora.r=8,64", "lora.target_modules=[q_proj,v_proj],all-linear",
                                  "model={name_or_path: gemma3-270m, chat_template: gemma},smollm2-135m"])
    assert axes["lora.r"] == [8, 64]
    assert axes["lora.target_modules"] == [["q_proj", "v_proj"], "all-linear"]
    assert axes["model"][0] == {"name_or_path": "gemma3-270m", "chat_template": "gemma"}
    with pytest.raises(ConfigError, match="is not KEY=V1,V2"):
        grid.parse_grid_args(["lora.r"])


@pytest.mark.parametrize("value", ["abc", "true", "1e-4", 1e-5, 8, None, [1, "a"], {"a": 1}, "a: b", "x,y", "",
                                   "你是一个法律专家，请根据用户的问题给出专业的回答", "Qwen/Qwen2.5-7B-Instruct"])
def test_override_text_parses_back_to_the_same_value(value):
    assert yaml.safe_load(grid.yaml_value(value)) == value


def test_every_combination_once_with_unique_readable_names():
    axes = {"model": [{"name_or_path": "Qwen/Qwen2.5-0.5B-Instruct"}, {"name_or_path": "gemma3-270m", "chat_template": "gemma"}],
            "lora.r": [8, 64], "train.learning_rate": [1e-4]}
    points = grid.plan(axes)
    assert [p.name for p in points] == ["Qwen2.5-0.5B-Instruct_r8", "Qwen2.5-0.5B-Instruct_r64", "gemma3-270m_r8",
                                        "gemma3-270m_r64"]  # the single-valued key is not in the names
    assert points[2].overrides == ["model.name_or_path=gemma3-270m", "model.chat_template=gemma", "lora.r=8",
                                   "train.learning_rate=0.0001"]
    assert grid.column_keys(axes) == ["model.name_or_path", "model.chat_template", "lora.r", "train.learning_rate"]
    same = grid.plan({"data.train": [["a/x.json"], ["b/x.json"]]})
    assert len({p.name for p in same}) == 2


def test_config_grid_and_command_line_grid_merge(tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path, tiny_model_dir, sweep="{grid: {lora.r: [4, 8], lora.alpha: [8, 16]}}")
    loaded = config.load(cfg)
    axes = grid.merge_grid(loaded.sweep.grid, grid.parse_grid_args(["lora.r=2"]))
    assert axes == {"lora.r": [2], "lora.alpha": [8, 16]}
    with pytest.raises(ConfigError, match="nothing to sweep"):
        grid.merge_grid({}, {})
    with pytest.raises(ConfigError, match="output_dir cannot be swept"):
        grid.merge_grid({}, {"output_dir": ["a", "b"]})


def test_bad_values_are_reported_for_all_runs_before_any_training(tmp_path, tiny_model_dir, capsys):
    cfg = write_config(tmp_path, tiny_model_dir)
    assert cli.main(["sweep", str(cfg), "--grid", "lora.r=0,-1,4", "--in-process"]) == 2
    err = capsys.readouterr().err
    assert "2 of 3 run config(s) are invalid" in err and "r0: " in err and "r-1: " in err and "lora.r" in err
    assert not (tmp_path / "sweep").exists(), "nothing trained, nothing written"


def test_dry_run_shows_the_plan_with_one_tracking_project(tmp_path, tiny_model_dir, capsys):
    cfg = write_config(tmp_path, tiny_model_dir)
    assert cli.main(["sweep", str(cfg), "--grid", "lora.r=4,8", "--grid", "lora.dropout=0,0.1", "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "4 runs" in err and "r4_drop0.1" in err and "SwanLab project 'sweep'" in err
    assert not (tmp_path / "sweep").exists()
    points = grid.plan({"lora.r": [4, 8]})
    shared = ["tracking.swanlab.project=p", "sweep.grid={}"]
    loaded = [config.load(cfg, sweep.run_overrides(p, shared, tmp_path / "sweep")) for p in points]
    assert {c.tracking.swanlab.project for c in loaded} == {"p"}
    assert [c.output_dir for c in loaded] == [str(tmp_path / "sweep" / "r4"), str(tmp_path / "sweep" / "r8")]
    assert all(c.sweep.grid == {} for c in loaded), "a run's own config carries no grid"


# ---------------------------------------------------------------------------
# a real sweep (tests/tools/conftest.py: lora.r=4,8, train.max_steps=2, in-process)


def test_two_runs_each_a_complete_run_directory(sweep_dir):
    for name, r in (("r4", 4), ("r8", 8)):
        run = sweep_dir / name
        assert (run / "summary.json").is_file() and (run / "adapter" / "adapter_model.safetensors").is_file()
        cfg = yaml.safe_load((run / "run_config.yaml").read_text())
        assert cfg["lora"]["r"] == r and cfg["train"]["max_steps"] == 2 and cfg["sweep"]["grid"] == {}
        assert json.loads((run / "model_info.json").read_text())["trainable_params"] > 0
    state = json.loads((sweep_dir / "sweep.json").read_text())
    assert [(r["name"], r["status"]) for r in state["runs"]] == [("r4", "finished"), ("r8", "finished")]
    assert state["grid"] == {"lora.r": [4, 8]}


def test_comparison_table_as_markdown_and_csv(sweep_dir):
    rows = list(csv.DictReader((sweep_dir / "comparison.csv").open(encoding="utf-8")))
    assert [r["run"] for r in rows] == ["r4", "r8"] and [r["lora.r"] for r in rows] == ["4", "8"]
    for r in rows:
        for col in ("final train loss", "best train loss", "final eval loss", "tokens/s", "wall time (s)", "trainable params"):
            assert r[col] != "", col
        assert float(r["best train loss"]) <= float(r["final train loss"])
        metrics = [json.loads(l) for l in (sweep_dir / r["run"] / "metrics.jsonl").read_text().splitlines()]
        assert float(r["final train loss"]) == [m["loss"] for m in metrics if "loss" in m][-1]
        assert float(r["final eval loss"]) == [m["eval_loss"] for m in metrics if "eval_loss" in m][-1]
    # LoRA rank doubles -> trainable parameters double (same modules, same shapes).
    assert int(rows[1]["trainable params"]) == 2 * int(rows[0]["trainable params"])
    md = (sweep_dir / "comparison.md").read_text(encoding="utf-8")
    assert "| run | status | lora.r |" in md and "| r8 | finished | 8 |" in md


def assert_loss_curves_png(path: Path) -> None:
    """A PNG that decodes, of the size its header states (over 600 x 400), with more than a blank canvas."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 600 and height > 400
    from matplotlib import image

    pixels = image.imread(path)
    assert pixels.shape[:2] == (height, width)
    assert len({tuple(p) for p in pixels.reshape(-1, pixels.shape[-1])[:: 97].tolist()}) > 2, "curves drawn"


def test_loss_curves_png(sweep_dir):
    assert_loss_curves_png(sweep_dir / "loss_curves.png")


def test_a_rerun_keeps_finished_runs(sweep_dir, capsys):
    cfg = sweep_dir.parent / "sweep.yaml"
    before = (sweep_dir / "r4" / "summary.json").stat().st_mtime_ns
    assert cli.main(["sweep", str(cfg), "--grid", "lora.r=4,8", "train.max_steps=2", "--in-process"]) == 0
    assert (sweep_dir / "r4" / "summary.json").stat().st_mtime_ns == before
    state = json.loads((sweep_dir / "sweep.json").read_text())
    assert {r["status"] for r in state["runs"]} == {"kept"}


def test_a_run_directory_cannot_hold_a_sweep(sweep_dir, capsys):
    cfg = sweep_dir.parent / "sweep.yaml"
    assert cli.main(["sweep", str(cfg), "--grid", "lora.r=4,8", f"output_dir={sweep_dir / 'r4'}", "--dry-run"]) == 2
    assert "output_dir is a run directory" in capsys.readouterr().err


def test_a_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path, tiny_model_dir, capsys):
    cfg = write_config(tmp_path, tiny_model_dir)
    missing = tmp_path / "no-such-model"
    rc = cli.main(["sweep", str(cfg), "--grid", f"model.name_or_path={missing},{tiny_model_dir}", "train.max_steps=1",
                   "tracking.probe_size=0", "--in-process"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "1 of 2 runs failed: no-such-model" in err and "Traceback" not in err
    state = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [r["status"] for r in state["runs"]] == ["failed", "finished"]
    assert "does not exist" in state["runs"][0]["error"]
    rows = list(csv.DictReader((tmp_path / "sweep" / "comparison.csv").open(encoding="utf-8")))
    assert [(r["run"], r["status"]) for r in rows] == [("no-such-model", "failed"), (tiny_model_dir.name, "finished")]
    assert "## Failed runs" in (tmp_path / "sweep" / "comparison.md").read_text()


@pytest.mark.slow
def test_subprocess_mode_logs_each_run_and_records_its_error(tmp_path, tiny_model_dir):
    """The default mode: one `chattune train` process per run, its output kept in logs/<run>.log."""
    cfg = write_config(tmp_path, tiny_model_dir)
    rc = cli.main(["sweep", str(cfg), "--grid", f"model.name_or_path={tmp_path / 'missing'},{tiny_model_dir}",
                   "train.max_steps=1", "tracking.probe_size=0"])
    assert rc == 2
    root = tmp_path / "sweep"
    state = json.loads((root / "sweep.json").read_text())
    assert [r["status"] for r in state["runs"]] == ["failed", "finished"]
    assert "does not exist" in state["runs"][0]["error"] and "exit status 2" in state["runs"][0]["error"]
    assert "chattune.cli train" in state["runs"][1]["command"]
    assert "done: 1 steps" in (root / "logs" / f"{tiny_model_dir.name}.log").read_text()
    assert (root / tiny_model_dir.name / "summary.json").is_file()
    assert_loss_curves_png(root / "loss_curves.png")
