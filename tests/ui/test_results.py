"""The Evaluate, Export and Runs tabs' handlers on a trained tiny run: they run the CLI and show what it wrote."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from chattune.errors import ChattuneError
from chattune.ui import form
from chattune.ui.context import Ctx
from chattune.ui.paths import Allowed, PathNotAllowedError
from chattune.ui.tabs_config import Form
from chattune.ui import tabs_results
from tests.conftest import train_tiny_run

FIXTURE = Path(__file__).parents[1] / "fixtures" / "data" / "alpaca.json"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir) -> Path:
    folder = tmp_path_factory.mktemp("ui-results")
    run = train_tiny_run(folder, tiny_model_dir)
    shutil.copy(FIXTURE, folder / "test.json")
    return run


def test_evaluate_runs_chattune_eval_and_shows_base_and_tuned(trained, monkeypatch):
    folder = trained.parent
    monkeypatch.chdir(folder)
    ctx, fm = Ctx(Allowed.of(folder)), Form(list(form.fields()))
    shown = list(tabs_results.evaluate(ctx, fm, "en", "run", "test.json", "", True, "3", "bleu,rouge"))
    assert "data-job='running'" in shown[0][0] and "data-job='done'" in shown[-1][0]
    record = json.loads((trained / "eval" / "test.json").read_text())
    assert record["rows"] == 3 and {"base", "tuned"} <= record["metrics"].keys()
    table = shown[-1][1]
    assert "data-eval=\"test\"" in table and "base model" in table and "tuned model" in table
    assert "bleu-4" in table.lower() or "bleu" in table.lower()
    with pytest.raises(PathNotAllowedError):
        list(tabs_results.evaluate(ctx, fm, "en", "run", "/etc/hosts", "", True, "", "bleu"))


def test_a_failed_eval_shows_the_cli_error(trained, monkeypatch):
    folder = trained.parent
    monkeypatch.chdir(folder)
    (folder / "broken.jsonl").write_text('{"instruction": "a", "output": "b"}\n{not json\n')
    ctx, fm = Ctx(Allowed.of(folder)), Form(list(form.fields()))
    with pytest.raises(ChattuneError) as exc:
        list(tabs_results.evaluate(ctx, fm, "en", "run", "broken.jsonl", "", False, "", "bleu"))
    assert "`chattune eval` failed: error:" in exc.value.what and "broken.jsonl:2" in exc.value.what


def test_runs_lists_every_run_with_its_report_and_compares_two(trained, monkeypatch):
    folder = trained.parent
    monkeypatch.chdir(folder)
    shutil.copytree(trained, folder / "runs" / "a")
    shutil.copytree(trained, folder / "runs" / "b")
    ctx = Ctx(Allowed.of(folder))
    table, pick = tabs_results.list_runs(ctx, "zh", "runs")
    assert (folder / "runs" / "a" / "report.html").is_file()
    assert "data-report='a'" in table and "data-report='b'" in table and "报告" in table
    assert pick["choices"] == [("runs/a", "runs/a"), ("runs/b", "runs/b")] or pick["choices"] == ["runs/a", "runs/b"]
    side = tabs_results.compare_runs(ctx, "en", ["runs/a", "runs/b"])
    assert "id=\"comparison\"" in side and side.count("data-series=") >= 2
    with pytest.raises(PathNotAllowedError):
        tabs_results.list_runs(ctx, "en", "/tmp")
