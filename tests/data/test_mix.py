"""data.train entries {path, fraction} / {path, samples}: how many rows each file gives, drawn with a fixed seed."""

from pathlib import Path

import pytest

from chattune.config import load, validate
from chattune.errors import ConfigError
from chattune.train.inputs import load_training_data

FIX = Path(__file__).parents[1] / "fixtures" / "data"


def _cfg(*overrides):
    return load(None, list(overrides))


def test_fraction_and_samples_give_the_rows_asked_for():
    n = len(load_training_data(_cfg(f"data.train={FIX / 'alpaca.json'}"))[0])
    m = len(load_training_data(_cfg(f"data.train={FIX / 'sharegpt.json'}"))[0])
    cfg = _cfg(f"data.train=[{FIX / 'sharegpt.json'}, {{path: {FIX / 'alpaca.json'}, fraction: 0.5}}]")
    convs, report = load_training_data(cfg)
    assert len(convs) == m + round(n / 2)
    assert report.mix[str(FIX / "alpaca.json")] == {"rows": n, "used": round(n / 2), "fraction": 0.5}
    assert report.mix[str(FIX / "sharegpt.json")] == {"rows": m, "used": m}
    again, _ = load_training_data(cfg)
    assert [c.where for c in again] == [c.where for c in convs], "same seed, same rows"
    other, _ = load_training_data(_cfg(f"data.train=[{FIX / 'sharegpt.json'}, {{path: {FIX / 'alpaca.json'}, fraction: 0.5}}]",
                                       "train.seed=7"))
    assert [c.where for c in other] != [c.where for c in convs], "the seed picks the rows"
    big, report = load_training_data(_cfg(f"data.train=[{{path: {FIX / 'alpaca.json'}, samples: {2 * n + 1}}}]"))
    assert len(big) == 2 * n + 1 and report.per_file == {str(FIX / "alpaca.json"): 2 * n + 1}
    assert len({c.where for c in big}) == n, "a count over the file's size repeats it"


@pytest.mark.parametrize("entry, what", [
    ({"path": "a.json", "fraction": 1.5}, "less than or equal to 1"),
    ({"path": "a.json", "fraction": -0.2}, "greater than 0"),
    ({"path": "a.json", "samples": 0}, "greater than or equal to 1"),
    ({"path": "a.json", "fraction": 0.5, "samples": 3}, "not both"),
])
def test_bad_amounts_are_config_errors(entry, what):
    with pytest.raises(ConfigError) as info:
        validate({"data": {"train": ["b.json", entry]}})
    assert "data.train.1" in info.value.what and what in info.value.what
