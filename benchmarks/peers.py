"""chattune against LLaMA-Factory and TRL: the same model, rows, LoRA and schedule, each side in a fresh process.

    python benchmarks/peers.py [--task roleplay|persona|all] [--rows N] [--skip-peer llamafactory|trl] [--gpu]
                               [--threads N]

The role-play rows are read from ../shared/data beside the checkout (CHATTUNE_SHARED_DATA names the folder
from a checkout elsewhere); without them that task is skipped with a message.

Tasks (benchmarks/peer_configs.py): `roleplay` is the seeds' role-play recipe (configs/roleplay_qwen1.5_7b.yaml)
on smollm2-135m, 300 rows of ../shared/data/huanhuan.json, one epoch; `persona` is the demo (configs/demo.yaml):
the project's persona data. Every side reads the same conversations (the recipe's system prompt, instruction +
input as the user turn), renders them with SmolLM2's ChatML template, supervises the answer tokens only, and
trains the recipe's LoRA (r, alpha, dropout, targets) with its learning rate, schedule, batch, accumulation and
epochs. The sides:

- chattune (`chattune train`'s code path), bf16 and, to show what the dtype alone is worth, fp32;
- LLaMA-Factory 0.9.5 from PyPI, in a side environment this script creates once in ~/.cache/chattune/bench/
  (torch pinned to the project's version; no torchvision, an empty `torchaudio` module: the registry's wheels
  of those do not load against the CPU torch, and text training never uses them; no gradio: the web UI only).
  `bf16: true` with `use_cpu: true`: 0.9.5 accepts it on a CPU (compute dtype bf16, the Trainer's CPU
  autocast). Without it, it loads the weights in the checkpoint's dtype (bf16 for SmolLM2) and trains them
  without autocast; it refuses only `pure_bf16` without a bf16 GPU;
- TRL's SFTTrainer from the project's environment (prompt-completion rows, completion-only loss), bf16.

For each: real (non-padding) tokens per second of training, training seconds, wall time of the whole process
(start-up, data, model load and save included), peak RSS (VmHWM), mean and final training loss, dtype. Then
how much faster chattune is, and a loss check. `--gpu` runs the same on a CUDA device with a randomly
initialised Qwen2.5-0.5B-shaped model (SmolLM2's tokenizer), every side in bf16; without a CUDA device it
stops with a message. Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import machine
from peer_configs import SHARED, TASKS, Settings, settings_for, side_spec, write_conversations
from peer_table import footnotes, table

from chattune.model.sources import resolve_model_dir

BENCH = Path.home() / ".cache" / "chattune" / "bench"
LLAMAFACTORY = "0.9.5"
SIDES_CPU = [("chattune", "bf16"), ("llamafactory", "bf16"), ("trl", "bf16"), ("chattune", "fp32")]
SIDES_GPU = [("chattune", "bf16"), ("llamafactory", "bf16"), ("trl", "bf16")]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "DISABLE_VERSION_CHECK": "1", "WANDB_DISABLED": "true"}


def side_venv() -> Path:
    """LLaMA-Factory's side environment (created on first use, then reused); its python."""
    import torch

    venv = BENCH / f"llamafactory-{LLAMAFACTORY}"
    python = venv / "bin" / "python"
    if (venv / ".complete").is_file():
        return python
    print(f"creating LLaMA-Factory {LLAMAFACTORY}'s environment in {venv} (once; a few minutes)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pin = f"torch=={torch.__version__.split('+')[0]}"  # the project's torch: without a pin pip pulls CUDA wheels
    constraints = venv / "constraints.txt"
    constraints.write_text(pin + "\n", encoding="utf-8")
    pip = [str(python), "-m", "pip", "install", "-q", "-c", str(constraints)]
    subprocess.run(pip + [pin], check=True)
    subprocess.run(pip + ["--no-deps", f"llamafactory=={LLAMAFACTORY}"], check=True)
    reqs = subprocess.run([str(python), "-c", "import importlib.metadata as m; print('\\n'.join(m.requires('llamafactory')))"],
                          check=True, capture_output=True, text=True).stdout.splitlines()
    skip = ("torch", "torchaudio", "torchvision", "gradio")  # torch is pinned above; see the module's docstring
    wanted = [r for r in reqs if "extra ==" not in r and not r.split(";")[0].strip().startswith(skip)]
    subprocess.run(pip + wanted, check=True)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "torchaudio").mkdir(exist_ok=True)
    (site / "torchaudio" / "__init__.py").write_text('"""Empty: LLaMA-Factory imports torchaudio; text training never uses it."""\n')
    (venv / ".complete").write_text(pin + "\n", encoding="utf-8")
    return python


