"""Helpers for integration tests: run a poise Server in-process on 127.0.0.1:0."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from poise.config import parse_config
from poise.server import Server


def seed(servers: list[str], interval: str = "2s") -> dict[str, Any]:
    return {"port": "127.0.0.1:0", "healthCheckInterval": interval, "servers": servers}


def full(
    backends: list[str], *, health: dict[str, Any] | None = None, **top: Any
) -> dict[str, Any]:
    up: dict[str, Any] = {"backends": backends}
    if health is not None:
        up["health_check"] = health
    doc: dict[str, Any] = {
        "listeners": [{"name": "web", "listen": "127.0.0.1:0", "upstream": "app"}],
        "upstreams": {"app": up},
    }
    doc.update(top)
    return doc


@contextlib.asynccontextmanager
async def running(doc: dict[str, Any]) -> AsyncIterator[tuple[Server, str]]:
    """Start a Server for ``doc``; yield it and its base URL; stop it and wait for the end."""
    server = Server(parse_config(doc))
    task = asyncio.create_task(server.serve())
    await until_started(task, server.started, 10)
    host, port = next(iter(server.addresses.values()))
    try:
        yield server, f"http://{host}:{port}"
    finally:
        server.stop()
        await asyncio.wait_for(task, 40)


async def until_started(task: asyncio.Task[None], started: asyncio.Event, limit: float) -> None:
    """Wait until ``started`` is set; raise what ended ``task`` if it ended first."""
    waiting = asyncio.create_task(started.wait())
    done, _ = await asyncio.wait({task, waiting}, timeout=limit, return_when="FIRST_COMPLETED")
    if task in done:
        waiting.cancel()
        task.result()
    assert waiting in done, f"did not start within {limit:.0f} s"


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``predicate`` until true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout:.1f}s")
        await asyncio.sleep(0.02)


def address(url: str) -> tuple[str, int]:
    hostport = url.split("//", 1)[1]
    host, port = hostport.rsplit(":", 1)
    return host, int(port)


async def exchange(url: str, data: bytes, *, timeout: float = 5.0, bytewise: bool = False) -> bytes:
    """Send raw bytes to the proxy (all at once, or one byte per write with ``bytewise``),
    read until EOF (or timeout), return what came back."""
    host, port = address(url)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        if bytewise:
            for i in range(len(data)):
                writer.write(data[i : i + 1])
                await writer.drain()
        else:
            writer.write(data)
        chunks = []
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                chunks.append(chunk)
        return b"".join(chunks)
    finally:
        writer.close()
