"""The page's pieces without a browser: strings, allowed folders, the generated form, jobs, binding rules."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from chattune import cli, config
from chattune.errors import ChattuneError, ConfigError, DataError, RunDirError
from chattune.ui import form, jobs
from chattune.ui.context import Ctx
from chattune.ui.paths import Allowed, PathNotAllowedError
from chattune.ui.strings import LANGS, STRINGS, t

UI_SRC = Path(__file__).parents[2] / "src" / "chattune" / "ui"
ROOT = Path(__file__).parents[2]


# strings ------------------------------------------------------------------


def test_every_string_has_english_and_chinese():
    for key, texts in STRINGS.items():
        assert len(texts) == len(LANGS) == 2, key
        en, zh = texts
        assert en.strip() and zh.strip(), key
        assert re.search(r"[\u4e00-\u9fff]", zh), f"{key}: the Chinese text has no Chinese in it: {zh!r}"
        assert t(key, "en") == en and t(key, "zh") == zh


def string_keys_used() -> set[str]:
    """Every literal key handed to t(), ctx.t() or ctx.label() in the ui package."""
    used = set()
    for path in UI_SRC.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            args = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            if name == "t" and args:
                used.add(args[0])
            elif name == "label" and args:
                used.add(args[0])
    return used


def test_every_label_the_page_uses_is_in_the_table():
    used = string_keys_used()
    assert len(used) > 60
    assert used <= STRINGS.keys(), f"keys used but missing from strings.py: {sorted(used - STRINGS.keys())}"


# allowed folders ----------------------------------------------------------------


def test_paths_inside_the_working_folder_or_allow_dirs_only(tmp_path):
    work, extra, outside = tmp_path / "work", tmp_path / "extra", tmp_path / "outside"
    for d in (work, extra, outside):
        d.mkdir()
    (outside / "secret.json").write_text("[]")
    (work / "link").symlink_to(outside)
    allowed = Allowed.of(work, [str(extra)])
    assert allowed.check("data/x.json") == work / "data" / "x.json"
    assert allowed.check(extra / "y.json") == extra / "y.json"
    for bad in (outside / "secret.json", "../outside/secret.json", "link/secret.json", "/etc/passwd"):
        with pytest.raises(PathNotAllowedError) as exc:
            allowed.check(bad, what="data.train")
        assert exc.value.where == "data.train" and "--allow" in exc.value.fix
    with pytest.raises(ChattuneError, match="no data file given"):
        allowed.check("  ", what="data file")


# the form -------------------------------------------------------------------


def test_form_fields_are_the_config_schema_keys_with_their_defaults_and_help():
    specs = list(form.fields())
    assert [(s.key, s.default, s.help) for s in specs] == list(config.iter_keys())
    by_key = {s.key: s for s in specs}
    assert by_key["model.dtype"].kind == "choice" and by_key["model.dtype"].choices == ("auto", "bf16", "fp16", "fp32")
    assert by_key["train.gradient_checkpointing"].choices == ("true", "false", "auto")
    assert by_key["model.trust_remote_code"].kind == "bool"
    assert by_key["lora.r"].kind == "text" and by_key["lora.r"].help == "LoRA rank"


def test_form_values_become_the_overrides_of_the_cli():
    specs = list(form.fields())
    cfg = config.load(ROOT / "configs" / "demo.yaml")
    initial = form.initial_texts(specs, cfg)
    values = list(initial)
    keys = [s.key for s in specs]
    assert form.overrides(specs, initial, values) == []
    values[keys.index("train.epochs")] = "3"  # the preset holds 3.0: the same value
    values[keys.index("lora.r")] = "64"
    values[keys.index("model.trust_remote_code")] = True
    values[keys.index("data.system")] = ""
    extra = form.overrides(specs, initial, values)
    assert extra == ["model.trust_remote_code=true", "data.system=null", "lora.r=64"]
    assert config.load(ROOT / "configs" / "demo.yaml", extra).lora.r == 64
    assert form.command(ROOT / "configs" / "demo.yaml", extra, ROOT) == (
        "chattune train configs/demo.yaml model.trust_remote_code=true data.system=null lora.r=64")


def test_form_problems_are_the_cli_messages_by_key():
    demo = ROOT / "configs" / "demo.yaml"
    checked = form.check(demo, ["lora.r=0", "data.eval_ratio=0.1", "data.eval_size=3", "lora.rr=2"])
    assert checked.cfg is None
    with pytest.raises(ConfigError) as cli_error:
        config.load(demo, ["lora.r=0", "data.eval_ratio=0.1", "data.eval_size=3", "lora.rr=2"])
    assert all(message in cli_error.value.what for _, message in checked.problems)
    assert dict(checked.problems)["lora.r"] == "lora.r: Input should be greater than or equal to 1 (got 0)"
    assert dict(checked.problems)["lora.rr"] == "lora.rr: unknown key; did you mean lora.r?"
    assert "data" in dict(checked.problems)  # a rule over two keys belongs to the section
    assert form.check(demo, []).cfg.output_dir == "runs/demo"


# jobs: a run folder in use, a dead training, progress --------------------------------------------


def test_a_run_folder_in_use_is_refused(tmp_path):
    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    assert jobs.run_in_use(run) is None
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        from chattune.files import write_json

        write_json(jobs.record_path(run, "train"), {"pid": sleeper.pid, "command": [], "log": str(tmp_path / "l")})
        assert "running" in jobs.run_in_use(run)
        with pytest.raises(RunDirError, match="in use"):
            jobs.start("train", run, ["train", "x.yaml"], tmp_path)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert jobs.run_in_use(run) is None
    # A training started elsewhere (the CLI) that is writing metrics right now.
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    assert "metrics.jsonl" in jobs.run_in_use(run)
    old = time.time() - jobs.RECENT_S - 5
    os.utime(run / "metrics.jsonl", (old, old))
    assert jobs.run_in_use(run) is None
    # Metrics written a moment ago by the page's own training, which has stopped since: free again.
    os.utime(run / "metrics.jsonl")
    (tmp_path / "l").write_text("interrupted\n")
    assert jobs.run_in_use(run) is None


def test_a_dead_training_shows_its_last_error_not_a_traceback(tmp_path):
    from chattune.ui.tabs_run import status

    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    log = jobs.log_path(run, "train")
    log.parent.mkdir(parents=True)
    log.write_text("$ chattune train old.yaml\nerror: an older failure\n$ chattune train c.yaml\n"
                   "train:  22%|##  | 2/9 [00:02<00:07,  1.04s/step]\n"
                   "Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
                   "RuntimeError: CUDA out of memory\n")
    from chattune.files import write_json

    write_json(jobs.record_path(run, "train"), {"pid": 2 ** 22 + 12345, "command": [], "log": str(log)})
    state, text = status(run, "en")
    assert state == "died"
    assert "RuntimeError: CUDA out of memory" in text and "start again to resume" in text
    assert "Traceback" not in text and "older failure" not in text
    assert jobs.progress(log) == (2, 9, "00:07")
    log.write_text("$ chattune train c.yaml\nerror: data/x.json:3: not valid JSON — fix it\n")
    assert jobs.last_error(log) == "error: data/x.json:3: not valid JSON — fix it"
    log.write_text("$ chattune train c.yaml\ninterrupted\n")
    assert status(run, "en")[0] == "stopped"


def test_an_unparsable_data_file_starts_nothing(tmp_path):
    from chattune.ui.tabs_run import refuse_bad_data

    bad = ROOT / "tests" / "fixtures" / "data" / "bad_line.jsonl"
    cfg = config.load(ROOT / "configs" / "demo.yaml", [f"data.train=[{bad}]", f"output_dir={tmp_path / 'r'}"])
    with pytest.raises(DataError) as exc:
        refuse_bad_data(cfg)
    assert re.search(r"bad_line\.jsonl:\d+", exc.value.where) and "nothing was started" in exc.value.what
    assert not (tmp_path / "r").exists()


# binding and the command line ----------------------------------------------------------------------


def test_other_addresses_than_loopback_need_a_password(monkeypatch):
    from chattune.ui.server import AUTH_ENV, parse_auth

    monkeypatch.delenv(AUTH_ENV, raising=False)
    assert parse_auth(None, "127.0.0.1") is None
    with pytest.raises(ConfigError, match="--auth") as exc:
        parse_auth(None, "0.0.0.0")
    assert exc.value.where == "--host"
    assert parse_auth("ada:s3cret", "0.0.0.0") == ("ada", "s3cret")
    with pytest.raises(ConfigError, match="user:password"):
        parse_auth("ada", "0.0.0.0")
    monkeypatch.setenv(AUTH_ENV, "bob:pw:with:colons")
    assert parse_auth(None, "0.0.0.0") == ("bob", "pw:with:colons")


def test_cli_refuses_a_public_address_without_auth(monkeypatch, capsys):
    monkeypatch.delenv("CHATTUNE_UI_AUTH", raising=False)
    assert cli.main(["ui", "--host", "0.0.0.0", "--port", "7999"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --host: listening on 0.0.0.0") and "Traceback" not in err


def test_ui_options_are_listed_by_keys(capsys):
    assert cli.main(["keys"]) == 0
    out = capsys.readouterr().out
    for key in ("ui.host", "ui.port", "ui.lang", "ui.allow", "ui.auth"):
        assert key in out
    args = cli.build_parser().parse_args(["ui", "--allow", "a", "--allow", "b", "--lang", "zh"])
    assert (args.allow, args.lang, args.host, args.port) == (["a", "b"], "zh", "127.0.0.1", 7860)


def test_an_unexpected_error_is_one_line_and_its_traceback_goes_to_the_log(tmp_path):
    import logging

    from chattune.ui.context import Ctx, message

    log_file = tmp_path / "ui.log"
    handler = logging.FileHandler(log_file)
    logging.getLogger("chattune").addHandler(handler)
    try:
        try:
            raise KeyError("boom")
        except KeyError as exc:
            shown = message(exc, Ctx(Allowed.of(tmp_path), log_file=log_file), "zh")
    finally:
        logging.getLogger("chattune").removeHandler(handler)
        handler.close()
    assert shown.startswith("意外错误: KeyError") and str(log_file) in shown and "Traceback" not in shown
    assert "Traceback" in log_file.read_text() and "KeyError: 'boom'" in log_file.read_text()
    user = message(DataError("bad row", where="d.json:3", fix="fix it"), Ctx(Allowed.of(tmp_path)), "en")
    assert user == "d.json:3: bad row — fix it"


def test_the_export_tab_offers_gguf_and_ollama_as_the_cli_does(tmp_path, monkeypatch):
    from chattune.export.quants import QUANTS
    from chattune.ui import app, tabs_results

    run = tmp_path / "runs" / "demo"
    assert tabs_results.ACTIONS["export"](None, run, "ollama", "q8_0", False) == \
        ["export", str(run), "--to", "ollama", "--quant", "q8_0"]
    assert tabs_results.ACTIONS["export"](None, run, "gguf", "f16", True)[-1] == "--overwrite"
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # gradio warns of anything but a tab directly in gr.Tabs
        page = app.build(Ctx(Allowed.of(tmp_path)))  # the whole page builds, the export section in it
    ids = {getattr(b, "elem_id", None) for b in page.blocks.values()}
    assert {"merge-go", "gguf-go"} <= ids
    quant = next(b for b in page.blocks.values() if getattr(b, "label", None) == "Quantisation")
    assert [c[1] for c in quant.choices] == list(QUANTS)
