"""The registry HTTP API on 127.0.0.1: validation by field, auth, blocking queries, the watch
stream, and HTTP framing edge cases of the small server behind it."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from poise.config.model import RegistryConfig
from poise.registry import MemoryStore
from poise.registry.api import RegistryApi
from poise.testing import FakeClock

pytestmark = pytest.mark.timeout(30)
TOKEN = "s3cret-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def api() -> AsyncIterator[tuple[str, MemoryStore, FakeClock]]:
    clock = FakeClock(1000.0)
    store = MemoryStore(clock=clock, history=5)
    server = RegistryApi(store, RegistryConfig(store="memory", token=TOKEN))
    host, port = await server.start("127.0.0.1", 0)
    try:
        yield f"http://{host}:{port}", store, clock
    finally:
        await server.close()


async def test_register_list_heartbeat_deregister(api: tuple[str, MemoryStore, FakeClock]) -> None:
    url, store, clock = api
    async with httpx.AsyncClient(base_url=url, headers=AUTH) as c:
        r = await c.put(
            "/v1/services/users/instances/u1",
            json={"host": "127.0.0.1", "port": 8001, "ttl": "10s", "tags": ["a"]},
        )
        assert r.status_code == 200, r.text
        assert r.json()["instance"]["ttl"] == 10.0 and r.headers["x-poise-index"] == "1"
        r = await c.get("/v1/services")
        assert r.json() == {"services": {"users": 1}, "revision": 1}
        r = await c.get("/v1/services/users")
        assert [i["id"] for i in r.json()["instances"]] == ["u1"]
        clock.advance(8)
        r = await c.put("/v1/services/users/instances/u1/heartbeat")
        assert r.status_code == 200 and r.json()["revision"] == 1
        clock.advance(8)  # 16 s after registering, 8 after the heartbeat: still there
        assert await store.expire() == 0
        r = await c.put("/v1/services/users/instances/u1/heartbeat", json={"status": "warning"})
        assert r.json()["status"] == "warning"
        r = await c.delete("/v1/services/users/instances/u1")
        assert r.json() == {"deregistered": True}
        r = await c.put("/v1/services/users/instances/u1/heartbeat")
        assert r.status_code == 404 and r.json()["reregister"] is True


async def test_validation_names_every_field(api: tuple[str, MemoryStore, FakeClock]) -> None:
    url, _, _ = api
    async with httpx.AsyncClient(base_url=url, headers=AUTH) as c:
        r = await c.put(
            "/v1/services/users/instances/u1", json={"host": "", "port": 0, "ttl": "x", "extra": 1}
        )
        assert r.status_code == 400
        fields = [p.split(":")[0] for p in r.json()["problems"]]
        assert fields == ["extra", "host", "port", "ttl"]
        r = await c.put("/v1/services/Bad%20Name/instances/u1", json={"host": "h"})
        assert r.status_code == 400 and r.json()["problems"][0].startswith("service:")
        r = await c.put(
            "/v1/services/users/instances/u1",
            content=b"{nope",
            headers={"Content-Type": "application/json"},
        )
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
        r = await c.put(
            "/v1/services/users/instances/u1",
            content=b"x" * 70_000,
            headers={"Content-Type": "application/json"},
        )
        assert r.status_code == 413
        r = await c.put("/v1/services/users/instances/u1/heartbeat", json={"status": "great"})
        assert r.status_code == 400 and "status" in r.json()["error"]
        assert (await c.post("/v1/services")).status_code == 405
        assert (await c.get("/v2/nothing")).status_code == 404


async def test_writes_need_the_token_reads_do_not(api: tuple[str, MemoryStore, FakeClock]) -> None:
    url, _, _ = api
    async with httpx.AsyncClient(base_url=url) as c:
        body = {"host": "127.0.0.1", "port": 8001}
        r = await c.put("/v1/services/users/instances/u1", json=body)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        r = await c.put(
            "/v1/services/users/instances/u1",
            json=body,
            headers={"Authorization": "Bearer wrong-token-0123456789"},
        )
        assert r.status_code == 401
        assert (await c.delete("/v1/services/users/instances/u1")).status_code == 401
        assert (await c.get("/v1/services")).status_code == 200


async def test_blocking_query_returns_on_change_or_after_wait(
    api: tuple[str, MemoryStore, FakeClock],
) -> None:
    url, _, _ = api
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=10) as c:
        first = await c.get("/v1/services/users")
        index = first.headers["x-poise-index"]
        t0 = time.monotonic()
        r = await c.get("/v1/services/users", params={"index": index, "wait": "300ms"})
        assert time.monotonic() - t0 >= 0.25 and r.json()["instances"] == []
        pending = asyncio.ensure_future(
            c.get("/v1/services/users", params={"index": index, "wait": "20s"})
        )
        await asyncio.sleep(0.05)
        await c.put("/v1/services/users/instances/u1", json={"host": "127.0.0.1", "port": 1})
        r = await asyncio.wait_for(pending, 5)
        assert [i["id"] for i in r.json()["instances"]] == ["u1"]
        assert int(r.headers["x-poise-index"]) > int(index)
        bad = await c.get("/v1/services/users", params={"index": "x"})
        assert bad.status_code == 400


async def test_watch_streams_events_and_resumes(api: tuple[str, MemoryStore, FakeClock]) -> None:
    url, _, _ = api
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=10) as c:
        for n in range(2):
            await c.put(f"/v1/services/users/instances/u{n}", json={"host": "h", "port": 1 + n})
        lines: list[dict[str, object]] = []
        async with c.stream("GET", "/v1/watch", params={"after": "0"}) as r:
            assert r.headers["content-type"] == "application/x-ndjson"
            async for line in r.aiter_lines():
                lines.append(json.loads(line))
                if len(lines) == 2:
                    await c.delete("/v1/services/users/instances/u0")
                if len(lines) == 3:
                    break
        assert [(e["type"], e["id"]) for e in lines] == [
            ("put", "u0"),
            ("put", "u1"),
            ("delete", "u0"),
        ]
        # history is 5 events: after 6 more, revision 0 is gone -> an error line with 410
        for n in range(6):
            await c.put(f"/v1/services/users/instances/x{n}", json={"host": "h", "port": 1})
        async with c.stream("GET", "/v1/watch", params={"after": "0"}) as r:
            line = json.loads(await anext(r.aiter_lines()))
        assert line["type"] == "error" and line["status"] == 410


async def test_pipelined_requests_and_openapi(api: tuple[str, MemoryStore, FakeClock]) -> None:
    url, _, _ = api
    host, port = url.split("//")[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /openapi.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    data = await asyncio.wait_for(reader.read(-1), 5)
    writer.close()
    first, _, rest = data.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200")
    assert b'"status":"ok"' in rest and b"HTTP/1.1 200" in rest
    doc = json.loads(rest.split(b"\r\n\r\n", 1)[1])
    assert doc["openapi"].startswith("3.") and "/v1/watch" in doc["paths"]
