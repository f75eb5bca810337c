"""L4 relay on real loopback sockets: bulk both ways, backpressure, half-close, resets,
failover on connect errors and timeouts, idle timeout, connection limit, drain."""

from __future__ import annotations

import asyncio
import hashlib
import time

import pytest

from poise.testing import TcpEcho
from tests.integration.l4support import (  # engine: a fixture, used by pytestmark
    blackhole,
    connect,
    dead_port,
    read_end,
    roundtrip,
    running_tcp,
    tcp_doc,
)
from tests.integration.support import eventually, running

CHUNK = 1 << 20
pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("engine")]


def pattern(i: int) -> bytes:
    return hashlib.sha256(i.to_bytes(8, "big")).digest() * (CHUNK // 32)


def buffered(server: object) -> int:
    """Bytes poise holds in its transports' write buffers (or its pump's) right now."""
    pump = server.l4.pump  # type: ignore[attr-defined]
    total = pump.buffered() if pump is not None else 0
    for listener in server.l4.listeners.values():  # type: ignore[attr-defined]
        for relay in listener.relays:
            for end in (relay.front, relay.back):
                if end is not None:
                    total += end.transport.get_write_buffer_size()
    return total


async def test_100_mib_each_way_at_once_is_byte_exact_with_bounded_buffers() -> None:
    size = 100 * CHUNK
    async with TcpEcho() as echo, running_tcp(tcp_doc([echo.address])) as (server, addr):
        reader, writer = await connect(addr)
        sent, got = hashlib.sha256(), hashlib.sha256()
        peak = 0

        async def send() -> None:
            for i in range(size // CHUNK):
                data = pattern(i)
                sent.update(data)
                writer.write(data)
                await writer.drain()
            writer.write_eof()

        async def receive() -> int:
            n = 0
            while chunk := await reader.read(1 << 20):
                got.update(chunk)
                n += len(chunk)
            return n

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, buffered(server))
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch())
        async with asyncio.timeout(60):
            _, received = await asyncio.gather(send(), receive())
        watcher.cancel()
        writer.close()
        assert received == size
        assert got.hexdigest() == sent.hexdigest()
        stats = server.statistics()["l4"]
        await eventually(lambda: server.statistics()["l4"]["listeners"]["t"]["active"] == 0)
        stats = server.statistics()["l4"]
        assert stats["listeners"]["t"]["bytes_in"] == size
        assert stats["listeners"]["t"]["bytes_out"] == size
        assert stats["backends"]["u"][echo.address]["bytes_in"] == size
        # backpressure, not buffering: a few high-water marks, never megabytes
        assert peak < 2 * CHUNK, peak


