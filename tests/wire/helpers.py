"""Helpers for the tests of plain listeners' connections (poise.wire): the ``wire_hub``
fixture that runs a test with the C hub (wire/_hub.c) and with its twin (the event loop's
own server and transports), a protocol that records its callbacks, a listener of the side
under test on loopback, and client sockets driven through the loop."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import struct
import termios
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from poise import wire
from tests.native import SRC, c_or_twin

HUB_INSTALLED = wire._native  # the C hub of a compiled install (None in development)

TIMEOUT = 10.0  # seconds: generous, for a busy machine; a passing test waits far less


def hub_module(request: pytest.FixtureRequest) -> Any:
    """The C hub for a test (see ``tests/native.py``); skips without a C compiler."""
    return c_or_twin(request, SRC / "wire" / "_hub.c", HUB_INSTALLED)


@pytest.fixture(params=["C", "python"])
def wire_hub(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which side serves plain listeners' connections in this test: the C hub ("C") or the
    loop's own server and transports ("python", the twin)."""
    if request.param == "C":
        monkeypatch.setattr(wire, "_native", hub_module(request))
        monkeypatch.setattr(wire, "use_native", True)
        assert wire.native_error() is None, wire.native_error()
    else:
        monkeypatch.setattr(wire, "use_native", False)
    return str(request.param)


async def until(condition: Callable[[], object], what: str, timeout: float = TIMEOUT) -> None:
    """Poll ``condition`` (every few milliseconds, the loop running) until it holds; fail
    after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        await asyncio.sleep(0.005)


async def settle(rounds: int = 20) -> None:
    """Let the loop go round a while (about 0.1 s, with polls in between): for checking that
    something does *not* happen."""
    for _ in range(rounds):
        await asyncio.sleep(0.005)


@contextlib.contextmanager
def loop_errors() -> Iterator[list[dict[str, Any]]]:
    """The contexts the running loop's exception handler is given meanwhile."""
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    seen: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    try:
        yield seen
    finally:
        loop.set_exception_handler(previous)


class Recorder(asyncio.Protocol):
    """A protocol that records its callbacks in ``log`` as (name, argument) pairs."""

    keep_open: bool | None = None  # what eof_received returns

    def __init__(self) -> None:
        self.log: list[tuple[str, Any]] = []
        self.transport: Any = None
        self.data = bytearray()
        self.handed_over = False  # set_protocol gave the transport to another protocol

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.log.append(("made", transport))

    def data_received(self, data: bytes) -> None:
        assert type(data) is bytes
        self.log.append(("data", data))
        self.data += data

    def eof_received(self) -> bool | None:
        self.log.append(("eof", None))
        return self.keep_open

    def pause_writing(self) -> None:
        self.log.append(("pause", self.transport.get_write_buffer_size()))

    def resume_writing(self) -> None:
        self.log.append(("resume", self.transport.get_write_buffer_size()))

    def connection_lost(self, exc: Exception | None) -> None:
        self.log.append(("lost", exc))

    def events(self) -> list[str]:
        return [name for name, _ in self.log]

    @property
    def lost(self) -> bool:
        return "lost" in self.events()

    @property
    def lost_with(self) -> Exception | None:
        """What connection_lost was given (the connection has ended)."""
        (exc,) = [arg for name, arg in self.log if name == "lost"]
        return exc  # type: ignore[no-any-return]


class Echo(Recorder):
    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.transport.write(data)


class Served:
    """A listener of the side under test, its protocols in the order they were made and the
    clients connected to it."""

    def __init__(self, server: Any, protocols: list[Recorder]) -> None:
        self.server = server
        self.protocols = protocols
        self.clients: list[socket.socket] = []
        sockname = server.sockets[0].getsockname()
        self.address: tuple[Any, ...] = (sockname[0], sockname[1])

    async def connect(self, rcvbuf: int | None = None) -> socket.socket:
        """A client connected to the listener (its receive buffer made small with
        ``rcvbuf``, before connecting, so that it takes little unread)."""
        sock = await connect(self.address, rcvbuf)
        self.clients.append(sock)
        return sock

    async def accepted(self, count: int = 1) -> Recorder:
        """The ``count``-th protocol made, once it has its transport."""
        await until(
            lambda: len(self.protocols) >= count and self.protocols[count - 1].log,
            f"connection {count} accepted",
        )
        return self.protocols[count - 1]

    async def pair(self, rcvbuf: int | None = None) -> tuple[socket.socket, Recorder]:
        """A new client and the protocol the listener made for it."""
        sock = await self.connect(rcvbuf)
        return sock, await self.accepted(len(self.clients))


