"""`chattune eval RUN_DIR`: generation metrics and/or multiple-choice accuracy, for the tuned (and base) model.

Writes RUN_DIR/eval/<name>.json (metrics, settings, model, data sha256) and
RUN_DIR/eval/<name>.predictions.jsonl (every row's answers), and prints a table.
The base model is the same loaded model with its adapter switched off, so
comparing costs no second load. The tasks are evaluate/tasks.py, the result
files and trackers evaluate/results.py, the tables evaluate/tables.py.
"""

from __future__ import annotations

import logging
import re
from contextlib import ExitStack
from pathlib import Path

from chattune.errors import ConfigError
from chattune.evaluate.metrics import parse_metrics
from chattune.evaluate.results import common_fields, log_to_trackers, open_trackers, predictions_path, result_path, save
from chattune.evaluate.likelihood import loss_task, preference_task
from chattune.evaluate.tasks import EvalTask, generation_task, mcq_task, variants
from chattune.infer.session import load_session
from chattune.rundir import RunDir, run_lock
from chattune.options import EVAL

log = logging.getLogger("chattune")


def run(run_dir: str | Path, *, data: str | None = EVAL.data, mcq: str | None = EVAL.mcq,
        preference: str | None = EVAL.preference, loss: bool = EVAL.loss, metrics: str = EVAL.metrics,
        compare_base: bool = EVAL.compare_base, limit: int | None = EVAL.limit, batch_size: int = EVAL.batch_size,
        max_new_tokens: int = EVAL.max_new_tokens, shots: int = EVAL.shots, name: str | None = EVAL.name) -> list[Path]:
    """Score a run on a data file (generation metrics) and/or a multiple-choice file; returns the result files."""
    check_options(data=data, mcq=mcq, limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens, shots=shots,
                  name=name, preference=preference, loss=loss)
    rd = RunDir(Path(run_dir))
    cfg = rd.load_config()
    rd.require_adapter()
    # Read and check every input before the slow model load.
    tasks: list[EvalTask] = []
    if data and loss:
        tasks.append(loss_task(data, cfg, limit=limit, name=name, batch_size=batch_size))
    elif data:
        tasks.append(generation_task(data, cfg, metrics=parse_metrics(metrics), limit=limit, name=name,
                                     batch_size=batch_size, max_new_tokens=max_new_tokens))
    if mcq:
        mcq_name = name or Path(mcq).stem
        if tasks and tasks[0].name == mcq_name:
            mcq_name += "-mcq"
        tasks.append(mcq_task(mcq, cfg, shots=shots, limit=limit, name=mcq_name, batch_size=batch_size))
    if preference:
        pref_name = name or Path(preference).stem
        if any(t.name == pref_name for t in tasks):
            pref_name += "-preference"
        tasks.append(preference_task(preference, cfg, limit=limit, name=pref_name, batch_size=batch_size))
    with ExitStack() as locks:  # before the model loads: a second eval writing the same result files is refused
        for task in tasks:
            locks.enter_context(run_lock(result_path(rd, task.name), "chattune eval"))
        trackers = {task.name: open_trackers(cfg, rd, task.name) for task in tasks}
        log.info("loading %s with the adapter of %s", cfg.model.name_or_path, rd.root)
        session = load_session(rd.root)
        written = []
        for task in tasks:
            record, predictions = task.evaluate(session, variants(session, compare_base))
            record.update(common_fields(task, rd, cfg, compare_base))
            written.append(save(rd, task.name, record, predictions))
            task.show(record, predictions)
            log_to_trackers(trackers[task.name], rd, record)
            log.info("wrote %s and %s", written[-1], predictions_path(rd, task.name))
    return written


def check_options(*, data: str | None, mcq: str | None, limit: int | None, batch_size: int, max_new_tokens: int,
                  shots: int, name: str | None, preference: str | None = None, loss: bool = False) -> None:
    """Reject impossible option values with the option's name."""
    if not data and not mcq and not preference:
        raise ConfigError("nothing to evaluate", where="chattune eval",
                          fix="pass --data FILE (BLEU/ROUGE/exact match; with --loss: loss and perplexity), "
                              "--mcq FILE (multiple-choice accuracy) and/or --preference FILE (held-out pairs)")
    if loss and not data:
        raise ConfigError("--loss scores the reference answers of --data FILE, and no --data was given",
                          where="--loss", fix="add --data FILE (e.g. general data such as alpaca_en_demo.json)")
    for flag, value, low in (("--limit", limit, 1), ("--batch-size", batch_size, 1),
                             ("--max-new-tokens", max_new_tokens, 1), ("--shots", shots, 0)):
        if value is not None and value < low:
            raise ConfigError(f"must be at least {low} (got {value})", where=flag)
    if name is not None and not re.fullmatch(r"[\w.\-]+", name):
        raise ConfigError(f"{name!r} is not a plain file name", where="--name",
                          fix="use letters, digits, '.', '-' and '_' only")
