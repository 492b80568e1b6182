"""The config tree: defaults, overrides, all errors at once, every shipped config valid."""

from pathlib import Path

import pytest

from chattune import config
from chattune.errors import ConfigError

ROOT = Path(__file__).parents[1]


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_live_in_the_schema(tmp_path):
    cfg = config.load(write(tmp_path, "data:\n  train: x.json\n"))
    assert cfg.lora.r == 8 and cfg.model.trust_remote_code is False
    assert cfg.data.train == ["x.json"]  # one file becomes a list


def test_overrides_parse_like_yaml(tmp_path):
    cfg = config.load(write(tmp_path, "data:\n  train: x.json\n"),
                      ["lora.r=64", "train.learning_rate=2e-4", "lora.target_modules=q_proj,v_proj",
                       "train.gradient_checkpointing=true", "data.template_kwargs={enable_thinking: false}"])
    assert cfg.lora.r == 64 and cfg.train.learning_rate == 2e-4
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.gradient_checkpointing is True
    assert cfg.data.template_kwargs == {"enable_thinking": False}


def test_all_problems_are_reported_together_with_suggestions(tmp_path):
    with pytest.raises(ConfigError) as info:
        config.load(write(tmp_path, "data:\n  train: x.json\n  formt: alpaca\nlora:\n  r: 0\n  dropout: 1.5\n"),
                    ["train.lerning_rate=1"])
    text = info.value.render()
    assert "4 problem(s)" in text
    assert "data.formt: unknown key; did you mean data.format?" in text
    assert "train.lerning_rate: unknown key; did you mean train.learning_rate?" in text
    assert "lora.r: Input should be greater than or equal to 1 (got 0)" in text
    assert "lora.dropout" in text


def test_bad_literal_lists_the_choices(tmp_path):
    with pytest.raises(ConfigError, match="model.dtype: Input should be 'auto', 'bf16', 'fp16' or 'fp32'"):
        config.load(write(tmp_path, "data:\n  train: x.json\nmodel:\n  dtype: float8\n"))


def test_missing_training_data_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="data.train is empty"):
        config.load(write(tmp_path, "model:\n  dtype: bf16\n"))


def test_bad_yaml_names_the_line(tmp_path):
    with pytest.raises(ConfigError) as info:
        config.load(write(tmp_path, "data:\n  train: [a.json\nlora:\n  r: 8\n"))
    assert info.value.where.startswith(str(tmp_path / "c.yaml") + ":")


def test_override_without_equals(tmp_path):
    with pytest.raises(ConfigError, match="is not key=value"):
        config.load(write(tmp_path, "data:\n  train: x.json\n"), ["lora.r"])


def test_dump_then_load_round_trips(tmp_path):
    cfg = config.load(write(tmp_path, "data:\n  train: x.json\n  system: 你好\n"), ["lora.r=4"])
    config.dump(cfg, tmp_path / "run_config.yaml")
    assert config.load(tmp_path / "run_config.yaml") == cfg


def test_every_key_has_help():
    keys = list(config.iter_keys())
    assert len(keys) > 30
    assert all(help_ for _, _, help_ in keys), [k for k, _, h in keys if not h]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate_and_say_how_to_run(path):
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# chattune ") and path.name in first
    config.load(path)
