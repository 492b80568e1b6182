"""A CPU shared with other busy processes: PyTorch's threads then wait on each other.

Each PyTorch process starts one OpenMP thread per core. When several such processes share the cores, every
parallel region waits for threads that the other processes keep off the CPU: on this project's 2-core machine,
a SmolLM2-135M training step under a load average of 8-12 took 395 s with 2 threads and 25-30 s with
OMP_NUM_THREADS=1. chattune does not change the thread count itself (an idle machine is faster with all
cores); it says so once, when the load is already there as a run starts.
"""

from __future__ import annotations

import os


def busy_cpu_advice(threads: int, load_average: float | None = None, cores: int | None = None,
                    env: dict[str, str] | None = None) -> str | None:
    """The advice to print, or None: only where this process would run `threads` > 1 CPU threads, the user did not
    choose the thread count (OMP_NUM_THREADS), and the 1-minute load average already reaches the core count."""
    env = os.environ if env is None else env
    if threads <= 1 or "OMP_NUM_THREADS" in env:
        return None
    load = os.getloadavg()[0] if load_average is None else load_average
    cores = cores or os.cpu_count() or 1
    if load < cores:
        return None
    return (f"this CPU is busy before training starts (load average {load:.1f} on {cores} cores): PyTorch's "
            f"{threads} threads per process wait on each other when processes share the cores, which can make each "
            f"step many times slower; if other jobs keep running, start chattune with OMP_NUM_THREADS=1")
