"""A registry API and fake backends on an event loop of their own, in a thread.

Both the sync SDK (which blocks its caller) and the async SDK (on the test's loop) can talk to
it without deadlock, and tests can stop it and start an empty one on the same port."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

from poise.client.sync import LoopThread
from poise.config.model import RegistryConfig
from poise.registry import Instance, MemoryStore
from poise.registry.api import RegistryApi
from poise.testing import HttpBackend

T = TypeVar("T")
DEADLINE = 15.0  # seconds a polled condition may take on a busy shared machine
SWEEP = 0.05  # seconds between TTL sweeps of the test registry


class Harness:
    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.thread = LoopThread("test registry")
        self.port = 0
        self.store = MemoryStore()
        self.api: RegistryApi | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.backends: list[HttpBackend] = []
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.thread.run(coro, DEADLINE)

    def start(self) -> None:
        """An API over a new, empty store (on the same port after the first start)."""

        async def start() -> None:
            self.store = MemoryStore()
            self.api = RegistryApi(self.store, RegistryConfig(store="memory", token=self.token))
            _, self.port = await self.api.start("127.0.0.1", self.port)
            self._sweeper = asyncio.create_task(self._sweep())

        self.run(start())

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP)
            await self.store.expire()

    def stop(self) -> None:
        async def stop() -> None:
            if self._sweeper is not None:
                self._sweeper.cancel()
                await asyncio.gather(self._sweeper, return_exceptions=True)
            if self.api is not None:
                await self.api.close()

        self.run(stop())

    def restart(self) -> None:
        self.stop()
        self.start()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The registry frozen like a SIGSTOPped process while the block runs: connections
        and requests queue in the kernel and are served once it is left."""
        frozen, release = threading.Event(), threading.Event()

        def freeze() -> None:
            frozen.set()
            release.wait(DEADLINE * 4)

        self.thread.call_soon(freeze)
        frozen.wait(DEADLINE)
        try:
            yield
        finally:
            release.set()

    def revision(self) -> int:
        return self.run(self.store.revision())

    def instances(self, service: str) -> tuple[Instance, ...]:
        return self.run(self.store.instances(service))[0]

    def ids(self, service: str) -> list[str]:
        return [i.id for i in self.instances(service)]

    def put(
        self, service: str, id: str, port: int, status: str = "passing", weight: int = 1
    ) -> None:
        """Register directly in the store (no TTL): an instance some other process owns."""
        instance = Instance(service, id, "127.0.0.1", port, status=status, weight=weight)
        self.run(self.store.register(instance))

    def delete(self, service: str, id: str) -> None:
        self.run(self.store.deregister(service, id))

    def backend(self, name: str) -> HttpBackend:
        async def start() -> HttpBackend:
            b = HttpBackend(name)
            await b.start()
            return b

        b = self.run(start())
        self.backends.append(b)
        return b

    def close(self) -> None:
        async def stop_backends() -> None:
            for b in self.backends:
                await b.stop()

        self.run(stop_backends())
        self.stop()
        self.thread.stop()


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what}")
        time.sleep(0.02)


async def await_until(
    predicate: Callable[[], bool | Awaitable[bool]], what: str, timeout: float = DEADLINE
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what}")
        await asyncio.sleep(0.02)
