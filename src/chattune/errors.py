"""The exceptions chattune raises for user mistakes.

Every error carries three things a user needs: where (file, line, key), what is
wrong, and how to fix it. The CLI prints them as one paragraph and exits with
status 2; anything that is not a ChattuneError is a bug and keeps its traceback.
"""

from __future__ import annotations


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


class MergeCheckError(ChattuneError):
    """The merged model does not reproduce the adapter model's logits."""

    exit_code = 3
