"""TLS passthrough routed by SNI on a TCP listener, on real loopback sockets: each backend
serves its own certificate and the client verifies it end to end (poise decrypts nothing),
exact and wildcard names, the default upstream (unknown name, no SNI, not TLS at all), a
ClientHello in pieces or after a PROXY header, and a client that stalls mid-hello."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from poise.admin.metrics import render
from poise.l4.relay import Phase
from poise.server import Server
from poise.testing import TcpEcho
from tests.integration.l4support import read_end, roundtrip, running_tcp
from tests.integration.support import eventually
from tests.tls.certgen import CA, Pair, serial_of
from tests.tls.helpers import server_context

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("engine")]

A_NAME = "a.example.test"
B_WILDCARD = "*.b.example.test"


class TlsEcho:
    """A TLS backend: answers each line with ``<name>:<line>``; records the SNI it saw."""

    def __init__(self, name: str, pair: Pair) -> None:
        self.name = name
        self.pair = pair
        self.server_names: list[str | None] = []  # per handshake, as the backend received it
        self.ctx = server_context(pair)
        self.ctx.sni_callback = self._sni
        self.server: asyncio.Server | None = None
        self.port = 0

    def _sni(self, obj: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        self.server_names.append(name)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ssl.SSLError):
            while line := await reader.readline():
                writer.write(self.name.encode() + b":" + line)
                await writer.drain()
        writer.close()

    async def __aenter__(self) -> TlsEcho:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.ctx)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"


def sni_doc(
    a: str, b: str, default: str, *, timeouts: dict[str, Any] | None = None, **listener: Any
) -> dict[str, Any]:
    off = {"enabled": False}
    doc: dict[str, Any] = {
        "listeners": [
            {
                "name": "t",
                "listen": "127.0.0.1:0",
                "protocol": "tcp",
                "upstream": "d",
                "sni": [
                    {"names": [A_NAME, "alias.example.test"], "upstream": "a"},
                    {"names": B_WILDCARD, "upstream": "b"},
                ],
                **listener,
            }
        ],
        "upstreams": {
            "a": {"backends": [a], "health_check": off},
            "b": {"backends": [b], "health_check": off},
            "d": {"backends": [default], "health_check": off},
        },
    }
    if timeouts:
        doc["timeouts"] = timeouts
    return doc


@pytest.fixture
def ca(tmp_path: Path) -> CA:
    return CA(tmp_path)


@contextlib.asynccontextmanager
async def three(ca: CA) -> AsyncIterator[tuple[TlsEcho, TlsEcho, TlsEcho]]:
    async with (
        TlsEcho("A", ca.issue("a", [A_NAME, "alias.example.test"])) as a,
        TlsEcho("B", ca.issue("b", [B_WILDCARD])) as b,
        TlsEcho("D", ca.issue("d", ["default.example.test"])) as d,
    ):
        yield a, b, d


def verifying(ca: CA, *, hostname: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca.path))
    ctx.check_hostname = hostname
    return ctx


async def talk(
    addr: tuple[str, int], ctx: ssl.SSLContext, server_name: str | None
) -> tuple[bytes, int]:
    """A TLS session through poise: (the backend's answer to one line, the serial number of
    the certificate the client verified)."""
    async with asyncio.timeout(5):
        reader, writer = await asyncio.open_connection(
            addr[0], addr[1], ssl=ctx, server_hostname=server_name or ""
        )
        try:
            serial = serial_of(writer.get_extra_info("ssl_object").getpeercert(binary_form=True))
            writer.write(b"hello\n")
            return await reader.readline(), serial
        finally:
            writer.close()


class Hello:
    """A client-side TLS session over memory BIOs, driven by hand over a plain stream, so a
    test chooses how the ClientHello (``hello``) reaches poise."""

    def __init__(self, ctx: ssl.SSLContext, server_name: str) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname=server_name)
        with pytest.raises(ssl.SSLWantReadError):
            self.obj.do_handshake()
        self.hello = self.outgoing.read()

    @property
    def serial(self) -> int:
        return serial_of(self.obj.getpeercert(binary_form=True))

    async def finish(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        """Once ``hello`` is sent: complete the handshake, send a line, return the answer."""
        obj = self.obj
        async with asyncio.timeout(5):
            while True:
                try:
                    obj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    writer.write(self.outgoing.read())
                    await self._receive(reader)
            obj.write(b"hello\n")
            writer.write(self.outgoing.read())
            answer = b""
            while not answer.endswith(b"\n"):
                try:
                    answer += obj.read(65536)
                except ssl.SSLWantReadError:
                    await self._receive(reader)
        return answer

    async def _receive(self, reader: asyncio.StreamReader) -> None:
        data = await reader.read(65536)
        assert data, "poise closed the connection"
        self.incoming.write(data)


def peeking(server: Server) -> list[int]:
    """Bytes held by each relay still peeking at its ClientHello."""
    relays = server.l4.listeners["t"].relays
    return [len(r.pending) for r in relays if r.phase is Phase.PEEK]


def stats(server: Server) -> dict[str, Any]:
    return server.statistics()["l4"]["listeners"]["t"]  # type: ignore[no-any-return]


async def test_each_name_reaches_its_backend_with_the_backends_own_certificate(ca: CA) -> None:
    async with (
        three(ca) as (a, b, d),
        running_tcp(sni_doc(a.address, b.address, d.address)) as (
            server,
            addr,
        ),
    ):
        strict = verifying(ca)
        assert await talk(addr, strict, A_NAME) == (b"A:hello\n", a.pair.serial)
        assert await talk(addr, strict, "ALIAS.example.test") == (b"A:hello\n", a.pair.serial)
        assert await talk(addr, strict, "x.b.example.test") == (b"B:hello\n", b.pair.serial)
        # the backends did the handshakes, with the names the clients sent
        assert a.server_names == [A_NAME, "ALIAS.example.test"]
        assert b.server_names == ["x.b.example.test"]
        assert d.server_names == []
        lax = verifying(ca, hostname=False)  # the default's certificate names none of these
        for name in ("unknown.example.test", "b.example.test", "y.x.b.example.test"):
            assert await talk(addr, lax, name) == (b"D:hello\n", d.pair.serial)
        assert d.server_names == ["unknown.example.test", "b.example.test", "y.x.b.example.test"]
        await eventually(lambda: stats(server)["active"] == 0)
        st = stats(server)
        assert st["sni_routes"] == {"a": 2, "b": 1, "d": 3}
        assert (st["sni_unreadable"], st["sni_timeouts"], st["closed"]) == (0, 0, 6)
        backends = server.statistics()["l4"]["backends"]
        assert [v["connections"] for v in backends["a"].values()] == [2]
        assert [v["connections"] for v in backends["b"].values()] == [1]
        assert [v["connections"] for v in backends["d"].values()] == [3]
        assert all(v["active"] == 0 for up in backends.values() for v in up.values())
        text = render(server)
        for upstream, n in (("a", 2), ("b", 1), ("d", 3)):
            assert f'poise_tcp_sni_routes_total{{listener="t",upstream="{upstream}"}} {n}' in text
        backend = b.address.split("://")[1]
        assert f'poise_tcp_backend_connections_total{{upstream="b",backend="{backend}"}} 1' in text


async def test_no_sni_goes_to_the_default(ca: CA) -> None:
    async with (
        three(ca) as (a, b, d),
        running_tcp(sni_doc(a.address, b.address, d.address)) as (
            server,
            addr,
        ),
    ):
        assert await talk(addr, verifying(ca, hostname=False), None) == (
            b"D:hello\n",
            d.pair.serial,
        )
        assert d.server_names == [None]
        assert stats(server)["sni_routes"] == {"d": 1}
        assert stats(server)["sni_unreadable"] == 0  # a ClientHello, just without a name


async def test_a_plain_client_goes_to_the_default() -> None:
    async with (
        TcpEcho() as plain,
        TcpEcho(name="a") as other,
        running_tcp(sni_doc(other.address, other.address, plain.address)) as (server, addr),
    ):
        assert await roundtrip(addr, b"GET / HTTP/1.0\r\n\r\n") == b"GET / HTTP/1.0\r\n\r\n"
        # starts like a TLS record, then ends: decided at the client's EOF
        assert await roundtrip(addr, b"\x16\x03\x01") == b"\x16\x03\x01"
        assert await roundtrip(addr, b"") == b""
        # a handshake announcing more than the peek limit: not waited for, relayed as it is
        huge = b"\x16\x03\x01\x40\x00\x01\x00\xff\xff" + bytes(20000)
        assert await roundtrip(addr, huge) == huge
        assert plain.heads == [b"GET / HTTP/1.0\r\n\r\n", b"\x16\x03\x01", b"", huge]
        assert other.heads == []
        await eventually(lambda: stats(server)["active"] == 0)
        assert stats(server)["sni_routes"] == {"d": 4}
        assert stats(server)["sni_unreadable"] == 4


async def test_a_client_hello_in_pieces(ca: CA) -> None:
    async with (
        three(ca) as (a, b, d),
        running_tcp(sni_doc(a.address, b.address, d.address)) as (
            server,
            addr,
        ),
    ):
        session = Hello(verifying(ca), "z.b.example.test")
        hello = session.hello
        assert len(hello) > 100
        cuts = [0, 1, 4, 5, 60, len(hello) - 1, len(hello)]  # inside the record header, too
        reader, writer = await asyncio.open_connection(*addr)
        try:
            for start, end in itertools.pairwise(cuts[:-1]):
                writer.write(hello[start:end])
                await writer.drain()
                # poise holds exactly what came so far, still peeking, nothing connected
                await eventually(lambda end=end: peeking(server) == [end])  # type: ignore[misc]
            assert b.server_names == []
            writer.write(hello[cuts[-2] :])
            assert await session.finish(reader, writer) == b"B:hello\n"
            assert session.serial == b.pair.serial
            assert b.server_names == ["z.b.example.test"]
        finally:
            writer.close()


async def test_sni_after_a_proxy_header_in_the_same_write(ca: CA) -> None:
    async with (
        three(ca) as (a, b, d),
        running_tcp(sni_doc(a.address, b.address, d.address, accept_proxy=["127.0.0.1/32"])) as (
            server,
            addr,
        ),
    ):
        session = Hello(verifying(ca), A_NAME)
        reader, writer = await asyncio.open_connection(*addr)
        try:
            writer.write(b"PROXY TCP4 192.0.2.7 192.0.2.1 40000 443\r\n" + session.hello)
            assert await session.finish(reader, writer) == b"A:hello\n"
            assert session.serial == a.pair.serial
        finally:
            writer.close()
        assert stats(server)["sni_routes"] == {"a": 1}
        assert stats(server)["proxy_errors"] == 0


async def test_a_stalled_client_hello_is_closed_at_client_header(ca: CA) -> None:
    async with (
        three(ca) as (a, b, d),
        running_tcp(
            sni_doc(a.address, b.address, d.address, timeouts={"client_header": "500ms"})
        ) as (server, addr),
    ):
        hello = Hello(verifying(ca), A_NAME).hello
        reader, writer = await asyncio.open_connection(*addr)
        started = time.monotonic()
        writer.write(hello[: len(hello) // 2])
        await writer.drain()
        await eventually(lambda: peeking(server) == [len(hello) // 2])
        assert await read_end(reader, timeout=20) == b""
        elapsed = time.monotonic() - started
        writer.close()
        # closed by client_header (0.5 s), not sooner, and not by the listener's idle
        # timeout (an hour): the upper bound leaves a loaded machine plenty of room
        assert 0.4 < elapsed < 20, elapsed
        await eventually(lambda: stats(server)["active"] == 0)
        st = stats(server)
        assert (st["sni_timeouts"], st["closed"]) == (1, 1)
        assert st["sni_routes"] == {}
        assert a.server_names == b.server_names == d.server_names == []
        assert all(
            v["connections"] == 0
            for up in server.statistics()["l4"]["backends"].values()
            for v in up.values()
        )


async def test_listeners_without_sni_do_not_peek() -> None:
    async with (
        TcpEcho() as echo,
        running_tcp(
            {
                "listeners": [
                    {"name": "t", "listen": "127.0.0.1:0", "protocol": "tcp", "upstream": "u"}
                ],
                "upstreams": {
                    "u": {"backends": [echo.address], "health_check": {"enabled": False}}
                },
            }
        ) as (server, addr),
    ):
        assert server.l4.listeners["t"].sni is None
        reader, writer = await asyncio.open_connection(*addr)
        writer.write(b"\x16\x03\x01")  # the start of a TLS record: relayed at once regardless
        async with asyncio.timeout(5):
            assert await reader.readexactly(3) == b"\x16\x03\x01"
        writer.close()
        assert "sni_routes" not in stats(server)
