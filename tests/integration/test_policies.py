"""Policies end to end: load-aware ones avoid a slow backend, hashing keeps users put."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections import Counter
from typing import Any

import httpx
import pytest

from poise.testing import HttpBackend, RecordedRequest, Response
from tests.integration.support import exchange, running


def doc(urls: list[str], policy: Any) -> dict[str, Any]:
    return {
        "listeners": [{"name": "web", "listen": "127.0.0.1:0", "upstream": "app"}],
        "upstreams": {"app": {"backends": urls, "policy": policy,
                              "health_check": {"enabled": False}}},
    }  # fmt: skip


@pytest.mark.parametrize("policy", ["least_conn", "p2c", "peak_ewma"])
async def test_load_aware_policies_send_less_to_a_slow_backend(policy: str) -> None:
    async def slow(_: RecordedRequest) -> Response:
        return Response(body=b"slow", delay=0.05)

    async with (
        HttpBackend(name="fast1") as f1,
        HttpBackend(name="fast2") as f2,
        HttpBackend(name="slow", handler=slow) as s,
        running(doc([f1.url, f2.url, s.url], policy)) as (_, url),
        httpx.AsyncClient(limits=httpx.Limits(max_connections=20)) as client,
    ):
        counts: Counter[str] = Counter()

        async def worker() -> None:
            for _ in range(30):
                counts[(await client.get(url)).text] += 1

        await asyncio.gather(*(worker() for _ in range(10)))
    assert sum(counts.values()) == 300
    fast_share = min(counts["fast1\n"], counts["fast2\n"])
    assert counts["slow"] < fast_share / 2, counts


@pytest.mark.parametrize("name", ["hash", "consistent_hash"])
async def test_hash_on_a_header_keeps_each_user_on_one_backend(name: str) -> None:
    policy = {"name": name, "key": "header:X-User"}
    async with (
        HttpBackend(name="a") as a,
        HttpBackend(name="b") as b,
        HttpBackend(name="c") as c,
        running(doc([a.url, b.url, c.url], policy)) as (_, url),
        httpx.AsyncClient() as client,
    ):
        seen: dict[str, set[str]] = {}
        for _ in range(3):
            for user in range(30):
                r = await client.get(url, headers={"X-User": f"user-{user}"})
                seen.setdefault(f"user-{user}", set()).add(r.text)
        # without the header: the fallback (round robin) spreads requests
        spread = {(await client.get(url)).text for _ in range(6)}
    assert all(len(backends) == 1 for backends in seen.values())
    assert len({next(iter(v)) for v in seen.values()}) == 3  # users spread over all three
    assert len(spread) == 3


async def test_seed_style_query_key_hash_with_default_key() -> None:
    policy = {"name": "hash", "key": "query:key", "default_key": "anonymous"}
    async with (
        HttpBackend(name="a") as a,
        HttpBackend(name="b") as b,
        running(doc([a.url, b.url], policy)) as (_, url),
        httpx.AsyncClient() as client,
    ):
        anon = {(await client.get(url + "/x")).text for _ in range(6)}
        keyed = {(await client.get(url + "/x?key=anonymous")).text for _ in range(3)}
    assert len(anon) == 1  # every key-less request uses the default key
    assert anon == keyed


async def test_load_counts_return_to_zero() -> None:
    async with (
        HttpBackend(name="a") as a,
        HttpBackend(name="b") as b,
        running(doc([a.url, b.url], "least_conn")) as (server, url),
        httpx.AsyncClient() as client,
    ):
        await asyncio.gather(*(client.get(url) for _ in range(20)))
        assert server.ctx is not None
        load = server.ctx.table.groups["app"].load
        assert load is not None
        assert load.active == [0, 0]


async def test_sticky_cookie_keeps_a_client_on_one_backend_and_restick_when_it_dies() -> None:
    policy = {"name": "sticky", "secret": "0123456789abcdef"}
    backends = [HttpBackend(name=n) for n in ("a", "b", "c")]
    for b in backends:
        await b.start()
    doc_ = doc([b.url for b in backends], policy)
    doc_["upstreams"]["app"]["health_check"] = {"interval": "100ms"}
    try:
        async with running(doc_) as (server, url), httpx.AsyncClient() as client:
            first = await client.get(url)
            # an opaque id, the same in every poise given the secret: no backend address
            pinned = first.text
            victim = next(b for b in backends if f"{b.name}\n" == pinned)
            id_ = victim.url.split("//", 1)[1].encode()
            value = hmac.new(b"0123456789abcdef", id_, hashlib.sha256).hexdigest()[:32]
            assert first.headers["set-cookie"] == (
                f"poise_sticky={value}; Path=/; HttpOnly; SameSite=Lax"
            )
            texts = {(await client.get(url)).text for _ in range(10)}
            assert texts == {pinned}
            # a pinned client gets no new cookie while its backend is fine
            assert "set-cookie" not in (await client.get(url)).headers
            # its backend dies: placed elsewhere, with a new cookie, and stays there
            await victim.stop()
            checker = server.membership.checkers[0]
            for _ in range(200):
                if not all(s.up for s in checker.states):
                    break
                await asyncio.sleep(0.02)
            moved = await client.get(url)
            assert moved.text != pinned
            assert "poise_sticky" in moved.headers["set-cookie"]
            assert {(await client.get(url)).text for _ in range(5)} == {moved.text}
            # a new client without a cookie is placed by the fallback and pinned
            async with httpx.AsyncClient() as fresh:
                assert "poise_sticky" in (await fresh.get(url)).headers["set-cookie"]
    finally:
        for b in backends:
            await b.stop()


async def test_load_counts_return_to_zero_after_refused_and_aborted_requests() -> None:
    async with (
        HttpBackend(name="a") as a,
        running(doc([a.url], "least_conn")) as (server, url),
    ):
        # the head goes out before the body breaks the chunked framing: 400, upstream dropped
        answer = await exchange(
            url,
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n",
            bytewise=True,
        )
        assert answer.startswith(b"HTTP/1.1 400 ")
        assert server.ctx is not None
        load = server.ctx.table.groups["app"].load
        assert load is not None
        for _ in range(100):
            if load.active == [0]:
                break
            await asyncio.sleep(0.02)
        assert load.active == [0]
