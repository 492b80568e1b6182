"""The streamed `data check` (data/tally.py) gives the numbers of the in-memory one (data/check.py) on the fixtures."""

import json
import random
from dataclasses import asdict
from pathlib import Path

import pytest

from chattune import config
from chattune.data import tally
from chattune.data.check import build_report, find_duplicates, render_both, scan_files
from chattune.data.formats import Conversation
from chattune.data.render import ChatRenderer
from chattune.model.load import load_tokenizer

from ..conftest import qwen3_tokenizer_dir

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "data"


@pytest.fixture(scope="module")
def renderer():
    return ChatRenderer(load_tokenizer(qwen3_tokenizer_dir(), config.ModelConfig()), {"enable_thinking": False})


def with_repeats(tmp_path: Path) -> Path:
    """alpaca.jsonl's rows, some repeated and some with another answer, plus one broken line."""
    rows = [json.loads(line) for line in (FIX / "alpaca.jsonl").read_text().splitlines() if line.strip()]
    rows += [rows[0], rows[2], {**rows[1], "output": "another answer"}, {**rows[0], "output": "long " * 60}, rows[0]]
    path = tmp_path / "repeats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"instruction": "x", "out\n')
    return path


def load_cfg(tmp_path: Path, *train: Path | str, method: str = "sft", max_length: int = 48, overlength: str = "truncate"):
    data = {"train": [str(p) for p in train], "max_length": max_length, "overlength": overlength,
            "on_bad_record": "skip"}
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps({"model": {"name_or_path": str(qwen3_tokenizer_dir())}, "data": data,
                                "train": {"method": method}, "output_dir": str(tmp_path / "run")}))
    return config.load(path)


def in_memory(cfg, renderer):
    files, convs = scan_files(cfg)
    rendered = render_both(renderer, convs, cfg)
    return build_report(cfg, files, convs, rendered, bins=8), rendered


def streamed(cfg, renderer, preview=0):
    scanned = tally.scan(cfg)
    groups = tally.duplicate_groups(scanned.digests, conflicts=cfg.train.method == "sft")
    counted, wheres = tally.render_pass(cfg, renderer, preview=preview, wanted={i for k in groups for g in k for i in g})
    return tally.streamed_report(cfg, scanned, counted, groups, wheres, bins=8), counted


@pytest.mark.parametrize("files, method, overlength", [
    (["alpaca.jsonl", "alpaca.json", "messages.jsonl", "sharegpt.json", "alpaca.csv"], "sft", "truncate"),
    (["repeats", "bad_line.jsonl", "qa_pairs.json"], "sft", "truncate"),
    (["repeats", "sharegpt.json"], "sft", "drop"),
    (["preference.json", "preference_flat.jsonl"], "dpo", "truncate"),
])
def test_streamed_report_equals_the_in_memory_one(files, method, overlength, tmp_path, renderer, monkeypatch):
    paths = [with_repeats(tmp_path) if f == "repeats" else FIX / f for f in files]
    cfg = load_cfg(tmp_path, *paths, method=method, overlength=overlength, max_length=48 if method == "sft" else 24)
    expected, rendered = in_memory(cfg, renderer)
    monkeypatch.setattr(tally, "RENDER_CHUNK", 3)  # several chunks, so the running numbers are merged
    report, counted = streamed(cfg, renderer, preview=4)
    assert asdict(report) == asdict(expected)
    assert report.render["truncated"] + report.render["dropped_overlength"] > 0  # max_length really cuts something
    assert [(s.input_ids, s.labels, s.where) for s in counted.previews] == \
        [(s.input_ids, s.labels, s.where) for s in rendered.full[:4]]
    if "repeats" in files:
        assert report.duplicates and (report.conflicts or method != "sft")


def test_duplicate_groups_match_find_duplicates_on_drawn_rows(tmp_path):
    rng = random.Random(7)
    convs = []
    for i in range(400):  # few distinct prompts and answers, so groups of every size and conflicts occur
        q, a = rng.randrange(25), rng.randrange(3)
        convs.append(Conversation([{"role": "user", "content": f"q{q}"}, {"role": "assistant", "content": f"a{a}"}],
                                  f"f.jsonl:{i + 1}"))
    digests = b"".join(tally._digest(c.messages) + tally._digest(c.prompt) + tally._digest(c.reference) for c in convs)
    import numpy as np

    same, conflicts = tally.duplicate_groups(np.frombuffer(digests, dtype=np.uint8).reshape(len(convs), 48))
    where = [c.where for c in convs]
    expected = find_duplicates(convs)
    assert expected[0] and expected[1]
    assert ([[where[i] for i in g] for g in same], [[where[i] for i in g] for g in conflicts]) == expected


def test_scan_counts_rows_and_keeps_bad_lines_with_their_location(tmp_path):
    cfg = load_cfg(tmp_path, FIX / "bad_line.jsonl", FIX / "alpaca.jsonl")
    scanned = tally.scan(cfg)
    bad, good = scanned.files
    assert (bad.rows, bad.valid, good.rows, good.valid, scanned.conversations) == (3, 2, 4, 4, 6)
    assert bad.invalid == [(f"{FIX / 'bad_line.jsonl'}:2", "line is not valid JSON: Expecting value (column 45)")]
    assert scanned.digests.shape == (6, 48)
