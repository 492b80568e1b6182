"""benchmarks/gpu_check_train.py in its CPU smoke form: every check answers in the framework's shape and passes
or skips with a reason (the fast test runs the quick ones, the slow test all of them)."""

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_module():
    path = ROOT / "benchmarks" / "gpu_check_train.py"
    spec = importlib.util.spec_from_file_location("gpu_check_train_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(check, tmp_path):
    workdir = tmp_path / check.__name__
    workdir.mkdir()
    ctx = SimpleNamespace(device="cpu", smoke=True, workdir=workdir, python=sys.executable, repo=ROOT)
    r = check(ctx)
    assert set(r) == {"name", "status", "detail", "figures"} and r["detail"], r
    assert r["name"] == check.__name__.removeprefix("check_")
    assert all(isinstance(v, float) for v in r["figures"].values()), r
    assert r["status"] in ("pass", "skip"), r
    return r


def test_quick_checks_pass_or_skip_on_the_cpu(tmp_path):
    m = load_module()
    names = [c.__name__ for c in m.CHECKS]
    assert names == ["check_packed_varlen", "check_sliding_window", "check_fused_lora_autocast", "check_chunked_ce",
                     "check_zero3_memory", "check_fsdp2_probes"]
    for check in (m.check_chunked_ce, m.check_zero3_memory, m.check_fsdp2_probes):
        r = run(check, tmp_path)
        if r["status"] == "skip":
            assert "tests/distributed/" in r["detail"]  # says where the CPU shows it instead


@pytest.mark.slow
def test_every_check_passes_or_skips_in_smoke_mode(tmp_path):
    m = load_module()
    statuses = {run(check, tmp_path)["name"]: None for check in m.CHECKS}
    assert len(statuses) == 6
