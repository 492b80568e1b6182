"""`chattune report`: one self-contained HTML page, checked as text and in a real headless Chromium."""

import json
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from chattune import cli, config
from chattune.report import html as report_html
from chattune.report.runs import load_run, load_runs
from chattune.files import write_json

ARTIFACTS = Path(__file__).parents[2] / "test-artifacts"


class Dom(HTMLParser):
    """The parts of a report page the tests look at: charts with their series, tables with their rows."""

    def __init__(self, text: str):
        super().__init__()
        self.charts: dict[str, list[tuple[str, int]]] = {}
        self.tables: list[dict] = []
        self._chart = None
        self._table = None
        self._cell = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "svg" and "data-chart" in a:
            self._chart = self.charts.setdefault(a["data-chart"], [])
        elif tag == "polyline" and self._chart is not None:
            self._chart.append((a.get("data-series"), int(a.get("data-points", 0))))
        elif tag == "table":
            self._table = {"class": a.get("class"), "rows": []}
            self.tables.append(self._table)
        elif tag == "tr" and self._table is not None:
            self._table["rows"].append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "svg":
            self._chart = None
        elif tag in ("td", "th") and self._cell is not None:
            self._table["rows"][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def table(self, css: str) -> list[dict]:
        return [t for t in self.tables if t["class"] == css]


def rows_of(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]


# ---------------------------------------------------------------------------
# a crafted run directory (no training)


def crafted_run(root: Path, *, epochs=(0, 2), answer="<script>alert(1)</script> & more") -> Path:
    root.mkdir(parents=True)
    cfg = config.validate({"data": {"train": ["data/legal.jsonl"]}, "model": {"name_or_path": "Qwen/Qwen2.5-7B-Instruct"},
                           "output_dir": str(root)})
    config.dump(cfg, root / "run_config.yaml")
    metrics = [{"step": s, "epoch": s / 4, "loss": 3.0 - 0.2 * s, "grad_norm": 1.0 + 0.1 * s, "learning_rate": 1e-4,
                "tokens_per_s": 900.0} for s in range(1, 9)]
    metrics.insert(4, {"step": 4, "epoch": 1.0, "eval_loss": 2.5, "eval_ppl": 12.18})
    (root / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    for e in epochs:
        (root / "predictions").mkdir(exist_ok=True)
        rows = [{"epoch": e, "step": 4 * e, "question": f"问题 {i} <b>?", "answer": f"{answer} (epoch {e})",
                 "reference": "参考答案"} for i in range(3)]
        (root / "predictions" / f"epoch_{e}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    write_json(root / "eval" / "legal.json", {"kind": "generation", "rows": 50, "metrics": {
        "base": {"bleu-4": 3.1, "rouge-l": 10.5}, "tuned": {"bleu-4": 12.25, "rouge-l": 30.75}}})
    write_json(root / "eval" / "mcq.json", {"kind": "mcq", "rows": 40, "metrics": {
        "tuned": {"accuracy": 55.0, "ci95": [40.0, 69.0], "correct": 22, "n": 40}}})
    return root


def test_page_is_self_contained_and_escapes_every_text(tmp_path):
    run = crafted_run(tmp_path / "legal-7b")
    page = report_html.build(load_runs([run]))
    for forbidden in ("http://", "https://", "<script", "<link", " src=", "@import", "url("):
        assert forbidden not in page, forbidden
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more (epoch 2)" in page
    dom = Dom(page)
    (preds,) = dom.table("predictions")
    assert preds["rows"][0] == ["#", "question", "base model (before training)", "tuned model (epoch 2)", "reference"]
    assert preds["rows"][1] == ["1", "问题 0 <b>?", "<script>alert(1)</script> & more (epoch 0)",
                                "<script>alert(1)</script> & more (epoch 2)", "参考答案"]
    assert dom.charts["run-0-loss"] == [("train loss", 8), ("eval loss", 1)]
    assert dom.charts["run-0-lr"] == [("learning rate", 8)] and dom.charts["run-0-grad-norm"] == [("grad norm", 8)]
    evals = dom.table("eval")
    assert ["rouge-l", "10.50", "30.75"] in evals[0]["rows"] and ["ci95", "40.0 – 69.0"] in evals[1]["rows"]
    # The class name alone is in the page's CSS; the badge itself says the run did not finish (no summary.json).
    assert '<span class="status-unfinished">unfinished</span>' in page


