#!/usr/bin/env python3
"""A deliberately minimal uvloop + httptools reverse proxy: the *ceiling* reference.

It does what every proxy must (parse the request, pick a backend round robin, reuse pooled
keep-alive connections, relay the response) and nothing a real one needs: no header rules,
no framing checks, no health, no timeouts, no error handling, no bodies. bench/run.py can
measure it beside poise (``--systems poise,ceiling,nginx,haproxy``) to show how much of the
distance to nginx is Python itself and how much is poise's own work.

    python bench/ceiling_proxy.py PORT BACKEND_PORT [BACKEND_PORT ...]
"""

from __future__ import annotations

import asyncio
import itertools
import sys
from typing import Any

import httptools
import uvloop

BACKENDS = [("127.0.0.1", int(p)) for p in sys.argv[2:]]
NEXT = itertools.cycle(BACKENDS)
POOLS: dict[tuple[str, int], list[Upstream]] = {b: [] for b in BACKENDS}
TASKS: set[asyncio.Task[None]] = set()


class Upstream(asyncio.Protocol):
    def __init__(self, backend: tuple[str, int]) -> None:
        self.backend = backend
        self.parser = httptools.HttpResponseParser(self)
        self.client: Client | None = None
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.client is not None:
            self.client.transport.write(data)
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        self.client = None
        POOLS[self.backend].append(self)


class Client(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: Any = None
        self.url = b""
        self.headers: list[bytes] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers += (name, b": ", value, b"\r\n")

    def on_message_complete(self) -> None:
        head = b"".join((b"GET ", self.url, b" HTTP/1.1\r\n", *self.headers, b"\r\n"))
        backend = next(NEXT)
        pool = POOLS[backend]
        if pool:
            up = pool.pop()
            up.client = self
            up.transport.write(head)
        else:
            task = asyncio.ensure_future(self.connect(backend, head))
            TASKS.add(task)
            task.add_done_callback(TASKS.discard)

    async def connect(self, backend: tuple[str, int], head: bytes) -> None:
        loop = asyncio.get_running_loop()
        transport, up = await loop.create_connection(lambda: Upstream(backend), *backend)
        up.client = self
        transport.write(head)


async def main() -> None:
    server = await asyncio.get_running_loop().create_server(Client, "127.0.0.1", int(sys.argv[1]))
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main())
