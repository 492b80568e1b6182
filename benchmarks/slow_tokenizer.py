"""The seed tutorials' slow tokenizer, the real one: transformers 4's pure-Python GPT2Tokenizer.

transformers 5 (the one chattune uses) has no Python tokenizers any more, and common.SlowBPE, a lean
re-implementation, runs about twice as fast as the real thing. So on first use this installs
transformers 4 into a side folder ($CHATTUNE_CACHE or ~/.cache/chattune, then bench/transformers4;
never the project's environment) and runs the tutorials' per-example encoding in a subprocess whose
sys.path puts that folder first. The model folder holds only transformers 5's tokenizer.json, which
transformers 4's AutoTokenizer cannot read, so the subprocess writes the vocab.json + merges.txt the
slow tokenizer reads and builds GPT2Tokenizer (SmolLM2's tokenizer class) with the added tokens as
special tokens, as `AutoTokenizer.from_pretrained(..., use_fast=False)` did.

The subprocess times common.reference_features (the tutorials' process_func) and returns the seconds
and the ids of every text it encoded, in order, so the caller can check them id for id against the
fast tokenizer and rebuild the features by replaying them.

    python benchmarks/slow_tokenizer.py --child SIDE_FOLDER JOB.json OUT.json   (what the caller runs)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PINS = ("transformers==4.57.1", "tokenizers==0.22.1", "huggingface_hub==0.36.0")
_MARKER = "chattune-pins.json"


def side_folder() -> Path:
    """Where transformers 4 is installed for the benchmarks."""
    root = Path(os.environ.get("CHATTUNE_CACHE") or Path.home() / ".cache" / "chattune").expanduser()
    return root / "bench" / "transformers4"


def install(folder: Path) -> str | None:
    """Install PINS into folder with `pip install --target` (once); None when ready, else why it failed."""
    marker = folder / _MARKER
    if marker.is_file() and json.loads(marker.read_text()) == list(PINS):
        return None
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"reference: installing {' '.join(PINS)} into {folder} (once, a minute or two) ...", flush=True)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-warn-script-location",
           "--retries", "1", "--timeout", "20", "--target", str(tmp), *PINS]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        return f"pip did not finish: {exc}"
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        lines = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        return f"pip failed: {lines[-1] if lines else f'exit status {proc.returncode}'}"
    (tmp / _MARKER).write_text(json.dumps(list(PINS)))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)  # only a complete install ever sits under the real name
    return None


def write_slow_files(tokenizer_json: Path, out: Path) -> list[str]:
    """vocab.json + merges.txt for a slow byte-level BPE tokenizer from a tokenizer.json; returns the added tokens."""
    spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"{tokenizer_json} is a {model.get('type')} tokenizer, not byte-level BPE")
    (out / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"]
    for merge in model["merges"]:
        pair = merge.split(" ") if isinstance(merge, str) else list(merge)
        if len(pair) != 2 or any(" " in p for p in pair):
            raise ValueError(f"merge {merge!r} cannot be written to merges.txt")
        lines.append(" ".join(pair))
    (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")  # the reader drops the last line
    return [t["content"] for t in spec.get("added_tokens", [])]


def run_reference(rows: list[dict[str, str]], model_dir: Path, end_id: int, max_length: int, folder: Path) -> dict[str, Any]:
    """Time the tutorials' per-example encoding with transformers 4's slow tokenizer in a subprocess.

    Returns {"seconds", "ids" (of every encoded text, in order), "transformers", "tokenizer"}.
    """
    with tempfile.TemporaryDirectory() as tmp:
        job, out = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job.write_text(json.dumps({"rows": rows, "model_dir": str(model_dir), "end_id": end_id, "max_length": max_length},
                                  ensure_ascii=False), encoding="utf-8")
        proc = subprocess.run([sys.executable, __file__, "--child", str(folder), str(job), str(out)],
                              capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"the transformers 4 reference failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text(encoding="utf-8"))


def _child(folder: str, job_path: str, out_path: str) -> None:
    """In the subprocess: transformers 4 first on sys.path, then the tutorials' loop, timed."""
    sys.path.insert(0, folder)
    import transformers
    from transformers import GPT2Tokenizer

    from common import reference_features  # stdlib + regex only: nothing of transformers 5 or torch

    if not transformers.__version__.startswith("4."):
        raise SystemExit(f"expected transformers 4 from {folder}, got {transformers.__version__} from {transformers.__file__}")
    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    model_dir = Path(job["model_dir"])
    config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    named = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if isinstance(config.get(k), str)}
    with tempfile.TemporaryDirectory() as tmp:
        added = write_slow_files(model_dir / "tokenizer.json", Path(tmp))
        tok = GPT2Tokenizer(f"{tmp}/vocab.json", f"{tmp}/merges.txt", additional_special_tokens=added, **named)
    assert not tok.is_fast
    seen: list[list[int]] = []

    def encode(text: str) -> list[int]:
        ids = tok(text, add_special_tokens=False)["input_ids"]  # the tutorials' call
        seen.append(ids)
        return ids

    start = time.perf_counter()
    reference_features(job["rows"], encode, job["end_id"], job["max_length"])
    seconds = time.perf_counter() - start
    Path(out_path).write_text(json.dumps({"seconds": seconds, "ids": seen, "transformers": transformers.__version__,
                                          "tokenizer": type(tok).__name__}), encoding="utf-8")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        _child(*sys.argv[2:])
    else:
        raise SystemExit(__doc__)
