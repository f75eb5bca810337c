"""The TLS record engine (poise.tls.engine: ``_engine.c`` and its twin ``PyEngine``) and the
listener's TLS transport (poise.tls.transport) over in-memory transports: a client
``ssl.SSLObject`` on one side, the engine or transport on the other. Every test runs with
the C engine and with the twin (the ``tls_engine`` fixture, tests/tls/helpers.py)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
from pathlib import Path
from typing import Any

import pytest

from poise.config.model import CertificateConfig, ListenerTlsConfig
from poise.tls import engine as engines
from poise.tls.contexts import server_context
from poise.tls.transport import TlsTransport
from tests.tls.certgen import CA

pytestmark = pytest.mark.usefixtures("tls_engine")

VERSIONS = [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3]
IDS = ["1.2", "1.3"]


class Client:
    """A TLS client over memory BIOs: what it sends is in ``out()``, what it is sent goes
    to ``feed``."""

    def __init__(self, ca: CA, version: ssl.TLSVersion, ciphers: str | None = None) -> None:
        ctx = ssl.create_default_context(cafile=str(ca.path))
        ctx.maximum_version = version
        if ciphers:
            ctx.set_ciphers(ciphers)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="a.test")
        self.closed = False

    def step(self) -> bool:
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            return False
        return True

    def out(self) -> bytes:
        return self.outgoing.read()

    def feed(self, data: bytes) -> bytes:
        """Take records in; the application data they carry."""
        self.incoming.write(data)
        got = b""
        while True:
            try:
                chunk = self.obj.read(1 << 20)
            except ssl.SSLWantReadError:
                return got
            except ssl.SSLZeroReturnError:
                self.closed = True
                return got
            if not chunk:
                self.closed = True
                return got
            got += chunk


def listener_context(tmp_path: Path) -> tuple[CA, ssl.SSLContext]:
    ca = CA(tmp_path)
    cert = ca.issue("a", ["a.test"])
    pem = CertificateConfig(str(cert.cert), str(cert.key))
    return ca, server_context(ListenerTlsConfig(certificates=(pem,)), pem)


def connect(client: Client, engine: engines.Engine) -> None:
    """Run the handshake to its end on both sides."""
    for _ in range(8):
        client.step()
        if engine.handshake(client.out() or None):
            client.feed(engine.take())
            if client.step():
                return
        else:
            client.feed(engine.take())
    raise AssertionError("the handshake did not complete")


def test_make_uses_the_engine_the_fixture_chose(tmp_path: Path, tls_engine: str) -> None:
    _, ctx = listener_context(tmp_path)
    made = engines.make(ctx)
    assert isinstance(made, engines.PyEngine) == (tls_engine == "python")
    assert type(made.sslobj).__name__ == "_SSLSocket"


@pytest.mark.parametrize("version", VERSIONS, ids=IDS)
def test_records_of_any_size_cut_anywhere_arrive_whole_both_ways(
    tmp_path: Path, version: ssl.TLSVersion
) -> None:
    ca, ctx = listener_context(tmp_path)
    client, engine = Client(ca, version), engines.make(ctx)
    connect(client, engine)
    assert engine.tls13 == (version == ssl.TLSVersion.TLSv1_3)
    assert engine.sslobj.version() == ("TLSv1.3" if engine.tls13 else "TLSv1.2")
    rng = random.Random(7)
    for size in (1, 100, 16384, 16385, 100_000, 1 << 20):
        payload = rng.randbytes(size)
        # client -> engine, the records cut at random places
        client.obj.write(payload)
        wire = client.out()
        got = b""
        while wire:
            cut = rng.randint(1, len(wire))
            got += engine.read(wire[:cut])
            wire = wire[cut:]
        assert got == payload
        # engine -> client: one write, or the same bytes as several pieces
        assert client.feed(engine.write(payload)) == payload
        pieces = [payload[: size // 3], b"", payload[size // 3 :]]
        assert client.feed(engine.writelines(pieces)) == payload
    assert engine.read(None) == b"" and engine.take() == b""


@pytest.mark.parametrize("version", VERSIONS, ids=IDS)
def test_close_notify_both_ways(tmp_path: Path, version: ssl.TLSVersion) -> None:
    ca, ctx = listener_context(tmp_path)
    client, engine = Client(ca, version), engines.make(ctx)
    connect(client, engine)
    client.obj.write(b"last words")
    with contextlib.suppress(ssl.SSLWantReadError):
        client.obj.unwrap()
    assert not engine.peer_closed
    assert engine.read(client.out()) == b"last words"
    assert engine.peer_closed
    assert engine.read(None) == b""  # and nothing after it
    assert engine.shutdown() is True  # the peer's arrived before ours
    client.feed(engine.take())
    assert client.closed


@pytest.mark.parametrize("version", VERSIONS, ids=IDS)
def test_our_close_notify_first(tmp_path: Path, version: ssl.TLSVersion) -> None:
    ca, ctx = listener_context(tmp_path)
    client, engine = Client(ca, version), engines.make(ctx)
    connect(client, engine)
    assert engine.shutdown() is False  # sent; the client's is still to come
    assert client.feed(engine.take()) == b""
    assert client.closed


def test_a_failed_handshake_raises_and_leaves_the_alert_to_send(tmp_path: Path) -> None:
    ca, ctx = listener_context(tmp_path)
    ctx.set_ciphers("ECDHE+AESGCM")
    # a TLS 1.2 client offering only a cipher the listener does not have
    client, engine = Client(ca, ssl.TLSVersion.TLSv1_2, ciphers="AES128-SHA"), engines.make(ctx)
    client.step()
    with pytest.raises(ssl.SSLError):
        engine.handshake(client.out())
    alert = engine.take()
    assert alert[:1] == b"\x15"  # an alert record (RFC 5246 §6.2.1)
    with pytest.raises(ssl.SSLError, match=r"(?i)handshake failure|no shared cipher"):
        client.feed(alert)
        client.step()


def test_bytes_that_are_not_tls_fail_the_handshake(tmp_path: Path) -> None:
    _, ctx = listener_context(tmp_path)
    engine = engines.make(ctx)
    with pytest.raises(ssl.SSLError):
        engine.handshake(b"\x16\x03\x01\x00\x05hello" + bytes(300))


def test_a_corrupted_record_fails_the_read(tmp_path: Path) -> None:
    ca, ctx = listener_context(tmp_path)
    client, engine = Client(ca, ssl.TLSVersion.TLSv1_3), engines.make(ctx)
    connect(client, engine)
    client.obj.write(b"x" * 100)
    wire = bytearray(client.out())
    wire[-3] ^= 0xFF  # inside the record's authentication tag
    with pytest.raises(ssl.SSLError):
        engine.read(bytes(wire))


@pytest.mark.parametrize("tls_engine", ["C"], indirect=True)  # the C engine's own check
def test_the_c_engine_takes_only_an_sslsocket(tmp_path: Path) -> None:
    module = engines._native
    with pytest.raises(TypeError):
        module.Engine(object())
    _, ctx = listener_context(tmp_path)
    with pytest.raises(TypeError):
        module.Engine(ctx)


# -- the transport -----------------------------------------------------------------------


class FakeTcp:
    """The TCP transport under a TlsTransport: records what it is asked to do."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.aborted = False
        self.eof_written = False
        self.reading = True
        self.limits: tuple[Any, Any] | None = None

    def write(self, data: bytes) -> None:
        assert not self.closed and not self.eof_written
        self.writes.append(bytes(data))

    def take(self) -> bytes:
        out = b"".join(self.writes)
        self.writes.clear()
        return out

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = self.closed = True

    def write_eof(self) -> None:
        self.eof_written = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def set_write_buffer_limits(self, high: Any = None, low: Any = None) -> None:
        self.limits = (high, low)

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 4242) if name == "peername" else default


