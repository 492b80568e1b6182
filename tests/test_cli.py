"""The command line: `chattune keys`, warnings (known noise filtered, the rest shown), quick answers without torch."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from chattune import cli, config, options

SRC = Path(cli.__file__).resolve().parents[1]
QUIET_ENV = ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")  # what cli.main sets before transformers loads


@pytest.fixture(autouse=True)
def _restore_quiet_env(monkeypatch):
    for name in QUIET_ENV:
        monkeypatch.delenv(name, raising=False)  # and put back as it was after the test


def keys_output(capsys) -> list[str]:
    assert cli.main(["--debug", "keys"]) == 0  # --debug: leave the process's warning filters alone
    return capsys.readouterr().out.splitlines()


def test_keys_lists_the_config_keys_then_every_verb_option_with_its_default(capsys):
    lines = keys_output(capsys)
    config_keys = list(config.iter_keys())
    assert [line.split()[0] for line in lines[:len(config_keys)]] == [k for k, _, _ in config_keys]
    rest = lines[len(config_keys):]
    for key, default, help_ in options.iter_keys():
        (line,) = [line for line in rest if line.split() and line.split()[0] == key]
        assert re.fullmatch(rf"{re.escape(key)} +{re.escape(repr(default))}  {re.escape(help_)}", line), line
    assert any("serve.port" in line and "8000" in line for line in rest)


def test_every_chattune_command_named_in_the_sources_exists():
    (sub,) = [a for a in cli.build_parser()._actions if a.dest == "verb"]
    named = {m for path in SRC.rglob("*.py") for m in re.findall(r"`chattune ([a-z][a-z-]*)", path.read_text("utf-8"))}
    assert named and named <= set(sub.choices), named - set(sub.choices)


def run_python(code: str) -> None:
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(SRC)}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_keys_and_config_errors_answer_without_importing_torch_or_transformers():
    run_python("import sys; from chattune import cli\n"
               "assert cli.main(['keys']) == 0 and cli.main(['train', 'missing.yaml']) == 2\n"
               "assert not {'torch', 'transformers'} & set(sys.modules), 'imported'")


def test_transformers_loaded_later_is_still_quiet():
    run_python("import logging; from chattune import cli\n"
               "cli.main(['keys'])\n"
               "from transformers.utils import logging as hf_logging\n"
               "assert hf_logging.get_verbosity() == logging.ERROR and not hf_logging.is_progress_bar_enabled()")


# --- warnings -------------------------------------------------------------------------------------------


def emit(category: type[Warning], module: str, message: str) -> None:
    """A warning as if `module` had issued it."""
    warnings.warn_explicit(message, category, filename=module.replace(".", "/") + ".py", lineno=1, module=module)


def seen_through_main(argv: list[str], *emitted: tuple[type[Warning], str, str]) -> list[str]:
    """Messages of the warnings that reach the user when a verb run by cli.main issues `emitted`."""
    def verb(args) -> None:
        for warning in emitted:
            emit(*warning)

    with warnings.catch_warnings(record=True) as seen:  # restores the filters main() adds
        warnings.simplefilter("always")
        assert cli.main(argv, entry=verb) == 0
    return [str(w.message) for w in seen]


@pytest.mark.parametrize("noisy", cli.NOISY_WARNINGS, ids=lambda w: w[1])
def test_a_known_noisy_warning_is_filtered(noisy):
    category, module, message = noisy
    assert seen_through_main(["keys"], (category, module, message + " (and the rest of it)")) == []


def test_other_warnings_reach_the_user():
    category, module, message = cli.NOISY_WARNINGS[0]
    others = [
        (UserWarning, "transformers.generation.utils", "a warning nobody listed"),
        (category, module, "the same module and category, another message"),
        (RuntimeWarning, module, message),  # the listed message, another category
        (category, module + "_other", message),  # another module whose name starts the same
    ]
    assert seen_through_main(["keys"], *others) == [m for _, _, m in others]


def test_debug_shows_the_noisy_warnings_too():
    noisy = [(c, m, text + " ...") for c, m, text in cli.NOISY_WARNINGS]
    assert seen_through_main(["--debug", "keys"], *noisy) == [m for _, _, m in noisy]
