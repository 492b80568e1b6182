"""One device check for chattune on a GPU: every check prints one line, and a JSON report is written.

    python benchmarks/gpu_check.py                  # on a CUDA machine: the full check, <= 10 minutes on one GPU
    python benchmarks/gpu_check.py --cpu-smoke      # every check on the CPU with tiny shapes (tests the checks)
    python benchmarks/gpu_check.py --only infer     # the checks of benchmarks/gpu_check_infer.py only

bash benchmarks/gpu_setup.sh sets up a CUDA venv on a fresh GPU machine and runs this.

Pluggable: every module benchmarks/gpu_check_*.py beside this file is imported, and each function in its
module-level list CHECKS is run, in the order listed (modules in name order). A check is

    def check_xxx(ctx) -> dict:   # {"name": str, "status": "pass"|"fail"|"skip"|"figure",
                                  #  "detail": str, "figures": {str: float}}

where ctx has device ("cuda" or "cpu"), smoke (bool), workdir (pathlib.Path: an empty folder of its own),
python (sys.executable) and repo (the repository root, a Path). A check that raises is a fail with the
exception's text. A check may carry a budget in seconds (check_xxx.budget_s = 90; default 60): running past it
is reported, and on a GPU it fails the check (the whole script has 10 minutes). The exit status is 1 when any
check fails, else 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
STATUSES = ("pass", "fail", "skip", "figure")
DEFAULT_BUDGET_S = 60.0


@dataclass
class Ctx:
    """What a check gets: where it runs and a folder of its own."""

    device: str
    smoke: bool
    workdir: Path
    python: str
    repo: Path


def discover(only: set[str] | None = None) -> list[tuple[str, Callable[[Ctx], dict]]]:
    """(module name, check) for every CHECKS entry of every benchmarks/gpu_check_*.py, in order."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))  # the checks import their neighbours (gpu_throughput, common)
    found = []
    for path in sorted(HERE.glob("gpu_check_*.py")):
        short = path.stem.removeprefix("gpu_check_")
        if only and short not in only:
            continue
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
        found += [(path.stem, fn) for fn in getattr(module, "CHECKS", [])]
    return found


def normalise(result: Any, fn: Callable) -> dict[str, Any]:
    """A check's answer in the report's shape; a malformed answer is a fail that says what was wrong."""
    name = fn.__name__.removeprefix("check_")
    if not isinstance(result, dict) or result.get("status") not in STATUSES:
        return {"name": name, "status": "fail", "detail": f"malformed result {result!r:.200}", "figures": {}}
    figures = {str(k): float(v) for k, v in (result.get("figures") or {}).items() if v is not None}
    return {"name": str(result.get("name") or name), "status": result["status"],
            "detail": str(result.get("detail", "")), "figures": figures}


def run_check(fn: Callable[[Ctx], dict], ctx: Ctx) -> dict[str, Any]:
    """Run one check with its time budget watched; never raises."""
    budget = float(getattr(fn, "budget_s", DEFAULT_BUDGET_S))
    name = fn.__name__.removeprefix("check_")
    warn = threading.Timer(budget, lambda: print(f"  ... {name} is still running after its {budget:.0f} s budget",
                                                 flush=True))
    warn.daemon = True
    warn.start()
    started = time.perf_counter()
    try:
        result = normalise(fn(ctx), fn)
    except Exception as exc:  # a check's crash is its failure, reported with the exception
        tb = traceback.format_exception_only(type(exc), exc)[-1].strip()
        result = {"name": name, "status": "fail", "detail": tb[:2000], "figures": {}}
    finally:
        warn.cancel()
    seconds = time.perf_counter() - started
    result["seconds"] = round(seconds, 2)
    result["budget_s"] = budget
    if seconds > budget:
        result["detail"] += f" [over its {budget:.0f} s budget: {seconds:.0f} s]"
        if not ctx.smoke and result["status"] != "fail":
            result["status"] = "fail"  # on a GPU the whole check must fit its 10 minutes
    return result


def line(r: dict[str, Any]) -> str:
    figures = "  ".join(f"{k}={v:.4g}" for k, v in r["figures"].items())
    return f"{r['status'].upper():6} {r['name']:<28} {r['seconds']:7.1f}s  {r['detail']}" + (f"  [{figures}]" if figures else "")


def environment(device: str) -> dict[str, Any]:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "device": device,
           "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        env["cuda"] = torch.version.cuda
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="run every check on the CPU with tiny shapes")
    ap.add_argument("--out", type=Path, help="the JSON report (default: benchmarks/gpu_check.json, "
                    "or gpu_check-smoke.json in the temp folder with --cpu-smoke)")
    ap.add_argument("--only", help="comma-separated module names, e.g. infer,train (gpu_check_<name>.py)")
    ap.add_argument("--keep", action="store_true", help="keep the checks' work folders (their path is printed)")
    args = ap.parse_args(argv)
    import torch

    if args.cpu_smoke:
        device = "cpu"
    elif torch.cuda.is_available():
        device = "cuda"
    else:
        print("gpu_check: no CUDA GPU here; run it on a GPU machine (bash benchmarks/gpu_setup.sh), "
              "or check the script itself with --cpu-smoke")
        return 2
    out = args.out or (Path(tempfile.gettempdir()) / "gpu_check-smoke.json" if args.cpu_smoke else HERE / "gpu_check.json")
    checks = discover(set(args.only.split(",")) if args.only else None)
    env = environment(device)
    print(f"# gpu_check: {len(checks)} checks on {env.get('gpu', 'the CPU')} ({'smoke' if args.cpu_smoke else 'full'}); "
          f"torch {env['torch']}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    results, started = [], time.perf_counter()
    for module, fn in checks:
        workdir = root / f"{module.removeprefix('gpu_check_')}-{fn.__name__.removeprefix('check_')}"
        workdir.mkdir(parents=True, exist_ok=True)
        ctx = Ctx(device=device, smoke=args.cpu_smoke, workdir=workdir, python=sys.executable, repo=REPO)
        r = run_check(fn, ctx)
        r["module"] = module
        results.append(r)
        print(line(r), flush=True)
    failed = [r["name"] for r in results if r["status"] == "fail"]
    report = {"environment": env, "smoke": args.cpu_smoke, "seconds": round(time.perf_counter() - started, 1),
              "failed": failed, "checks": results}
    from chattune.files import write_json

    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, report)
    print(f"# {len(results) - len(failed)}/{len(results)} checks did not fail in {report['seconds']:.0f} s; "
          f"report: {out}" + (f"; work folders: {root}" if args.keep else ""))
    if not args.keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
