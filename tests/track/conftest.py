"""Tracking-test helpers: a guard that records every attempt to reach the network."""

from __future__ import annotations

import socket

import pytest


def _is_local(address) -> bool:
    if isinstance(address, (str, bytes)):  # AF_UNIX path
        return True
    host = address[0] if isinstance(address, tuple) else address
    return host in ("127.0.0.1", "::1", "localhost", "0.0.0.0")


@pytest.fixture
def network_attempts(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every non-loopback connect or name lookup made while the test runs (all threads), refused and recorded."""
    return guard_network(monkeypatch)


@pytest.fixture(scope="module")
def module_network_attempts():
    """network_attempts for a module-scoped fixture (e.g. one training run shared by several tests)."""
    with pytest.MonkeyPatch.context() as mp:
        yield guard_network(mp)


def guard_network(monkeypatch: pytest.MonkeyPatch) -> list:
    """Refuse and record non-loopback connects and name lookups until the monkeypatch is undone."""
    attempts: list = []
    real_connect, real_connect_ex, real_getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def connect(self, address):
        if not _is_local(address):
            attempts.append(("connect", address))
            raise OSError("network disabled by the test")
        return real_connect(self, address)

    def connect_ex(self, address):
        if not _is_local(address):
            attempts.append(("connect_ex", address))
            return 101  # ENETUNREACH
        return real_connect_ex(self, address)

    def getaddrinfo(host, *args, **kw):
        if not _is_local((host,)):
            attempts.append(("getaddrinfo", host))
            raise socket.gaierror("network disabled by the test")
        return real_getaddrinfo(host, *args, **kw)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return attempts
