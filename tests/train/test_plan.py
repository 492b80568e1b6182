"""`chattune plan`: the model's shape is counted as training counts it, the estimate moves the right way with
every knob, the suggestions keep the effective batch and fit the limit, and (slow) the estimate is within
TOLERANCE of the peak RSS that real training steps reach on this CPU."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from chattune import config, options
from chattune.cli import main
from chattune.errors import ConfigError
from chattune.train import plan as est
from chattune.train.planner import DataSize, make_plan
from chattune.train.shape import from_model_dir, from_numbers, known_shape
from chattune.verbs import plan as plan_verb

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "data" / "alpaca.json"


def _setting(**kw) -> est.Setting:
    base = dict(device="cpu", dtype_bytes=2, quantization="none", batch_size=4, grad_accum=2,
                gradient_checkpointing=False, max_length=256)
    return est.Setting(**{**base, **kw})


def test_shape_counts_the_parameters_training_loads(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    shape = from_model_dir(tiny_model_dir)
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.layers == model.config.num_hidden_layers
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if type(m).__name__ == "Linear" and "lm_head" not in n)
    assert shape.linear_params == linear


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]])
def test_lora_parameter_count_equals_peft(tiny_model_dir, targets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules=targets, task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert from_model_dir(tiny_model_dir).lora_params(4, targets) == trainable


@pytest.mark.parametrize("name, billions", [
    ("Qwen/Qwen2.5-0.5B-Instruct", 0.494), ("Qwen/Qwen2.5-7B-Instruct", 7.62), ("Qwen/Qwen2.5-14B-Instruct", 14.77),
    ("Qwen/Qwen1.5-7B-Chat", 7.72), ("THUDM/glm-4-9b-chat-hf", 9.40)])
def test_known_shapes_have_the_published_sizes(name, billions):
    # Published parameter counts (model cards); biases and norms are under 0.1 % of them.
    assert known_shape(name).params / 1e9 == pytest.approx(billions, rel=0.01)


def test_the_attention_length_limit_is_the_one_training_uses():
    """plan.py stays torch-free, so it keeps its own copy of model/row_attention.py's MATH_MAX_LEN: they must agree."""
    from chattune.model.row_attention import MATH_MAX_LEN

    assert est.MATMUL_ATTENTION_MAX == MATH_MAX_LEN


def test_each_knob_moves_the_estimate_the_right_way():
    shape = from_numbers(896, 4864, 24, 14, 2, 151936, True)
    base = est.estimate(shape, _setting(), r=8, targets="all-linear")
    by = {q: est.estimate(shape, _setting(quantization=q), r=8, targets="all-linear").weights for q in ("none", "8bit", "4bit")}
    assert by["4bit"] < by["8bit"] < by["none"]
    gc = est.estimate(shape, _setting(gradient_checkpointing=True), r=8, targets="all-linear")
    assert gc.activations < base.activations / 5 and gc.attention < base.attention
    double = est.estimate(shape, _setting(batch_size=8), r=8, targets="all-linear")
    assert double.activations == pytest.approx(2 * base.activations)
    assert est.estimate(shape, _setting(), r=16, targets="all-linear").lora == pytest.approx(2 * base.lora)
    fp32 = est.estimate(shape, _setting(dtype_bytes=4), r=8, targets="all-linear")
    assert fp32.weights == pytest.approx(2 * base.weights)
    gpu = est.estimate(shape, _setting(device="cuda"), r=8, targets="all-linear")
    assert gpu.attention == 0  # flash / varlen kernels keep no score matrix


def test_candidates_keep_the_effective_batch_and_never_get_heavier():
    s = _setting(batch_size=8, grad_accum=2, quantization="8bit")
    cands = est.candidates(s)
    assert cands[0] == s
    assert {c.quantization for c in cands} == {"8bit", "4bit"}
    assert all(c.batch_size * c.grad_accum >= 16 and c.batch_size * c.grad_accum < 16 + c.batch_size for c in cands)


def _plan(limit: float | None, **setting):
    cfg = config.load(None, [f"data.train={FIXTURE}", "model.name_or_path=Qwen/Qwen2.5-7B-Instruct", "data.max_length=1024",
                             *[f"{k}={v}" for k, v in setting.items()]])
    data = DataSize([1024] * 100, 50_000, exact=False)
    return make_plan(cfg, data, gpu="A100", limit=limit)


def test_suggestion_is_the_first_candidate_that_fits(monkeypatch):
    monkeypatch.setattr("chattune.train.planner._hub_config", lambda m: None)  # offline: the table of known models
    limit = 12 * est.GIB
    plan = _plan(limit)
    assert plan.estimate.total > limit  # bf16 7B weights alone are 14 GiB
    setting, estimate = plan.first_fit()
    assert estimate.total <= limit and setting.quantization != "none"
    earlier = plan.suggestions[:plan.suggestions.index((setting, estimate))]
    assert earlier and all(e.total > limit for _, e in earlier)
    assert _plan(2 * est.GIB).first_fit() is None  # nothing makes a 7B model fit in 2 GiB