def test_only_base_answers_say_so(tmp_path):
    page = report_html.build([load_run(crafted_run(tmp_path / "r", epochs=(0,)))])
    (preds,) = Dom(page).table("predictions")
    assert preds["rows"][0] == ["#", "question", "base model (before training)", "reference"]
    assert "no epoch finished" in page


def test_not_a_run_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path), "--out", str(tmp_path / "r.html")]) == 2
    assert "neither a run directory nor a folder holding runs" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


# ---------------------------------------------------------------------------
# the sweep's two real runs (tests/tools/conftest.py), in a real browser


def chromium() -> str | None:
    return shutil.which("chromium") or (Path("/usr/bin/chromium").is_file() and "/usr/bin/chromium") or None


def headless(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--window-size=1280,2000", "--hide-scrollbars"]
    return subprocess.run([browser, *flags, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def report_file(sweep_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report.html"
    assert cli.main(["report", str(sweep_dir), "--out", str(out)]) == 0
    return out


def test_sweep_folder_expands_to_its_runs_in_order(sweep_dir):
    assert [r.name for r in load_runs([sweep_dir])] == ["r4", "r8"]


def assert_page_shows_the_sweep(dom: Dom, sweep_dir: Path) -> None:
    """The comparison (one row and one overlaid loss line per run), each run's curves with one point per logged
    step of its metrics.jsonl, and its probe answers before and after training, row for row."""
    (comparison,) = dom.table("comparison")
    assert [r[0] for r in comparison["rows"][1:]] == ["r4", "r8"]
    assert [s for s, _ in dom.charts["compare-loss"]] == ["r4", "r8"]
    for i, name in enumerate(["r4", "r8"]):
        metrics = rows_of(sweep_dir / name / "metrics.jsonl")
        n_train = sum(1 for m in metrics if "loss" in m)
        n_eval = sum(1 for m in metrics if "eval_loss" in m)
        assert dom.charts[f"run-{i}-loss"] == [("train loss", n_train), ("eval loss", n_eval)]
        assert dom.charts[f"run-{i}-lr"] == [("learning rate", n_train)]
        assert dom.charts[f"run-{i}-grad-norm"] == [("grad norm", n_train)]
    # The probes: each question with the base model's and the tuned model's answers, side by side.
    tables = dom.table("predictions")
    assert len(tables) == 2
    for table, name in zip(tables, ["r4", "r8"]):
        epochs = sorted(int(p.stem.split("_")[1]) for p in (sweep_dir / name / "predictions").glob("epoch_*.jsonl"))
        before = rows_of(sweep_dir / name / "predictions" / "epoch_0.jsonl")
        after = rows_of(sweep_dir / name / "predictions" / f"epoch_{epochs[-1]}.jsonl")
        assert table["rows"][0] == ["#", "question", "base model (before training)", f"tuned model (epoch {epochs[-1]})",
                                    "reference"]
        assert [r[1:] for r in table["rows"][1:]] == [[b["question"], b["answer"], a["answer"], b["reference"]]
                                                     for b, a in zip(before, after)]


def test_report_file_holds_every_runs_numbers(report_file, sweep_dir):
    # Without a browser too: the written page itself, not only that it exists.
    page = report_file.read_text(encoding="utf-8")
    assert_page_shows_the_sweep(Dom(page), sweep_dir)
    assert page.count('<span class="status-finished">finished</span>') == 2, "both runs of the sweep finished"
    assert '<span class="status-unfinished">' not in page


def test_browser_shows_the_curves_and_the_prediction_table(report_file, sweep_dir, tmp_path):
    browser = chromium()
    if browser is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
    dom_text = headless(browser, tmp_path / "dom", "--dump-dom", report_file.as_uri()).stdout
    assert_page_shows_the_sweep(Dom(dom_text), sweep_dir)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    headless(browser, tmp_path / "shot", f"--screenshot={shot}", report_file.as_uri())
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24]) == (1280, 2000)
