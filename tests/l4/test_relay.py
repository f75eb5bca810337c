"""The relay and listener state machine without sockets: fake transports record what the
relay does; the sweep is driven with explicit clock readings."""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import Any

from poise.config import parse_config
from poise.health.status import View
from poise.l4 import L4
from poise.l4.proxy_protocol import encode_v1
from poise.l4.relay import HOLD_LIMIT, Back, Front, Phase
from poise.routing import build_table
from tests.integration.l4support import dead_port
from tests.integration.support import eventually

BACKENDS = ("tcp://10.0.0.1:1", "tcp://10.0.0.2:1", "tcp://10.0.0.3:1")  # never connected to


class FakeTransport:
    def __init__(self, peer: tuple[str, int] = ("192.0.2.7", 4000)) -> None:
        self.written: list[bytes] = []
        self.eof_written = False
        self.closed = False
        self.aborted = False
        self.reading = True
        self.buffered = 0  # what get_write_buffer_size reports
        self.keep = False  # writes stay buffered (the socket is full)
        self.extra = {"peername": peer, "sockname": ("198.51.100.1", 5432)}

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))
        if self.keep:
            self.buffered += len(data)

    def write_eof(self) -> None:
        self.eof_written = True

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.extra.get(name, default)


def hub(backends: tuple[str, ...] = BACKENDS, **listener: Any) -> L4:
    config = parse_config(
        {
            "listeners": [
                {"name": "t", "listen": ":1", "protocol": "tcp", "upstream": "u", **listener}
            ],
            "upstreams": {
                "u": {
                    "backends": list(backends),
                    "policy": "least_conn",
                }
            },
        }
    )
    table = build_table(config, random.Random(1))
    l4 = L4(config, lambda: table, random.Random(1).random)
    l4.clock = lambda: l4.now  # a fake clock: the tests move ``now`` and sweep by hand
    return l4


class FakeTask:
    def __init__(self) -> None:
        self.cancelled = False

    def add_done_callback(self, callback: Any) -> None:
        pass

    def done(self) -> bool:
        return False

    def cancel(self) -> bool:  # typed like Task.cancel: the compiled relay checks it
        self.cancelled = True
        return True


class NoSpawn:
    """Stands in for L4.spawn: records the connect coroutines instead of running them."""

    def __init__(self) -> None:
        self.coros: list[Any] = []

    def __call__(self, coro: Any) -> FakeTask:
        coro.close()
        self.coros.append(coro)
        return FakeTask()


def accept(l4: L4, peer: tuple[str, int] = ("192.0.2.7", 4000)) -> tuple[Front, FakeTransport]:
    spawn = NoSpawn()
    l4.spawn = spawn  # type: ignore[method-assign,assignment]
    front = l4.listeners["t"].factory()
    transport = FakeTransport(peer)
    front.connection_made(transport)  # type: ignore[arg-type]
    return front, transport


def feed(end: Any, data: bytes) -> None:
    end.data_received(data)


def connect(front: Front, index: int = 0) -> tuple[Back, FakeTransport]:
    relay = front.relay
    backend = front.listener.hub.table.groups["u"].backends[index]
    back = Back(relay, backend)
    relay.attempt = back
    transport = FakeTransport(("10.0.0.1", 1))
    back.connection_made(transport)  # type: ignore[arg-type]
    return back, transport


def test_bytes_before_the_backend_are_held_then_sent_in_order() -> None:
    l4 = hub()
    front, client = accept(l4)
    assert front.relay.phase is Phase.CONNECTING
    feed(front, b"early ")
    feed(front, b"bytes")
    back, server = connect(front)
    assert server.written == [b"early bytes"]
    feed(front, b"!")
    feed(back, b"reply")
    assert server.written[-1] == b"!"
    assert client.written == [b"reply"]
    assert front.relay.phase is Phase.RELAYING