async def test_a_client_that_stops_reading_pauses_the_backend_not_poise_memory() -> None:
    async with TcpEcho() as echo, running_tcp(tcp_doc([echo.address])) as (server, addr):
        reader, writer = await connect(addr)
        written = 0
        # Write without reading until the whole chain is full and drain() blocks for good.
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(2.0):
                while True:
                    writer.write(pattern(written // CHUNK))
                    written += CHUNK
                    await writer.drain()
        assert buffered(server) < 2 * CHUNK
        writer.write_eof()
        digest = hashlib.sha256()
        n = 0
        async with asyncio.timeout(30):
            while chunk := await reader.read(1 << 20):
                digest.update(chunk)
                n += len(chunk)
        expected = hashlib.sha256(b"".join(pattern(i) for i in range(written // CHUNK)))
        assert n == written
        assert digest.hexdigest() == expected.hexdigest()
        writer.close()


async def test_a_connected_relay_is_handed_to_the_pump_when_there_is_one(engine: str) -> None:
    async with TcpEcho() as echo, running_tcp(tcp_doc([echo.address])) as (server, addr):
        reader, writer = await connect(addr)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        pump = server.l4.pump
        if engine == "C":
            assert len(pump) == 1 and len(server.l4.pumped) == 1
        else:
            assert pump is None and not server.l4.pumped
        writer.write(b"pong")
        assert await reader.readexactly(4) == b"pong"
        stats = server.statistics()["l4"]["listeners"]["t"]
        assert stats["bytes_in"] == stats["bytes_out"] == 8  # counted while relaying
        writer.write_eof()
        assert await reader.read() == b""
        writer.close()
        await eventually(lambda: server.statistics()["l4"]["listeners"]["t"]["active"] == 0)
        assert not server.l4.pumped and (pump is None or len(pump) == 0)


async def test_client_half_close_reaches_the_backend_while_data_flows_back() -> None:
    async with TcpEcho() as echo, running_tcp(tcp_doc([echo.address])) as (server, addr):
        reader, writer = await connect(addr)
        writer.write(b"ping")
        writer.write_eof()  # SHUT_WR: the backend must see EOF, the echo must still come back
        await echo.wait_until(lambda: echo.half_closed == 1)
        assert await read_end(reader) == b"ping"
        writer.close()
        await eventually(lambda: server.statistics()["l4"]["listeners"]["t"]["active"] == 0)


async def test_backend_half_close_reaches_the_client_while_it_still_sends() -> None:
    received: list[bytes] = []

    async def speaks_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello")
        writer.write_eof()  # done talking, still listening
        received.append(await reader.read())
        writer.close()

    backend = await asyncio.start_server(speaks_first, "127.0.0.1", 0)
    port = backend.sockets[0].getsockname()[1]
    async with backend, running_tcp(tcp_doc([f"tcp://127.0.0.1:{port}"])) as (server, addr):
        reader, writer = await connect(addr)
        async with asyncio.timeout(5):
            assert await reader.read() == b"hello"  # EOF from the backend arrived
        writer.write(b"after your EOF")
        writer.write_eof()
        await eventually(lambda: received == [b"after your EOF"])
        writer.close()
        await eventually(lambda: server.statistics()["l4"]["listeners"]["t"]["active"] == 0)


async def test_backend_reset_reaches_the_client() -> None:
    async with (
        TcpEcho(reset_after=1) as echo,
        running_tcp(tcp_doc([echo.address])) as (
            server,
            addr,
        ),
    ):
        reader, writer = await connect(addr)
        writer.write(b"x")
        # at once, not at a timer: the listener's idle timeout is an hour (a bound of
        # seconds tells the two apart on a loaded machine too)
        with pytest.raises(ConnectionResetError):
            async with asyncio.timeout(20):
                while await reader.read(100):
                    pass
                raise AssertionError("clean EOF instead of a reset")
        writer.close()
        await eventually(lambda: server.statistics()["l4"]["listeners"]["t"]["backend_resets"] == 1)


async def test_refused_backend_is_skipped_for_the_next_one() -> None:
    async with TcpEcho() as echo:
        doc = tcp_doc([f"tcp://127.0.0.1:{dead_port()}", echo.address])
        async with running_tcp(doc) as (server, addr):
            for i in range(4):
                assert await roundtrip(addr, b"n%d" % i) == b"n%d" % i
            stats = server.statistics()["l4"]
            assert echo.connections_accepted == 4
            assert stats["listeners"]["t"]["connect_errors"] >= 1
            assert stats["listeners"]["t"]["retries"] == stats["listeners"]["t"]["connect_errors"]


async def test_no_backend_reachable_closes_the_client_promptly() -> None:
    # Refused connects fail at once: the client is closed without waiting for a connect
    # timeout, set long here so that the bound below tells the two apart on a loaded machine.
    doc = tcp_doc(
        [f"tcp://127.0.0.1:{dead_port()}", f"tcp://127.0.0.1:{dead_port()}"],
        connect_timeout="60s",
    )
    async with running_tcp(doc) as (server, addr):
        reader, writer = await connect(addr)
        started = time.monotonic()
        assert await read_end(reader, timeout=30) == b""
        assert time.monotonic() - started < 30
        writer.close()
        stats = server.statistics()["l4"]["listeners"]["t"]
        assert (stats["connect_errors"], stats["no_backend"]) == (2, 1)


async def test_connect_timeout_moves_on_to_the_next_backend() -> None:
    with blackhole() as port:
        async with TcpEcho() as echo:
            doc = tcp_doc(
                [f"tcp://127.0.0.1:{port}", echo.address],
                policy="first",  # always the black hole first
                connect_timeout="0.5s",
            )
            async with running_tcp(doc) as (server, addr):
                started = time.monotonic()
                assert await roundtrip(addr, b"late but fine") == b"late but fine"
                took = time.monotonic() - started
                assert 0.4 < took < 3.0, took
                stats = server.statistics()["l4"]["listeners"]["t"]
                assert stats["connect_timeouts"] == 1
                assert stats["retries"] == 1


async def test_idle_connections_are_closed_active_ones_are_not() -> None:
    async with (
        TcpEcho() as echo,
        running_tcp(tcp_doc([echo.address], idle_timeout="0.6s")) as (
            server,
            addr,
        ),
    ):
        idle_r, idle_w = await connect(addr)
        busy_r, busy_w = await connect(addr)
        started = time.monotonic()
        # the busy one talks every 0.2 s for 1.5 s: more than twice the idle timeout
        while time.monotonic() - started < 1.5:
            busy_w.write(b".")
            assert await asyncio.wait_for(busy_r.read(1), 2) == b"."
            await asyncio.sleep(0.2)
        assert await read_end(idle_r, timeout=3) == b""
        assert not busy_r.at_eof()
        busy_w.write(b"!")
        assert await asyncio.wait_for(busy_r.read(1), 2) == b"!"
        assert server.statistics()["l4"]["listeners"]["t"]["idle_timeouts"] == 1
        idle_w.close()
        busy_w.close()


async def test_max_connections_refuses_the_one_too_many() -> None:
    async with (
        TcpEcho() as echo,
        running_tcp(tcp_doc([echo.address], max_connections=2)) as (
            server,
            addr,
        ),
    ):
        conns = [await connect(addr) for _ in range(2)]
        for r, w in conns:
            w.write(b"ok")
            assert await asyncio.wait_for(r.readexactly(2), 5) == b"ok"
        r3, w3 = await connect(addr)
        assert await read_end(r3, timeout=3) == b""
        w3.close()
        assert server.statistics()["l4"]["listeners"]["t"]["refused"] == 1
        conns[0][1].close()
        await eventually(lambda: server.statistics()["l4"]["listeners"]["t"]["active"] == 1)
        assert await roundtrip(addr, b"room again") == b"room again"
        conns[1][1].close()


async def test_drain_stops_accepting_and_lets_relays_finish() -> None:
    async with TcpEcho() as echo:
        server_cm = running_tcp(tcp_doc([echo.address], timeouts={"drain": "20s"}))
        server, addr = await server_cm.__aenter__()
        reader, writer = await connect(addr)
        writer.write(b"before")
        assert await asyncio.wait_for(reader.readexactly(6), 5) == b"before"
        server.stop()
        with pytest.raises(OSError):  # no longer accepting
            await eventually(lambda: not server.listeners[0].is_serving())
            await asyncio.wait_for(connect(addr), 2)
        writer.write(b"during drain")  # the relay still works
        assert await asyncio.wait_for(reader.readexactly(12), 5) == b"during drain"
        writer.write_eof()
        assert await read_end(reader) == b""
        writer.close()
        started = time.monotonic()
        await server_cm.__aexit__(None, None, None)  # serve() returns once the relay ended
        assert time.monotonic() - started < 5


async def test_drain_timeout_closes_what_is_left() -> None:
    async with TcpEcho() as echo:
        doc = tcp_doc([echo.address], timeouts={"drain": "0.5s"})
        async with running(doc) as (server, _):
            reader, writer = await connect(server.addresses["t"])
            writer.write(b"hi")
            assert await asyncio.wait_for(reader.readexactly(2), 5) == b"hi"
            server.stop()
            started = time.monotonic()
            assert await read_end(reader, timeout=5) == b""
            assert time.monotonic() - started < 3
            writer.close()


async def test_many_connections_at_once_all_finish() -> None:
    """A burst of accepts (the connect tasks start late under it) and traffic on each: every
    relay completes and none is left behind."""
    async with TcpEcho() as a, TcpEcho() as b:
        doc = tcp_doc([a.address, b.address])
        async with running_tcp(doc) as (server, addr):

            async def one(i: int) -> bytes:
                reader, writer = await connect(addr)
                try:
                    data = b""
                    for j in range(20):
                        msg = b"%d.%d;" % (i, j)
                        writer.write(msg)
                        data += await asyncio.wait_for(reader.readexactly(len(msg)), 10)
                    writer.write_eof()
                    await read_end(reader)
                    return data
                finally:
                    writer.close()

            results = await asyncio.gather(*(one(i) for i in range(200)))
            assert results == [b"".join(b"%d.%d;" % (i, j) for j in range(20)) for i in range(200)]
            await eventually(lambda: server.l4.active() == 0)
            stats = server.statistics()["l4"]["listeners"]["t"]
            assert (stats["accepted"], stats["closed"], stats["no_backend"]) == (200, 200, 0)


async def test_ipv6_client_and_backend() -> None:
    async with TcpEcho(proxy_header=True, host="::1") as echo:
        doc = tcp_doc([echo.address], proxy_protocol="v1")
        doc["listeners"][0]["listen"] = "[::1]:0"
        async with running(doc) as (server, _):
            addr = server.addresses["t"]
            assert addr[0] == "::1"
            reader, writer = await connect(addr)
            local = writer.get_extra_info("sockname")
            writer.write(b"six")
            writer.write_eof()
            assert await read_end(reader) == b"six"
            writer.close()
            assert echo.headers[0].source == ("::1", local[1])
            assert echo.headers[0].destination == ("::1", addr[1])


async def test_upstream_limits_cap_open_connections_without_a_queue() -> None:
    async with TcpEcho() as echo:
        doc = tcp_doc([echo.address], upstream={"limits": {"max_requests_per_backend": 1}})
        async with running_tcp(doc) as (server, addr):
            reader, writer = await connect(addr)
            writer.write(b"a")
            assert await asyncio.wait_for(reader.readexactly(1), 5) == b"a"
            r2, w2 = await connect(addr)  # the only backend is full: closed, not queued
            assert await read_end(r2, timeout=3) == b""
            w2.close()
            writer.close()
            await eventually(lambda: server.l4.active() == 0)
            assert await roundtrip(addr, b"free again") == b"free again"
            assert server.statistics()["l4"]["listeners"]["t"]["no_backend"] == 1
