"""Helpers for the L4 integration tests: a TCP listener config, a client, dead ports, and
the ``engine`` fixture that runs each test with the C pump (l4/_pump.c) and with its
pure-Python twin (the relay's protocols)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from poise.l4 import listener as l4listener
from poise.server import Server
from tests.integration.support import running
from tests.native import SRC, c_or_twin

PUMP_INSTALLED = l4listener.PUMP  # the pump of a compiled install (None in development)


@pytest.fixture(params=["C", "python"])
def engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which relays the L4 listeners of this test use: the C pump or the protocols."""
    module = c_or_twin(request, SRC / "l4" / "_pump.c", PUMP_INSTALLED)
    monkeypatch.setattr(l4listener, "PUMP", module)
    return str(request.param)


def tcp_doc(
    backends: list[str],
    *,
    health: dict[str, Any] | bool = False,
    policy: str | dict[str, Any] | None = None,
    upstream: dict[str, Any] | None = None,
    timeouts: dict[str, Any] | None = None,
    **listener: Any,
) -> dict[str, Any]:
    """One TCP listener "t" on 127.0.0.1:0 relaying to upstream "u"; health checks off
    unless given (``False``), so tests choose which backends get tried."""
    up: dict[str, Any] = {"backends": backends, **(upstream or {})}
    up["health_check"] = {"enabled": False} if health is False else health
    if policy is not None:
        up["policy"] = policy
    doc: dict[str, Any] = {
        "listeners": [
            {"name": "t", "listen": "127.0.0.1:0", "protocol": "tcp", "upstream": "u", **listener}
        ],
        "upstreams": {"u": up},
    }
    if timeouts:
        doc["timeouts"] = timeouts
    return doc


@contextlib.asynccontextmanager
async def running_tcp(doc: dict[str, Any]) -> AsyncIterator[tuple[Server, tuple[str, int]]]:
    async with running(doc) as (server, _):
        yield server, server.addresses["t"]


async def connect(addr: tuple[str, int]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(addr[0], addr[1], limit=1 << 20)


async def roundtrip(addr: tuple[str, int], data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data``, half-close, read until EOF."""
    reader, writer = await connect(addr)
    try:
        writer.write(data)
        writer.write_eof()
        async with asyncio.timeout(timeout):
            return await reader.read()
    finally:
        writer.close()


async def read_end(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    """What arrives until the connection ends (EOF or reset), within ``timeout``."""
    out = b""
    async with asyncio.timeout(timeout):
        try:
            while chunk := await reader.read(65536):
                out += chunk
        except ConnectionResetError:
            pass
    return out


def dead_port() -> int:
    """A loopback port nobody listens on (connect is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def blackhole() -> Any:
    """A loopback port whose connects hang: a listener with a full accept queue (Linux drops
    the SYN), so connecting to it times out instead of failing."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", port))
            fillers.append(s)
        yield port
    finally:
        for s in fillers:
            s.close()
        listener.close()
