"""`chattune predict`: answer every row of a data file, batched and resumable.

Each row's prompt (every turn before its last answer, or the whole conversation
when it has no answer) is rendered with the run's template and system prompt and
answered by `generate_batch`, so the answers match `chattune chat` and the
training probes. Every finished batch is appended to OUT at once; a rerun skips
the rows already there (keyed by row index + a hash of the prompt).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chattune.data.formats import Conversation, load_conversations
from chattune.errors import DataError
from chattune.infer.generate import generate_batch
from chattune.options import PREDICT

log = logging.getLogger("chattune")


@dataclass
class Row:
    """One row to answer: its index in the data, the prompt messages, and the reference answer if any."""

    index: int
    where: str
    prompt: list[dict[str, str]]
    reference: str | None

    @property
    def key(self) -> str:
        """Row index + prompt hash: what makes a line of OUT belong to this row."""
        return f"{self.index}:{prompt_hash(self.prompt)}"


def prompt_hash(messages: list[dict[str, str]]) -> str:
    """A short stable hash of the prompt messages (system prompt included)."""
    text = json.dumps(messages, ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def to_row(index: int, conv: Conversation) -> Row:
    """The prompt part of a conversation: everything before its final answer, or all of it when unanswered."""
    if conv.messages[-1]["role"] == "assistant":
        return Row(index, conv.where, conv.prompt, conv.reference)
    return Row(index, conv.where, conv.messages, None)


def load_rows(data: str | Path, cfg: Any) -> list[Row]:
    """Rows of any file the loaders read, with the run's system prompt and instruction_as rule."""
    convs, _ = load_conversations([data], fmt="auto", system=cfg.data.system, instruction_as=cfg.data.instruction_as,
                                  require_answer=False)
    return [to_row(i, c) for i, c in enumerate(convs)]


def read_done(out: Path, rows: list[Row]) -> set[str]:
    """Keys of the rows OUT already answers; a torn last line (a crash mid-write) is dropped first."""
    if not out.is_file():
        return set()
    raw = out.read_bytes()
    if raw and not raw.endswith(b"\n"):
        # The last line was cut off mid-write: drop it so the next append starts on a fresh line.
        keep = raw[: raw.rfind(b"\n") + 1]
        with out.open("r+b") as f:
            f.truncate(len(keep))
        raw = keep
    known = {r.index: r.key for r in rows}
    done, stale = set(), []
    for lineno, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            key = f"{item['index']}:{item['prompt_hash']}"
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError("line is not a chattune predict result", where=f"{out}:{lineno}",
                            fix="choose another --out, or delete the file to start over") from None
        if known.get(item["index"]) != key:
            stale.append(lineno)
        done.add(key)
    if stale:
        raise DataError(
            f"{len(stale)} line(s) answer prompts that are not in --data (e.g. line {stale[0]}): "
            "the data file or the run's system prompt changed since OUT was written",
            where=str(out),
            fix="choose another --out, or delete the file to start over",
        )
    return done


def write_sorted(out: Path) -> None:
    """Rewrite OUT in row order (batches finish sorted by prompt length), atomically."""
    lines = [l for l in out.read_text(encoding="utf-8").splitlines() if l.strip()]
    ordered = sorted(lines, key=lambda l: json.loads(l)["index"])
    if ordered == lines:
        return
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(ordered) + "\n")
    os.replace(tmp, out)


def result_line(row: Row, answer: str) -> dict[str, Any]:
    """One line of OUT."""
    question = next((m["content"] for m in reversed(row.prompt) if m["role"] == "user"), "")
    line = {"index": row.index, "prompt_hash": prompt_hash(row.prompt), "where": row.where, "question": question,
            "answer": answer}
    if row.reference is not None:
        line["reference"] = row.reference
    return line


def predict_rows(model: Any, renderer: Any, rows: list[Row], out: Path, *, batch_size: int, bar: Any = None,
                 **gen: Any) -> int:
    """Answer rows in batches of similar length, appending each batch to OUT as it finishes; returns rows written."""
    # Similar lengths in one batch keep padding (wasted compute) low.
    lengths = {r.index: len(renderer.prompt_ids(r.prompt)) for r in rows}
    ordered = sorted(rows, key=lambda r: lengths[r.index])
    written = 0
    with out.open("a", encoding="utf-8") as f:
        for start in range(0, len(ordered), batch_size):
            batch = ordered[start:start + batch_size]
            answers = generate_batch(model, renderer, [r.prompt for r in batch], batch_size=len(batch), **gen)
            f.write("".join(json.dumps(result_line(r, a), ensure_ascii=False) + "\n" for r, a in zip(batch, answers)))
            f.flush()
            written += len(batch)
            if bar is not None:
                bar.update(len(batch))
    return written


def run(run_dir: str, *, data: str, out: str, batch_size: int = PREDICT.batch_size,
        max_new_tokens: int = PREDICT.max_new_tokens, do_sample: bool = PREDICT.sample,
        temperature: float = PREDICT.temperature, top_p: float = PREDICT.top_p) -> Path:
    """Entry point of `chattune predict`."""
    from tqdm.auto import tqdm

    from chattune.infer.session import load_session
    from chattune.rundir import RunDir

    if batch_size < 1:
        raise DataError(f"--batch-size must be at least 1 (got {batch_size})", fix="e.g. --batch-size 8")
    out_path = Path(out)
    cfg = RunDir(Path(run_dir)).load_config()  # fails fast on a wrong run directory, before the model loads
    rows = load_rows(data, cfg)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = read_done(out_path, rows)
    todo = [r for r in rows if r.key not in done]
    if done:
        log.info("predict: %d of %d rows already in %s; answering the other %d", len(rows) - len(todo), len(rows),
                 out_path, len(todo))
    if todo:
        session = load_session(run_dir)
        gen = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "temperature": temperature, "top_p": top_p}
        with tqdm(total=len(todo), desc="predict", unit="row", dynamic_ncols=True, file=sys.stderr) as bar:
            predict_rows(session.model, session.renderer, todo, out_path, batch_size=batch_size, bar=bar, **gen)
    write_sorted(out_path)
    print(f"wrote {out_path} ({len(rows)} rows)")
    return out_path
