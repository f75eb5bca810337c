"""The admin API on its own listener: auth, reads, validated writes, metrics, and that the
data-plane listener cannot reach it."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from poise.admin.metrics import names
from poise.server import Server
from poise.testing import HttpBackend
from tests.integration.support import eventually, full, running

pytestmark = pytest.mark.timeout(60)
TOKEN = "admin-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def doc(backends: list[str], **top: Any) -> dict[str, Any]:
    d = full(backends, health={"interval": "0.3s", "timeout": "0.3s"}, **top)
    d["admin"] = {"listen": "127.0.0.1:0", "token": TOKEN}
    return d


def admin_url(server: Server) -> str:
    assert server.admin_address is not None
    host, port = server.admin_address
    return f"http://{host}:{port}"


async def test_every_call_needs_the_token() -> None:
    async with HttpBackend("a") as a, running(doc([a.url])) as (server, _):
        c = httpx.AsyncClient(base_url=admin_url(server))
        async with c:
            for method, path in [
                ("GET", "/v1/status"),
                ("GET", "/metrics"),
                ("GET", "/nothing-here"),
                ("PUT", "/v1/upstreams/app/backends/x/state"),
            ]:
                r = await c.request(method, path)
                assert r.status_code == 401, (method, path)
                assert r.headers["www-authenticate"].startswith("Bearer")
            r = await c.get("/v1/status", headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401


async def test_the_data_plane_never_serves_admin_paths() -> None:
    async with HttpBackend("a") as a, running(doc([a.url])) as (_, url):
        async with httpx.AsyncClient() as c:
            for path in ["/v1/status", "/metrics", "/%76%31/status", "//v1/status"]:
                r = await c.get(url + path, headers={**AUTH, "Host": "127.0.0.1:9901"})
                assert r.text == "a\n"  # proxied to the backend like any other path
        # every one of them reached the backend, as an ordinary proxied request
        assert [r.target for r in a.requests if r.method == "GET"][-4:] == [
            "/v1/status",
            "/metrics",
            "/%76%31/status",
            "//v1/status",
        ]


async def test_reads_show_backends_with_health_and_why() -> None:
    async with (
        HttpBackend("a") as a,
        HttpBackend("b") as b,
        running(doc([a.url, b.url])) as (server, _),
    ):
        c = httpx.AsyncClient(base_url=admin_url(server), headers=AUTH)
        async with c:
            status = (await c.get("/v1/status")).json()
            assert status["upstreams"] == 1 and "web" in status["listeners"]
            routes = (await c.get("/v1/routes")).json()
            assert routes["web"][0]["upstream"] == "app"
            await b.stop()
            await eventually(lambda: not server.table.groups["app"].up[1])
            detail = (await c.get("/v1/upstreams/app")).json()
            by_url = {x["url"]: x for x in detail["backends"]}
            assert by_url[b.url]["up"] is False
            assert by_url[b.url]["check"]["reason"] == "connect refused"
            assert by_url[b.url]["check"]["history"][-1]["ok"] is False
            assert by_url[a.url]["check"]["health"] == "up"
            assert (await c.get("/v1/upstreams/nope")).status_code == 404
            config = (await c.get("/v1/config")).json()
            assert config["admin"]["token"] == "<hidden>"


async def test_writes_drain_weight_add_remove() -> None:
    async with (
        HttpBackend("a") as a,
        HttpBackend("b") as b,
        running(doc([a.url])) as (server, url),
        httpx.AsyncClient(base_url=admin_url(server), headers=AUTH) as c,
        httpx.AsyncClient() as client,
    ):
        r = await c.post("/v1/upstreams/app/backends", json={"url": b.url, "weight": 2})
        assert r.status_code == 201
        assert [x["weight"] for x in r.json()["backends"]] == [1, 2]
        await eventually(lambda: len(server.table.groups["app"].backends) == 2)
        seen = {(await client.get(url + f"/{i}")).text for i in range(6)}
        assert seen == {"a\n", "b\n"}
        key = a.url.split("//")[1]
        r = await c.put(f"/v1/upstreams/app/backends/{key}/state", json={"state": "drain"})
        assert r.status_code == 200
        seen = {(await client.get(url + f"/{i}")).text for i in range(4)}
        assert seen == {"b\n"}
        r = await c.put(f"/v1/upstreams/app/backends/{key}/weight", json={"weight": 5})
        assert r.json()["backends"][0]["weight"] == 5
        assert r.json()["backends"][0]["state"] == "drain"  # kept across the change
        # invalid writes change nothing
        bad = [
            await c.put(f"/v1/upstreams/app/backends/{key}/state", json={"state": "x"}),
            await c.put(f"/v1/upstreams/app/backends/{key}/weight", json={"weight": -1}),
            await c.post("/v1/upstreams/app/backends", json={"url": "ftp://x"}),
            await c.post("/v1/upstreams/app/backends", json={"url": b.url}),
            await c.delete("/v1/upstreams/app/backends/127.0.0.1:1"),
            await c.put(
                "/v1/upstreams/app/backends/x/state",
                content=b"{",
                headers={"Content-Type": "application/json"},
            ),
        ]
        assert [r.status_code for r in bad] == [400, 400, 400, 409, 404, 400]
        assert len(server.table.groups["app"].backends) == 2
        r = await c.delete(f"/v1/upstreams/app/backends/{key}")
        assert [x["url"] for x in r.json()["backends"]] == [b.url]


async def test_metrics_in_prometheus_format() -> None:
    async with HttpBackend("a") as a, running(doc([a.url])) as (server, url):
        async with httpx.AsyncClient() as client:
            for i in range(3):
                await client.get(url + f"/{i}")
        async with httpx.AsyncClient(base_url=admin_url(server), headers=AUTH) as c:
            r = await c.get("/metrics")
        assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
        text = r.text
        for family in [
            "poise_requests_total",
            "poise_backend_responses_total",
            "poise_backend_up",
            "poise_backend_in_flight",
            "poise_retries_total",
            "poise_health_checks_total",
            "poise_errors_total",
        ]:
            assert family in names(text), family
        backend = a.url.split("//")[1]
        assert (
            f'poise_backend_responses_total{{code="2xx",upstream="app",backend="{backend}"}} 3'
            in text
        )
        assert f'poise_backend_up{{upstream="app",backend="{backend}"}} 1' in text
        assert "poise_requests_total 3" in text
        # every response is timed once, the keep-alive fast path included
        assert "poise_request_duration_seconds_count 3" in text
        assert 'poise_request_duration_seconds_bucket{le="+Inf"} 3' in text


async def test_poise_status_prints_routes_and_backends() -> None:
    async with (
        HttpBackend("a") as a,
        HttpBackend("b") as b,
        running(doc([a.url, b.url])) as (server, _),
    ):
        await b.stop()
        await eventually(lambda: not server.table.groups["app"].up[1])

        async def cli(
            *args: str, token: str, admin: str = admin_url(server)
        ) -> tuple[int, str, str]:
            env = {"POISE_ADMIN_TOKEN": token, "PATH": "/usr/bin:/bin"}
            if "PYTHONPATH" in os.environ:  # the poise under test, not an installed one
                env["PYTHONPATH"] = os.environ["PYTHONPATH"]
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "poise",
                "status",
                "--admin",
                admin,
                *args,
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(proc.communicate(), 30)
            return proc.returncode or 0, out.decode(), err.decode()

        code, out, _ = await cli(token=TOKEN)
        assert code == 0
        lines = out.splitlines()
        assert any(line.split()[:4] == ["web", "*", "/", "app"] for line in lines), out
        row_b = next(line for line in lines if b.url in line)
        assert row_b.split()[2:5] == ["down", "connect", "refused"], row_b
        row_a = next(line for line in lines if a.url in line)
        assert row_a.split()[2] == "up"
        code, _, err = await cli(token="wrong")
        assert code == 1 and "refused the token" in err
        # --admin as admin.listen is written (host:port), not only as a URL
        code, out_hostport, err = await cli(token=TOKEN, admin=admin_url(server).split("//")[1])
        assert code == 0, err
        rows = [line.split()[:4] for line in out_hostport.splitlines()]
        assert ["web", "*", "/", "app"] in rows
        assert a.url in out_hostport and b.url in out_hostport


async def test_requests_in_flight_are_counted_whatever_the_policy() -> None:
    """round_robin reads no load, yet the admin API and /metrics show requests in flight
    (they were null / missing for policies that are not load-aware)."""
    release, arrived = asyncio.Event(), asyncio.Event()

    async def slow(request: Any) -> Any:
        from poise.testing import Response

        if request.target == "/slow":  # health checks are answered at once
            arrived.set()
            await release.wait()
        return Response(body=b"done\n")

    async with (
        HttpBackend("a", handler=slow) as a,
        running(doc([a.url])) as (server, url),
        httpx.AsyncClient() as client,
        httpx.AsyncClient(base_url=admin_url(server), headers=AUTH) as adm,
    ):
        pending = asyncio.create_task(client.get(url + "/slow"))
        await asyncio.wait_for(arrived.wait(), 10)

        async def in_flight() -> int:
            r = await adm.get("/v1/upstreams/app")
            return int(r.json()["backends"][0]["in_flight"])

        assert await in_flight() == 1
        text = (await adm.get("/metrics")).text
        assert f'poise_backend_in_flight{{upstream="app",backend="{a.url[7:]}"}} 1' in text
        release.set()
        assert (await pending).text == "done\n"
        assert await in_flight() == 0


async def test_a_broken_backends_file_shows_in_status_and_upstream(tmp_path: Path) -> None:
    path = tmp_path / "backends.txt"
    async with HttpBackend("a") as a:
        path.write_text(f"{a.url}\n")
        config = doc([])
        config["upstreams"]["app"] = {"file": str(path), "health_check": {"enabled": False}}
        async with running(config) as (server, _), httpx.AsyncClient(headers=AUTH) as c:
            base = admin_url(server)
            status = (await c.get(f"{base}/v1/status")).json()
            assert status["sources"]["app"]["error"] == ""
            assert (await c.get(f"{base}/v1/upstreams/app")).json()["source_error"] == ""
            path.write_text('["http://127.0.0.1:notaport"]')
            await eventually(lambda: bool(server.membership.sources["app"].error))
            status = (await c.get(f"{base}/v1/status")).json()
            assert "notaport" in status["sources"]["app"]["error"]
            assert status["sources"]["app"]["file"] == str(path)
            up = (await c.get(f"{base}/v1/upstreams/app")).json()
            assert "notaport" in up["source_error"]
            assert [b["url"] for b in up["backends"]] == [a.url]  # the last good list
            ups = (await c.get(f"{base}/v1/upstreams")).json()
            assert "notaport" in ups["app"]["source_error"]
