"""Crash-safe checkpoints through public Trainer hooks: output_dir is the staging folder, on_save publishes."""

import json
from types import SimpleNamespace

import torch
from transformers import Trainer, TrainingArguments

from chattune.train.checkpoints import MARKER, STAGING, PublishCheckpoints, complete_checkpoints


def test_on_save_marks_renames_and_rotates(tmp_path):
    root = tmp_path / "checkpoints"
    for n in (1, 2):
        (root / f"checkpoint-{n}").mkdir(parents=True)
        (root / f"checkpoint-{n}" / MARKER).write_text("{}")
    staged = root / STAGING / "checkpoint-3"
    staged.mkdir(parents=True)
    (staged / "adapter_model.safetensors").write_text("weights")
    args = SimpleNamespace(output_dir=str(root / STAGING), should_save=True, save_total_limit=2)
    state = SimpleNamespace(global_step=3, epoch=0.75, max_steps=8)
    PublishCheckpoints({"data": "sha256 x"}).on_save(args, state, None)
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-2", "checkpoint-3"], "staging gone, last two kept"
    marker = json.loads((root / "checkpoint-3" / MARKER).read_text())
    assert marker == {"step": 3, "epoch": 0.75, "max_steps": 8, "fingerprints": {"data": "sha256 x"}}
    assert (root / "checkpoint-3" / "adapter_model.safetensors").read_text() == "weights"


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, labels=None):
        return {"loss": ((self.w - x) ** 2).mean()}


def test_transformers_saves_into_output_dir_then_calls_on_save(tmp_path):
    """What PublishCheckpoints relies on: the Trainer writes checkpoint-N whole into args.output_dir, then on_save.

    If a transformers release saves elsewhere or calls on_save earlier, this fails (and so would resume).
    """
    seen = []

    class Spy(PublishCheckpoints):
        def on_save(self, args, state, control, **kw):
            staged = tmp_path / "checkpoints" / STAGING / f"checkpoint-{state.global_step}"
            seen.append((state.global_step, (staged / "trainer_state.json").is_file(),
                         (staged / "optimizer.pt").is_file()))
            return super().on_save(args, state, control, **kw)

    args = TrainingArguments(output_dir=str(tmp_path / "checkpoints" / STAGING), max_steps=2, save_strategy="steps",
                             save_steps=1, save_total_limit=1, per_device_train_batch_size=1, report_to="none",
                             use_cpu=True, remove_unused_columns=False, disable_tqdm=True, logging_strategy="no")
    data = [{"x": torch.tensor([1.0])} for _ in range(4)]
    Trainer(model=_Tiny(), args=args, train_dataset=data, callbacks=[Spy({})]).train()
    assert seen == [(1, True, True), (2, True, True)], "on_save comes after the whole checkpoint is in output_dir"
    root = tmp_path / "checkpoints"
    assert [p.name for p in complete_checkpoints(root)] == ["checkpoint-2"]
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-2"], "no staging folder left behind"
