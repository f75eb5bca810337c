"""The known attacks on HTTP/2 servers, each refused without harm to other clients: a
normal client is served while and after each runs, and the attack's cost to poise is
bounded (CPU time, memory, what reaches the backends). Frames are crafted with hyperframe
and hpack (the h2 package's own), sent over a raw socket. Both engines (``h2_engine``)."""

from __future__ import annotations

import asyncio
import resource
import time
from collections.abc import AsyncIterator
from typing import Any

import hpack
import pytest
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from poise.h2.front import PREFACE, STREAM_HIGH
from poise.testing import HttpBackend, Response, echo_handler
from poise.testing.backend import RecordedRequest
from tests.h2.support import H2Client
from tests.integration.support import eventually, running

pytestmark = pytest.mark.usefixtures("h2_engine")

CPU_BOUND = 10.0  # seconds of this process's CPU an attack may cost (attacker included)
MEMORY_BOUND = 64 * 1024 * 1024  # growth of the process's peak RSS an attack may cause


def doc(backend: str, **h2: Any) -> dict[str, Any]:
    return {
        "listeners": [{"name": "web", "listen": "127.0.0.1:0", "upstream": "app",
                       "http2": h2 or True}],
        "upstreams": {"app": {"backends": [backend]}},
        "timeouts": {"client_send": "1s"},
    }  # fmt: skip


def request_block(enc: hpack.Encoder, path: str = "/", **extra: str) -> bytes:
    headers = [(":method", "GET"), (":path", path), (":scheme", "http"),
               (":authority", "test.local"), *extra.items()]  # fmt: skip
    return bytes(enc.encode(headers))


def headers_frame(sid: int, block: bytes, *, end_headers: bool = True, end: bool = True) -> bytes:
    f = HeadersFrame(sid)
    f.data = block
    if end_headers:
        f.flags.add("END_HEADERS")
    if end:
        f.flags.add("END_STREAM")
    return bytes(f.serialize())


