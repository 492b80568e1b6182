"""A tiny training run tracked by SwanLab (local mode) and TensorBoard, then seen through `chattune dashboard`:
its JSON API, and a real headless Chromium with a screenshot kept in test-artifacts/."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pytest

from chattune import cli
from chattune.track.base import prediction_caption, prediction_text

ROOT = Path(__file__).parents[2]
FIX = ROOT / "tests" / "fixtures" / "data"
ARTIFACTS = ROOT / "test-artifacts"
SECRET = "sk-chattune-test-0123456789abcdef"
TRAIN_CHARTS = ["train/loss", "train/grad_norm", "train/learning_rate", "train/epoch", "train/tokens_per_s"]
EPOCHS = 2
# The tests of the tracked project: a training run with SwanLab and TensorBoard, a dashboard process, a browser
# (58 s of fixture set-up in the fast suite on a shared 2-core CPU at load 10, about 16 s alone).
slow = pytest.mark.slow


def train(tmp: Path, tiny_model_dir: Path, out: Path, *extra: str) -> int:
    cfg = tmp / "c.yaml"
    cfg.write_text(f"model:\n  name_or_path: {tiny_model_dir}\n  dtype: fp32\ndata:\n  train: {FIX / 'alpaca.json'}\n")
    # 5 rows: 2 held out as probes, 3 trained on in 2 steps per epoch; a high rate so the answers change.
    return cli.main(["train", str(cfg), f"output_dir={out}", f"train.epochs={EPOCHS}", "train.batch_size=2",
                     "train.grad_accum=1", "train.learning_rate=5e-2", "train.logging_steps=1",
                     "tracking.probe_size=2", "tracking.probe_max_new_tokens=8", *extra])


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir, module_network_attempts):
    """A project folder holding one run tracked in SwanLab local mode (+ TensorBoard), trained with no network."""
    tmp = tmp_path_factory.mktemp("track")
    proj = tmp / "legalproj"
    with pytest.MonkeyPatch.context() as mp:
        # A key in the environment must not leak into anything local mode writes.
        mp.setenv("SWANLAB_API_KEY", SECRET)
        mp.setenv("HOME", str(tmp / "home"))
        assert train(tmp, tiny_model_dir, proj / "run", "tracking.backends=[swanlab,tensorboard]") == 0
    return proj


@pytest.fixture(scope="module")
def dashboard(project):
    """`chattune dashboard RUN --port P` on a free loopback port: (base url, the lines it printed first)."""
    proc, base, printed = start_dashboard(project / "run")
    try:
        yield base, printed
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def start_dashboard(run: Path, attempts: int = 3) -> tuple[subprocess.Popen, str, list[str]]:
    """Start the dashboard on a port that was free a moment ago; wait until its API answers.

    `chattune dashboard` takes a fixed --port, so another process may take the port between our probe and
    the dashboard's bind. The dashboard then stops at once saying the port is in use: try another port.
    """
    for _ in range(attempts):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from chattune.cli import main; sys.exit(main(sys.argv[1:]))",
             "dashboard", str(run), "--port", str(port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        printed = [proc.stdout.readline(), proc.stdout.readline()]
        base = f"http://127.0.0.1:{port}"
        if wait_for_api(proc, base):
            return proc, base, printed
        output = "".join(printed) + proc.stdout.read()
        if not any(sign in output for sign in ("already in use", "Errno 98")):
            raise AssertionError(f"the dashboard stopped: {output}")
    raise AssertionError(f"the dashboard found no free port in {attempts} attempts")


def wait_for_api(proc: subprocess.Popen, base: str, timeout_s: float = 60) -> bool:
    """True once the API answers; False if the process stopped first."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            api(base, "/project")
            return True
        except OSError:
            if proc.poll() is not None:
                return False
            if time.monotonic() > deadline:
                proc.terminate()
                raise AssertionError(f"dashboard did not answer within {timeout_s:.0f} s")
            time.sleep(0.3)


def api(base: str, path: str):
    with urllib.request.urlopen(f"{base}/api/v1{path}", timeout=10) as r:
        body = json.loads(r.read().decode("utf-8"))
    assert body["code"] == 0, body
    return body["data"]


def experiment(base: str) -> dict:
    (exp,) = [e for e in api(base, "/project")["experiments"] if e["name"] == "run"]
    return exp


def tag(base: str, exp_id: int, name: str) -> list[dict]:
    return api(base, f"/experiment/{exp_id}/tag/{quote(name, safe='')}")["list"]


@slow
def test_dashboard_prints_its_address_and_the_run_page(dashboard):
    base, printed = dashboard
    exp_id = experiment(base)["id"]
    assert printed[0].startswith(f"SwanLab dashboard: {base}")
    assert f"{base}/experiment/{exp_id}/chart" in printed[1]


