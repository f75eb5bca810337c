"""Backends from a watched file and from DNS (a fake DNS server on 127.0.0.1), end to end."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import dns.message
import dns.rdatatype
import dns.rrset
import httpx
import pytest

from poise.config import parse_config
from poise.errors import ConfigError
from poise.server import Server
from poise.testing import HttpBackend
from tests.integration.support import eventually, running

pytestmark = pytest.mark.timeout(60)


def doc(**upstream: Any) -> dict[str, Any]:
    return {
        "listeners": [{"name": "web", "listen": "127.0.0.1:0", "upstream": "app"}],
        "upstreams": {"app": {"health_check": {"enabled": False}, **upstream}},
    }


async def served(url: str, n: int = 6) -> set[str]:
    async with httpx.AsyncClient() as c:
        return {(await c.get(f"{url}/{i}")).text for i in range(n)}


def members(server: Server) -> list[int]:
    return sorted(b.port for b in server.table.groups["app"].backends)


async def test_a_backends_file_is_followed_and_a_bad_version_is_not_applied(
    tmp_path: Path,
) -> None:
    path = tmp_path / "backends.json"
    async with HttpBackend("a") as a, HttpBackend("b") as b:
        path.write_text(json.dumps([a.url]))
        async with running(doc(file=str(path))) as (server, url):
            assert await served(url) == {"a\n"}
            path.write_text(f"# plain text works too\n{a.url}\n{b.url}  # the second\n")
            await eventually(lambda: members(server) == sorted([a.port, b.port]))
            assert await served(url) == {"a\n", "b\n"}
            path.write_text('["http://127.0.0.1:notaport"')  # a broken (half-written) file
            await eventually(lambda: bool(server.statistics()["sources"]["app"]["error"]))
            assert members(server) == sorted([a.port, b.port])  # the last good list stays
            path.write_text(json.dumps([{"url": b.url, "weight": 3}]))
            await eventually(lambda: members(server) == [b.port])
            assert server.statistics()["sources"]["app"]["error"] == ""


async def test_an_emptied_or_cut_backends_file_is_not_applied(tmp_path: Path) -> None:
    path = tmp_path / "backends.txt"
    async with HttpBackend("a") as a:
        path.write_text(f"{a.url}\n")
        async with running(doc(file=str(path))) as (server, url):
            stats = server.statistics
            path.write_text("")  # `: > backends.txt`, the first step of a rewrite
            await eventually(lambda: "empty file" in stats()["sources"]["app"]["error"])
            assert members(server) == [a.port]
            assert await served(url) == {"a\n"}
            path.write_text(f"{a.url}\nhttp://127.0.0.1:200")  # cut mid-line
            await eventually(lambda: "newline" in stats()["sources"]["app"]["error"])
            assert members(server) == [a.port]
            path.write_text("[]")  # said explicitly: no backends
            await eventually(lambda: members(server) == [])


async def test_an_unreadable_backends_file_stops_the_start(tmp_path: Path) -> None:
    server = Server(parse_config(doc(file=str(tmp_path / "missing.json"))))
    with pytest.raises(ConfigError, match=r"upstreams\.app\.file: .*missing\.json"):
        await asyncio.wait_for(server.serve(), 10)


class FakeDns(asyncio.DatagramProtocol):
    """Answers A and SRV queries from ``records`` (name -> list of rdata texts)."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], list[str]] = {}
        self.transport: asyncio.DatagramTransport | None = None
        self.queries = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        query = dns.message.from_wire(data)
        self.queries += 1
        reply = dns.message.make_response(query)
        q = query.question[0]
        key = (q.name.to_text(), dns.rdatatype.to_text(q.rdtype))
        if key in self.records:
            reply.answer.append(
                dns.rrset.from_text_list(q.name, 5, "IN", key[1], self.records[key])
            )
        assert self.transport is not None
        self.transport.sendto(reply.to_wire(), addr)


@pytest.fixture
async def fake_dns() -> AsyncIterator[tuple[FakeDns, int]]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(FakeDns, local_addr=("127.0.0.1", 0))
    try:
        yield proto, transport.get_extra_info("sockname")[1]
    finally:
        transport.close()


async def test_dns_a_records_are_followed(fake_dns: tuple[FakeDns, int]) -> None:
    dns_server, dns_port = fake_dns
    async with HttpBackend("a") as a:
        dns_server.records[("svc.test.", "A")] = ["127.0.0.1"]
        cfg = {
            "name": "svc.test",
            "port": a.port,
            "refresh": "0.2s",
            "nameserver": f"127.0.0.1:{dns_port}",
        }
        async with running(doc(dns=cfg)) as (server, url):
            assert await served(url) == {"a\n"}
            dns_server.records[("svc.test.", "A")] = ["127.0.0.1", "127.0.0.2"]
            await eventually(lambda: len(server.table.groups["app"].backends) == 2)
            hosts = sorted(b.host for b in server.table.groups["app"].backends)
            assert hosts == ["127.0.0.1", "127.0.0.2"]


async def test_dns_srv_records_give_ports_and_weights(fake_dns: tuple[FakeDns, int]) -> None:
    dns_server, dns_port = fake_dns
    async with HttpBackend("a") as a, HttpBackend("b") as b, HttpBackend("c") as c:
        dns_server.records[("_http._tcp.svc.test.", "SRV")] = [
            f"10 5 {a.port} 127.0.0.1.",
            f"10 1 {b.port} 127.0.0.1.",
            f"20 1 {c.port} 127.0.0.1.",  # a backup priority: not used
        ]
        cfg = {
            "name": "_http._tcp.svc.test",
            "type": "SRV",
            "refresh": "0.2s",
            "nameserver": f"127.0.0.1:{dns_port}",
        }
        async with running(doc(dns=cfg)) as (server, url):
            backends = server.table.groups["app"].backends
            assert sorted((b.port, b.weight) for b in backends) == sorted(
                [(a.port, 5), (b.port, 1)]
            )
            assert await served(url, 8) == {"a\n", "b\n"}
            dns_server.records.pop(("_http._tcp.svc.test.", "SRV"))  # NXDOMAIN-like: no answer
            await eventually(lambda: bool(server.statistics()["sources"]["app"]["error"]))
            assert len(server.table.groups["app"].backends) == 2  # kept


async def test_dns_config_errors_are_listed() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(doc(dns={"name": "x", "type": "MX", "refresh": "0s"}, backends=["http://a:1"]))
    text = str(e.value)
    assert "upstreams.app: give one of backends, service, file or dns" in text
    assert "upstreams.app.dns.type" in text and "upstreams.app.dns.refresh" in text
