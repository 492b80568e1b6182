"""The run directory: the contract between `train` and every later verb.

    RUN/
      run_config.yaml        resolved config (later verbs read it instead of asking again)
      chat_template.jinja    the exact template used for training
      tokenizer/             tokenizer files, template included
      adapter/               adapter_config.json + adapter_model.safetensors (no base weights)
      metrics.jsonl          one line per logging step
      predictions/epoch_K.jsonl   probe answers; epoch_0 = before training
      checkpoints/           trainer checkpoints (resume)
      data_report.json       what loading and rendering kept, truncated, skipped
      summary.json           written last: the run finished
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from chattune import config as config_mod
from chattune.errors import RunDirError


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory."""

    root: Path

    @property
    def config_file(self) -> Path:
        return self.root / "run_config.yaml"

    @property
    def template_file(self) -> Path:
        return self.root / "chat_template.jinja"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def data_report(self) -> Path:
        return self.root / "data_report.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    def is_finished(self) -> bool:
        """True once training wrote its summary (the last file of a run)."""
        return self.summary.is_file()

    def load_config(self) -> config_mod.RunConfig:
        """The resolved config this run was trained with."""
        if not self.config_file.is_file():
            raise RunDirError(
                "not a chattune run directory (no run_config.yaml)",
                where=str(self.root),
                fix="pass the output_dir of a `chattune train` run, e.g. runs/demo",
            )
        return config_mod.load(self.config_file)

    def require_adapter(self) -> None:
        """Fail with a clear message when training has not produced an adapter yet."""
        if not (self.adapter / "adapter_config.json").is_file():
            raise RunDirError(
                "the run has no adapter yet (training unfinished or failed)",
                where=str(self.adapter),
                fix="finish `chattune train` for this run first",
            )

