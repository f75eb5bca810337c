"""Slow and greedy clients: slowloris, slow readers, running out of file descriptors."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from poise.testing import HttpBackend, RecordedRequest, Response
from tests.integration.support import address, full, running

# every case with the C hub and with the loop's own server (tests/wire/helpers.py)
pytestmark = pytest.mark.usefixtures("wire_hub")


async def test_slowloris_connections_closed_while_normal_clients_are_served() -> None:
    async with (
        HttpBackend() as backend,
        running(
            full([backend.url], health={"enabled": False}, timeouts={"client_header": "1s"})
        ) as (server, url),
    ):
        host, port = address(url)
        slow = [await asyncio.open_connection(host, port) for _ in range(200)]

        async def dribble(writer: asyncio.StreamWriter) -> None:
            writer.write(b"GET / HTTP/1.1\r\n")
            try:
                for _ in range(50):
                    await asyncio.sleep(0.1)
                    writer.write(b"X")
                    await writer.drain()
            except ConnectionError:
                pass

        tasks = [asyncio.create_task(dribble(w)) for _, w in slow]
        assert server.ctx is not None
        deadline = time.monotonic() + 10
        while len(server.ctx.clients) < 200 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert len(server.ctx.clients) >= 200  # all slow connections are held by poise
        async with httpx.AsyncClient() as client:
            for _ in range(20):
                assert (await client.get(url)).status_code == 200
        assert server.ctx is not None
        deadline = time.monotonic() + 10
        while len(server.ctx.clients) > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert len(server.ctx.clients) == 0  # every slow head was cut off at the timeout
        for task in tasks:
            task.cancel()
        for _, w in slow:
            w.close()


async def test_client_that_stops_reading_is_cut_off() -> None:
    big = b"z" * (8 << 20)

    async def handler(_: RecordedRequest) -> Response:
        return Response(body=big)

    async with (
        HttpBackend(handler=handler) as backend,
        running(full([backend.url], health={"enabled": False}, timeouts={"client_send": "1s"})) as (
            server,
            url,
        ),
    ):
        host, port = address(url)
        sock = socket.create_connection((host, port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert server.ctx is not None
        deadline = time.monotonic() + 15
        while server.ctx.stats.requests == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)  # the proxy has the request: now it must give up on us
        assert server.ctx.stats.requests == 1
        while server.ctx.clients and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not server.ctx.clients  # closed instead of buffering 8 MiB for a stalled reader
        assert server.ctx.stats.upstream_timeouts == 0  # the backend was not blamed
        assert server.ctx.stats.client_timeouts == 1
        sock.close()


async def test_client_abort_leaves_no_file_descriptors_behind() -> None:
    async with (
        HttpBackend() as backend,
        running(full([backend.url], health={"enabled": False})) as (server, url),
    ):
        async with httpx.AsyncClient() as client:
            await client.get(url)  # warm: pooled backend connection exists
        baseline = len(os.listdir("/proc/self/fd"))
        assert server.ctx is not None
        accepted = server.ctx.stats.connections_accepted
        host, port = address(url)
        for _ in range(20):
            _, writer = await asyncio.open_connection(host, port)
            writer.write(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nabc")
            await writer.drain()
            writer.transport.abort()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if (
                server.ctx.stats.connections_accepted == accepted + 20
                and not server.ctx.clients
                and len(os.listdir("/proc/self/fd")) <= baseline
            ):
                break
            await asyncio.sleep(0.05)
        assert server.ctx.stats.connections_accepted == accepted + 20
        assert not server.ctx.clients
        assert len(os.listdir("/proc/self/fd")) <= baseline


def test_running_out_of_file_descriptors_does_not_spin() -> None:
    """With RLIMIT_NOFILE low, a flood of connections must not make poise busy-loop on
    accept(); once they go, it serves again."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    launcher = (
        "import resource, runpy, sys; "
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)); "
        "sys.argv = ['poise'] + sys.argv[1:]; "
        "runpy.run_module('poise', run_name='__main__')"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", launcher, "run", "--listen", f"127.0.0.1:{port}",
         "--backend", "http://127.0.0.1:9", "--log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    conns: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "poise did not start"
                time.sleep(0.05)
        for _ in range(150):
            try:
                conns.append(socket.create_connection(("127.0.0.1", port), timeout=1))
            except OSError:
                break

        def cpu() -> float:
            with open(f"/proc/{proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        before, t0 = cpu(), time.monotonic()
        time.sleep(2.0)
        used = cpu() - before
        elapsed = time.monotonic() - t0
        assert used < 0.5 * elapsed, f"{used:.2f}s CPU in {elapsed:.2f}s: accept loop spinning"
        for c in conns:
            c.close()
        conns.clear()
        deadline = time.monotonic() + 20
        while True:  # serving again (503: its only backend is down, which is the point)
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as c:
                    c.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                    answer = c.recv(100)
                if answer.startswith(b"HTTP/1.1 "):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "poise did not recover"
            time.sleep(0.1)
        assert proc.poll() is None
    finally:
        for c in conns:
            c.close()
        proc.kill()
        proc.wait()
