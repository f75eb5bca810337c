"""Timeouts never fire before their configured value.

The sweep runs every tick and ``Context.now`` is the clock as of the last tick, so a deadline
counted from ``now`` would be up to a tick early. Driven here on a fake clock: the request
arrives 0.2 s after the last tick, and the sweep just before ``arrival + timeout`` must not
fire, the one just after must.
"""

from __future__ import annotations

import asyncio

from tests.l7.test_memo import GET, Rig, Sink

from poise.l7.client import ClientConnection


class FakeClock:
    def __init__(self, start: float) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t


def test_the_response_timeout_counts_from_when_the_request_was_sent() -> None:
    async def run() -> None:
        rig = Rig()
        clock = FakeClock(1_000_000.0)
        rig.ctx.clock = clock
        rig.ctx.now = clock.t  # the last tick
        timeout = rig.ctx.upstream_response_timeout
        client, sink = rig.client()
        clock.t += 0.2  # a request arrives between two ticks
        client.data_received(GET)
        sent_at = clock.t
        assert rig.up_transport.out, "the request went to the backend"
        clock.t = sent_at + timeout - 0.01
        rig.ctx._tick()
        assert sink.out == [] and not rig.up.closed, "504 before the timeout"
        clock.t = sent_at + timeout + 0.01
        rig.ctx._tick()
        assert sink.data().startswith(b"HTTP/1.1 504 ")

    asyncio.run(run())


def test_the_idle_timeout_counts_from_the_end_of_the_last_response() -> None:
    async def run() -> None:
        rig = Rig()
        clock = FakeClock(1_000_000.0)
        rig.ctx.clock = clock
        rig.ctx.now = clock.t
        idle = rig.ctx.client_idle_timeout
        client, _ = rig.client()
        clock.t += 0.2
        rig.exchange(client, GET, [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"])
        done_at = clock.t
        clock.t = done_at + idle - 0.01
        rig.ctx._tick()
        assert not client.closed
        clock.t = done_at + idle + 0.01
        rig.ctx._tick()
        assert client.closed

    asyncio.run(run())


class HalfClosingSink(Sink):
    """A transport that can send FIN (write_eof), as a TCP transport can."""

    def __init__(self) -> None:
        super().__init__()
        self.eof = False

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True


def test_a_408_for_a_trickling_body_is_sent_with_a_lingering_close() -> None:
    """The client is still sending when its body is cut off: poise answers 408, sends FIN and
    drops what still arrives for a moment, rather than closing at once, which could reset the
    connection under the 408 before the client reads it (found as a CI flake). Then, after
    the linger, the connection is closed."""

    async def run() -> None:
        rig = Rig()
        clock = FakeClock(1_000_000.0)
        rig.ctx.clock = clock
        rig.ctx.now = clock.t
        client = ClientConnection(rig.ctx, "web")
        sink = HalfClosingSink()
        client.connection_made(sink)  # type: ignore[arg-type]
        client.data_received(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nx")
        clock.t += rig.ctx.client_body_timeout + 0.01  # the body stopped arriving
        rig.ctx._tick()
        assert sink.data().startswith(b"HTTP/1.1 408 Request Timeout\r\n")
        assert sink.eof and not sink.closed and not client.closed
        client.data_received(b"xxxx")  # still arriving: read and dropped
        assert sink.data().count(b"HTTP/1.1 ") == 1
        clock.t += 2.5  # LINGER
        rig.ctx._tick()
        assert sink.closed

    asyncio.run(run())