class App:
    """The HTTP side: records every call; answers eof_received with ``keep_open``."""

    def __init__(self, keep_open: bool = False) -> None:
        self.events: list[tuple[str, Any]] = []
        self.keep_open = keep_open
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.events.append(("made", None))

    def data_received(self, data: bytes) -> None:
        self.events.append(("data", data))

    def eof_received(self) -> bool:
        self.events.append(("eof", None))
        return self.keep_open

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append(("lost", exc))

    def pause_writing(self) -> None:
        self.events.append(("pause_writing", None))

    def resume_writing(self) -> None:
        self.events.append(("resume_writing", None))

    def data(self) -> bytes:
        return b"".join(v for k, v in self.events if k == "data")


class Timer:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


def open_transport(
    tmp_path: Path, version: ssl.TLSVersion, app: App | None = None
) -> tuple[Client, TlsTransport, FakeTcp, App, Timer]:
    ca, ctx = listener_context(tmp_path)
    client, tcp, app, timer = Client(ca, version), FakeTcp(), app or App(), Timer()
    loop = asyncio.get_running_loop()
    tls = TlsTransport(loop, tcp, app, ctx, timer)  # type: ignore[arg-type]
    client.step()
    tls.data_received(client.out())  # ClientHello
    assert not app.events and not timer.cancelled
    client.feed(tcp.take())  # the server's flight
    while not client.step():  # TLS 1.2: the client's flight, then the server's Finished
        tls.data_received(client.out())
        client.feed(tcp.take())
    # TLS 1.3: the client's Finished, with the first request
    tls.data_received(client.out() + _app_bytes(client, b"GET / HTTP/1.1\r\n\r\n"))
    assert timer.cancelled
    return client, tls, tcp, app, timer


