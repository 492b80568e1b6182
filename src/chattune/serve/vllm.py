"""`chattune serve RUN... --engine vllm`: the runs handed to vLLM's OpenAI server, checked against chattune first.

vLLM gets the base model, every run's adapter (`--enable-lora --lora-modules name=adapter_dir`), the run's
training template (`--chat-template`, the run's own file) and a generation config holding the template's
end-of-turn ids as eos ids (`--generation-config`). Before it is reported ready, a few probe questions are
answered greedily by chattune's own path (before vLLM takes the GPU) and by vLLM, and the agreement is
printed; `--check` makes any difference fatal. vLLM needs an NVIDIA GPU and its own package.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from chattune import files
from chattune.errors import ConfigError, ModelError
from chattune.infer.generate import generate_batch
from chattune.infer.session import load_run_renderer, with_system
from chattune.model.sources import resolve_model_dir
from chattune.rundir import RunDir
from chattune.serve.adapters import load_engines, parse_names

VLLM_PIN = "vllm==0.33.0"  # the release this command line was written against
PROBES = ["Hello! Who are you?", "Name three primary colours.", "Explain in one sentence what a LoRA adapter is."]
PROBE_TOKENS = 32
START_TIMEOUT_S = 900
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the --max-lora-rank values vLLM accepts
DTYPES = {"auto": "auto", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass
class VllmRun:
    """What vLLM needs of one run: its served name, adapter folder, template file, stop ids and system prompt."""

    name: str
    adapter: Path
    template: Path
    eos_ids: list[int]
    system: str | None
    rank: int


def unavailable() -> str | None:
    """Why vLLM cannot run here (one line with what to install), or None."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed here"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible here, and vLLM needs an NVIDIA GPU"
    return None


def read_runs(paths: list[str], names: list[str] | None) -> tuple[str, str, list[VllmRun]]:
    """(base model folder, vLLM dtype, the runs) from run directories that share one base model."""
    runs, base, dtype = [], None, None
    for name, path in parse_names(paths, names):
        run_dir = RunDir(Path(path))
        cfg = run_dir.load_config()
        run_dir.require_adapter()
        here = (cfg.model.name_or_path, cfg.model.source, cfg.model.revision, cfg.model.dtype)
        if base is not None and here != base:
            raise ConfigError(f"{path} was trained on {here[0]!r} ({here[3]}), the first run on {base[0]!r} ({base[3]}): "
                              "runs served together must share one base model", where=str(run_dir.config_file),
                              fix="serve them with separate `chattune serve` processes")
        base, dtype = here, cfg.model.dtype
        renderer = load_run_renderer(run_dir, cfg)
        runs.append(VllmRun(name, run_dir.adapter, run_dir.template_file, list(renderer.end_of_turn_ids()),
                            cfg.data.system, cfg.lora.r))
    if not runs:
        raise ModelError("--engine vllm serves run directories", where="chattune serve", fix="pass runs/NAME folders")
    first = RunDir(Path(paths[0])).load_config().model
    model_dir = resolve_model_dir(first.name_or_path, source=first.source, revision=first.revision,
                                  trust_remote_code=first.trust_remote_code)
    return str(model_dir), DTYPES.get(dtype or "auto", "auto"), runs


def vllm_command(model_dir: str, runs: list[VllmRun], generation_dir: Path, *, host: str, port: int,
                 dtype: str = "auto") -> list[str]:
    """The `vllm serve` command line: base model named `base`, one LoRA module per run, template, stop ids."""
    rank = next((r for r in LORA_RANKS if r >= max(run.rank for run in runs)), LORA_RANKS[-1])
    return [str(Path(sys.executable).with_name("vllm")), "serve", model_dir, "--host", host, "--port", str(port),
            "--served-model-name", "base", "--dtype", dtype, "--enable-lora", "--max-loras", str(len(runs)),
            "--max-lora-rank", str(rank), "--lora-modules", *[f"{r.name}={r.adapter}" for r in runs],
            "--chat-template", str(runs[0].template), "--generation-config", str(generation_dir)]


