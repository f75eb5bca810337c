#!/usr/bin/env python3
"""Streams 2 GiB down and 2 GiB up through poise and reports poise's memory.

A loopback backend serves GET with a 1 GiB Content-Length body and answers POST with the
SHA-256 of what it received; curl is the client. The claim checked: bodies stream with
backpressure, so poise's peak RSS barely moves (the foundation issue's 'a 1 GiB body passes
with bounded memory').

    python bench/bigbody.py [--size-mib 2048]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import socket
import subprocess
import sys
import tempfile
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                key, value = line.split(":")
                out[key] = int(value.split()[0])
    return out


async def main(size: int) -> int:
    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            if head.startswith(b"HEAD"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            elif head.startswith(b"POST"):
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                digest = hashlib.sha256()
                while length:
                    chunk = await reader.read(min(length, 1 << 20))
                    digest.update(chunk)
                    length -= len(chunk)
                body = digest.hexdigest().encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
                chunk = b"x" * (1 << 20)
                for _ in range(size >> 20):
                    writer.write(chunk)
                    await writer.drain()
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    zeros, mib = hashlib.sha256(), b"\0" * (1 << 20)
    for _ in range(size >> 20):
        zeros.update(mib)
    expected = zeros.hexdigest()  # of the sparse file uploaded below
    bport, fport = free_port(), free_port()
    server = await asyncio.start_server(backend, "127.0.0.1", bport)
    proxy = subprocess.Popen(
        [sys.executable, "-m", "poise", "run", "--listen", f"127.0.0.1:{fport}",
         "--backend", f"http://127.0.0.1:{bport}", "--log-level", "warning"]
    )  # fmt: skip
    failed = 0
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", fport), timeout=0.1).close()
                break
            except OSError:
                await asyncio.sleep(0.1)
        before = rss_kib(proxy.pid)
        print(f"poise RSS at start: {before['VmRSS']} KiB")
        t = time.monotonic()
        down = await asyncio.create_subprocess_exec(
            "curl", "-s", "-o", "/dev/null", "-w", "%{size_download}",
            f"http://127.0.0.1:{fport}/big", stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        got = int((await down.communicate())[0])
        print(
            f"download: {got} bytes in {time.monotonic() - t:.1f}s",
            "OK" if got == size else "SHORT",
        )
        failed += got != size
        with tempfile.NamedTemporaryFile() as f:
            f.truncate(size)  # sparse zeros
            t = time.monotonic()
            up = await asyncio.create_subprocess_exec(
                "curl", "-s", "-X", "POST", "-T", f.name, f"http://127.0.0.1:{fport}/up",
                stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            answer = (await up.communicate())[0].decode()
            ok = answer == expected
            print(f"upload: sha256 {'matches' if ok else 'DIFFERS'} in {time.monotonic() - t:.1f}s")
            failed += not ok
        after = rss_kib(proxy.pid)
        growth = after["VmHWM"] - before["VmRSS"]
        print(f"poise peak RSS {after['VmHWM']} KiB: growth {growth} KiB")
    finally:
        proxy.terminate()
        proxy.wait()
        server.close()
    return 1 if failed else 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=2048)
    sys.exit(asyncio.run(main(ap.parse_args().size_mib << 20)))