def _app_bytes(client: Client, data: bytes) -> bytes:
    client.obj.write(data)
    return client.out()


@pytest.mark.parametrize("version", VERSIONS, ids=IDS)
async def test_the_app_is_told_once_the_handshake_is_done_and_gets_the_first_request(
    tmp_path: Path, version: ssl.TLSVersion
) -> None:
    client, tls, tcp, app, _ = open_transport(tmp_path, version)
    assert app.events == [("made", None), ("data", b"GET / HTTP/1.1\r\n\r\n")]
    assert app.transport is tls and not tls.is_closing()
    assert tls.get_extra_info("peername") == ("127.0.0.1", 4242)
    sslobj = tls.get_extra_info("ssl_object")
    assert sslobj.version() == ("TLSv1.3" if version == ssl.TLSVersion.TLSv1_3 else "TLSv1.2")
    assert tls.get_extra_info("peercert") is None  # (no client certificate asked for)
    assert tls.get_extra_info("sslcontext") is not None
    if version == ssl.TLSVersion.TLSv1_3:
        # the session tickets wait for the first response: nothing written yet
        assert tcp.writes == []
    tls.write(b"HTTP/1.1 200 OK\r\n\r\n")
    assert len(tcp.writes) == 1  # (TLS 1.3: tickets and response in one write)
    assert client.feed(tcp.take()) == b"HTTP/1.1 200 OK\r\n\r\n"
    assert client.obj.session is not None and client.obj.session.has_ticket


@pytest.mark.parametrize("version", VERSIONS, ids=IDS)
async def test_close_sends_close_notify_then_closes_and_writes_after_it_are_dropped(
    tmp_path: Path, version: ssl.TLSVersion
) -> None:
    client, tls, tcp, app, _ = open_transport(tmp_path, version)
    tls.writelines([b"a", b"b"])
    tls.close()
    assert tcp.closed and tls.is_closing()
    assert client.feed(tcp.take()) == b"ab" and client.closed
    tls.write(b"late")
    tls.writelines([b"late"])
    assert tcp.writes == []
    tls.connection_lost(None)
    assert app.events[-1] == ("lost", None)
    assert tls.get_protocol() is None  # the HTTP side is let go (no cycle)


@pytest.mark.parametrize("version", VERSIONS, ids=IDS)
async def test_write_eof_sends_close_notify_and_reading_goes_on(
    tmp_path: Path, version: ssl.TLSVersion
) -> None:
    client, tls, tcp, app, _ = open_transport(tmp_path, version)
    assert tls.can_write_eof()
    tls.write(b"bye")
    tls.write_eof()
    assert tcp.eof_written and not tcp.closed
    assert client.feed(tcp.take()) == b"bye" and client.closed
    tls.data_received(_app_bytes(client, b"more"))  # TLS 1.3 allows a half-close
    assert app.data().endswith(b"more")
    tls.close()
    assert tcp.closed and tcp.writes == []  # close_notify went out once


@pytest.mark.parametrize("keep_open", [False, True])
async def test_the_clients_close_notify_is_eof_received(tmp_path: Path, keep_open: bool) -> None:
    client, tls, tcp, app, _ = open_transport(tmp_path, ssl.TLSVersion.TLSv1_3, App(keep_open))
    client.obj.write(b"tail")
    with contextlib.suppress(ssl.SSLWantReadError):
        client.obj.unwrap()
    tls.data_received(client.out())
    assert app.events[-2:] == [("data", b"tail"), ("eof", None)]
    # the HTTP side keeps a half-closed connection to answer, or it closes at once
    assert tcp.closed != keep_open
    if keep_open:
        tls.write(b"answer")
        assert client.feed(tcp.take()) == b"answer"


