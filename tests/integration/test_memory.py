"""256 MiB each way through a poise process, with peers that read slowly: byte-exact, and
poise's memory stays flat (backpressure, not buffering). bench/bigbody.py does 1-2 GiB."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import subprocess
import sys
import time

import pytest

SIZE = 256 << 20
CHUNK = 1 << 20
pytestmark = pytest.mark.timeout(180)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise AssertionError(f"{key} not found")


def pattern(i: int) -> bytes:
    return hashlib.sha256(i.to_bytes(8, "big")).digest() * (CHUNK // 32)


async def test_large_bodies_both_ways_through_slow_peers_with_flat_memory() -> None:
    sent = hashlib.sha256()
    for i in range(SIZE // CHUNK):
        sent.update(pattern(i))
    expected = sent.hexdigest()

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            if head.startswith(b"HEAD"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            elif head.startswith(b"POST"):
                left, digest = SIZE, hashlib.sha256()
                while left:  # a slow reader: small reads with pauses
                    chunk = await reader.read(min(left, 256 * 1024))
                    digest.update(chunk)
                    left -= len(chunk)
                    await asyncio.sleep(0.001)
                body = digest.hexdigest().encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 64\r\n\r\n" + body)
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % SIZE)
                for i in range(SIZE // CHUNK):
                    writer.write(pattern(i))
                    await writer.drain()
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(backend, "127.0.0.1", 0)
    bport, fport = server.sockets[0].getsockname()[1], free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "poise", "run", "--listen", f"127.0.0.1:{fport}",
         "--backend", f"http://127.0.0.1:{bport}", "--log-level", "warning"],
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", fport)
                break
            except OSError:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        before = rss_kib(proc.pid, "VmRSS")

        # download, read slowly
        writer.write(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        got, left = hashlib.sha256(), SIZE
        while left:
            chunk = await reader.read(min(left, 256 * 1024))
            assert chunk, "download cut short"
            got.update(chunk)
            left -= len(chunk)
            await asyncio.sleep(0.001)
        assert got.hexdigest() == expected

        # upload on the same connection, to a backend that reads slowly
        writer.write(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % SIZE)
        for i in range(SIZE // CHUNK):
            writer.write(pattern(i))
            await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert (await reader.readexactly(64)).decode() == expected
        writer.close()

        growth_mib = (rss_kib(proc.pid, "VmHWM") - before) / 1024
        assert growth_mib < 50, f"poise RSS grew by {growth_mib:.1f} MiB"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        server.close()
