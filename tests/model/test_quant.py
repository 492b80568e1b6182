"""QLoRA: the bitsandbytes config converter, and 8-bit / 4-bit training end to end on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from chattune import cli
from chattune.config import ModelConfig
from chattune.errors import MissingDependencyError
from chattune.model import quant
from chattune.model.quant import describe_quantization, parameter_count, to_bnb_config

# --- to_bnb_config: pure conversion -------------------------------------------------------------


def test_no_quantization_gives_no_config():
    assert to_bnb_config(ModelConfig(), torch.bfloat16) is None


def test_8bit():
    bnb = to_bnb_config(ModelConfig(quantization="8bit"), torch.bfloat16)
    assert bnb.load_in_8bit and not bnb.load_in_4bit


def test_4bit_recipe_defaults_follow_the_model_dtype():
    bnb = to_bnb_config(ModelConfig(quantization="4bit"), torch.bfloat16)
    assert bnb.load_in_4bit and not bnb.load_in_8bit
    assert bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_use_double_quant is True
    assert bnb.bnb_4bit_compute_dtype == torch.bfloat16  # compute dtype auto = model.dtype


def test_4bit_explicit_choices():
    cfg = ModelConfig(quantization="4bit", bnb_4bit_quant_type="fp4", bnb_4bit_double_quant=False,
                      bnb_4bit_compute_dtype="fp16")
    bnb = to_bnb_config(cfg, torch.float32)
    assert bnb.bnb_4bit_quant_type == "fp4" and bnb.bnb_4bit_use_double_quant is False
    assert bnb.bnb_4bit_compute_dtype == torch.float16


@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_missing_bitsandbytes_says_which_extra_to_install(monkeypatch, mode):
    monkeypatch.setattr(quant, "bitsandbytes_available", lambda: False)
    with pytest.raises(MissingDependencyError) as info:
        to_bnb_config(ModelConfig(quantization=mode), torch.float32)
    assert info.value.where == "model.quantization"
    assert "pip install 'chattune[qlora]'" in info.value.render()
    assert to_bnb_config(ModelConfig(), torch.float32) is None  # not needed without quantization


def test_missing_bitsandbytes_stops_load_model_before_loading(monkeypatch, tiny_model_dir):
    from chattune.model.load import load_model

    monkeypatch.setattr(quant, "bitsandbytes_available", lambda: False)
    with pytest.raises(MissingDependencyError, match="needs the bitsandbytes package"):
        load_model(tiny_model_dir, ModelConfig(quantization="4bit"), dtype=torch.float32)


def test_unquantized_model_is_described_as_none(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert describe_quantization(model) == "none"
    assert sum(parameter_count(p) for p in model.parameters()) == sum(p.numel() for p in model.parameters())


# --- end to end on smollm2-135m ----------------------------------------------------------------

ROOT = Path(__file__).parents[2]
# Four short rows, one batch: a few steps at a high learning rate must lower the loss on them.
ROWS = [
    {"instruction": "What is your name?", "input": "", "output": "My name is Quill."},
    {"instruction": "Who made you?", "input": "", "output": "The chattune project made me."},
    {"instruction": "What do you like?", "input": "", "output": "I like short answers."},
    {"instruction": "Where do you live?", "input": "", "output": "I live in a tiny test."},
]
SMOLLM2_PARAMS = 134_515_008  # SmolLM2-135M, tied embeddings: what every quantised run must still count
EXPECTED = {"4bit": "4bit-nf4+dq", "8bit": "8bit"}


@pytest.fixture(scope="module", params=["4bit", "8bit"])
def qlora_run(request, tmp_path_factory, smollm2_dir, session_cache):
    """A QLoRA run on the packaged smollm2-135m alias, trained for 4 steps on ROWS."""
    mode = request.param
    tmp = tmp_path_factory.mktemp(f"qlora-{mode}")
    data = tmp / "rows.json"
    data.write_text(json.dumps(ROWS))
    # enable_grad: verbs like `chat` switch grad mode off process-wide, and an earlier test may have run one.
    with pytest.MonkeyPatch.context() as mp, torch.enable_grad():
        mp.setenv("CHATTUNE_CACHE", str(session_cache))
        code = cli.main(["train", str(ROOT / "configs" / "demo.yaml"), f"model.quantization={mode}", "model.name_or_path=smollm2-135m",
                         f"data.train={data}", f"output_dir={tmp / 'run'}", "train.max_steps=4", "train.batch_size=4",
                         "train.grad_accum=1", "train.learning_rate=5e-3", "train.lr_scheduler=constant",
                         "train.warmup_ratio=0", "train.logging_steps=1", "lora.r=8", "lora.dropout=0", "tracking.probe_size=0",
                         "tracking.probe_file=null", "tracking.backends=[none]"])
    assert code == 0
    return mode, tmp / "run"


@pytest.mark.slow
def test_qlora_loss_goes_down_and_adapter_is_saved(qlora_run):
    from safetensors.torch import load_file

    mode, run = qlora_run
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if json.loads(line).get("loss") is not None]
    assert len(losses) == 4 and losses[-1] < losses[0] * 0.8, losses
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    assert weights and all("lora_" in k for k in weights)
    assert all(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k), "training moved every lora_B"
    assert all(v.dtype == torch.float32 for v in weights.values()), "adapters train in fp32 on a quantised base"


@pytest.mark.slow
def test_qlora_model_info_counts_unpacked_weights_and_the_smaller_footprint(qlora_run):
    mode, run = qlora_run
    info = json.loads((run / "model_info.json").read_text())
    assert info["quantization"] == EXPECTED[mode]
    # A packed 4-bit weight is half as many uint8 elements: the count must still be the model's own.
    assert info["total_params"] == SMOLLM2_PARAMS + info["trainable_params"]
    bf16_bytes = SMOLLM2_PARAMS * 2
    assert info["memory_bytes"] < bf16_bytes * (0.5 if mode == "4bit" else 0.7)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["quantization"] == EXPECTED[mode]


@pytest.mark.slow
def test_chat_loads_the_base_quantised_as_trained_and_answers(qlora_run, session_cache, monkeypatch, capsys):
    from chattune.verbs import chat

    mode, run = qlora_run
    monkeypatch.setenv("CHATTUNE_CACHE", str(session_cache))
    seen = []
    real = chat.load_session

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(chat, "load_session", spy)
    assert cli.main(["chat", str(run), "--prompt", "What is your name?", "--max-new-tokens", "8"]) == 0
    answer = capsys.readouterr().out.strip()
    assert answer, "chat printed an answer"
    (session,) = seen
    assert describe_quantization(session.model) == EXPECTED[mode]
    layer = "Linear4bit" if mode == "4bit" else "Linear8bitLt"
    assert any(type(m).__name__ == layer for m in session.model.modules())
    assert any("lora_A" in n for n, _ in session.model.named_parameters()), "the adapter is on"


def test_4bit_gradients_survive_an_eval_pass(tiny_model_dir):
    """Probe answers (eval, no grad) before training must not switch 4-bit layers to a kernel without backward."""
    pytest.importorskip("bitsandbytes")
    from chattune.config import LoraConfig
    from chattune.model.load import load_model
    from chattune.model.lora import apply_lora

    model = load_model(tiny_model_dir, ModelConfig(quantization="4bit"), dtype=torch.bfloat16)
    model = quant.prepare_for_kbit_training(model, torch.bfloat16)
    model = apply_lora(model, LoraConfig(r=4, dropout=0.0), gradient_checkpointing=False)
    ids = torch.randint(10, 1000, (1, 12))
    first = next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn.q_proj")).lora_B["default"]  # A x != 0, B = 0

    def grad_of_first_adapter():
        model.train()
        model.zero_grad()
        model(input_ids=ids).logits.float().pow(2).mean().backward()
        return first.weight.grad.clone()

    before = grad_of_first_adapter()
    assert before.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)  # what the probes do
    torch.testing.assert_close(grad_of_first_adapter(), before)
