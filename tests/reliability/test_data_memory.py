"""Memory-bounded data: peak RSS of `data check` and of training's tokenisation as the JSONL file grows.

A 1 GB file takes about 25 minutes for both steps on a 2-core CPU, so this test measures two sizes (SMALL and LARGE MB)
in child processes and extrapolates the growth to 1 GB; benchmarks/data_memory.py measures 1 GB itself
(the numbers are in benchmarks/RESULTS.md and docs/reliability.md).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "data_memory.py"
SMALL, LARGE = 10, 40  # MB of JSONL; 10 MB already renders many chunks, so the difference is growth, not warm-up
GIB = 2**30


def bench():
    spec = importlib.util.spec_from_file_location("data_memory", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def peaks(tiny_model_dir, tmp_path_factory) -> dict[tuple[str, int], tuple[int, int, str, Path]]:
    """(step, MB) -> (peak RSS bytes, rows, the child's output, its folder) of data check and of the tokenisation."""
    b = bench()
    out = {}
    for mb in (SMALL, LARGE):
        folder = tmp_path_factory.mktemp(f"data{mb}")
        data = folder / "big.jsonl"
        rows = b.write_rows(data, mb)
        cfg = b.write_config(folder, data, tiny_model_dir)
        for step in ("check", "tokenise"):
            peak, _, output = b.measure(step, cfg, folder)
            out[step, mb] = (peak, rows, output, folder)
            print(f"{step}: {data.stat().st_size / 1e6:.1f} MB, {rows} rows, peak RSS {peak / GIB:.3f} GiB")
    return out


def per_gb(peaks, step: str) -> float:
    """Growth of the peak per GB of JSONL, from the two sizes."""
    return (peaks[step, LARGE][0] - peaks[step, SMALL][0]) / (LARGE - SMALL) * 1000


@pytest.mark.slow
def test_data_check_stays_under_2_gib_for_a_1_gb_file(peaks):
    _, rows, output, folder = peaks["check", LARGE]
    report = json.loads((folder / "check" / "check.json").read_text())
    assert report["conversations"] == report["render"]["samples"] == rows  # every row read and counted
    assert sum(count for _, _, count in report["histogram"]) == rows and report["lengths"]["total"]["max"] < 256
    assert "ok: training would use" in output
    at_1gb = peaks["check", SMALL][0] + per_gb(peaks, "check")
    assert at_1gb < 2 * GIB, f"data check would peak at {at_1gb / GIB:.2f} GiB on 1 GB ({peaks})"
    # The old in-memory check grew by about 27 GB per GB (every token a Python int); now ~300 bytes per row.
    assert per_gb(peaks, "check") < 1 * GIB, f"{per_gb(peaks, 'check') / GIB:.2f} GiB per GB of JSONL"


@pytest.mark.slow
def test_tokenisation_stays_under_2_gib_for_a_1_gb_file(peaks):
    rows = peaks["tokenise", LARGE][1]
    assert f"SAMPLES {rows - 5}" in peaks["tokenise", LARGE][2]  # one sample per row, less 5 probes (probe_size)
    at_1gb = peaks["tokenise", SMALL][0] + per_gb(peaks, "tokenise")
    assert at_1gb < 2 * GIB, f"tokenisation would peak at {at_1gb / GIB:.2f} GiB on 1 GB ({peaks})"
    # Samples as Python lists added about 27 bytes per byte of JSONL, conversations as dicts about 2.4; what
    # is left is the packed conversations (about 1.2).
    assert per_gb(peaks, "tokenise") < 1.6 * GIB, f"{per_gb(peaks, 'tokenise') / GIB:.2f} GiB per GB of JSONL"