def test_plan_cli_on_a_recipe_that_is_not_downloaded(monkeypatch, capsys):
    monkeypatch.setattr("chattune.train.planner._hub_config", lambda m: None)
    rc = main(["plan", str(REPO / "configs" / "qwen7b_chat_4bit.yaml"), f"data.train={FIXTURE}", "--gpu", "A100",
               "--memory", "8GiB"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "table of known models (Qwen/Qwen-7B-Chat)" in out and "4bit" in out
    assert "each counted at max_length" in out  # no tokenizer on disk: an upper bound, and it says so


@pytest.mark.parametrize("text, expected", [("24GiB", 24 * 2**30), ("80GB", 80e9), ("16", 16 * 2**30),
                                            ("512MiB", 512 * 2**20), ("1.5g", 1.5 * 2**30)])
def test_parse_memory(text, expected):
    assert plan_verb.parse_memory(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["lots", "24 GiBs", "iB", ""])
def test_parse_memory_refuses_what_it_cannot_read(text):
    with pytest.raises(ConfigError, match="--memory"):
        plan_verb.parse_memory(text)


def test_run_defaults_come_from_the_options():
    got = {p.name: p.default for p in inspect.signature(plan_verb.run).parameters.values() if p.name != "quiet"
           and p.default is not p.empty}
    assert got == options.PLAN.model_dump()


# ---------------------------------------------------------------------------
# the estimate against real training steps on this CPU

TOLERANCE = 0.15  # |estimate - measured| / measured, peak RSS of the whole process
# The child's own high-water mark. Not getrusage's ru_maxrss: Linux carries the parent's peak across fork and
# exec into it, so a child of this (large) test process would report at least the test process's size.
MEASURE = ("import sys\nfrom chattune.cli import main\nrc = main(sys.argv[1:])\n"
           "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
           "print('PEAK_BYTES', int(hwm.split()[1]) * 1024)\nsys.exit(rc)")


def _long_rows(path: Path, n: int, length: int) -> Path:
    answer = "Here is a long and careful answer about many things, with details. " * (length // 8)
    path.write_text(json.dumps([{"instruction": f"Question number {i}?", "output": answer} for i in range(n)]))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("model, batch, length, ckpt", [
    ("smollm2-135m", 4, 256, False),  # matmul attention (<= 384 tokens): its scores count
    ("smollm2-135m", 2, 768, True),   # flash attention, checkpointing
    ("gemma3-270m", 2, 256, False),   # not among the models the constants were fitted on; 262k vocabulary
])
def test_estimate_is_within_tolerance_of_the_measured_peak(model, batch, length, ckpt, use_session_cache, gemma3_dir,
                                                          tmp_path):
    data = _long_rows(tmp_path / "rows.json", batch * 2, length)
    overrides = [f"model.name_or_path={model}", f"data.train={data}", f"data.max_length={length}",
                 f"train.batch_size={batch}", "train.grad_accum=1", "train.max_steps=2",
                 f"train.gradient_checkpointing={str(ckpt).lower()}", "tracking.backends=[none]", "tracking.probe_size=0",
                 f"output_dir={tmp_path / 'run'}", *(["model.chat_template=gemma"] if "gemma" in model else [])]
    demo = str(REPO / "configs" / "demo.yaml")
    estimate = plan_verb.run(config.load(demo, overrides), quiet=True).estimate.total
    proc = subprocess.run([sys.executable, "-c", MEASURE, "train", demo, "--overwrite", *overrides],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = int(proc.stdout.split("PEAK_BYTES")[-1].split()[0])
    assert abs(estimate - measured) / measured <= TOLERANCE, (estimate / est.GIB, measured / est.GIB)


def test_mixed_sources_are_planned_with_the_rows_training_takes(tiny_model_dir):
    from chattune.train.planner import data_size

    rows = json.loads(FIXTURE.read_text())
    base = [f"model.name_or_path={tiny_model_dir}", "model.chat_template=chatml"]
    whole = data_size(config.load(None, [*base, f"data.train={FIXTURE}"]))
    half = data_size(config.load(None, [*base, f"data.train=[{{path: {FIXTURE}, fraction: 0.5}}]"]))
    assert len(whole.lengths) == len(rows) and len(half.lengths) == round(len(rows) / 2)
    assert whole.exact and half.exact and half.tokens < whole.tokens


def test_short_gpu_names_find_their_peak():
    from chattune.train.planner import gpu_peak
    from chattune.train.throughput import PEAK_BF16

    assert gpu_peak("4090") == PEAK_BF16["RTX 4090"] and gpu_peak("a100") == PEAK_BF16["A100"]
    assert gpu_peak("NVIDIA H100 PCIe") == PEAK_BF16["H100 PCIe"] and gpu_peak("B9000") is None