def gpu_model(workdir: Path) -> str:
    """A randomly initialised Qwen2.5-0.5B-shaped model with SmolLM2's tokenizer and ChatML template, saved once."""
    import torch
    from gpu_throughput import SHAPES
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    out = workdir / "qwen2.5-0.5b-shaped"
    if not (out / "config.json").is_file():
        tok = AutoTokenizer.from_pretrained(resolve_model_dir("smollm2-135m"))
        tok.save_pretrained(out)
        torch.manual_seed(0)
        shape = dict(SHAPES["0.5b"], vocab_size=len(tok))
        model = Qwen2ForCausalLM(Qwen2Config(**shape, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
        model.to(torch.bfloat16).save_pretrained(out)
    return str(out)


def run_side(python: Path, spec: dict[str, Any], workdir: Path, threads: int | None) -> dict[str, Any] | None:
    """One side in a fresh process; its result with the process's wall time, or None (log tail printed)."""
    name = f"{spec['settings']['task']}-{spec['side']}-{spec['dtype']}"
    spec_path, result_path, log_path = (workdir / f"{name}.{ext}" for ext in ("spec.json", "result.json", "log"))
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    result_path.unlink(missing_ok=True)
    env = {**os.environ, **OFFLINE, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    if spec["side"] == "llamafactory":
        env.pop("PYTHONPATH", None)  # the side environment has its own packages only
    print(f"  {name}: running (log: {log_path})", flush=True)
    started = time.perf_counter()
    with log_path.open("w") as log:
        rc = subprocess.run([str(python), str(Path(__file__).with_name("peer_sides.py")), str(spec_path), str(result_path)],
                            stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.perf_counter() - started
    if rc != 0 or not result_path.is_file():
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        print(f"  {name}: failed (exit {rc}); the end of its log:\n    " + "\n    ".join(tail), flush=True)
        return None
    result = json.loads(result_path.read_text(encoding="utf-8"))
    result["wall_s"] = wall
    print(f"  {name}: {result['train_s']:.1f} s training, {wall:.1f} s wall, mean loss {result.get('train_loss', 0):.4f}",
          flush=True)
    return result


def pythons(skip: list[str]) -> dict[str, Path]:
    """The interpreter of each side that runs: the project's for chattune and TRL, the side environment's for LLaMA-Factory."""
    out = {"chattune": Path(sys.executable)}
    if "trl" not in skip:
        try:
            import trl  # noqa: F401  (TRL is one of chattune's dependencies; check anyway)
            out["trl"] = Path(sys.executable)
        except ImportError:
            print("TRL is not installed in this environment: its rows are left out", flush=True)
    if "llamafactory" not in skip:
        out["llamafactory"] = side_venv()
    return out


def run_task(name: str, args: argparse.Namespace, workdir: Path, python: dict[str, Path]) -> None:
    task = TASKS[name]
    if task.needs_shared and not task.data.is_file():
        print(f"\n## {name}: skipped — {task.data} is absent (../shared/data holds the benchmarks' real data)")
        return
    data = workdir / f"{name}.messages.json"
    rows = write_conversations(task, args.rows, data)
    model = gpu_model(workdir) if args.gpu else str(resolve_model_dir("smollm2-135m"))
    s = settings_for(task, model, data, rows, device="cuda" if args.gpu else "cpu")
    print(f"\n## {name}: {describe(s)}", flush=True)
    results = []
    for side, dtype in SIDES_GPU if args.gpu else SIDES_CPU:
        if side in python:
            r = run_side(python[side], side_spec(side, s, dtype, workdir), workdir, args.threads)
            results += [r] if r else []
    if results:
        print("\n" + "\n".join(table(results, s.epochs) + [""] + footnotes(results)))
        print(json.dumps({"task": name, "settings": describe(s), "results": results}))


def describe(s: Settings) -> str:
    targets = s.targets if isinstance(s.targets, str) else "/".join(t.removesuffix("_proj") for t in s.targets)
    return (f"{s.rows} rows, {s.epochs:g} epoch(s), {s.steps} optimizer steps of {s.batch}×{s.grad_accum}, max_length "
            f"{s.max_length}, LoRA r {s.r} alpha {s.alpha:g} dropout {s.dropout:g} on {targets}, lr {s.learning_rate:g} "
            f"{s.scheduler} warm-up {s.warmup_ratio:g}, gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}; "
            f"model {Path(s.model_dir).name}")


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=["roleplay", "persona", "all"], default="all")
    ap.add_argument("--rows", type=int, help="rows of each task (default: 300 for roleplay, every row for persona)")
    ap.add_argument("--skip-peer", action="append", choices=["llamafactory", "trl"], default=[],
                    help="leave a peer out (repeatable)")
    ap.add_argument("--gpu", action="store_true", help="run on a CUDA device with a Qwen2.5-0.5B-shaped model, all sides bf16")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS of every side (default: torch's own choice)")
    ap.add_argument("--workdir", type=Path, default=BENCH / "work", help="configs, logs, results and run folders")
    args = ap.parse_args()
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            print("peers.py --gpu: no CUDA device here (torch.cuda.is_available() is False); run it on a machine with an "
                  "NVIDIA GPU and a CUDA build of torch, or leave out --gpu for the CPU benchmark", file=sys.stderr)
            return 2
    names = ["roleplay", "persona"] if args.task == "all" else [args.task]
    if all(TASKS[n].needs_shared and not TASKS[n].data.is_file() for n in names):
        print(f"peers.py: skipped — {SHARED} is absent (the role-play task reads huanhuan.json there)")
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"# peers — {machine()}; load average before: {load_average()}", flush=True)
    python = pythons(args.skip_peer)
    for name in names:
        run_task(name, args, args.workdir, python)
    print(f"\nload average after: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