async def test_a_tcp_end_without_close_notify_is_eof_received(tmp_path: Path) -> None:
    _, tls, _, app, _ = open_transport(tmp_path, ssl.TLSVersion.TLSv1_3, App(keep_open=True))
    assert tls.eof_received() is True  # kept open: the HTTP side answers first
    assert app.events[-1] == ("eof", None)
    assert tls.eof_received() is True  # reported once, and still kept open
    assert [k for k, _ in app.events].count("eof") == 1
    tls.close()
    assert tls.eof_received() is None


async def test_a_tcp_end_after_close_notify_keeps_the_half_close(tmp_path: Path) -> None:
    # a client that sends its request, close_notify and FIN still gets its response
    client, tls, tcp, app, _ = open_transport(tmp_path, ssl.TLSVersion.TLSv1_3, App(True))
    with contextlib.suppress(ssl.SSLWantReadError):
        client.obj.unwrap()
    tls.data_received(client.out())
    assert app.events[-1] == ("eof", None)
    assert tls.eof_received() is True and not tcp.closed
    tls.write(b"answer")
    assert client.feed(tcp.take()) == b"answer"


async def test_a_tcp_end_while_paused_waits_for_the_held_data(tmp_path: Path) -> None:
    client, tls, _, app, _ = open_transport(tmp_path, ssl.TLSVersion.TLSv1_3, App(True))
    tls.pause_reading()
    tls.data_received(_app_bytes(client, b"held"))
    assert tls.eof_received() is True
    assert app.events[-1] == ("data", b"GET / HTTP/1.1\r\n\r\n")
    tls.resume_reading()
    await asyncio.sleep(0)
    assert app.events[-2:] == [("data", b"held"), ("eof", None)]


async def test_paused_reading_holds_plaintext_and_eof_until_resumed(tmp_path: Path) -> None:
    client, tls, tcp, app, _ = open_transport(tmp_path, ssl.TLSVersion.TLSv1_3)
    tls.pause_reading()
    assert not tcp.reading and not tls.is_reading()
    tls.data_received(_app_bytes(client, b"one"))
    tls.data_received(_app_bytes(client, b"two"))
    with contextlib.suppress(ssl.SSLWantReadError):
        client.obj.unwrap()
    tls.data_received(client.out())
    assert app.data() == b"GET / HTTP/1.1\r\n\r\n"  # nothing delivered while paused
    tls.resume_reading()
    assert tcp.reading
    assert app.data() == b"GET / HTTP/1.1\r\n\r\n"  # not from inside resume_reading
    await asyncio.sleep(0)
    assert app.events[-3:] == [("data", b"one"), ("data", b"two"), ("eof", None)]


async def test_write_flow_control_is_the_sockets(tmp_path: Path) -> None:
    _, tls, tcp, app, _ = open_transport(tmp_path, ssl.TLSVersion.TLSv1_3)
    tls.set_write_buffer_limits(high=1000)
    assert tcp.limits == (1000, None)
    tls.pause_writing()
    tls.resume_writing()
    assert app.events[-2:] == [("pause_writing", None), ("resume_writing", None)]


async def test_a_failed_handshake_sends_the_alert_and_closes(tmp_path: Path) -> None:
    ca, ctx = listener_context(tmp_path)
    ctx.set_ciphers("ECDHE+AESGCM")
    client = Client(ca, ssl.TLSVersion.TLSv1_2, ciphers="AES128-SHA")
    tcp, app, timer = FakeTcp(), App(), Timer()
    tls = TlsTransport(asyncio.get_running_loop(), tcp, app, ctx, timer)  # type: ignore[arg-type]
    client.step()
    tls.data_received(client.out())
    assert tcp.closed and timer.cancelled and app.events == []
    assert tcp.take()[:1] == b"\x15"


async def test_a_tcp_end_in_the_handshake_closes_without_the_app(tmp_path: Path) -> None:
    _, ctx = listener_context(tmp_path)
    tcp, app, timer = FakeTcp(), App(), Timer()
    tls = TlsTransport(asyncio.get_running_loop(), tcp, app, ctx, timer)  # type: ignore[arg-type]
    assert tls.eof_received() is None  # the TCP transport closes itself
    assert timer.cancelled and tls.is_closing()
    tls.connection_lost(None)
    assert app.events == []


async def test_a_corrupted_record_closes_and_the_app_sees_the_loss(tmp_path: Path) -> None:
    client, tls, tcp, app, _ = open_transport(tmp_path, ssl.TLSVersion.TLSv1_3)
    wire = bytearray(_app_bytes(client, b"x" * 50))
    wire[-2] ^= 0xFF
    tls.data_received(bytes(wire))
    assert tcp.closed and tls.is_closing()
    tls.connection_lost(None)
    assert app.events[-1] == ("lost", None)
