"""The busy-CPU advice: given exactly when PyTorch's threads would wait on other processes' work."""

from __future__ import annotations

from chattune.model.cpu_threads import busy_cpu_advice


def test_a_busy_cpu_gets_the_thread_advice():
    text = busy_cpu_advice(2, load_average=8.1, cores=2, env={})
    assert text is not None and "load average 8.1 on 2 cores" in text and "OMP_NUM_THREADS=1" in text


def test_no_advice_when_idle_single_threaded_or_chosen_by_the_user():
    assert busy_cpu_advice(2, load_average=0.9, cores=2, env={}) is None  # idle: all cores are the fast choice
    assert busy_cpu_advice(1, load_average=12.0, cores=2, env={}) is None  # one thread waits on nobody
    assert busy_cpu_advice(2, load_average=12.0, cores=2, env={"OMP_NUM_THREADS": "2"}) is None  # the user chose


def test_the_load_is_read_from_the_system_when_not_given(monkeypatch):
    monkeypatch.setattr("os.getloadavg", lambda: (3.0, 0.0, 0.0))
    assert "load average 3.0 on 2 cores" in busy_cpu_advice(2, cores=2, env={})
    monkeypatch.setattr("os.getloadavg", lambda: (1.0, 0.0, 0.0))
    assert busy_cpu_advice(2, cores=2, env={}) is None
