"""compile_norms (model/compiled_norms.py): RMSNorm layers compiled for CPU training, eager elsewhere."""

from __future__ import annotations

import logging
import threading

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import chattune.model.compiled_norms as cn


class Two(torch.nn.Module):
    """Two norms of one class (one compiled graph for both) around a frozen linear, as in a decoder layer."""

    def __init__(self, hidden: int, dtype: torch.dtype):
        super().__init__()
        self.a, self.b = LlamaRMSNorm(hidden, 1e-5), LlamaRMSNorm(hidden, 1e-5)
        self.lin = torch.nn.Linear(hidden, hidden, bias=False)
        torch.manual_seed(0)
        for p in self.parameters():
            p.data.normal_(1.0, 0.2)
            p.requires_grad_(False)
        self.to(dtype)

    def forward(self, x):
        return self.b(self.lin(self.a(x)))


def _forward_backward(model, x, grad):
    x = x.clone().requires_grad_()
    out = model(x)
    out.backward(grad)
    return out.detach(), x.grad


def test_compiled_norms_give_eager_values_and_gradients():
    """float32: the eager numbers; bfloat16: no further from a float32 reference than eager bfloat16 is."""
    g = torch.Generator().manual_seed(1)
    for tokens in (37, 50):  # two lengths: dynamic shapes, one graph
        x, grad = torch.randn(1, tokens, 256, generator=g), torch.randn(1, tokens, 256, generator=g)
        reference = _forward_backward(Two(256, torch.float32), x, grad)
        compiled = Two(256, torch.float32)
        assert cn.compile_norms(compiled) == 2
        for a, b in zip(reference, _forward_backward(compiled, x, grad)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        eager16, compiled16 = Two(256, torch.bfloat16), Two(256, torch.bfloat16)
        cn.compile_norms(compiled16)
        x16, grad16 = x.bfloat16(), grad.bfloat16()
        for r, a, b in zip(reference, _forward_backward(eager16, x16, grad16), _forward_backward(compiled16, x16, grad16)):
            err_eager, err_compiled = ((t.float() - r).abs().max() / r.abs().max() for t in (a, b))
            assert err_compiled <= 1.5 * err_eager + 1e-3, f"{err_compiled:.4f} vs {err_eager:.4f}"


def test_only_training_calls_take_the_compiled_path(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: (lambda *a, **k: calls.append(1) or fn(*a, **k)))
    model = Two(256, torch.float32)
    cn.compile_norms(model)
    x = torch.randn(1, 5, 256, requires_grad=True)
    model(x)
    assert len(calls) == 2
    with torch.no_grad():
        model(x)
    model.eval()
    model(x)
    assert len(calls) == 2, "evaluation and generation stay eager"
    model.train()
    model(torch.randn(1, 5, 256))
    assert len(calls) == 2, "frozen weights and an input without gradient: no backward to fuse, eager"
    model.a.weight.requires_grad_(True)
    model(torch.randn(1, 5, 256))
    assert len(calls) == 4, "a trained norm weight has a backward: both norms compiled"


def test_a_failing_compiler_falls_back_to_eager_once_with_a_warning(monkeypatch, caplog):
    def broken(fn, **kw):
        def call(*a, **k):
            raise RuntimeError("no C++ compiler found\ndetails")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    eager, model = Two(256, torch.float32), Two(256, torch.float32)
    cn.compile_norms(model)
    x = torch.randn(1, 6, 256)
    grad = torch.randn(1, 6, 256)
    with caplog.at_level(logging.WARNING, logger="chattune"):
        ours = _forward_backward(model, x, grad)
        _forward_backward(model, x, grad)
    assert [r.getMessage() for r in caplog.records if "RMSNorm" in r.getMessage()] == [
        "compiling the RMSNorm layers failed (RuntimeError: no C++ compiler found); they run eagerly (same results, slower)"]
    for a, b in zip(_forward_backward(eager, x, grad), ours):
        assert torch.equal(a, b)


def test_tiny_models_and_other_devices_are_left_alone():
    assert cn.compile_norms(Two(64, torch.float32)) == 0
    model = Two(256, torch.float32)
    assert cn.compile_norms(torch.nn.Linear(4, 4)) == 0
    assert cn.compile_norms(model) == 2 and "forward" in model.a.__dict__


def test_the_cpu_isa_probe_runs_once_on_a_thread_and_the_first_compiled_call_waits_for_it(monkeypatch):
    from torch._inductor import cpu_vec_isa

    order, release = [], threading.Event()

    def slow_probe():  # stands in for inductor's ten child processes
        assert release.wait(10)
        order.append("probe")

    monkeypatch.setattr(cpu_vec_isa, "valid_vec_isa_list", slow_probe)
    monkeypatch.setattr(cn, "_probe", None)
    cn.probe_cpu_in_background()
    thread = cn._probe
    assert thread is not None and thread.is_alive() and thread.daemon, "the caller goes on while the probe runs"
    cn.probe_cpu_in_background()
    assert cn._probe is thread, "once per process"
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: (lambda *a, **k: order.append("compiled") or fn(*a, **k)))
    model = Two(256, torch.float32)
    cn.compile_norms(model)
    threading.Timer(0.2, release.set).start()
    model(torch.randn(1, 5, 256, requires_grad=True))
    assert order == ["probe", "compiled", "compiled"]


def test_a_failing_background_probe_is_silent_and_leaves_the_compiled_path_to_report(monkeypatch):
    from torch._inductor import cpu_vec_isa

    def broken():
        raise OSError("no C++ compiler")

    seen = []
    monkeypatch.setattr(threading, "excepthook", seen.append)
    monkeypatch.setattr(cpu_vec_isa, "valid_vec_isa_list", broken)
    monkeypatch.setattr(cn, "_probe", None)
    cn.probe_cpu_in_background()
    cn.wait_for_probe()
    assert not cn._probe.is_alive() and seen == [], "no traceback from the thread"
