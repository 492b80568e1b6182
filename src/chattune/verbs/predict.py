"""`chattune predict`: answer every row of a data file, batched and resumable.

Each row is rendered with the run's template and system prompt and answered by
`generate_batch`, so the answers match `chattune chat` and the training probes.
Finished rows are appended to OUT at once; a rerun skips the rows already there.
Rows, their keys and OUT's bookkeeping are infer/predict.py.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from tqdm.auto import tqdm

from chattune.errors import DataError
from chattune.infer.predict import load_rows, predict_rows, read_done, write_sorted
from chattune.infer.session import load_session
from chattune.rundir import RunDir, run_lock
from chattune.options import PREDICT

log = logging.getLogger("chattune")


def run(run_dir: str, *, data: str, out: str, batch_size: int = PREDICT.batch_size,
        max_new_tokens: int = PREDICT.max_new_tokens, do_sample: bool = PREDICT.sample,
        temperature: float = PREDICT.temperature, top_p: float = PREDICT.top_p) -> Path:
    """Entry point of `chattune predict`."""
    if batch_size < 1:
        raise DataError(f"--batch-size must be at least 1 (got {batch_size})", fix="e.g. --batch-size 8")
    out_path = Path(out)
    cfg = RunDir(Path(run_dir)).load_config()  # fails fast on a wrong run directory, before the model loads
    rows = load_rows(data, cfg)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with run_lock(out_path, "chattune predict"):  # two predicts appending to one OUT would mix their rows
        answer_missing_rows(run_dir, rows, out_path, batch_size=batch_size, max_new_tokens=max_new_tokens,
                            do_sample=do_sample, temperature=temperature, top_p=top_p)
    print(f"wrote {out_path} ({len(rows)} rows)")
    return out_path


def answer_missing_rows(run_dir: str, rows: list, out_path: Path, *, batch_size: int, **gen) -> None:
    """Answer the rows OUT does not hold yet (appending each as it finishes), then sort OUT by row."""
    done = read_done(out_path, rows)
    todo = [r for r in rows if r.key not in done]
    if done:
        log.info("predict: %d of %d rows already in %s; answering the other %d", len(rows) - len(todo), len(rows),
                 out_path, len(todo))
    if todo:
        session = load_session(run_dir)
        with tqdm(total=len(todo), desc="predict", unit="row", dynamic_ncols=True, file=sys.stderr) as bar:
            predict_rows(session.model, session.renderer, todo, out_path, batch_size=batch_size, bar=bar, **gen)
    write_sorted(out_path)
