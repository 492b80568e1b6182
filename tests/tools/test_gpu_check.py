"""benchmarks/gpu_check.py: the framework's rules on fake checks (fast), and the whole --cpu-smoke run (slow)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _ctx(gpu_check, tmp_path, smoke=True):
    return gpu_check.Ctx(device="cpu", smoke=smoke, workdir=tmp_path, python=sys.executable, repo=ROOT)


def test_a_raising_check_is_a_fail_with_its_message(gpu_check, tmp_path):
    def check_boom(ctx):
        raise ValueError("the kernel disagreed")

    r = gpu_check.run_check(check_boom, _ctx(gpu_check, tmp_path))
    assert r["status"] == "fail" and r["name"] == "boom"
    assert "ValueError: the kernel disagreed" in r["detail"]


def test_a_malformed_answer_is_a_fail(gpu_check, tmp_path):
    r = gpu_check.run_check(lambda ctx: {"status": "great"}, _ctx(gpu_check, tmp_path))
    assert r["status"] == "fail" and "malformed" in r["detail"]


def test_figures_are_floats_and_missing_ones_dropped(gpu_check, tmp_path):
    def check_speed(ctx):
        return {"name": "speed", "status": "figure", "detail": "d", "figures": {"tokens_per_s": 12, "mfu": None}}

    r = gpu_check.run_check(check_speed, _ctx(gpu_check, tmp_path))
    assert r["figures"] == {"tokens_per_s": 12.0} and r["status"] == "figure"
    assert "tokens_per_s=12" in gpu_check.line(r)


@pytest.mark.parametrize("smoke, status", [(True, "pass"), (False, "fail")])
def test_over_budget_is_reported_and_fails_on_a_gpu(gpu_check, tmp_path, smoke, status):
    import time

    def check_slow(ctx):
        time.sleep(0.05)
        return {"name": "slow", "status": "pass", "detail": "done", "figures": {}}

    check_slow.budget_s = 0.01
    r = gpu_check.run_check(check_slow, _ctx(gpu_check, tmp_path, smoke=smoke))
    assert "over its 0 s budget" in r["detail"] and r["status"] == status


def test_exit_status_and_report(gpu_check, tmp_path, monkeypatch, capsys):
    def check_ok(ctx):
        assert ctx.workdir.is_dir() and ctx.repo == ROOT and ctx.device == "cpu" and ctx.smoke
        return {"name": "ok", "status": "pass", "detail": "fine", "figures": {}}

    def check_bad(ctx):
        return {"name": "bad", "status": "fail", "detail": "wrong", "figures": {}}

    monkeypatch.setattr(gpu_check, "discover", lambda only=None: [("gpu_check_fake", check_ok)])
    out = tmp_path / "r.json"
    assert gpu_check.main(["--cpu-smoke", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["checks"][0]["name"] == "ok"
    monkeypatch.setattr(gpu_check, "discover", lambda only=None: [("gpu_check_fake", check_ok), ("gpu_check_fake", check_bad)])
    assert gpu_check.main(["--cpu-smoke", "--out", str(out)]) == 1
    report = json.loads(out.read_text())
    assert report["failed"] == ["bad"] and [c["status"] for c in report["checks"]] == ["pass", "fail"]
    assert re.search(r"^FAIL +bad", capsys.readouterr().out, re.M)


def test_every_check_module_keeps_the_interface(gpu_check):
    checks = gpu_check.discover()
    names = {fn.__name__ for _, fn in checks}
    assert {"check_chat", "check_predict", "check_eval", "check_eval_mcq", "check_serve",
            "check_qlora_train_chat_merge", "check_fp16_gradscaler", "check_throughput_05b",
            "check_throughput_7b"} <= names
    assert all(callable(fn) and fn.__name__.startswith("check_") for _, fn in checks)


@pytest.mark.slow
def test_cpu_smoke_passes(tmp_path):
    """The whole device check on the CPU: every line passes, skips with a reason, or gives a figure."""
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(out)], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [l for l in proc.stdout.splitlines() if re.match(r"^(PASS|FAIL|SKIP|FIGURE) ", l)]
    report = json.loads(out.read_text())
    assert len(lines) == len(report["checks"]) >= 10
    for c in report["checks"]:
        assert c["status"] in ("pass", "skip", "figure"), c
        assert c["detail"].strip(), c  # a skip says why; a pass says what it saw
    by_name = {c["name"]: c for c in report["checks"]}
    for verb in ("chat", "predict", "eval", "eval_mcq", "serve"):
        assert "on cpu" in by_name[verb]["detail"]  # the log line that says where the model was loaded
    assert by_name["throughput_0.5b"]["figures"]["tokens_per_s"] > 0
    assert report["failed"] == [] and report["smoke"] is True
