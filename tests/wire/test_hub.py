"""Plain listeners' connections (poise.wire) as the protocols see them, over real sockets on
loopback: a ``Conn`` of the C hub (wire/_hub.c) must behave as the event loop's transport
does. Every test runs with the C hub and with the twin, the loop's own server (the
``wire_hub`` fixture, tests/wire/helpers.py); the protocols record their callbacks, and
``serving`` checks on the way out that each got connection_made once and first and
connection_lost once and last."""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket
from typing import Any

import pytest

from poise import wire
from tests.wire.helpers import (
    Echo,
    Recorder,
    connect,
    loop_errors,
    read_to_end,
    recv_exactly,
    reset,
    send,
    server_option,
    serving,
    settle,
    unread,
    until,
)

pytestmark = pytest.mark.usefixtures("wire_hub")

BIG = 8 << 20  # more than the kernel holds for a client that does not read (tcp_wmem max
# 4 MiB, the client's receive buffer made small): some always waits in the transport
SMALL_RCVBUF = 16 * 1024


def payload(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hub_of(loop: asyncio.AbstractEventLoop) -> Any:
    """The loop's C hub (None with the twin)."""
    return wire._hubs.get(loop)


async def test_the_listener_is_served_by_the_side_under_test(wire_hub: str) -> None:
    async with serving() as served:
        await served.pair()
        native = isinstance(served.server, wire.HubServer)
        assert native == (wire_hub == "C")
        assert (hub_of(asyncio.get_running_loop()) is not None) == native
        if native:
            assert type(served.protocols[0].transport).__name__ == "Conn"


async def test_echo_and_the_addresses(wire_hub: str) -> None:
    async with serving(Echo) as served:
        client, protocol = await served.pair()
        await send(client, b"hello, hub")
        assert await recv_exactly(client, 10) == b"hello, hub"
        transport = protocol.transport
        assert transport.get_extra_info("peername") == client.getsockname()
        assert transport.get_extra_info("sockname") == client.getpeername()
        assert transport.get_extra_info("nonexistent") is None
        assert transport.get_extra_info("nonexistent", 7) == 7
        assert transport.get_extra_info(name="nonexistent", default=8) == 8
        if wire_hub == "C":  # the descriptor is the hub's alone (the twin offers its socket)
            assert transport.get_extra_info("socket") is None
            assert transport.get_extra_info("socket", 5) == 5
        assert transport.get_protocol() is protocol
        assert transport.can_write_eof()
        assert transport.is_reading() and not transport.is_closing()
        assert transport.get_write_buffer_size() == 0
        client.shutdown(socket.SHUT_WR)
        assert await read_to_end(client) == (b"", "eof")
        await until(lambda: protocol.lost, "connection_lost")
        assert protocol.events() == ["made", "data", "eof", "lost"]
        assert protocol.lost_with is None
        assert transport.is_closing()


async def test_the_addresses_are_still_answered_after_the_end(wire_hub: str) -> None:
    """asyncio's transports keep peername and sockname for their whole life (a protocol may
    log them in connection_lost). The hub's peername comes from accept itself; its sockname
    is asked of the socket when first wanted (no system call per connection otherwise), so
    after the end it is known if it was asked before, and otherwise the default."""
    async with serving(Echo) as served:
        for ask_first in (True, False):
            client, protocol = await served.pair()
            transport = protocol.transport
            peer, local = client.getsockname(), client.getpeername()
            if ask_first:
                assert transport.get_extra_info("sockname") == local
            client.close()
            await until(lambda p=protocol: p.lost, "connection_lost")
            assert transport.get_extra_info("peername") == peer
            if ask_first or wire_hub == "python":
                assert transport.get_extra_info("sockname") == local
            else:
                assert transport.get_extra_info("sockname", "gone") == "gone"


async def test_the_connections_socket_has_nodelay() -> None:
    """asyncio's and uvloop's TCP transports turn Nagle's algorithm off on each connection
    (TCP_NODELAY), whatever the listening socket has: small writes go out at once."""
    async with serving(Echo) as served:
        _, protocol = await served.pair()
        assert server_option(protocol.transport, socket.IPPROTO_TCP, socket.TCP_NODELAY)


async def test_many_clients_at_once_each_with_its_own_protocol(wire_hub: str) -> None:
    count = 80  # more than the hub's first 64 slots: it grows with them all open
    loop = asyncio.get_running_loop()
    async with serving(Echo) as served:

        async def client(i: int) -> tuple[socket.socket, bytes]:
            sock = await served.connect()
            data = payload(1000 + 997 * i, seed=i)
            await send(sock, data)
            assert await recv_exactly(sock, len(data)) == data
            return sock, data

        clients = await asyncio.gather(*(client(i) for i in range(count)))
        assert len(served.protocols) == count
        if wire_hub == "C":
            assert len(hub_of(loop)) == count
        by_peer = {p.transport.get_extra_info("peername"): p for p in served.protocols}
        assert len(by_peer) == count
        for sock, data in clients:
            protocol = by_peer[sock.getsockname()]
            assert bytes(protocol.data) == data
            sock.close()
        await until(lambda: all(p.lost for p in served.protocols), "every connection lost")
        for protocol in served.protocols:
            assert protocol.events().count("made") == 1
            assert protocol.events().count("lost") == 1
            assert protocol.lost_with is None
        if wire_hub == "C":
            assert len(hub_of(loop)) == 0


async def test_a_big_write_to_a_slow_reader_pauses_and_resumes_the_protocol() -> None:
    data = payload(BIG)
    async with serving() as served:
        client, protocol = await served.pair(rcvbuf=SMALL_RCVBUF)
        transport = protocol.transport
        transport.write(data)
        await until(lambda: "pause" in protocol.events(), "pause_writing")
        assert transport.get_write_buffer_size() > 0
        assert protocol.events() == ["made", "pause"]  # the client has read nothing yet
        received = await recv_exactly(client, BIG, chunk=16 * 1024)
        assert len(received) == BIG and digest(received) == digest(data)
        await until(lambda: "resume" in protocol.events(), "resume_writing")
        assert protocol.events() == ["made", "pause", "resume"]
        low, high = transport.get_write_buffer_limits()
        assert protocol.log[1][1] > high
        assert protocol.log[2][1] <= low
        assert transport.get_write_buffer_size() == 0
        transport.write(b"still open")
        assert await recv_exactly(client, 10) == b"still open"


async def test_write_buffer_limits_as_asyncio_sets_them(wire_hub: str) -> None:
    async with serving() as served:
        _, protocol = await served.pair()
        transport = protocol.transport
        low, high = transport.get_write_buffer_limits()
        assert high == 64 * 1024
        if wire_hub == "C":  # uvloop starts with low = 16 (64 // 4: KiB taken for bytes)
            assert low == 16 * 1024
        cases: list[tuple[dict[str, int], tuple[int, int]]] = [
            ({}, (16 * 1024, 64 * 1024)),
            ({"high": 1000}, (250, 1000)),
            ({"high": 1001}, (250, 1001)),
            ({"low": 100}, (100, 400)),
            ({"high": 100, "low": 10}, (10, 100)),
            ({"high": 50, "low": 50}, (50, 50)),
            ({"high": 0}, (0, 0)),
            ({"high": 0, "low": 0}, (0, 0)),
        ]
        for kwargs, limits in cases:
            transport.set_write_buffer_limits(**kwargs)
            assert transport.get_write_buffer_limits() == limits, kwargs
        transport.set_write_buffer_limits(200, 50)  # positional: high, low
        assert transport.get_write_buffer_limits() == (50, 200)
        for bad in ({"high": 10, "low": 20}, {"high": -1}, {"low": -1}, {"high": 5, "low": -1}):
            with pytest.raises(ValueError):
                transport.set_write_buffer_limits(**bad)
            assert transport.get_write_buffer_limits() == (50, 200), bad  # unchanged
        assert protocol.events() == ["made"]


async def test_lowering_the_high_mark_under_what_waits_pauses_the_protocol() -> None:
    async with serving() as served:
        client, protocol = await served.pair(rcvbuf=SMALL_RCVBUF)
        transport = protocol.transport
        transport.set_write_buffer_limits(high=64 << 20)
        data = payload(BIG)
        transport.write(data)
        assert "pause" not in protocol.events()
        assert transport.get_write_buffer_size() > 0
        transport.set_write_buffer_limits(high=1024)
        await until(lambda: "pause" in protocol.events(), "pause_writing")
        assert digest(await recv_exactly(client, BIG)) == digest(data)
        await until(lambda: "resume" in protocol.events(), "resume_writing")
        assert protocol.events() == ["made", "pause", "resume"]


async def test_writelines_of_many_pieces_arrive_in_order() -> None:
    rng = random.Random(4)
    pieces: list[bytes | bytearray | memoryview] = []
    for i in range(200):
        chunk = rng.randbytes(rng.choice([0, 1, 7, 100, 4096, 70000]))
        pieces.append([bytes, bytearray, memoryview][i % 3](chunk))
    more = [rng.randbytes(rng.choice([1, 300, 5000])) for _ in range(150)]
    expected = b"".join(pieces) + b"".join(more)
    async with serving() as served:
        client, protocol = await served.pair(rcvbuf=SMALL_RCVBUF)
        transport = protocol.transport
        transport.set_write_buffer_limits(high=64 << 20)
        transport.writelines(pieces)  # more than the socket takes: the rest waits
        transport.writelines(iter(more))  # any iterable; after what waits
        transport.writelines([])
        got = await recv_exactly(client, len(expected))
        assert len(got) == len(expected) and digest(got) == digest(expected)
        transport.writelines([b"a", bytearray(b"b"), memoryview(b"xcx")[1:2]])
        assert await recv_exactly(client, 3) == b"abc"


async def test_write_of_what_is_not_bytes_raises_type_error() -> None:
    async with serving() as served:
        client, protocol = await served.pair()
        transport = protocol.transport
        with pytest.raises(TypeError):
            transport.write("text")
        with pytest.raises(TypeError):
            transport.write(12)
        with pytest.raises(TypeError):
            transport.writelines(["text"])
        transport.write(bytearray(b"still "))
        transport.write(memoryview(b"works"))
        transport.write(b"")
        assert await recv_exactly(client, 11) == b"still works"
        assert not transport.is_closing()


async def test_close_sends_what_waits_then_the_end() -> None:
    data = payload(BIG, seed=2)
    async with serving() as served:
        client, protocol = await served.pair(rcvbuf=SMALL_RCVBUF)
        transport = protocol.transport
        transport.write(data)
        transport.close()
        assert transport.is_closing()
        assert not transport.is_reading()
        transport.close()  # again: nothing more
        await settle()
        assert not protocol.lost  # what waits has not gone out: the client reads nothing yet
        received, how = await read_to_end(client)
        assert how == "eof"
        assert len(received) == BIG and digest(received) == digest(data)
        await until(lambda: protocol.lost, "connection_lost")
        assert protocol.lost_with is None
        transport.close()
        assert transport.is_closing()


async def test_close_with_nothing_waiting() -> None:
    async with serving() as served:
        client, protocol = await served.pair()
        protocol.transport.write(b"bye")
        protocol.transport.close()
        assert not protocol.lost  # connection_lost comes from the loop, not from close()
        assert await read_to_end(client) == (b"bye", "eof")
        await until(lambda: protocol.lost, "connection_lost")
        assert protocol.lost_with is None


# C only: write_last is the hub's (the twin's transports have none; poise writes and closes)
@pytest.mark.parametrize("wire_hub", ["C"], indirect=True)
@pytest.mark.parametrize("size", [3, BIG])
async def test_write_last_sends_the_pieces_then_the_end(wire_hub: str, size: int) -> None:
    """write_last(pieces) is writelines then close: everything arrives, then EOF (the FIN in
    the last segment), connection_lost once from the loop; what follows is dropped."""
    data = payload(size, seed=4)
    third = size // 3
    pieces = [data[:third], bytearray(data[third : 2 * third]), memoryview(data)[2 * third :]]
    async with serving() as served:
        client, protocol = await served.pair(rcvbuf=SMALL_RCVBUF)
        transport = protocol.transport
        transport.write_last(pieces)
        assert transport.is_closing()
        assert "lost" not in protocol.events()  # not from inside write_last()
        transport.write(b"dropped")
        transport.write_last([b"dropped"])
        transport.close()
        received, how = await read_to_end(client)
        assert how == "eof"
        assert len(received) == size and digest(received) == digest(data)
        await until(lambda: protocol.lost, "connection_lost")
        assert protocol.lost_with is None
        assert protocol.events().count("lost") == 1


async def test_abort_drops_what_waits_and_calls_connection_lost_from_the_loop(
    wire_hub: str,
) -> None:
    async with serving() as served:
        client, protocol = await served.pair(rcvbuf=SMALL_RCVBUF)
        transport = protocol.transport
        transport.write(payload(BIG))
        assert transport.get_write_buffer_size() > 0
        transport.abort()
        assert "lost" not in protocol.events()  # not from inside abort()
        assert transport.is_closing()
        transport.write(b"dropped")  # silently
        transport.abort()
        transport.close()
        await until(lambda: protocol.lost, "connection_lost")
        assert protocol.lost_with is None
        received, _ = await read_to_end(client)
        assert len(received) < BIG  # what waited in the transport never went
        if wire_hub == "C":  # the twin raises once its handle is closed
            transport.write(b"dropped")


async def test_write_eof_half_closes() -> None:
    data = payload(BIG, seed=3)
    async with serving() as served:
        client, protocol = await served.pair(rcvbuf=SMALL_RCVBUF)
        transport = protocol.transport
        transport.write(data)
        transport.write_eof()
        assert transport.get_write_buffer_size() > 0
        transport.write_eof()  # again: nothing more
        with pytest.raises(RuntimeError):
            transport.write(b"x")
        with pytest.raises(RuntimeError):
            transport.writelines([b"x"])
        assert not transport.is_closing()
        received, how = await read_to_end(client)
        assert how == "eof" and digest(received) == digest(data)
        await send(client, b"the client still talks")
        await until(lambda: protocol.data == b"the client still talks", "data after write_eof")
        assert not protocol.lost
        client.close()
        await until(lambda: protocol.lost, "connection_lost")
        events = [e for e in protocol.events() if e not in ("pause", "resume")]
        assert events == ["made", *["data"] * (len(events) - 3), "eof", "lost"], events
        assert protocol.lost_with is None


@pytest.mark.parametrize("keep_open", [True, False, None])
async def test_the_clients_half_close(keep_open: bool | None) -> None:
    class HalfOpen(Recorder):
        pass

    HalfOpen.keep_open = keep_open
    async with serving(HalfOpen) as served:
        client, protocol = await served.pair()
        await send(client, b"question")
        client.shutdown(socket.SHUT_WR)
        await until(lambda: "eof" in protocol.events(), "eof_received")
        assert protocol.data == b"question"
        transport = protocol.transport
        if keep_open:
            await settle()
            assert not protocol.lost and not transport.is_closing()
            transport.write(b"answer")
            transport.close()
            assert await read_to_end(client) == (b"answer", "eof")
        else:
            assert await read_to_end(client) == (b"", "eof")
            assert transport.is_closing()
        await until(lambda: protocol.lost, "connection_lost")
        assert protocol.events() == ["made", "data", "eof", "lost"]
        assert protocol.lost_with is None


async def test_the_clients_half_close_with_data_waiting() -> None:
    """eof_received returns None: the transport closes, after what waits has gone out."""
    data = payload(BIG, seed=5)
    async with serving() as served:
        client, protocol = await served.pair(rcvbuf=SMALL_RCVBUF)
        transport = protocol.transport
        transport.write(data)
        client.shutdown(socket.SHUT_WR)
        await until(lambda: "eof" in protocol.events(), "eof_received")
        assert transport.is_closing()
        await settle()
        assert not protocol.lost
        received, how = await read_to_end(client)
        assert how == "eof" and digest(received) == digest(data)
        await until(lambda: protocol.lost, "connection_lost")
        assert protocol.lost_with is None


async def test_pause_reading_holds_data_back_until_resumed() -> None:
    async with serving() as served:
        client, protocol = await served.pair()
        transport = protocol.transport
        transport.pause_reading()
        transport.pause_reading()  # again: nothing more
        assert not transport.is_reading()
        await send(client, b"while paused")
        await until(lambda: unread(transport) == 12, "the bytes at the server's socket")
        await settle()
        assert protocol.events() == ["made"]
        transport.resume_reading()
        transport.resume_reading()
        assert transport.is_reading()
        await until(lambda: protocol.data == b"while paused", "data_received after resume")
        await send(client, b"+")
        await until(lambda: protocol.data == b"while paused+", "data_received")


@pytest.mark.parametrize("waiting", [True, False], ids=["data-waiting", "idle"])
async def test_a_client_reset(waiting: bool) -> None:
    async with serving(Echo) as served:
        client, protocol = await served.pair(rcvbuf=SMALL_RCVBUF)
        if waiting:
            protocol.transport.write(payload(BIG))
            assert protocol.transport.get_write_buffer_size() > 0
        reset(client)
        await until(lambda: protocol.lost, "connection_lost")
        # both sides: the reset, from the send that failed or from the read
        assert isinstance(protocol.lost_with, ConnectionError), repr(protocol.lost_with)
        assert protocol.transport.is_closing()
        other, _ = await served.pair()  # the listener goes on
        await send(other, b"ping")
        assert await recv_exactly(other, 4) == b"ping"


async def test_a_protocol_that_raises_ends_its_connection() -> None:
    raised = ValueError("data_received failed")

    class Raising(Recorder):
        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            raise raised

    async with serving(Raising) as served:
        with loop_errors() as errors:
            client, protocol = await served.pair()
            await send(client, b"hi")
            _, how = await read_to_end(client)
            assert how in ("eof", "reset")
            await until(lambda: protocol.lost, "connection_lost")
            assert protocol.lost_with is raised
            assert protocol.events() == ["made", "data", "lost"]
            [context] = [c for c in errors if c.get("exception") is raised]
            assert context["protocol"] is protocol
            assert context["transport"] is protocol.transport


async def test_an_eof_received_that_raises_ends_its_connection() -> None:
    raised = ValueError("eof_received failed")

    class Raising(Recorder):
        def eof_received(self) -> bool | None:
            super().eof_received()
            raise raised

    async with serving(Raising) as served:
        with loop_errors() as errors:
            client, protocol = await served.pair()
            client.shutdown(socket.SHUT_WR)
            await until(lambda: protocol.lost, "connection_lost")
            assert protocol.lost_with is raised
            assert protocol.events() == ["made", "eof", "lost"]
            assert any(c.get("exception") is raised for c in errors)
            assert await read_to_end(client) == (b"", "eof")


async def test_a_connection_made_that_raises_is_reported(wire_hub: str) -> None:
    raised = ValueError("connection_made failed")

    class Raising(Recorder):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            raise raised

    async with serving(Raising) as served:
        with loop_errors() as errors:
            client, protocol = await served.pair()
            await until(lambda: any(c.get("exception") is raised for c in errors), "the error")
            if wire_hub == "C":  # the hub ends it, as for its other callbacks (the loop's
                # transports, calling connection_made from call_soon, go on)
                await until(lambda: protocol.lost, "connection_lost")
                assert protocol.lost_with is raised
                _, how = await read_to_end(client)
                assert how in ("eof", "reset")


async def test_a_pause_writing_that_raises_is_reported_and_the_connection_goes_on() -> None:
    raised = ValueError("pause_writing failed")

    class Raising(Recorder):
        def pause_writing(self) -> None:
            super().pause_writing()
            raise raised

    data = payload(BIG, seed=6)
    async with serving(Raising) as served:
        with loop_errors() as errors:
            client, protocol = await served.pair(rcvbuf=SMALL_RCVBUF)
            protocol.transport.write(data)
            await until(lambda: any(c.get("exception") is raised for c in errors), "the error")
            assert not protocol.transport.is_closing()
            assert digest(await recv_exactly(client, BIG)) == digest(data)
            await until(lambda: "resume" in protocol.events(), "resume_writing")
            assert not protocol.lost


# C only: uvloop 0.23, after a factory raised, keeps the accepted socket (uv_accept is never
# called) and stops accepting on that listener; the hub closes that one connection and goes on
@pytest.mark.parametrize("wire_hub", ["C"], indirect=True)
async def test_a_factory_that_raises_costs_only_that_connection(wire_hub: str) -> None:
    raised = RuntimeError("no protocol")
    failing = [True]

    def factory() -> Recorder:
        if failing.pop() if failing else False:
            raise raised
        return Echo()

    async with serving(factory) as served:
        with loop_errors() as errors:
            doomed = await served.connect()
            await until(lambda: any(c.get("exception") is raised for c in errors), "the error")
            _, how = await read_to_end(doomed)
            assert how in ("eof", "reset")
            client = await served.connect()
            protocol = await served.accepted(1)
            await send(client, b"next")
            assert await recv_exactly(client, 4) == b"next"
            assert served.protocols == [protocol]


async def test_set_protocol_sends_what_follows_to_the_new_protocol() -> None:
    successor = Echo()

    class Switching(Recorder):
        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            successor.transport = self.transport  # (no connection_made: as with asyncio)
            self.transport.set_protocol(successor)
            self.handed_over = True
            self.transport.write(b"switched")

    async with serving(Switching) as served:
        client, first = await served.pair()
        await send(client, b"one")
        assert await recv_exactly(client, 8) == b"switched"
        assert first.transport.get_protocol() is successor
        await send(client, b"two")
        assert await recv_exactly(client, 3) == b"two"
        client.close()
        await until(lambda: successor.lost, "connection_lost for the new protocol")
        assert first.events() == ["made", "data"]
        assert first.data == b"one"
        assert successor.events() == ["data", "eof", "lost"]
        assert successor.data == b"two" and successor.lost_with is None


async def test_a_closed_server_accepts_nothing_but_its_connections_go_on() -> None:
    async with serving(Echo) as served:
        client, protocol = await served.pair()
        served.server.close()
        assert not served.server.sockets
        try:
            late = await connect(served.address)
        except ConnectionRefusedError:
            pass
        else:  # a connection the listener's queue held when it closed: reset, not served
            try:
                _, how = await read_to_end(late)
                assert how in ("eof", "reset")
            finally:
                late.close()
        await settle()
        assert served.protocols == [protocol]
        await send(client, b"still here")
        assert await recv_exactly(client, 10) == b"still here"
        assert not protocol.lost


@pytest.mark.parametrize("wire_hub", ["C"], indirect=True)  # (the twin has no hub)
async def test_shutdown_ends_the_hubs_connections(wire_hub: str) -> None:
    loop = asyncio.get_running_loop()
    async with serving(Echo) as served:
        client, protocol = await served.pair()
        hub = hub_of(loop)
        assert len(hub) == 1
        served.server.close()  # as the server stops: listeners first
        wire.shutdown(loop)
        assert hub_of(loop) is None
        assert not protocol.lost  # connection_lost comes from the loop
        assert len(hub) == 0
        await until(lambda: protocol.lost, "connection_lost")
        assert protocol.lost_with is None
        assert await read_to_end(client) == (b"", "eof")
        wire.shutdown(loop)  # again: nothing more


async def test_ipv6_addresses() -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    async with serving(Echo, host="::1") as served:
        client, protocol = await served.pair()
        await send(client, b"six")
        assert await recv_exactly(client, 3) == b"six"
        peer = protocol.transport.get_extra_info("peername")
        assert len(peer) == 4 and peer[0] == "::1"
        assert peer == client.getsockname()
        assert protocol.transport.get_extra_info("sockname") == client.getpeername()
