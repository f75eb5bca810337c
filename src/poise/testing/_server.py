"""Shared plumbing for the test servers: bind, accept, count, stop, wait.

`_TcpServer` owns the listening socket and the per-connection tasks so that
`HttpBackend` and `ScriptedBackend` only implement `_handle()`. Not public API.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import ssl
from collections.abc import Callable
from types import TracebackType
from typing import Self


class _TcpServer:
    """A restartable 127.0.0.1 TCP server that runs `_handle()` per connection."""

    def __init__(
        self, name: str, host: str, port: int, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.ssl_context = ssl_context  # serve TLS (an https:// backend) when set
        self.connections_accepted = 0
        self.open_connections = 0
        self.errors: list[BaseException] = []
        self._server: asyncio.Server | None = None
        self._generation = 0
        self._connection_ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._changed = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    async def start(self) -> None:
        """Start listening. After `stop()` this rebinds the port used before."""
        if self._server is not None:
            return
        self._generation += 1
        callback = functools.partial(self._accept, self._generation)
        self._server = await asyncio.start_server(
            callback, self.host, self.port, limit=1 << 20, reuse_address=True,
            ssl=self.ssl_context,
        )  # fmt: skip
        self.port = self._server.sockets[0].getsockname()[1]
        self._notify()

    async def stop(self) -> None:
        """Stop listening and drop every open connection, like a killed process.

        A handler may call this (a backend dying mid-request): its own connection is
        dropped too, and nothing it returns afterwards is sent.
        """
        server, self._server = self._server, None
        if server is None:
            return
        self._generation += 1
        server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        current = asyncio.current_task()  # stop() may be called by a handler
        tasks = [task for task in self._tasks if task is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()
        self._notify()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- observation -------------------------------------------------------------

    def statistics(self) -> dict[str, int]:
        return {
            "connections_accepted": self.connections_accepted,
            "open_connections": self.open_connections,
            "errors": len(self.errors),
        }

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait until `predicate()` is true; it is re-checked on every state change.

        Raises TimeoutError after `timeout` seconds.
        """
        async with asyncio.timeout(timeout):
            while not predicate():
                await self._changed.wait()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # -- connections -------------------------------------------------------------

    async def _accept(
        self, generation: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if generation != self._generation:  # accepted just before stop()
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections_accepted += 1
        self.open_connections += 1
        self._notify()
        try:
            await self._handle(reader, writer, next(self._connection_ids))
        except (ConnectionError, TimeoutError):
            pass
        except asyncio.CancelledError:
            # stop() or loop shutdown. Nobody awaits this task, and asyncio's stream
            # callback would log a cancelled one as an error: end it quietly.
            pass
        except Exception as exc:  # a bug in a script or in this module: record it
            self.errors.append(exc)
        finally:
            try:
                writer.close()  # flushes what is buffered, then FIN
                # stop() may cancel this task while it waits here (a connection that ended
                # by itself just as the server stops): it is ending anyway, and a
                # CancelledError escaping would be logged by asyncio's stream callback.
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await writer.wait_closed()
            finally:
                self._tasks.discard(task)
                self._writers.discard(writer)
                self.open_connections -= 1
                self._notify()

    async def _handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, connection_id: int
    ) -> None:
        raise NotImplementedError
