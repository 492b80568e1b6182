"""FSDP2 with probes: generation right after sharding must leave the model trainable, and ranks generate in step.

Before the fix the probes ran under torch.inference_mode: FSDP2's gathered weights were then created as
inference tensors and the first training step failed ("Inference tensors do not track version counter").
"""

import json
import subprocess
import sys

import pytest
import torch

from tests.distributed.launch import ROOT


@pytest.mark.slow
def test_fsdp2_probes_then_a_training_step(tiny_model_dir):
    """World size 1 on gloo, sharded as accelerate shards it (decoder layers, then the root)."""
    proc = subprocess.run([sys.executable, "tests/distributed/fsdp_probe_worker.py", str(tiny_model_dir)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["answers"] == 1 and out["loss"] > 0
    assert out["lora_grads"] == out["lora_B"] > 0  # the step after the probes reaches every adapter


def test_sharded_generation_runs_in_step_under_no_grad(tiny_model_dir, monkeypatch):
    """What generate() gets: synced_gpus with several processes, no_grad rather than inference_mode."""
    from transformers import AutoModelForCausalLM

    from chattune.config import ModelConfig
    from chattune.data.render import ChatRenderer
    from chattune.infer import generate as gen
    from chattune.model.load import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    renderer = ChatRenderer(load_tokenizer(tiny_model_dir, ModelConfig(name_or_path=str(tiny_model_dir))), {})
    seen = []
    real = model.generate

    def spy(**kw):
        seen.append((kw.pop("synced_gpus", None), torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
        return real(**kw)  # (one process here: lockstep would wait for a process group that does not exist)

    monkeypatch.setattr(model, "generate", spy)
    monkeypatch.setattr(gen, "_process_count", lambda: 2)
    prompt = [[{"role": "user", "content": "hello"}]]
    gen.generate_batch(model, renderer, prompt, max_new_tokens=2, sharded=True)
    gen.generate_batch(model, renderer, prompt, max_new_tokens=2)
    assert seen == [(True, False, False), (None, True, False)]
    monkeypatch.setattr(gen, "_process_count", lambda: 1)
    gen.generate_batch(model, renderer, prompt, max_new_tokens=2, sharded=True)
    assert seen[-1] == (None, False, False)  # one process: nothing to keep in step with


def test_probes_of_a_sharded_run_generate_as_sharded(monkeypatch):
    from chattune.train import callbacks

    calls = []
    monkeypatch.setattr(callbacks, "generate_batch", lambda *a, **kw: calls.append(kw["sharded"]) or ["x"])
    from chattune.data.formats import Conversation

    conv = Conversation([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "t")
    for every in (True, False):
        callbacks.PredictionProbes([conv], renderer=None, out_dir=None, max_new_tokens=2,
                                   every_process=every).answer(None, 0, 0, write=False)
    assert calls == [True, False]
