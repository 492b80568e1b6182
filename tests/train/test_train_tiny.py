"""Training on a tiny random model: the run-directory contract and what training may and may not change."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chattune import cli
from chattune.config import RunConfig
from chattune.train.checkpoints import MARKER, complete_checkpoints

FIX = Path(__file__).parents[1] / "fixtures" / "data"


def train(tmp_path, tiny_model_dir, *extra, out="run"):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  name_or_path: {tiny_model_dir}\n  dtype: fp32\ndata:\n  train: {FIX / 'alpaca.json'}\n")
    return cli.main(["train", str(cfg), f"output_dir={tmp_path / out}", "train.max_steps=4", "train.batch_size=2",
                     "train.grad_accum=1", "train.learning_rate=1e-2", "train.logging_steps=1",
                     "tracking.probe_size=2", "tracking.probe_max_new_tokens=4", "tracking.backends=[none]", *extra])


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("train")
    assert train(tmp, tiny_model_dir) == 0
    return tmp / "run"


def test_run_directory_contract(run):
    names = {p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file() and "checkpoints" not in p.parts}
    for required in ["adapter/adapter_config.json", "adapter/adapter_model.safetensors", "run_config.yaml",
                     "chat_template.jinja", "tokenizer/tokenizer.json", "metrics.jsonl", "predictions/epoch_0.jsonl",
                     "data_report.json", "model_info.json", "summary.json"]:
        assert required in names, required
    assert not [n for n in names if n.endswith((".bin", "model.safetensors")) and not n.startswith("adapter/")], \
        "no full model weights in a run directory"
    assert (run / "checkpoints").is_dir()


def test_run_directory_files_hold_what_later_verbs_read(run):
    """The contract by content: the adapter's shape, the summary, model info, data report and the last checkpoint."""
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 8 and adapter["lora_alpha"] == 16
    assert adapter["target_modules"]
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    assert all(w.shape[0] == 8 for k, w in weights.items() if "lora_A" in k)
    assert all(w.shape[1] == 8 for k, w in weights.items() if "lora_B" in k)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_step"] == 4
    assert {"train_loss", "first_loss", "final_loss", "wall_s", "trainable_params", "total_params"} <= summary.keys()
    info = json.loads((run / "model_info.json").read_text())
    assert 0 < info["trainable_params"] < info["total_params"] and info["dtype"] == "float32"
    report = json.loads((run / "data_report.json").read_text())
    assert {"files", "skipped", "render"} <= report.keys() and report["render"]["samples"] > 0
    last = complete_checkpoints(run / "checkpoints")[-1]
    assert last.name == "checkpoint-4" and json.loads((last / MARKER).read_text())["step"] == 4


def test_adapter_holds_only_lora_weights_and_they_moved(run):
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    assert weights and all("lora_" in k for k in weights)
    # peft starts every lora_B at zero; training must have moved them.
    assert all(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)


def test_base_weights_are_unchanged(run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    original = load_file(tiny_model_dir / "model.safetensors")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run / "adapter")
    base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
            for k, v in model.state_dict().items() if "lora_" not in k}
    for name, tensor in original.items():
        assert torch.equal(base[name], tensor), name


def test_metrics_have_one_line_per_logging_step(run):
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert {"step", "epoch", "loss", "grad_norm", "learning_rate", "tokens_per_s"} <= r.keys()
        assert r["loss"] > 0 and r["tokens_per_s"] > 0


def test_template_and_config_are_the_ones_used(run, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run / "tokenizer")
    assert tok.chat_template == (run / "chat_template.jinja").read_text()
    cfg = RunConfig.model_validate(__import__("yaml").safe_load((run / "run_config.yaml").read_text()))
    assert cfg.model.name_or_path == str(tiny_model_dir) and cfg.train.max_steps == 4


def test_probes_are_held_out_and_answered_before_training(run):
    probes = [json.loads(l) for l in (run / "predictions" / "epoch_0.jsonl").read_text().splitlines()]
    assert len(probes) == 2 and all({"question", "answer", "reference"} <= p.keys() for p in probes)
    report = json.loads((run / "data_report.json").read_text())
    assert report["render"]["conversations"] == 5 - 2, "probe rows are held out of training by default"


def test_finished_run_is_not_overwritten(tmp_path, tiny_model_dir, capsys):
    assert train(tmp_path, tiny_model_dir, "train.max_steps=1") == 0
    capsys.readouterr()
    assert train(tmp_path, tiny_model_dir, "train.max_steps=1") == 2
    err = capsys.readouterr().err
    assert "a finished run is already there" in err and "--overwrite" in err and "Traceback" not in err
    assert train(tmp_path, tiny_model_dir, "train.max_steps=1", "--overwrite") == 0


def test_chat_prompt_prints_only_the_answer(run, capsys):
    capsys.readouterr()
    assert cli.main(["chat", str(run), "--prompt", "Hello?", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n") and "chatting with" not in out and len(out.strip().splitlines()) <= 5


def test_chat_on_something_that_is_not_a_run(tmp_path, capsys):
    assert cli.main(["chat", str(tmp_path)]) == 2
    assert "not a chattune run directory" in capsys.readouterr().err


def test_group_by_length_sampling_reaches_the_trainer(tmp_path):
    """train.sampling=group_by_length: the Trainer's length-grouped sampler orders samples by length in mega-batches."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from chattune.config import TrainConfig
    from chattune.data.collate import SampleDataset
    from chattune.rundir import RunDir
    from chattune.train.trainer import to_training_args

    cfg = RunConfig.model_validate({"data": {"train": "x.json"}, "train": {"sampling": "group_by_length", "batch_size": 2}})
    args = to_training_args(cfg, RunDir(tmp_path / "run"), torch.float32, has_eval=False)
    assert args.train_sampling_strategy == "group_by_length"
    assert TrainConfig().sampling == "random"

    from transformers import Trainer

    lengths = [3, 30, 5, 28, 4, 31, 6, 29]
    data = SampleDataset([type("S", (), {"input_ids": [1] * n, "labels": [1] * n})() for n in lengths])
    trainer = Trainer(model=torch.nn.Linear(1, 1), args=args, train_dataset=data, data_collator=lambda b: b)
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler)
    order = list(sampler)
    assert sorted(order) == list(range(8))
    assert [lengths[i] for i in order] == sorted(lengths, reverse=True), "one mega-batch: longest first, neighbours alike"