@slow
def test_api_lists_project_experiment_config_and_metric_keys(dashboard, project):
    base, _ = dashboard
    assert api(base, "/project")["name"] == "legalproj", "project name defaults to the output folder's parent"
    exp = api(base, f"/experiment/{experiment(base)['id']}")
    config = {k: v["value"] for k, v in exp["config"].items()}
    model_info = json.loads((project / "run" / "model_info.json").read_text())
    assert config["lora"]["r"] == 8 and config["train"]["learning_rate"] == 5e-2
    assert config["model_info"]["trainable_params"] == model_info["trainable_params"] > 0
    assert config["data_stats"]["samples"] == 3 and config["system"]["torch"]
    assert exp["system"]["hardware"]["cpu"], "SwanLab's own system information is there too"
    charts = {c["name"] for c in api(base, f"/experiment/{exp['id']}/chart")["charts"]}
    assert set(TRAIN_CHARTS) | {"Prediction"} <= charts


@slow
def test_logged_metrics_equal_metrics_jsonl(dashboard, project):
    base, _ = dashboard
    exp_id = experiment(base)["id"]
    metrics = rows(project / "run" / "metrics.jsonl")
    assert [r["step"] for r in metrics] == list(range(1, 2 * EPOCHS + 1))
    for chart in TRAIN_CHARTS:
        key = chart.split("/")[1]
        logged = [(p["index"], p["data"]) for p in tag(base, exp_id, chart)]
        assert logged == [(r["step"], pytest.approx(r[key])) for r in metrics], chart


@slow
def test_prediction_panel_equals_the_prediction_files(dashboard, project):
    base, _ = dashboard
    logged = tag(base, experiment(base)["id"], "Prediction")
    files = [rows(project / "run" / "predictions" / f"epoch_{k}.jsonl") for k in range(EPOCHS + 1)]
    # epoch 0 (the base model) at step 0, then one entry at the last step of every epoch.
    assert [p["index"] for p in logged] == [0, 2, 4] == [f[0]["step"] for f in files]
    for entry, probe_rows in zip(logged, files):
        assert entry["data"] == [prediction_text(r) for r in probe_rows]
        assert [m["caption"] for m in entry["more"]] == [prediction_caption(r, i) for i, r in enumerate(probe_rows)]
    assert files[0][0]["question"] == "Name the three primary colors." and files[0][0]["reference"] == "Red, yellow and blue."
    assert [r["answer"] for r in files[0]] != [r["answer"] for r in files[-1]], "training changed the answers"


@slow
def test_nothing_reached_the_network_and_the_key_is_nowhere(project, module_network_attempts):
    assert module_network_attempts == []
    files = [f for f in project.rglob("*") if f.is_file()]
    assert any(f.name == "runs.swanlab" for f in files) and any("console" in f.parts for f in files)
    for f in files:
        assert SECRET.encode() not in f.read_bytes(), f


@slow
def test_tensorboard_got_the_same_scalars_and_predictions(project):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(project / "run" / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    metrics = rows(project / "run" / "metrics.jsonl")
    assert set(TRAIN_CHARTS) <= set(acc.Tags()["scalars"])
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(r["step"], pytest.approx(r["loss"])) for r in metrics]
    texts = acc.Tensors("Prediction/text_summary")
    assert [t.step for t in texts] == [0, 2, 4]
    first = rows(project / "run" / "predictions" / "epoch_0.jsonl")[0]
    assert first["question"] in texts[0].tensor_proto.string_val[0].decode()


def test_tracking_none_still_writes_predictions(tmp_path, tiny_model_dir):
    out = tmp_path / "proj" / "run"
    assert train(tmp_path, tiny_model_dir, out, "tracking.backends=[none]", "train.epochs=1") == 0
    assert sorted(p.name for p in (out / "predictions").iterdir()) == ["epoch_0.jsonl", "epoch_1.jsonl"]
    assert all(len(rows(p)) == 2 for p in (out / "predictions").iterdir())
    assert not (tmp_path / "proj" / "swanlog").exists() and not (out / "tracking.json").exists()
    assert not (out / "tensorboard").exists()


# ---------------------------------------------------------------------------
# a real browser


def chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def headless(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--window-size=1400,1500", "--hide-scrollbars",
             # Let the page's scripts run (and fetch from the API) before the DOM is dumped / the shot is taken.
             "--virtual-time-budget=20000"]
    return subprocess.run([browser, *flags, *args], capture_output=True, text=True, timeout=120)


@slow
def test_browser_shows_the_loss_chart(dashboard, tmp_path):
    browser = chromium()
    if browser is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
    base, _ = dashboard
    page = f"{base}/experiment/{experiment(base)['id']}/chart"
    for attempt in range(3):  # the first start of a fresh profile is sometimes slow to render
        dom = headless(browser, tmp_path / f"dom{attempt}", "--dump-dom", page).stdout
        if "train/loss" in dom and "<canvas" in dom:
            break
    assert "train/loss" in dom and "<canvas" in dom, dom[-2000:]
    assert "Prediction" in dom and "train/grad_norm" in dom and "train/learning_rate" in dom

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "swanlab_experiment.png"
    shot.unlink(missing_ok=True)
    headless(browser, tmp_path / "shot", f"--screenshot={shot}", page)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24]) == (1400, 1500)
    assert len(data) > 20_000, "a page with charts, not a blank one"
