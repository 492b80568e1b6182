"""The exceptions chattune raises for user mistakes, one class per cause, and the CLI's exit statuses.

Every error carries three things a user needs: where (file, line, key), what is
wrong, and how to fix it. The CLI prints them as one paragraph and exits with
the error's exit_code (2 unless a class says otherwise); anything that is not a
ChattuneError is a bug and keeps its traceback. EXIT_CODES lists every status.
"""

from __future__ import annotations

import importlib.util

# Every exit status of the `chattune` command (docs/reliability.md shows the same table).
EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "a bug: an unexpected exception, printed with its traceback (also torchrun's status when a training "
       "process of `chattune train --nproc N` failed)",
    2: "a user mistake (a ChattuneError: config, data, model, run directory, missing optional package) or a "
       "command line argparse rejects; one paragraph: where, what, fix",
    3: "`chattune merge`: the merged model does not reproduce the adapter's logits (MergeCheckError); "
       "`chattune export`: the GGUF does not answer like the trained model at f16/bf16 (ExportCheckError)",
    130: "interrupted by Ctrl-C (128 + SIGINT); training saves a checkpoint and prints the command that resumes",
}
# `chattune train --nproc N` returns torchrun's own exit status as is: 0, 1 (a worker failed: its traceback
# is above), or 130 when Ctrl-C stopped the workers (chattune turns that into KeyboardInterrupt).


class ChattuneError(Exception):
    """Base class: a problem the user can fix, reported without a traceback."""

    exit_code = 2

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        self.what = what
        self.where = where
        self.fix = fix
        super().__init__(self.render())

    def render(self) -> str:
        """One readable paragraph: 'where: what — fix'."""
        text = f"{self.where}: {self.what}" if self.where else self.what
        if self.fix:
            text += f" — {self.fix}"
        return text


class ConfigError(ChattuneError):
    """The YAML config or a key=value override is invalid."""


class DataError(ChattuneError):
    """A data file or one of its records cannot be used."""


class TemplateError(ChattuneError):
    """A chat template cannot give correct labels or train/inference parity."""


class ModelError(ChattuneError):
    """A model cannot be found, fetched or loaded as configured."""


class RunDirError(ChattuneError):
    """A run directory is missing files or would be overwritten."""


class StorageError(ChattuneError):
    """A file could not be written: the disk (or quota) is full, or the folder is not writable."""


class LockedError(ChattuneError):
    """Another live chattune process is writing to the same output (the lock file names it)."""


class MergeCheckError(ChattuneError):
    """The merged model does not reproduce the adapter model's logits."""

    exit_code = 3


class ExportCheckError(ChattuneError):
    """An exported GGUF does not answer like the trained model (the parity check of `chattune export`)."""

    exit_code = 3


class MissingDependencyError(ChattuneError, ImportError):
    """An optional package that the chosen feature needs is not installed; the fix is the pip command.

    Also an ImportError, so code that treats a missing package as "skip this extra" keeps working.
    """

    def __init__(self, package: str, *, pip: str, needed_for: str | None = None, what: str | None = None,
                 where: str | None = None, note: str | None = None, otherwise: str | None = None):
        self.package = package
        self.pip = pip
        what = what or f"{needed_for or 'this'} needs the {package} package, which is not installed"
        fix = f"run `{pip}`" + (f" ({note})" if note else "") + (f", or {otherwise}" if otherwise else "")
        super().__init__(what, where=where, fix=fix)
        self.name = package  # ImportError's attribute: the module that could not be imported


def extra_pip(extra: str) -> str:
    """The pip command that installs one of chattune's extras (pyproject.toml pins their versions)."""
    return f"pip install 'chattune[{extra}]'"


def installed(module: str) -> bool:
    """True when `module` can be imported (looked up without importing it; sys.modules[name] = None counts as absent)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package, or a module without a spec
        return False


def require(module: str, *, extra: str, needed_for: str, where: str | None = None, note: str | None = None,
            otherwise: str | None = None, package: str | None = None) -> None:
    """Raise MissingDependencyError, naming `pip install 'chattune[extra]'`, unless `module` can be imported."""
    if not installed(module):
        raise MissingDependencyError(package or module, pip=extra_pip(extra), needed_for=needed_for, where=where,
                                     note=note, otherwise=otherwise)
