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

import shutil
from dataclasses import dataclass
from pathlib import Path

from chattune import config as config_mod
from chattune.errors import ConfigError, RunDirError


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


def prepare_run_dir(cfg: config_mod.RunConfig, *, overwrite: bool, resume: bool = False) -> RunDir:
    """Create the run directory; refuse to train over a finished run unless told to.

    An unfinished run is kept: training resumes it from its last checkpoint (see train/resume.py).
    """
    run_dir = RunDir(Path(cfg.output_dir))
    if overwrite and resume:
        raise ConfigError("--overwrite and --resume contradict each other", where="chattune train",
                          fix="--resume continues the run in output_dir, --overwrite deletes it first: pass one")
    if run_dir.is_finished() and not overwrite:
        raise RunDirError(
            "a finished run is already there" + (", so there is nothing to resume" if resume else ""),
            where=str(run_dir.root),
            fix="pass --overwrite to replace it, or choose another output_dir (e.g. output_dir=runs/demo2)",
        )
    if run_dir.root.exists() and overwrite:
        shutil.rmtree(run_dir.root)
    run_dir.root.mkdir(parents=True, exist_ok=True)
    return run_dir