class Raw:
    """An attacking connection: raw frames out, everything it gets back kept."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.got = bytearray()

    @classmethod
    async def connect(cls, server: Any) -> Raw:
        host, port = server.addresses["web"]
        reader, writer = await asyncio.open_connection(host, port)
        raw = cls(reader, writer)
        writer.write(PREFACE + SettingsFrame(0).serialize())
        return raw

    async def send(self, data: bytes) -> bool:
        """Send; False when poise has closed the connection meanwhile."""
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (ConnectionError, OSError):
            return False
        return True

    async def until_closed(self, timeout: float = 15.0) -> None:
        """Read until poise closes the connection (fails after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, "poise did not close the attacking connection"
            try:
                data = await asyncio.wait_for(self.reader.read(65536), left)
            except (ConnectionError, OSError):
                return
            if not data:
                return
            self.got += data

    async def read_for(self, seconds: float) -> None:
        """Keep what arrives for ``seconds`` (or until the connection ends)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                data = await asyncio.wait_for(self.reader.read(65536), left)
            except (TimeoutError, ConnectionError, OSError):
                return
            if not data:
                return
            self.got += data

    def frames(self) -> list[Frame]:
        out: list[Frame] = []
        buf = bytes(self.got)
        while len(buf) >= 9:
            frame, length = Frame.parse_frame_header(buf[:9])
            if len(buf) < 9 + length:
                break
            frame.parse_body(memoryview(buf[9 : 9 + length]))
            out.append(frame)
            buf = buf[9 + length :]
        return out

    def goaway(self) -> GoAwayFrame | None:
        found = [f for f in self.frames() if isinstance(f, GoAwayFrame)]
        return found[-1] if found else None

    def close(self) -> None:
        self.writer.close()


class Budget:
    """CPU time and peak memory of this process across an attack."""

    def __enter__(self) -> Budget:
        self.cpu = time.process_time()
        self.rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            return
        cpu = time.process_time() - self.cpu
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.rss
        assert cpu < CPU_BOUND, f"the attack cost {cpu:.1f} s of CPU"
        assert rss < MEMORY_BOUND, f"the attack grew the peak RSS by {rss >> 20} MiB"


@pytest.fixture
async def backend() -> AsyncIterator[HttpBackend]:
    async with HttpBackend("b", echo_handler) as b:
        yield b


def proxied(backend: HttpBackend) -> int:
    return sum(1 for r in backend.requests if r.header("user-agent") != "poise-health")


async def served(server: Any) -> None:
    """A normal client, on its own connection, gets its answers."""
    client = await H2Client.connect(*server.addresses["web"])
    try:
        for i in range(3):
            reply = await client.request(f"/normal/{i}")
            assert reply.status == 200, reply
    finally:
        await client.close()


async def test_rapid_reset(backend: HttpBackend) -> None:
    """CVE-2023-44487: streams opened and reset at once, thousands of them."""
    async with running(doc(backend.url)) as (server, _):
        raw = await Raw.connect(server)
        enc = hpack.Encoder()
        with Budget():
            sid = 1
            for _ in range(50):  # 50 writes of 100 open+reset pairs
                burst = bytearray()
                for _ in range(100):
                    burst += headers_frame(sid, request_block(enc, f"/r/{sid}"))
                    burst += RstStreamFrame(sid, error_code=8).serialize()
                    sid += 2
                if not await raw.send(bytes(burst)):
                    break
                await asyncio.sleep(0)
            await raw.until_closed()
            await served(server)
        goaway = raw.goaway()
        assert goaway is not None and goaway.error_code == 0xB  # ENHANCE_YOUR_CALM
        # backend work started for a few streams at most (the rest were dropped unstarted)
        assert proxied(backend) <= 3 + 200
        raw.close()


async def test_continuation_flood(backend: HttpBackend) -> None:
    """2024: a header block that never ends, one CONTINUATION frame after another."""
    async with running(doc(backend.url)) as (server, _):
        raw = await Raw.connect(server)
        enc = hpack.Encoder()
        with Budget():
            block = request_block(enc, "/c")
            await raw.send(headers_frame(1, block, end_headers=False))
            for _ in range(2000):
                f = ContinuationFrame(1)
                f.data = bytes(enc.encode([("x-pad", "a" * 200)]))
                if not await raw.send(bytes(f.serialize())):
                    break
            await raw.until_closed()
            await served(server)
        assert proxied(backend) == 3  # only the normal client's
        raw.close()


async def test_hpack_bomb(backend: HttpBackend) -> None:
    """A small header block that decodes to megabytes (one big indexed field, repeated)."""
    async with running(doc(backend.url)) as (server, _):
        raw = await Raw.connect(server)
        with Budget():
            enc = hpack.Encoder()
            first = bytes(enc.encode([
                (":method", "GET"), (":path", "/bomb"), (":scheme", "http"),
                (":authority", "test.local"), ("x-big", "b" * 4000),
            ]))  # fmt: skip
            # the field is now entry 62 of the dynamic table: each 0xbe byte repeats it
            bomb = first + b"\xbe" * 5000  # 5 kB on the wire, 20 MB decoded
            await raw.send(headers_frame(1, bomb))
            await raw.until_closed()
            await served(server)
        goaway = raw.goaway()
        assert goaway is not None and goaway.error_code in (0x9, 0xB)  # COMPRESSION, CALM
        assert proxied(backend) == 3  # the bomb never reached the backend
        raw.close()


@pytest.mark.parametrize("flood", ["settings", "ping"])
async def test_control_frame_flood(backend: HttpBackend, flood: str) -> None:
    """SETTINGS and PING frames each make poise answer (an ACK): past a burst of 1,000
    and 100 a second the connection ends with ENHANCE_YOUR_CALM; and a client that does
    not read the answers meanwhile cannot make poise buffer them."""
    async with running(doc(backend.url)) as (server, _):
        raw = await Raw.connect(server)
        frame = (
            SettingsFrame(0).serialize() if flood == "settings"
            else PingFrame(0, opaque_data=b"12345678").serialize()
        )  # fmt: skip
        with Budget():
            chunk = bytes(frame) * 2000
            for _ in range(100):  # up to 200,000 frames
                if not await raw.send(chunk):
                    break
                sessions = list(server.ctx.sessions)
                buffered = [s.transport.get_write_buffer_size() for s in sessions if s.transport]
                assert max(buffered, default=0) < 4 * 1024 * 1024
            await raw.until_closed()
            await served(server)
        goaway = raw.goaway()
        assert goaway is not None and goaway.error_code == 0xB
        raw.close()


async def test_zero_window_stall() -> None:
    """A client that asks for a large response and never opens its window holds a stream
    open; poise stops reading the backend, then resets the stream after client_send."""
    payload = b"z" * (8 * 1024 * 1024)

    async def big(request: RecordedRequest) -> Response:
        return Response(body=payload)

    async with HttpBackend("b", big) as backend, running(doc(backend.url)) as (server, _):
        raw = await Raw.connect(server)
        settings = SettingsFrame(0)
        settings.settings = {SettingsFrame.INITIAL_WINDOW_SIZE: 0}
        with Budget():
            await raw.send(settings.serialize() + headers_frame(1, request_block(hpack.Encoder())))

            def queued() -> int:
                return sum(s.engine.queued(1) for s in server.ctx.sessions if 1 in s.streams)

            await eventually(lambda: queued() > 0)
            await asyncio.sleep(0.3)
            held = queued()
            assert held <= STREAM_HIGH + 2 * 1024 * 1024  # not the 8 MiB the backend has
            deadline = time.monotonic() + 10
            while not any(isinstance(f, RstStreamFrame) for f in raw.frames()):
                assert time.monotonic() < deadline, "the stalled stream was not reset"
                await raw.read_for(0.5)
            await served(server)
        assert not any(1 in s.streams for s in server.ctx.sessions)
        # opening the window now brings nothing: the stream is gone
        await raw.send(WindowUpdateFrame(1, window_increment=65535).serialize())
        raw.close()


async def test_an_even_stream_id_is_never_served(backend: HttpBackend) -> None:
    """Clients open odd-numbered streams only (RFC 9113 §5.1.1): h2 ends the connection
    (PROTOCOL_ERROR), nghttp2 ignores the frame. Either way nothing reaches a backend."""
    async with running(doc(backend.url)) as (server, _):
        raw = await Raw.connect(server)
        await raw.send(headers_frame(2, request_block(hpack.Encoder(), "/even")))
        await served(server)
        await raw.read_for(0.3)
        raw.close()
    assert "/even" not in [r.target for r in backend.requests]
    goaway = raw.goaway()
    assert goaway is None or goaway.error_code == 0x1


async def test_a_stream_id_going_down_is_never_served(backend: HttpBackend) -> None:
    """Stream 3 after stream 5 is implicitly closed (RFC 9113 §5.1.1): nghttp2 drops it,
    h2 ends the connection (PROTOCOL_ERROR). Either way it never reaches a backend."""
    async with running(doc(backend.url)) as (server, _):
        raw = await Raw.connect(server)
        enc = hpack.Encoder()
        await raw.send(headers_frame(5, request_block(enc, "/five")))
        await raw.send(headers_frame(3, request_block(enc, "/three")))
        await served(server)
        await raw.read_for(0.3)
        raw.close()
    targets = [r.target for r in backend.requests]
    assert "/three" not in targets
    goaway = raw.goaway()
    assert goaway is None or goaway.error_code == 0x1


async def test_streams_beyond_the_concurrency_limit_are_refused() -> None:
    release = asyncio.Event()

    async def held(request: RecordedRequest) -> Response:
        if request.header("user-agent") != "poise-health":
            await release.wait()
        return Response(body=b"ok")

    async with (
        HttpBackend("b", held) as backend,
        running(doc(backend.url, max_concurrent_streams=10)) as (server, _),
    ):
        raw = await Raw.connect(server)
        enc = hpack.Encoder()
        with Budget():
            burst = b"".join(
                headers_frame(sid, request_block(enc, f"/s/{sid}")) for sid in range(1, 61, 2)
            )
            await raw.send(burst)
            await eventually(lambda: proxied(backend) >= 10)
            await asyncio.sleep(0.3)
            assert proxied(backend) == 10
            release.set()
            await raw.read_for(0.5)
        frames = raw.frames()
        refused = {f.stream_id for f in frames if isinstance(f, RstStreamFrame)}
        goaway = raw.goaway()
        assert refused == set(range(21, 61, 2))  # each stream over the limit: REFUSED_STREAM
        assert all(f.error_code == 0x7 for f in frames if isinstance(f, RstStreamFrame))
        answered = {f.stream_id for f in frames if isinstance(f, HeadersFrame)}
        assert answered == set(range(1, 21, 2))
        assert goaway is None
        raw.close()
        await served(server)


async def test_a_request_body_beyond_the_window_is_refused(backend: HttpBackend) -> None:
    """DATA past the window poise granted is a flow-control error, not a buffer to grow."""
    async with running(doc(backend.url, initial_window_size=16384)) as (server, _):
        raw = await Raw.connect(server)
        enc = hpack.Encoder()
        await raw.send(headers_frame(1, request_block(enc, "/up"), end=False))
        with Budget():
            for _ in range(64):
                f = DataFrame(1)
                f.data = b"d" * 16384
                if not await raw.send(bytes(f.serialize())):
                    break
            await raw.until_closed()
        frames = raw.frames()
        assert raw.goaway() is not None or any(isinstance(f, RstStreamFrame) for f in frames)
        await served(server)
        raw.close()
