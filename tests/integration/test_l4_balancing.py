"""L4 with the shared machinery: policies, active TCP checks (send/expect), PROXY headers
sent to backends and accepted from trusted peers."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from poise.config import ConfigError, parse_config
from poise.l4.proxy_protocol import encode_v1, encode_v2
from poise.testing import HttpBackend, TcpEcho
from tests.integration.l4support import (  # engine: a fixture, used by pytestmark
    connect,
    dead_port,
    read_end,
    roundtrip,
    running_tcp,
    tcp_doc,
)
from tests.integration.support import eventually, running

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("engine")]


async def test_round_robin_spreads_connections() -> None:
    async with TcpEcho() as a, TcpEcho() as b, TcpEcho() as c:
        doc = tcp_doc([a.address, b.address, c.address])
        async with running_tcp(doc) as (server, addr):
            for i in range(9):
                assert await roundtrip(addr, b"%d" % i) == b"%d" % i
            assert [e.connections_accepted for e in (a, b, c)] == [3, 3, 3]
            backends = server.statistics()["l4"]["backends"]["u"]
            assert [backends[e.address]["connections"] for e in (a, b, c)] == [3, 3, 3]


async def test_least_conn_counts_open_relays() -> None:
    async with TcpEcho() as a, TcpEcho() as b:
        doc = tcp_doc([a.address, b.address], policy="least_conn")
        async with running_tcp(doc) as (server, addr):
            reader, writer = await connect(addr)  # held open on one backend
            writer.write(b"x")
            await asyncio.wait_for(reader.readexactly(1), 5)
            busy, other = (a, b) if a.open_connections else (b, a)
            for i in range(3):  # each short one goes to the backend with no open relay
                assert await roundtrip(addr, b"%d" % i) == b"%d" % i
                await eventually(lambda: server.statistics()["l4"]["listeners"]["t"]["active"] == 1)
            assert (busy.connections_accepted, other.connections_accepted) == (1, 3)
            writer.close()


async def test_source_ip_hash_keeps_a_client_on_one_backend() -> None:
    async with TcpEcho() as a, TcpEcho() as b, TcpEcho() as c:
        for policy in ("hash", {"name": "consistent_hash", "algorithm": "maglev"}):
            doc = tcp_doc([a.address, b.address, c.address], policy=policy)
            before = [e.connections_accepted for e in (a, b, c)]
            async with running_tcp(doc) as (_, addr):
                for i in range(6):
                    assert await roundtrip(addr, b"%d" % i) == b"%d" % i
            after = [e.connections_accepted for e in (a, b, c)]
            assert sorted(x - y for x, y in zip(after, before, strict=True)) == [0, 0, 6]


async def test_hash_on_addresses_from_trusted_proxy_headers() -> None:
    """Behind a trusted proxy the PROXY header's source is the key: each client sticks to its
    backend, and different clients spread."""
    backends = [TcpEcho(proxy_header=True) for _ in range(3)]
    for e in backends:
        await e.start()
    try:
        doc = tcp_doc(
            [e.address for e in backends],
            policy={"name": "consistent_hash"},
            accept_proxy=["127.0.0.1/32"],
            proxy_protocol="v1",
        )
        async with running_tcp(doc) as (_, addr):
            chosen: dict[str, set[int]] = {}
            for n in range(20):
                for repeat in range(2):
                    ip = f"203.0.113.{n}"
                    header = encode_v1((ip, 1000 + repeat), ("198.51.100.1", 5432))
                    assert await roundtrip(addr, header + b"q") == b"q"
                    where = next(
                        i
                        for i, e in enumerate(backends)
                        if e.headers and e.headers[-1].source == (ip, 1000 + repeat)
                    )
                    chosen.setdefault(ip, set()).add(where)
            assert all(len(s) == 1 for s in chosen.values())
            spread = Counter(next(iter(s)) for s in chosen.values())
            assert len(spread) == 3
    finally:
        for e in backends:
            await e.stop()


async def test_tcp_check_with_send_expect_follows_backend_health() -> None:
    async with TcpEcho() as a, TcpEcho() as b:
        health = {
            "type": "tcp",
            "send": "PING\r\n",
            "expect": "PING",
            "interval": "0.1s",
            "timeout": "0.1s",
            "rise": 2,
            "fall": 1,
        }
        doc = tcp_doc([a.address, b.address], health=health, upstream={"panic_threshold": 0})
        async with running_tcp(doc) as (server, addr):

            def health_of(e: TcpEcho) -> str:
                backends = server.statistics()["health"]["u"]["backends"]
                return str(backends[e.address]["health"])

            assert (health_of(a), health_of(b)) == ("up", "up")
            await b.stop()
            await eventually(lambda: health_of(b) == "down")
            before = a.connections_accepted
            for i in range(4):
                assert await roundtrip(addr, b"%d" % i) == b"%d" % i
            assert a.connections_accepted - before >= 4  # checks too, so at least
            stats = server.statistics()["l4"]["listeners"]["t"]
            assert stats["connect_errors"] == 0  # never tried: the check knew
            await b.start()
            await eventually(lambda: health_of(b) == "up")
            for i in range(4):
                assert await roundtrip(addr, b"%d" % i) == b"%d" % i
            assert server.statistics()["l4"]["backends"]["u"][b.address]["connections"] >= 1


async def test_tcp_check_expect_mismatch_and_silence_mark_down() -> None:
    async with TcpEcho(banner=b"-ERR not ready\r\n") as erring, TcpEcho() as silent:
        doc = tcp_doc(
            [erring.address, silent.address],
            health={"type": "tcp", "expect": "+OK", "timeout": "0.3s"},
        )
        async with running_tcp(doc) as (server, _):
            backends = server.statistics()["health"]["u"]["backends"]
            assert backends[erring.address]["health"] == "down"
            assert backends[silent.address]["health"] == "down"
            assert "timeout" in backends[silent.address]["reason"]


@pytest.mark.parametrize(("version", "option"), [(1, "v1"), (2, "v2")])
async def test_proxy_header_sent_to_the_backend(version: int, option: str) -> None:
    async with TcpEcho(proxy_header=True) as echo:
        doc = tcp_doc([echo.address], proxy_protocol=option)
        async with running_tcp(doc) as (_, addr):
            reader, writer = await connect(addr)
            local = writer.get_extra_info("sockname")
            writer.write(b"payload after the header")
            writer.write_eof()
            assert await read_end(reader) == b"payload after the header"
            writer.close()
            header = echo.headers[0]
            assert header.version == version
            assert header.source == ("127.0.0.1", local[1])
            assert header.destination == addr


async def test_proxy_header_accepted_from_a_trusted_peer_is_passed_on() -> None:
    async with TcpEcho(proxy_header=True) as echo:
        doc = tcp_doc([echo.address], accept_proxy=["127.0.0.0/8"], proxy_protocol="v2")
        async with running_tcp(doc) as (_, addr):
            incoming = encode_v1(("203.0.113.9", 4444), ("192.0.2.10", 5432))
            assert await roundtrip(addr, incoming + b"data") == b"data"
            assert echo.headers[0].source == ("203.0.113.9", 4444)
            assert echo.headers[0].destination == ("192.0.2.10", 5432)
            # v2 in, split across writes, with the payload in the same segment
            reader, writer = await connect(addr)
            raw = encode_v2(("2001:db8::7", 7), ("2001:db8::8", 8)) + b"more"
            for i in range(len(raw)):
                writer.write(raw[i : i + 1])
                await writer.drain()
            writer.write_eof()
            assert await read_end(reader) == b"more"
            writer.close()
            assert echo.headers[1].source == ("2001:db8::7", 7)


async def test_proxy_header_from_an_untrusted_peer_is_just_data() -> None:
    async with TcpEcho(proxy_header=True) as echo:
        doc = tcp_doc([echo.address], accept_proxy=["10.0.0.0/8"], proxy_protocol="v1")
        async with running_tcp(doc) as (_, addr):
            spoof = encode_v1(("203.0.113.9", 4444), ("192.0.2.10", 5432))
            assert await roundtrip(addr, spoof) == spoof
            assert echo.headers[0].source is not None
            assert echo.headers[0].source[0] == "127.0.0.1"  # the real peer, not the spoof


async def test_trusted_peer_without_a_valid_header_is_closed() -> None:
    async with TcpEcho() as echo:
        doc = tcp_doc([echo.address], accept_proxy=["127.0.0.1"])
        async with running_tcp(doc) as (server, addr):
            assert await roundtrip(addr, b"GET / HTTP/1.1\r\n\r\n") == b""
            assert echo.connections_accepted == 0
            reader, writer = await connect(addr)
            writer.write(b"PROXY TCP4 1.2.3")
            writer.write_eof()  # ended mid-header
            assert await read_end(reader) == b""
            writer.close()
            await eventually(
                lambda: server.statistics()["l4"]["listeners"]["t"]["proxy_errors"] == 2
            )


async def test_one_upstream_behind_http_and_tcp_listeners() -> None:
    async with HttpBackend(name="b") as backend:
        doc = {
            "listeners": [
                {"name": "web", "listen": "127.0.0.1:0", "upstream": "app"},
                {"name": "t", "listen": "127.0.0.1:0", "protocol": "tcp", "upstream": "app"},
            ],
            "upstreams": {"app": {"backends": [backend.url]}},
        }
        async with running(doc) as (server, _):
            request = b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
            for name in ("web", "t"):
                answer = await roundtrip(server.addresses[name], request)
                assert answer.startswith(b"HTTP/1.1 200"), (name, answer[:60])
                assert answer.endswith(b"b\n")
            # only the HTTP listener added forwarding headers: the TCP one relayed bytes
            sent = [r for r in backend.requests if r.target == "/x"]  # not the health checks
            assert [r.header("X-Forwarded-For") is not None for r in sent] == [True, False]


async def test_operator_drain_and_passive_ejection_apply_to_tcp() -> None:
    async with TcpEcho() as a, TcpEcho() as b:
        dead = f"tcp://127.0.0.1:{dead_port()}"
        doc = tcp_doc(
            [a.address, b.address, dead],
            upstream={"passive": {"consecutive_failures": 1}, "panic_threshold": 0},
        )
        async with running_tcp(doc) as (server, addr):
            held_r, held_w = await connect(addr)
            held_w.write(b"h")
            assert await asyncio.wait_for(held_r.readexactly(1), 5) == b"h"
            drained = a if a.open_connections else b  # round robin starts at random
            server.membership.set_backend_state("u", drained.address, "drain")
            for i in range(6):
                assert await roundtrip(addr, b"%d" % i) == b"%d" % i
            assert drained.connections_accepted == 1  # draining: no new connections ...
            held_w.write(b"still")  # ... but the open one goes on
            assert await asyncio.wait_for(held_r.readexactly(5), 5) == b"still"
            held_w.close()
            stats = server.statistics()
            assert stats["l4"]["listeners"]["t"]["connect_errors"] == 1  # then ejected
            assert stats["backends"]["u"]["ejections"] == 1


async def test_membership_changes_reach_tcp_listeners() -> None:
    """Backends added and removed at run time (admin API, registry, files) are used by new
    TCP connections; a relay open on a removed backend finishes and releases its load."""
    async with TcpEcho() as a, TcpEcho() as b:
        doc = tcp_doc([f"http://127.0.0.1:{a.port}"], policy="least_conn")
        async with running_tcp(doc) as (server, addr):
            held_r, held_w = await connect(addr)  # on a
            held_w.write(b"1")
            assert await asyncio.wait_for(held_r.readexactly(1), 5) == b"1"
            server.membership.add_backend("u", f"http://127.0.0.1:{b.port}")
            for i in range(2):  # the new group's load starts at zero: ties go round robin
                assert await roundtrip(addr, b"n%d" % i) == b"n%d" % i
            assert b.connections_accepted >= 1
            server.membership.remove_backend("u", f"http://127.0.0.1:{a.port}")
            held_w.write(b"2")  # the relay on the removed backend goes on
            assert await asyncio.wait_for(held_r.readexactly(1), 5) == b"2"
            held_w.close()
            await eventually(lambda: server.l4.active() == 0)
            before = (a.connections_accepted, b.connections_accepted)
            for i in range(3):
                assert await roundtrip(addr, b"%d" % i) == b"%d" % i
            assert (a.connections_accepted, b.connections_accepted) == (before[0], before[1] + 3)
            backends = server.statistics()["l4"]["backends"]["u"]
            url = f"http://127.0.0.1:{b.port}"
            assert list(backends) == [url]
            assert backends[url]["connections"] == b.connections_accepted
            assert backends[url]["active"] == 0


async def test_reload_keeps_tcp_listeners_and_refuses_to_change_them() -> None:
    async with TcpEcho() as a, TcpEcho() as b:
        doc = tcp_doc([a.address])
        async with running_tcp(doc) as (server, addr):
            changed = tcp_doc([a.address], idle_timeout="5s")
            changed["listeners"][0]["listen"] = f"127.0.0.1:{addr[1]}"
            with pytest.raises(ConfigError) as e:
                await server.reload(parse_config(changed))
            assert e.value.problems == ["listeners.t: changing a TCP listener needs a restart"]
            moved = tcp_doc([b.address])  # the upstream may change in place
            moved["listeners"][0]["listen"] = f"127.0.0.1:{addr[1]}"
            await server.reload(parse_config(moved))
            assert await roundtrip(addr, b"to b") == b"to b"
            assert (a.connections_accepted, b.connections_accepted) == (0, 1)


async def test_tcp_counters_in_prometheus_metrics() -> None:
    from poise.admin.metrics import names, render

    async with TcpEcho() as echo, running_tcp(tcp_doc([echo.address])) as (server, addr):
        assert await roundtrip(addr, b"12345") == b"12345"
        await eventually(lambda: server.l4.active() == 0)
        text = render(server)
        assert 'poise_tcp_connections_total{listener="t"} 1' in text
        assert 'poise_tcp_bytes_total{listener="t",direction="in"} 5' in text
        assert 'poise_tcp_bytes_total{listener="t",direction="out"} 5' in text
        backend = echo.address.split("://")[1]
        assert f'poise_tcp_backend_connections_total{{upstream="u",backend="{backend}"}} 1' in text
        assert "poise_tcp_errors_total" in names(text)
