"""Safe loading of weight files: safetensors only unless told otherwise, and damaged files named before loading.

A pickle file (pytorch_model.bin, *.pt, *.pth, *.ckpt) can run any Python code
hidden in it the moment it is loaded; safetensors holds tensors and nothing
else. A truncated or corrupt safetensors file is found here by its header
(cheap: a few bytes per file) instead of failing deep inside the loader, or
crashing the process when a memory-mapped read runs past the end of the file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from chattune.errors import ModelError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Files beside the weights that are pickles but never loaded as a model (trainer leftovers).
_NOT_WEIGHTS = {"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt"}
_MAX_HEADER = 100 * 2**20  # the safetensors format caps its JSON header at 100 MB


def weight_files(model_dir: Path) -> tuple[list[Path], list[Path]]:
    """(safetensors files, pickle-based weight files) directly inside a model folder."""
    files = sorted(p for p in model_dir.iterdir() if p.is_file())
    safe = [p for p in files if p.suffix == ".safetensors"]
    pickled = [p for p in files if p.suffix in PICKLE_SUFFIXES and p.name not in _NOT_WEIGHTS]
    return safe, pickled


def check_weight_files(model_dir: str | Path, *, allow_pickle: bool) -> None:
    """Refuse pickle-only weights unless model.allow_pickle, and name a damaged safetensors file."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return
    safe, pickled = weight_files(model_dir)
    if pickled and not safe and not allow_pickle:
        names = ", ".join(p.name for p in pickled[:3]) + (" ..." if len(pickled) > 3 else "")
        raise ModelError(
            f"the model's weights are only in pickle files ({names}); loading a pickle can run any code hidden in "
            "it, so chattune loads safetensors only",
            where=str(model_dir),
            fix="use a copy of the model with *.safetensors weights (most hub repos have one); or, if you trust where "
            "the files came from, set model.allow_pickle=true (the converted copy can then be saved with "
            "save_pretrained, which writes safetensors)",
        )
    for path in safe:
        problem = safetensors_problem(path)
        if problem:
            raise ModelError(
                f"{path.name} is damaged or incomplete: {problem}",
                where=str(path),
                fix="download or convert the model again (an interrupted download or copy leaves such a file); "
                "compare the file size with the source",
            )


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file cannot be complete (bad header, or shorter than its header says), or None."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"the file has {size} bytes, too short for a safetensors header"
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                return f"the header claims {n} bytes but the file has {size} (not a safetensors file, or cut short)"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return f"the header is not readable ({exc.__class__.__name__})"
    if not isinstance(header, dict):
        return "the header is not a table of tensors"
    ends = [t["data_offsets"][1] for k, t in header.items()
            if k != "__metadata__" and isinstance(t, dict) and len(t.get("data_offsets", ())) == 2]
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        return f"the file has {size:,} bytes but its header describes {expected:,} (cut short)"
    return None

