"""Hot reload while serving: applied atomically, refused whole (nothing changed) when bad,
state and open connections kept, 0 failed requests under a request loop."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from poise.config import parse_config
from poise.errors import ConfigError
from poise.testing import HttpBackend, RecordedRequest, Response
from poise.testing.procs import free_port
from tests.integration.support import eventually, full, running

pytestmark = pytest.mark.timeout(90)


def doc(backends: list[str], **upstream: Any) -> dict[str, Any]:
    d = full(backends, health={"interval": "0.3s", "timeout": "0.3s"})
    d["upstreams"]["app"].update(upstream)
    return d


def same_listener(new: dict[str, Any], port: int) -> dict[str, Any]:
    new["listeners"][0]["listen"] = f"127.0.0.1:{port}"
    return new


async def test_reload_under_load_changes_backends_and_policy_with_no_failed_request() -> None:
    async with (
        HttpBackend("a") as a,
        HttpBackend("b") as b,
        HttpBackend("c") as c,
        running(doc([a.url, b.url])) as (server, url),
    ):
        port = int(url.rsplit(":", 1)[1])
        failures: list[str] = []
        ok = 0
        stop = asyncio.Event()

        async def loop() -> None:
            nonlocal ok
            async with httpx.AsyncClient() as client:  # one keep-alive connection throughout
                while not stop.is_set():
                    r = await client.get(url + "/x")
                    if r.status_code == 200:
                        ok += 1
                    else:
                        failures.append(f"{r.status_code} {r.text}")

        loops = [asyncio.create_task(loop()) for _ in range(3)]
        await eventually(lambda: ok > 20)
        server.membership.set_backend_state("app", a.url, "drain")
        pool_b = server.table.groups["app"].pools[1]
        versions = [
            doc([a.url, b.url, c.url]),  # add c
            doc([b.url, c.url], policy="least_conn"),  # remove a, change the policy
            doc([b.url, c.url], policy="least_conn", retry={"attempts": 2}),
        ]
        for version in versions:
            changed = await server.reload(parse_config(same_listener(version, port)))
            assert changed["changed"] == ["app"]
            before = ok
            await eventually(lambda before=before: ok > before + 20)
        stop.set()
        await asyncio.gather(*loops)
        assert failures == [], failures[:5]
        group = server.table.groups["app"]
        assert [x.url for x in group.backends] == [b.url, c.url]
        assert group.config.policy.name == "least_conn"
        assert group.pools[0] is pool_b  # b's pooled connections were kept
        assert server.membership.checkers[0].states[0].history  # b's probe history too


async def test_a_bad_or_impossible_reload_changes_nothing() -> None:
    async with HttpBackend("a") as a, running(doc([a.url])) as (server, url):
        port = int(url.rsplit(":", 1)[1])
        table = server.table
        with pytest.raises(ConfigError) as e:
            other = doc([a.url])
            other["listeners"][0]["listen"] = f"127.0.0.1:{free_port()}"
            other["registry"] = {"store": "memory", "listen": None}
            await server.reload(parse_config(other))
        assert e.value.problems == [
            "listeners.web: changing its address needs a restart",
            "registry: changing the registry settings needs a restart",
        ]
        from_file = same_listener(doc([a.url]), port)
        del from_file["upstreams"]["app"]["backends"]
        from_file["upstreams"]["app"]["file"] = str(Path("/no/such/file.json"))
        with pytest.raises(ConfigError, match=r"upstreams\.app\.file: .*file\.json"):
            await server.reload(parse_config(from_file))
        assert server.table is table
        async with httpx.AsyncClient() as c:
            assert (await c.get(url)).text == "a\n"


async def test_an_in_flight_request_finishes_across_a_reload_that_removes_its_backend() -> None:
    release = asyncio.Event()

    async def slow(request: RecordedRequest) -> Response:
        await release.wait()
        return Response(body=b"finished\n")

    async with (
        HttpBackend("slow", handler=slow) as s,
        HttpBackend("b") as b,
        running(doc([s.url], health_check={"enabled": False})) as (server, url),
        httpx.AsyncClient(timeout=10) as client,
    ):
        port = int(url.rsplit(":", 1)[1])
        pending = asyncio.ensure_future(client.get(url + "/long"))
        await eventually(lambda: [r.target for r in s.requests] == ["/long"])
        new = doc([b.url], health_check={"enabled": False})
        await server.reload(parse_config(same_listener(new, port)))
        assert (await client.get(url + "/new")).text == "b\n"
        release.set()
        r = await pending
        assert server.ctx is not None
        assert (r.status_code, r.text) == (200, "finished\n"), server.ctx.stats


def write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def get(url: str) -> str:
    return httpx.get(url, timeout=5).text


@pytest.mark.parametrize("trigger", ["sighup", "watch", "admin"])
def test_reload_triggers_on_a_running_process(tmp_path: Path, trigger: str) -> None:
    a, b = HttpBackend("a"), HttpBackend("b")
    loop = asyncio.new_event_loop()
    loop.run_until_complete(a.start())
    loop.run_until_complete(b.start())
    backends_thread = __import__("threading").Thread(target=loop.run_forever, daemon=True)
    backends_thread.start()
    port, admin_port = free_port(), free_port()
    conf = tmp_path / "poise.json"
    token = "reload-token-0123456789"
    base = {
        "listeners": [{"name": "web", "listen": f"127.0.0.1:{port}", "upstream": "app"}],
        "upstreams": {"app": {"backends": [a.url], "health_check": {"enabled": False}}},
        "admin": {"listen": f"127.0.0.1:{admin_port}", "token": token},
    }
    write(conf, base)
    argv = [sys.executable, "-m", "poise", "run", "-c", str(conf)]
    if trigger == "watch":
        argv.append("--watch-config")
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                assert get(f"http://127.0.0.1:{port}/") == "a\n"
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "poise did not start"
                time.sleep(0.05)
        base["upstreams"]["app"]["backends"] = [b.url]
        write(conf, base)
        if trigger == "sighup":
            proc.send_signal(signal.SIGHUP)
        elif trigger == "admin":
            r = httpx.post(
                f"http://127.0.0.1:{admin_port}/v1/reload",
                headers={"Authorization": f"Bearer {token}"},
            )
            assert r.status_code == 200 and r.json()["changed"] == ["app"], r.text
        deadline = time.monotonic() + 20
        while get(f"http://127.0.0.1:{port}/") != "b\n":
            assert time.monotonic() < deadline, "the new config was not applied"
            time.sleep(0.05)
        # a broken file is refused, and the running config stays
        conf.write_text('{"listeners": [')
        if trigger == "admin":
            r = httpx.post(
                f"http://127.0.0.1:{admin_port}/v1/reload",
                headers={"Authorization": f"Bearer {token}"},
            )
            assert r.status_code == 400 and r.json()["problems"], r.text
        elif trigger == "sighup":
            proc.send_signal(signal.SIGHUP)
        assert get(f"http://127.0.0.1:{port}/") == "b\n"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=30)
        finally:
            proc.kill()
        loop.call_soon_threadsafe(loop.stop)
        backends_thread.join(10)
    assert proc.returncode == 0, err.decode()[-2000:]


async def test_a_websocket_tunnel_survives_a_reload_that_removes_its_backend() -> None:
    from tests.integration.test_upgrade import HANDSHAKE, accept

    async with (
        HttpBackend("ws", handler=accept) as ws,
        HttpBackend("b") as b,
        running(doc([ws.url], health_check={"enabled": False})) as (server, url),
    ):
        port = int(url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(HANDSHAKE)
        async with asyncio.timeout(5):
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
        await server.reload(parse_config(same_listener(doc([b.url]), port)))
        async with asyncio.timeout(5):  # the echoing tunnel goes on after the reload
            for i in range(3):
                frame = b"frame %d|" % i
                writer.write(frame)
                assert await reader.readexactly(len(frame)) == frame
        assert server.ctx is not None and len(server.ctx.tunnels) == 1
        writer.close()
        async with httpx.AsyncClient() as client:
            assert (await client.get(url)).text == "b\n"  # new requests: the new config


async def test_turning_health_checks_off_by_reload_brings_a_down_backend_back() -> None:
    """A DOWN verdict is no longer revised once the checks are off: it must not keep the
    backend out (a fresh start with the same file would use it). On again: probed again."""

    async def failing_probe(request: RecordedRequest) -> Response:
        if request.target == "/health":
            return Response(status=500, body=b"sick\n")
        return Response(body=b"served\n")

    checked = {"path": "/health", "interval": "0.3s", "timeout": "0.3s"}
    async with (
        HttpBackend("a", handler=failing_probe) as a,
        running(doc([a.url], health_check=checked)) as (server, url),
        httpx.AsyncClient(timeout=5) as client,
    ):
        port = int(url.rsplit(":", 1)[1])
        await eventually(lambda: server.membership.board.statuses["app"].healthy == [False])
        assert (await client.get(url + "/x")).status_code == 503
        off = doc([a.url], health_check={**checked, "enabled": False})
        await server.reload(parse_config(same_listener(off, port)))
        r = await client.get(url + "/x")
        assert (r.status_code, r.text) == (200, "served\n")
        assert server.membership.checkers == []
        await server.reload(parse_config(same_listener(doc([a.url], health_check=checked), port)))
        await eventually(lambda: server.membership.board.statuses["app"].healthy == [False])
        assert (await client.get(url + "/x")).status_code == 503


async def test_a_reload_keeps_admin_api_changes_unless_the_file_changed_that_backend(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Weights, added and removed backends changed through the admin API outlive a reload;
    a backend whose file entry the reload changes takes the file's, with a warning."""
    from poise.server import Server

    a, b, c, d = (f"http://127.0.0.1:{port}" for port in (9001, 9002, 9003, 9004))

    def backends(*entries: tuple[str, int]) -> list[dict[str, Any]]:
        return [{"url": url, "weight": w} for url, w in entries]

    server = Server(parse_config(doc(backends((a, 1), (b, 1), (c, 1)))))
    server.membership.set_backend_weight("app", "127.0.0.1:9001", 5)
    server.membership.set_backend_weight("app", "127.0.0.1:9002", 7)
    server.membership.remove_backend("app", "127.0.0.1:9003")
    server.membership.add_backend("app", d, weight=2)
    server.membership.set_backend_state("app", "127.0.0.1:9001", "drain")

    def running() -> list[tuple[str, int]]:
        return [(x.url, x.weight) for x in server.table.groups["app"].config.backends]

    # the same file again: every change made through the API stays
    with caplog.at_level("INFO", logger="poise.reload"):
        await server.reload(parse_config(doc(backends((a, 1), (b, 1), (c, 1)))))
    assert running() == [(a, 5), (b, 7), (d, 2)]
    assert server.membership.board.statuses["app"].admin[0] == "drain"
    assert "keeps its admin API change 127.0.0.1:9003: removed" in caplog.text
    # the file changes b's weight and lists c again with another weight: the file wins for
    # those two; a's change and the added d stay
    caplog.clear()
    await server.reload(parse_config(doc(backends((a, 1), (b, 3), (c, 4)))))
    assert running() == [(a, 5), (b, 3), (c, 4), (d, 2)]
    assert "127.0.0.1:9002: weight 7 replaced by the file's weight 3" in caplog.text
    # now the file lists d: its entry wins from then on
    await server.reload(parse_config(doc(backends((a, 1), (b, 3), (c, 4), (d, 1)))))
    assert running() == [(a, 5), (b, 3), (c, 4), (d, 1)]