def write_generation_config(runs: list[VllmRun], folder: Path) -> Path:
    """A generation_config.json whose eos ids are every run's end-of-turn ids (vLLM stops at any of them)."""
    eos = sorted({i for r in runs for i in r.eos_ids})
    files.write_json(folder / "generation_config.json", {"eos_token_id": eos, "do_sample": False})
    return folder


def probe_messages(run: VllmRun) -> list[list[dict[str, str]]]:
    return [with_system([{"role": "user", "content": q}], run.system) for q in PROBES]


def chattune_answers(paths: list[str], names: list[str] | None) -> dict[str, list[str]]:
    """The probes answered greedily by chattune (each run with its adapter), then the GPU memory given back."""
    import torch

    engines = [e for e in load_engines(paths, names) if e.adapter != "__base__"]
    out = {}
    for e in engines:
        e.model.set_adapter(e.adapter)
        prompts = [with_system([{"role": "user", "content": q}], e.system) for q in PROBES]
        out[e.name] = generate_batch(e.model, e.renderer, prompts, max_new_tokens=PROBE_TOKENS)
    del engines
    torch.cuda.empty_cache()
    return out


def vllm_answers(url: str, runs: list[VllmRun], api_key: str | None) -> dict[str, list[str]]:
    """The probes answered greedily by the running vLLM server, per served run name."""
    out = {}
    for run in runs:
        out[run.name] = []
        for messages in probe_messages(run):
            body = {"model": run.name, "messages": messages, "max_tokens": PROBE_TOKENS, "temperature": 0}
            req = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(), headers={
                "Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})})
            with urllib.request.urlopen(req, timeout=300) as r:
                out[run.name].append((json.load(r)["choices"][0]["message"]["content"] or "").strip())
    return out


def agreement(ours: dict[str, list[str]], theirs: dict[str, list[str]]) -> tuple[int, int, list[str]]:
    """(answers equal, answers compared, one line per difference)."""
    same, total, diffs = 0, 0, []
    for name, answers in ours.items():
        for q, a, b in zip(PROBES, answers, theirs.get(name, [])):
            total += 1
            if a == b:
                same += 1
            else:
                diffs.append(f"  {name}: {q!r}\n    chattune: {a!r}\n    vllm:     {b!r}")
    return same, total, diffs


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ModelError(f"vLLM exited with status {proc.returncode} while starting", where="--engine vllm",
                             fix="read its output above (a GPU memory shortage or an unsupported model is typical)")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(2)
    proc.terminate()
    raise ModelError(f"vLLM did not answer {url}/health within {timeout:.0f} s", where="--engine vllm",
                     fix="check its output above")


def serve(paths: list[str], names: list[str] | None, *, host: str, port: int, api_key: str | None,
          check: bool) -> None:
    """Probe with chattune, start vLLM, probe it, print the agreement, then serve until it exits or SIGTERM."""
    reason = unavailable()
    if reason:
        raise ConfigError(reason, where="--engine vllm", fix=f"on a machine with an NVIDIA GPU, pip install '{VLLM_PIN}' "
                          "(its own virtual environment: it pins its own torch); here, serve without --engine vllm")
    model_dir, dtype, runs = read_runs(paths, names)
    ours = chattune_answers(paths, names)
    work = Path(tempfile.mkdtemp(prefix="chattune-vllm-"))
    cmd = vllm_command(model_dir, runs, write_generation_config(runs, work), host=host, port=port, dtype=dtype)
    print("starting: " + " ".join(cmd), flush=True)
    env = {**os.environ, **({"VLLM_API_KEY": api_key} if api_key else {})}  # the key never goes on the command line
    proc = subprocess.Popen(cmd, env=env)
    try:
        url = f"http://{host}:{port}"
        wait_ready(proc, url)
        same, total, diffs = agreement(ours, vllm_answers(url, runs, api_key))
        print(f"greedy agreement with chattune: {same}/{total} probe answers identical", flush=True)
        if diffs:
            print("\n".join(diffs), flush=True)
        if check and same != total:
            raise ModelError(f"vLLM's greedy answers differ from chattune's in {total - same} of {total} probes",
                             where="--check", fix="compare the template and stop ids above, or serve without --check")
        print(f"serving {', '.join(r.name for r in runs)} and base via vLLM on {url}/v1; Ctrl-C stops", flush=True)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=60)