def test_too_much_early_data_pauses_the_client_until_connected() -> None:
    l4 = hub()
    front, client = accept(l4)
    for _ in range(HOLD_LIMIT // 4096 + 1):
        feed(front, b"x" * 4096)
    assert not client.reading
    connect(front)
    assert client.reading


def test_proxy_header_goes_first() -> None:
    l4 = hub(proxy_protocol="v1")
    front, _ = accept(l4)
    feed(front, b"hi")
    _, server = connect(front)
    assert server.written == [encode_v1(("192.0.2.7", 4000), ("198.51.100.1", 5432)) + b"hi"]


def test_half_close_each_way_then_close() -> None:
    l4 = hub()
    front, client = accept(l4)
    back, server = connect(front)
    assert front.eof_received() is True  # keep the transport open for the reply
    assert server.eof_written and not client.closed
    feed(back, b"still flowing")
    assert client.written == [b"still flowing"]
    back.eof_received()
    assert client.closed and server.closed  # both directions done
    assert not l4.listeners["t"].relays


def test_client_eof_while_connecting_is_passed_on_after_connect() -> None:
    l4 = hub()
    front, _ = accept(l4)
    feed(front, b"q")
    front.eof_received()
    _, server = connect(front)
    assert server.written == [b"q"] and server.eof_written


def test_backend_reset_resets_the_client_and_releases_the_load() -> None:
    l4 = hub()
    front, client = accept(l4)
    listener = l4.listeners["t"]
    group = l4.table.groups["u"]
    backend = group.backends[0]
    listener._take(group, front.relay, backend)
    assert group.load is not None and group.load.active[0] == 1
    back, server = connect(front)
    back.connection_lost(ConnectionResetError())
    assert client.aborted and server.aborted
    assert group.load.active[0] == 0
    assert listener.stats.backend_resets == 1


def test_a_late_connect_closes_itself() -> None:
    l4 = hub()
    front, _client = accept(l4)
    stale = Back(front.relay, l4.table.groups["u"].backends[0])
    _, current = connect(front, 1)  # a newer attempt won
    transport = FakeTransport()
    stale.connection_made(transport)  # type: ignore[arg-type]
    assert transport.closed and not current.closed
    stale.connection_lost(None)  # not ours: the relay goes on
    assert front.relay.phase is Phase.RELAYING


def test_backpressure_pauses_the_other_side() -> None:
    l4 = hub()
    front, client = accept(l4)
    back, server = connect(front)
    back.pause_writing()  # the backend's buffer is full
    assert not client.reading
    back.resume_writing()
    assert client.reading
    front.pause_writing()
    assert not server.reading


def test_sweep_idle_timeout_counts_bytes_not_clock_reads() -> None:
    l4 = hub(idle_timeout="10s")
    listener = l4.listeners["t"]
    front, client = accept(l4)
    back, _ = connect(front)
    listener.sweep(5.0)
    feed(back, b"x")
    listener.sweep(12.0)  # moved since the last sweep: the idle clock restarts at 12
    assert not client.closed
    listener.sweep(21.9)
    assert not client.closed
    listener.sweep(22.0)
    assert client.closed
    assert listener.stats.idle_timeouts == 1


def test_trusted_peer_header_then_data_and_bad_header() -> None:
    l4 = hub(accept_proxy=["192.0.2.0/24"])
    front, _client = accept(l4)
    assert front.relay.phase is Phase.HEADER
    feed(front, encode_v1(("203.0.113.1", 1), ("203.0.113.2", 2))[:10])
    assert front.relay.phase is Phase.HEADER
    feed(front, encode_v1(("203.0.113.1", 1), ("203.0.113.2", 2))[10:] + b"data")
    assert front.relay.phase is Phase.CONNECTING
    assert front.relay.client == ("203.0.113.1", 1)
    assert bytes(front.relay.pending) == b"data"
    bad, bad_client = accept(l4)
    feed(bad, b"HELLO")
    assert bad_client.closed and l4.listeners["t"].stats.proxy_errors == 1


def test_header_deadline() -> None:
    l4 = hub(accept_proxy=["192.0.2.0/24"])
    _front, client = accept(l4)
    listener = l4.listeners["t"]
    listener.sweep(l4.now + listener.header_timeout + 0.1)
    assert client.closed and listener.stats.proxy_errors == 1


def test_header_deadline_counts_from_the_accept_not_the_last_sweep() -> None:
    l4 = hub(accept_proxy=["192.0.2.0/24"])
    listener = l4.listeners["t"]
    l4.now = 100.0  # the last sweep
    at = [100.2]
    l4.clock = lambda: at[0]  # the connection arrives 0.2 s later
    _front, client = accept(l4)
    listener.sweep(100.2 + listener.header_timeout - 0.01)
    assert not client.closed
    listener.sweep(100.2 + listener.header_timeout + 0.01)
    assert client.closed


def test_max_connections_refuses() -> None:
    l4 = hub(max_connections=1)
    accept(l4)
    _, second = accept(l4)
    assert second.aborted and l4.listeners["t"].stats.refused == 1


def test_choose_skips_down_tried_and_prefers_least_loaded() -> None:
    l4 = hub()
    listener = l4.listeners["t"]
    front, _ = accept(l4)
    group = l4.table.groups["u"]
    assert group.load is not None
    group.load.active[:] = [3, 0, 1]
    assert listener._choose(group, front.relay) == group.backends[1]
    front.relay.tried = (group.backends[1],)
    assert listener._choose(group, front.relay) == group.backends[2]
    down = group.with_view(View((True, True, False)))
    assert listener._choose(down, front.relay) == group.backends[0]


def test_a_closed_side_still_flushing_lingers_until_the_idle_timeout() -> None:
    l4 = hub(idle_timeout="10s")
    listener = l4.listeners["t"]
    front, client = accept(l4)
    back, _server = connect(front)
    front.eof_received()
    client.buffered = 5  # the client has not taken everything yet
    back.eof_received()  # both directions ended: close, flushing
    assert client.closed and not client.aborted
    assert list(listener.lingering) == [front] and l4.active() == 1
    listener.sweep(l4.now + 5)
    assert not client.aborted
    listener.sweep(l4.now + 10.5)
    assert client.aborted and not listener.lingering and l4.active() == 0


def test_idle_timeout_does_not_wait_for_a_peer_that_takes_nothing() -> None:
    l4 = hub(idle_timeout="10s")
    listener = l4.listeners["t"]
    front, client = accept(l4)
    _back, server = connect(front)
    client.buffered = 65536  # stuck: the client reads nothing
    listener.sweep(1.0)
    listener.sweep(11.5)
    assert client.aborted  # not a close that would wait for a flush forever
    assert server.closed and not server.aborted
    assert not listener.lingering


async def test_a_sweep_before_the_connect_task_runs_does_not_expire_it() -> None:
    """Regression: the connect deadline was set by the task itself, so a sweep between the
    accept and the task's first step saw deadline 0, cancelled the task before it ran, and
    the relay stayed in CONNECTING forever."""
    l4 = hub((f"tcp://127.0.0.1:{dead_port()}",))
    runner = asyncio.create_task(l4.run())
    await l4.ready.wait()
    listener = l4.listeners["t"]
    front = listener.factory()
    client = FakeTransport()
    front.connection_made(client)  # type: ignore[arg-type]
    listener.sweep(l4.now + 0.5)  # before the task's first step
    assert not front.relay.expired
    await eventually(lambda: client.closed)  # the refused connect closed it, as it should
    assert listener.stats.connect_errors == 1
    runner.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await runner


async def test_a_connect_task_ending_unresolved_closes_its_relay() -> None:
    l4 = hub((f"tcp://127.0.0.1:{dead_port()}",))
    runner = asyncio.create_task(l4.run())
    await l4.ready.wait()
    front = l4.listeners["t"].factory()
    client = FakeTransport()
    front.connection_made(client)  # type: ignore[arg-type]
    assert front.relay.task is not None
    front.relay.task.cancel()  # before its first step: its body never runs
    await eventually(lambda: client.closed)
    assert not l4.listeners["t"].relays
    runner.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await runner
