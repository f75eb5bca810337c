"""A load client that never retries: every request it writes must get a whole response, or
it counts as failed. For "no failed requests" under a drain or a rolling restart, where a
retrying client (a browser, httpx with a retry, wrk's reconnect) would hide a lost request.

Each connection sends ``GET`` after ``GET`` on one keep-alive connection (HTTP/1.1, no
pipelining) and opens a new connection only when the response said ``Connection: close``
(or, with ``fresh``, after every request). Also runnable by hand against any address:

    python -m tests.integration.load 127.0.0.1:8080 --connections 16 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import time


@dataclasses.dataclass
class Load:
    ok: int = 0
    closes: int = 0  # keep-alive requests answered with Connection: close (a drain's end)
    failures: list[str] = dataclasses.field(default_factory=list)  # a request written, no answer
    refused: list[str] = dataclasses.field(default_factory=list)  # connect() failed: none sent

    def summary(self) -> str:
        return (
            f"{self.ok} ok, {len(self.failures)} failed, {len(self.refused)} connects refused, "
            f"{self.closes} Connection: close"
        )


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One response with a Content-Length (or none): status, fields (lower-cased), body."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    fields = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip().lower()
    body = await reader.readexactly(int(fields.get("content-length", "0")))
    return status, fields, body


async def _one(host: str, port: int, load: Load, stop: asyncio.Event, fresh: bool) -> None:
    request = b"GET / HTTP/1.1\r\nHost: load\r\n" + (b"Connection: close\r\n" if fresh else b"")
    request += b"\r\n"
    while not stop.is_set():
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
        except (OSError, TimeoutError) as exc:
            load.refused.append(f"connect: {type(exc).__name__}: {exc}")
            await asyncio.sleep(0.01)  # not a busy loop while nothing listens
            continue
        try:
            while not stop.is_set():
                writer.write(request)
                try:
                    status, fields, _ = await asyncio.wait_for(read_response(reader), 10)
                except (OSError, EOFError, TimeoutError, asyncio.IncompleteReadError) as exc:
                    load.failures.append(f"{type(exc).__name__}: {exc}")
                    break
                if status == 200:
                    load.ok += 1
                else:
                    load.failures.append(f"status {status}")
                if fresh:
                    break
                if fields.get("connection") == "close":
                    load.closes += 1
                    break
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


@dataclasses.dataclass(eq=False)
class Hammer:
    """``connections`` keep-alive loops (and ``fresh`` one-request-per-connection loops) on
    host:port until ``stop()``; ``load`` has the counts so far."""

    host: str
    port: int
    connections: int = 4
    fresh: int = 0
    load: Load = dataclasses.field(default_factory=Load)

    async def __aenter__(self) -> Hammer:
        self._stop = asyncio.Event()
        self._tasks = [
            asyncio.create_task(
                _one(self.host, self.port, self.load, self._stop, i >= self.connections)
            )
            for i in range(self.connections + self.fresh)
        ]
        return self

    async def stop(self) -> Load:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        return self.load

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def _main(host: str, port: int, connections: int, seconds: float) -> None:
    async with Hammer(host, port, connections) as h:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            await asyncio.sleep(1)
            print(h.load.summary(), flush=True)
    print("final:", h.load.summary())
    for f in h.load.failures[:10]:
        print("  ", f)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("address")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--seconds", type=float, default=10)
    a = p.parse_args()
    h, _, port_ = a.address.rpartition(":")
    asyncio.run(_main(h, int(port_), a.connections, a.seconds))