@contextlib.asynccontextmanager
async def serving(
    factory: Callable[[], Recorder] = Recorder, host: str = "127.0.0.1"
) -> AsyncIterator[Served]:
    """A listener on ``host`` (an ephemeral port) made by ``wire.create_server``, serving.
    On the way out its clients and connections are closed, the loop's hub is shut down,
    and every protocol is checked: connection_made once and first, connection_lost once
    (unless it handed its transport over) and last."""
    loop = asyncio.get_running_loop()
    protocols: list[Recorder] = []

    def make() -> Recorder:
        protocol = factory()
        protocols.append(protocol)
        return protocol

    server = await wire.create_server(loop, make, backlog=128, host=host, port=0)
    await server.start_serving()
    served = Served(server, protocols)
    try:
        yield served
    finally:
        server.close()
        for sock in served.clients:
            sock.close()
        for protocol in protocols:
            if protocol.transport is not None and not protocol.lost:
                protocol.transport.abort()
        try:
            await until(
                lambda: all(p.lost or p.handed_over for p in protocols), "every connection lost"
            )
            await settle()
        finally:
            wire.shutdown(loop)
    for protocol in protocols:
        events = protocol.events()
        assert events[0] == "made" and events.count("made") == 1, events
        assert events.count("lost") == (0 if protocol.handed_over else 1), events
        assert not protocol.lost or events[-1] == "lost", events


async def connect(address: tuple[Any, ...], rcvbuf: int | None = None) -> socket.socket:
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, address), TIMEOUT)
    except BaseException:
        sock.close()
        raise
    return sock


async def send(sock: socket.socket, data: bytes) -> None:
    await asyncio.wait_for(asyncio.get_running_loop().sock_sendall(sock, data), TIMEOUT)


async def recv_exactly(sock: socket.socket, size: int, chunk: int = 256 * 1024) -> bytes:
    """``size`` bytes from the client socket (reading ``chunk`` at a time); fails on an
    early end."""
    loop = asyncio.get_running_loop()
    got = bytearray()

    async def read() -> None:
        while len(got) < size:
            data = await loop.sock_recv(sock, min(chunk, size - len(got)))
            assert data, f"EOF after {len(got)} of {size} bytes"
            got.extend(data)
            await asyncio.sleep(0)

    await asyncio.wait_for(read(), TIMEOUT)
    return bytes(got)


async def read_to_end(sock: socket.socket) -> tuple[bytes, str]:
    """Everything the client socket receives until its end, and how it ended: "eof" or
    "reset"."""
    loop = asyncio.get_running_loop()
    got = bytearray()

    async def read() -> str:
        while True:
            try:
                data = await loop.sock_recv(sock, 256 * 1024)
            except ConnectionResetError:
                return "reset"
            if not data:
                return "eof"
            got.extend(data)

    how = await asyncio.wait_for(read(), TIMEOUT)
    return bytes(got), how


def reset(sock: socket.socket) -> None:
    """Close the client socket with a reset (SO_LINGER 0) instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def server_fd(transport: Any) -> int:
    """The descriptor of the server's end of a connection (looked at, never closed)."""
    sock = transport.get_extra_info("socket")  # the twin's; the hub offers none
    return int(sock.fileno() if sock is not None else transport.fileno())


def unread(transport: Any) -> int:
    """How many received bytes wait unread in the kernel on the server's socket."""
    (count,) = struct.unpack("i", fcntl.ioctl(server_fd(transport), termios.FIONREAD, b"\0\0\0\0"))
    return int(count)


def server_option(transport: Any, level: int, option: int) -> int:
    """A socket option of the server's end of a connection."""
    sock = socket.socket(fileno=server_fd(transport))
    try:
        return sock.getsockopt(level, option)
    finally:
        sock.detach()  # the descriptor stays the transport's
