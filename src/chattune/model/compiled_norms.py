"""The model's RMSNorm layers compiled (torch.compile, inductor) for training on a CPU.

An RMSNorm as transformers writes it is eight tensor operations forward (a float32
copy, square, mean, rsqrt, two products, the copy back) and about fifteen backward,
each a full pass over [tokens, hidden] in float32. On two cores one norm's forward
and backward took 3.6 ms at 1060 x 576, and the 61 norms of SmolLM2 about 8 % of a
training step. inductor fuses each direction into one loop over the rows: 0.74 ms.

The model's own forward is what gets compiled (Gemma's 1 + weight, Qwen's or GLM's
variants alike), one graph per norm class shared by every layer, with dynamic
shapes so that each batch's length reuses it. Only training calls with a backward
take the compiled path: evaluation, probes and generation (no gradients) stay eager,
so they never trigger a compilation of their own, and so does a norm whose input and
weight need no gradient (the first layer's, under LoRA), whose forward alone would
save about a millisecond a step for a second graph's compilation (0.6 s).

If inductor cannot run here (no C++ compiler, an unsupported platform), the first
call says so once and every norm goes back to its eager forward; training goes on.

Before its first CPU compilation inductor checks which vector instruction sets this
CPU can run: it builds a small library per set and loads each in a child Python
process (ten of them, 1.3 s on the development machine), while the training step
waits. probe_cpu_in_background() starts that check on a thread as the run begins,
so that the children run while the main thread loads the model and the data; the
first compiled call waits for the thread instead of probing again.
"""

from __future__ import annotations

import logging
import threading
import types
from typing import Any, Callable

import torch

log = logging.getLogger("chattune")

MIN_HIDDEN = 256  # below this (tiny test models) a norm costs less than compiling it

_probe: threading.Thread | None = None  # inductor's vector-ISA check, started once per process


def probe_cpu_in_background() -> None:
    """Start inductor's check of the CPU's vector instruction sets on a daemon thread (once per process).

    The check is inductor's own (valid_vec_isa_list, cached for the process); this only runs it early.
    Its modules are imported here, on the calling thread, so that no import happens on two threads at once.
    """
    global _probe
    if _probe is not None:
        return
    try:
        from torch._inductor import codecache, cpp_builder, cpu_vec_isa  # noqa: F401  (check_build imports them)
    except Exception:  # no inductor here: the first compiled call reports it and falls back to eager
        return
    _probe = threading.Thread(target=_probe_quietly, args=(cpu_vec_isa.valid_vec_isa_list,),
                              name="chattune-cpu-isa-probe", daemon=True)
    _probe.start()


def _probe_quietly(probe: Callable[[], Any]) -> None:
    try:
        probe()
    except Exception:  # the compiled call probes again on the main thread, where a failure is reported
        pass


def wait_for_probe() -> None:
    """Let a running background probe finish, so that the first compilation uses its result."""
    if _probe is not None:
        _probe.join()


def _is_rms_norm(module: torch.nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), torch.Tensor)


class _Compiled:
    """One class's compiled forward, shared by its instances; eager for good after a failure."""

    def __init__(self, eager: Callable[..., torch.Tensor]):
        self.eager = eager
        self.compiled = torch.compile(eager, dynamic=True)
        self.failed = False

    def __call__(self, module: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.failed or not (torch.is_grad_enabled() and module.training and _has_backward(module, hidden_states)):
            return self.eager(module, hidden_states, *args, **kwargs)
        try:
            wait_for_probe()
            return self.compiled(module, hidden_states, *args, **kwargs)
        except Exception as exc:  # inductor's failures have no common base class
            self.failed = True
            log.warning("compiling the RMSNorm layers failed (%s: %s); they run eagerly (same results, slower)",
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            return self.eager(module, hidden_states, *args, **kwargs)


def _has_backward(module: torch.nn.Module, hidden_states: torch.Tensor) -> bool:
    """False for the first layer's norm under LoRA (embeddings and weight frozen): a forward alone gains too
    little from fusing to pay for a graph of its own (dynamo compiles one per requires_grad pattern)."""
    return hidden_states.requires_grad or module.weight.requires_grad


def compile_norms(model: Any) -> int:
    """Give every RMSNorm of a CPU model a compiled training forward; returns how many got one.

    Nothing happens on other devices, or for hidden sizes under MIN_HIDDEN.
    """
    norms = [m for m in model.modules() if _is_rms_norm(m)]
    if not norms or norms[0].weight.device.type != "cpu" or norms[0].weight.shape[-1] < MIN_HIDDEN:
        return 0
    shared: dict[type, _Compiled] = {}
    for module in norms:
        cls = type(module)
        if cls not in shared:
            shared[cls] = _Compiled(cls.forward)
        module.forward = types.MethodType(shared[cls], module)
    return len(norms)
