"""`chattune data check`: counts on a crafted data file, checked against an independent tokenisation."""

import json
from pathlib import Path

import pytest

from chattune import cli
from chattune.config import ModelConfig
from chattune.data.check import histogram, mask_segments
from chattune.data.formats import Conversation
from chattune.data.render import ChatRenderer
from chattune.model.load import load_tokenizer

MAX = 64
LONG = " word" * 100  # 100 tokens with the Qwen3 tokenizer


def crafted_rows() -> list[dict]:
    """3 short samples (+1 duplicate, +1 conflicting answer), 2 long answers, 1 long prompt, 1 invalid row."""
    return [
        {"instruction": "Short question one?", "output": "Short answer."},      # [0]
        {"instruction": "Short question two?", "output": "Another answer."},    # [1]
        {"instruction": "Short question three?", "output": "Third answer."},    # [2]
        {"instruction": "Short question one?", "output": "Short answer."},      # [3] duplicate of [0]
        {"instruction": "Tell me a long story.", "output": "Once" + LONG},       # [4] answer cut at MAX
        {"instruction": "Another long one.", "output": "Twice" + LONG[:400]},    # [5] answer cut at MAX
        {"instruction": "Read this:" + LONG, "output": "ok"},                   # [6] prompt alone fills MAX
        {"instruction": "No answer here."},                                     # [7] invalid: no output
        {"instruction": "Short question one?", "output": "A different answer."},  # [8] same prompt as [0]
    ]


@pytest.fixture
def crafted(tmp_path, tiny_model_dir):
    data = tmp_path / "crafted.json"
    data.write_text(json.dumps(crafted_rows()), encoding="utf-8")

    def config(*lines: str) -> Path:
        path = tmp_path / "c.yaml"
        path.write_text(f"model:\n  name_or_path: {tiny_model_dir}\ndata:\n  train: {data}\n  max_length: {MAX}\n"
                        + "".join(f"  {l}\n" for l in lines) + f"output_dir: {tmp_path / 'runs' / 'crafted'}\n")
        return path

    return config


