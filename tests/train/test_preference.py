"""Preference tuning: pairs read and checked (file:line), labels as SFT's, TRL's losses, a tiny DPO/ORPO/SimPO run."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from chattune import cli
from chattune.config import TrainConfig, validate
from chattune.data.preference import check_layout, load_pairs, render_pairs, to_pair
from chattune.data.render import IGNORE, ChatRenderer
from chattune.errors import ConfigError, DataError
from chattune.train.preference import preference_loss, sequence_logps

DATA = Path(__file__).parents[1] / "fixtures" / "data"
PAIRS = DATA / "preference.json"
FLAT = DATA / "preference_flat.jsonl"


def test_both_layouts_read_into_the_same_pairs():
    pairs, report = load_pairs([PAIRS, FLAT], system="S.")
    assert report.per_file == {str(PAIRS): 12, str(FLAT): 3}
    first = pairs[0]
    assert first.prompt == [{"role": "system", "content": "S."}, {"role": "user", "content": "What is 2+2?"}]
    assert (first.chosen, first.rejected) == ("4.", "5.")
    assert [m["role"] for m in pairs[3].prompt] == ["system", "user", "assistant", "user"], "history kept as prompt"
    flat = pairs[12:]
    assert flat[0].prompt[-1] == {"role": "user", "content": "Say yes."}
    assert flat[1].prompt[0] == {"role": "system", "content": "Be brief."} and flat[1].chosen == "No."
    assert flat[2].prompt[-1]["content"] == "Add\n1 and 1" and flat[2].rejected == "3"


@pytest.mark.parametrize("record, what", [
    ({"prompt": "q", "chosen": "a"}, 'field "rejected" is missing'),
    ({"prompt": "q", "chosen": "a", "rejected": " a "}, "identical"),
    ({"prompt": "q", "chosen": {"from": "gpt", "value": " "}, "rejected": "b"}, '"chosen" answer is empty'),
    ({"chosen": "a", "rejected": "b"}, "no prompt"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "chosen": "x",
      "rejected": "y"}, "must end with the user's turn"),
])
def test_bad_records_are_reported_with_their_place(record, what, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "fine", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError) as info:
        load_pairs([path])
    assert what in info.value.what and info.value.where == f"{path}:2"
    pairs, report = load_pairs([path], on_bad_record="skip")
    assert len(pairs) == 1 and report.skipped[0][0] == f"{path}:2"


def test_wrong_layout_for_the_method_names_the_expected_one():
    with pytest.raises(DataError) as info:
        check_layout([PAIRS], "sft")
    assert "train.method=sft" in info.value.what and "dpo" in info.value.fix
    with pytest.raises(DataError) as info:
        check_layout([DATA / "alpaca.json"], "dpo")
    assert "chosen, rejected" in info.value.what and info.value.where.endswith(":1") or info.value.where
    check_layout([PAIRS], "orpo")
    check_layout([DATA / "alpaca.json"], "sft")


@pytest.mark.parametrize("raw, key", [
    ({"train": {"method": "dpo", "beta": 0}}, "train.beta"),
    ({"train": {"method": "dpo", "beta": -0.1}}, "train.beta"),
    ({"train": {"method": "orpo", "label_smoothing": 0.1}}, "label_smoothing"),
    ({"train": {"method": "dpo"}, "data": {"train": ["x"], "eval_size": 3}}, "--preference"),
    ({"train": {"method": "dpo"}, "lora": {"variant": "pissa"}}, "pissa"),
    ({"train": {"method": "ipo"}}, "train.method"),
])
def test_preference_config_mistakes(raw, key):
    with pytest.raises(ConfigError) as info:
        validate({"data": {"train": ["x"]}, **raw})
    assert key in info.value.what


def test_default_betas():
    assert TrainConfig(method="dpo").preference_beta == 0.1
    assert TrainConfig(method="simpo").preference_beta == 2.0
    assert TrainConfig(method="orpo", beta=0.25).preference_beta == 0.25


@pytest.fixture(scope="module")
def renderer(tiny_model_dir):
    from transformers import AutoTokenizer

    return ChatRenderer(AutoTokenizer.from_pretrained(tiny_model_dir))


def test_each_side_is_labelled_like_sft(renderer):
    pairs, _ = load_pairs([PAIRS])
    samples, stats = render_pairs(renderer, pairs, max_length=512)
    assert len(samples) == 24 and stats.samples == 24
    eot = renderer.end_of_turn_ids()[0]
    for k, pair in enumerate(pairs):
        prompt = renderer.prompt_ids(pair.prompt)
        for sample, answer in zip(samples[2 * k:2 * k + 2], (pair.chosen, pair.rejected)):
            assert sample.input_ids[:len(prompt)] == prompt, "the prompt is exactly what inference sends"
            assert all(l == IGNORE for l in sample.labels[:len(prompt)]), "history and prompt are not supervised"
            supervised = [t for t in sample.labels if t != IGNORE]
            assert supervised[-1] == eot and renderer.tokenizer.decode(supervised[:-1]).strip() == answer


def test_a_pair_is_dropped_whole(renderer):
    pairs = [to_pair({"prompt": "q", "chosen": "short", "rejected": "long " * 200}, "x:1"),
             to_pair({"prompt": "q", "chosen": "a", "rejected": "b"}, "x:2")]
    samples, stats = render_pairs(renderer, pairs, max_length=64, overlength="drop")
    assert [s.where for s in samples] == ["x:2", "x:2"] and stats.dropped_overlength == 1


def test_sequence_logps_padding_free_equals_padded(tiny_model_dir, renderer):
    from transformers import AutoModelForCausalLM

    from chattune.data.collate import flat_collate, padded_collate

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    model.config.use_cache = False  # as training runs: per-sample attention blocks from the position ids
    samples, _ = render_pairs(renderer, load_pairs([PAIRS])[0][:3], max_length=512)
    feats = [{"input_ids": s.input_ids, "labels": s.labels} for s in samples]
    with torch.no_grad():
        flat, n_flat = sequence_logps(model, flat_collate()(feats))
        padded, n_pad = sequence_logps(model, padded_collate(renderer.tokenizer.pad_token_id)(feats))
        one = [model(input_ids=torch.tensor([s.input_ids])).logits[0] for s in samples]
    direct = torch.stack([
        -F.cross_entropy(lg[:-1], torch.tensor(s.labels[1:]), ignore_index=IGNORE, reduction="sum")
        for lg, s in zip(one, samples)])
    torch.testing.assert_close(flat, direct, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(padded, direct, atol=1e-4, rtol=1e-5)
    assert n_flat.tolist() == n_pad.tolist() == [sum(l != IGNORE for l in s.labels[1:]) for s in samples]


def test_trl_losses_are_the_papers_formulas():
    sums = torch.tensor([-10.0, -14.0, -20.0, -18.0])
    counts = torch.tensor([5.0, 7.0, 10.0, 6.0])
    ref = torch.tensor([[-11.0, -13.0], [-19.0, -19.0]])
    loss, m = preference_loss(TrainConfig(method="dpo", beta=0.1), sums, counts, ref)
    delta = torch.tensor([(-10 + 11) - (-14 + 13), (-20 + 19) - (-18 + 19)], dtype=torch.float32)
    assert loss.item() == pytest.approx((-F.logsigmoid(0.1 * delta)).mean().item())
    assert m["rewards/chosen"].item() == pytest.approx(0.1 * (1 - 1) / 2)
    assert m["rewards/accuracies"].item() == 0.5 and m["rewards/margins"].item() == pytest.approx(0.1 * delta.mean().item())
    avg_c, avg_r = torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -3.0])
    loss, _ = preference_loss(TrainConfig(method="simpo", beta=2.0, simpo_gamma=0.5), sums, counts, None)
    assert loss.item() == pytest.approx((-F.logsigmoid(2.0 * (avg_c - avg_r) - 0.5)).mean().item(), rel=1e-5)
    loss, m = preference_loss(TrainConfig(method="orpo", beta=0.1), sums, counts, None)
    log_odds = (avg_c - avg_r) - (torch.log1p(-avg_c.exp()) - torch.log1p(-avg_r.exp()))
    nll = 30.0 / 15.0
    assert loss.item() == pytest.approx(nll - (0.1 * F.logsigmoid(log_odds)).mean().item(), rel=1e-5)


def _train(tmp_path, model_dir, *extra):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  name_or_path: {model_dir}\n  dtype: fp32\ndata:\n  train: {PAIRS}\n")
    out = tmp_path / "run"
    assert cli.main(["train", str(cfg), f"output_dir={out}", "train.max_steps=3", "train.batch_size=2",
                     "train.grad_accum=2", "train.learning_rate=5e-3", "tracking.probe_size=2",
                     "tracking.probe_max_new_tokens=4", "tracking.backends=[none]", *extra]) == 0
    return out


@pytest.mark.parametrize("method", ["dpo", pytest.param("orpo", marks=pytest.mark.slow),
                                    pytest.param("simpo", marks=pytest.mark.slow)])
def test_tiny_preference_run(method, tiny_model_dir, tmp_path):
    run = _train(tmp_path, tiny_model_dir, f"train.method={method}")
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert len(train_rows) == 3
    for r in train_rows:
        assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= set(r)
        assert r["rewards/margins"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"], abs=1e-5)
        assert 0 <= r["rewards/accuracies"] <= 1 and math.isfinite(r["loss"])
    if method == "dpo":
        assert train_rows[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-4), "step 1: policy == reference"
        assert train_rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "summary.json").is_file()
    before = [json.loads(l) for l in (run / "predictions" / "epoch_0.jsonl").read_text().splitlines()]
    assert [p["reference"] for p in before] == ["4.", "Red."], "probes: held-out prompts, the chosen answer as reference"