def independent_lengths(tiny_model_dir) -> list[tuple[int, int]]:
    """(whole sample, prompt) token counts of each valid row, straight from the template text and the tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    out = []
    for row in crafted_rows():
        if "output" not in row:
            continue
        msgs = [{"role": "user", "content": row["instruction"]}, {"role": "assistant", "content": row["output"]}]
        full = tok.apply_chat_template(msgs, tokenize=False).removesuffix("\n")  # the sample ends at <|im_end|>
        prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
        out.append((len(tok(full)["input_ids"]), len(tok(prompt)["input_ids"])))
    return out


def test_truncation_counts_on_a_crafted_file(crafted, tiny_model_dir, tmp_path, capsys):
    assert cli.main(["data", "check", str(crafted("on_bad_record: skip")), "--preview", "1"]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "runs" / "data_check" / "crafted" / "check.json").read_text())
    lengths = independent_lengths(tiny_model_dir)
    over = [(n, p) for n, p in lengths if n > MAX]
    assert len(over) == 3, "the fixture's design: rows 4, 5 and 6 are longer than max_length"
    (f,) = report["files"]
    assert (f["rows"], f["valid"]) == (9, 8) and f["invalid"][0][0].endswith("crafted.json[7]")
    r = report["render"]
    assert r["truncated"] == 3 and r["lost_end_of_turn"] == 3
    assert r["dropped_no_labels"] == 1 and r["samples"] == 7
    assert report["lost_response_samples"] == 3
    # Rows 4 and 5 lose everything after MAX (all answer); row 6 loses its whole answer.
    assert report["lost_response_tokens"] == sum(n - max(MAX, p) for n, p in over)
    assert report["lengths"]["total"]["max"] == max(n for n, _ in lengths)
    assert report["duplicates"] == [[f"{tmp_path / 'crafted.json'}[0]", f"{tmp_path / 'crafted.json'}[3]"]]
    assert len(report["conflicts"]) == 1
    assert "3 sample(s) truncated; 3 lose response tokens" in out and "3 lose the end-of-turn token" in out
    assert "1 sample(s) dropped: the prompt alone fills max_length=64" in out
    # 8 valid rows -> 7 samples; the first 5 rows are held out as probes (tracking.probe_size=5), leaving rows 5, 6
    # and 8, of which row 6 is dropped: 2 samples are trained on.
    assert "ok: training would use 2 samples (5 held out as probes (tracking.probe_size); 1 invalid row(s) skipped)" \
        in out
    assert "plan: peak memory about" in out  # chattune plan's headline, for the samples just counted
    png = Path(report["png"]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert sum(c for _, _, c in report["histogram"]) == 8


def test_overlength_drop_is_reported_as_drops(crafted, tmp_path):
    assert cli.main(["data", "check", str(crafted("on_bad_record: skip", "overlength: drop")), "--preview", "0",
                     "--out", str(tmp_path / "chk")]) == 0
    r = json.loads((tmp_path / "chk" / "check.json").read_text())["render"]
    assert (r["dropped_overlength"], r["truncated"], r["samples"]) == (3, 0, 5)


def test_invalid_rows_fail_like_training_would(crafted, capsys):
    assert cli.main(["data", "check", str(crafted()), "--preview", "0"]) == 2
    captured = capsys.readouterr()
    assert "1 invalid row(s)" in captured.out and "field \"output\" is missing" in captured.out
    assert "crafted.json[7]: 1 invalid row(s); training would stop at the first" in captured.err
    assert "data.on_bad_record=skip" in captured.err and "Traceback" not in captured.err


def test_label_mask_preview_marks_exactly_the_answer(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir, ModelConfig(name_or_path=str(tiny_model_dir)))
    renderer = ChatRenderer(tok)
    conv = Conversation([{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello there."}], "x")
    (sample,), _ = renderer.render(conv)
    segs = mask_segments(tok, sample, max_length=1000)
    assert "".join(s.text for s in segs if s.supervised) == "Hello there.<|im_end|>"
    assert "".join(s.text for s in segs) == tok.decode(sample.input_ids, skip_special_tokens=False)
    long = Conversation([{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Once" + LONG}], "y")
    (sample,), _ = renderer.render(long)
    segs = mask_segments(tok, sample, max_length=MAX)
    kept = "".join(s.text for s in segs if not s.cut)
    assert kept == tok.decode(sample.input_ids[:MAX], skip_special_tokens=False)
    assert all(s.supervised for s in segs if s.cut) and segs[-1].text.endswith("<|im_end|>")
    clipped = mask_segments(tok, sample, max_length=MAX, edge=10)
    assert sum(s.elided for s in clipped) == 1
    assert clipped[0].text + (clipped[1].text if not clipped[1].elided else "") \
        == tok.decode(sample.input_ids[:10], skip_special_tokens=False)


def test_histogram_bins_cover_every_value_once():
    values = [1, 2, 2, 3, 10, 99, 100]
    bins = histogram(values, 4)
    assert sum(c for _, _, c in bins) == len(values)
    assert bins[0][0] == 1 and bins[-1][1] > 100
    assert all(a[1] == b[0] for a, b in zip(bins, bins[1:]))


def test_would_use_counts_the_eval_hold_out(crafted, tmp_path, capsys):
    cfg = crafted("on_bad_record: skip", "eval_size: 2")
    assert cli.main(["data", "check", str(cfg), "--preview", "0", "--out", str(tmp_path / "chk"),
                     "tracking.probe_size=0"]) == 0
    out = capsys.readouterr().out
    from chattune.config import load
    from chattune.data.split import split_eval
    from chattune.data.check import scan_files
    _, convs = scan_files(load(cfg))
    train, held = split_eval(convs, size=2, seed=load(cfg).train.seed)  # the split training makes
    dropped = {f"{tmp_path / 'crafted.json'}[6]"}  # its prompt alone fills max_length
    expected = sum(c.where not in dropped for c in train)
    assert len(held) == 2 and expected < 7
    assert f"ok: training would use {expected} samples (2 conversation(s) held out for eval by data.eval_size=2; " \
        "1 invalid row(s) skipped)" in out


def test_histogram_keeps_dropped_and_truncated_apart(crafted, tmp_path, capsys):
    for overlength, fates in (("truncate", (5, 2, 1)), ("drop", (5, 0, 3))):
        out_dir = tmp_path / overlength
        assert cli.main(["data", "check", str(crafted("on_bad_record: skip", f"overlength: {overlength}")),
                         "--preview", "0", "--out", str(out_dir)]) == 0
        report = json.loads((out_dir / "check.json").read_text())
        kept, cut, dropped = (sum(b[i] for b in report["fates"]) for i in (2, 3, 4))
        assert (kept, cut, dropped) == fates, overlength
        assert [b[:2] for b in report["fates"]] == [b[:2] for b in report["histogram"]]
        assert all(k + t + d == c for (_, _, k, t, d), (_, _, c) in zip(report["fates"], report["histogram"]))
    out = capsys.readouterr().out
    assert "truncated)" in out and "dropped)" in out and "yellow: truncated to max_length=64, red: dropped" in out


def test_a_sweep_over_models_checks_each_tokenizer_and_names_it(crafted, tmp_path, tiny_model_dir, capsys):
    import shutil

    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    cfg = crafted("on_bad_record: skip")
    cfg.write_text(cfg.read_text() + f"sweep:\n  grid:\n    model.name_or_path: [{tiny_model_dir}, {other}]\n")
    assert cli.main(["data", "check", str(cfg), "--preview", "0", "--out", str(tmp_path / "chk")]) == 0
    out = capsys.readouterr().out
    for model in (tiny_model_dir, other):
        report = json.loads((tmp_path / "chk" / str(model).strip("/").replace("/", "_") / "check.json").read_text())
        assert report["model"] == str(model)
        assert f"tokenizer and template of {model}" in out.replace("\n", "")
        assert f"ok: training would use 2 samples with the tokenizer of {model}" in out
