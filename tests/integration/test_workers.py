"""``--workers N``: worker processes on SO_REUSEPORT sockets behind one supervisor, which
checks health and follows the registry once and sends the workers every change.

The supervisor runs in the test's event loop (so its state can be read), its workers are
real processes (``python -m poise.workers``); backends are in-process HttpBackends. Which
worker serves a connection is the kernel's choice, so "every worker routes like this" is
asserted over many fresh connections, polled until true or a generous deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from poise.config import parse_config
from poise.server import BACKLOG
from poise.testing import HttpBackend, RecordedRequest, Response
from poise.testing.procs import free_port
from poise.testing.tcp import TcpEcho
from poise.workers import Supervisor
from tests.integration.l4support import roundtrip, tcp_doc
from tests.integration.load import Hammer
from tests.integration.support import address, eventually, full, until_started

pytestmark = pytest.mark.timeout(120)

HEALTH = {"interval": "0.2s", "timeout": "0.2s"}
FRESH = httpx.Limits(max_keepalive_connections=0)  # a new connection (and so worker) per request


@contextlib.asynccontextmanager
async def supervised(
    doc: dict[str, Any], workers: int = 2
) -> AsyncIterator[tuple[Supervisor, str]]:
    sup = Supervisor(parse_config(doc), workers)
    task = asyncio.create_task(sup.serve())
    await until_started(task, sup.started, 60)
    host, port = next(iter(sup.addresses.values()))
    try:
        yield sup, f"http://{host}:{port}"
    finally:
        sup.stop()
        await asyncio.wait_for(task, 60)
    assert not sup.alive, "every worker has exited"


async def served_by(url: str, n: int = 24) -> set[str]:
    """Which backends answer ``n`` GETs, each on a new connection (so on any worker)."""
    async with httpx.AsyncClient(limits=FRESH, timeout=10) as client:
        replies = [await client.get(url) for _ in range(n)]
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    return {r.text.strip() for r in replies}


async def routes_to(url: str, expected: set[str], timeout: float = 20.0) -> None:
    """Poll until ``n`` fresh connections are all answered by exactly ``expected``."""
    deadline = time.monotonic() + timeout
    seen: set[str] = set()
    while time.monotonic() < deadline:
        seen = await served_by(url)
        if seen == expected:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"still served by {sorted(seen)}, expected {sorted(expected)}")


def worker_pids(sup: Supervisor) -> set[int]:
    return {w["pid"] for w in sup.describe() if w["state"] == "serving"}


async def test_workers_share_the_port_and_their_numbers_are_summed() -> None:
    async with (
        HttpBackend("a") as a,
        HttpBackend("b") as b,
        supervised(full([a.url, b.url], health=HEALTH)) as (sup, url),
    ):
        assert len(worker_pids(sup)) == 2
        assert os.getpid() not in worker_pids(sup)
        async with httpx.AsyncClient(limits=FRESH, timeout=10) as client:
            replies = [await client.get(url) for _ in range(60)]
        assert [r.status_code for r in replies] == [200] * 60
        assert {r.text for r in replies} == {"a\n", "b\n"}
        # both workers took connections, and the supervisor's numbers are their sum
        await eventually(lambda: sup.dataplane()["stats"].get("requests") == 60)
        per_worker = [w["requests"] for w in sup.describe()]
        assert sum(per_worker) == 60 and min(per_worker) > 0, per_worker
        responses = sup.dataplane()["backends"]["app"]
        assert sum(r["responses"][2] for r in responses.values()) == 60
        from poise.admin import metrics

        text = metrics.render(sup.server)
        assert "poise_requests_total 60\n" in text
        assert "poise_workers 2\n" in text
        from poise.admin.status import render

        status = {"version": "x", "uptime_s": 1.0, "requests": 60, "clients": 0}
        status["workers"] = sup.describe()
        first = render(status, {}, {}).splitlines()[0]
        assert first.endswith("60 requests, 0 clients, 2/2 workers serving"), first


async def test_health_is_checked_once_and_every_worker_follows_it() -> None:
    probes: list[float] = []  # when backend a was probed

    async def a_handler(request: RecordedRequest) -> Response:
        if request.method == "HEAD":
            probes.append(time.monotonic())
        return Response(body=b"a\n")

    async with (
        HttpBackend("a", handler=a_handler) as a,
        HttpBackend("b") as b,
        supervised(full([a.url, b.url], health=HEALTH), workers=3) as (_sup, url),
    ):
        start = len(probes)
        await eventually(lambda: len(probes) >= start + 11, timeout=30)
        window = probes[start + 10] - probes[start]
        # one checker needs 10 waits of at least 0.2 s - 10% jitter; three would need a third
        assert window >= 10 * 0.2 * 0.9 * 0.9, f"11 probes in {window:.2f} s: more than 1 checker"

        await b.stop()
        await routes_to(url, {"a"})
        await b.start()  # same port
        await routes_to(url, {"a", "b"})


async def test_operator_states_membership_and_reloads_reach_every_worker(tmp_path: Path) -> None:
    async with (
        HttpBackend("a") as a,
        HttpBackend("b") as b,
        HttpBackend("c") as c,
        supervised(full([a.url, b.url], health=HEALTH)) as (sup, url),
    ):
        await routes_to(url, {"a", "b"})
        sup.server.membership.set_backend_state("app", a.url, "maint")
        await routes_to(url, {"b"})
        sup.server.membership.add_backend("app", c.url)
        await routes_to(url, {"b", "c"})
        sup.server.membership.set_backend_state("app", a.url, "enabled")
        await routes_to(url, {"a", "b", "c"})
        # a reload: b leaves, and the policy changes; a new worker gets the same state
        port = sup.addresses["web"][1]
        new = full([a.url, c.url], health=HEALTH)
        new["listeners"][0]["listen"] = f"127.0.0.1:{port}"
        new["upstreams"]["app"]["policy"] = "least_conn"
        await sup.server.reload(parse_config(new))
        await routes_to(url, {"a", "c"})
        await sup.rolling_restart()
        await routes_to(url, {"a", "c"})


# The old worker's idle connections wait timeouts.drain_idle for the client's next request;
# this test's client shares a loaded box, so give it time to be scheduled (costs nothing: under
# load no connection stays idle, each ends on the response after the drain begins).
STALLS = {"drain_idle": "5s"}


def accept_queue_size(sock: socket.socket) -> int:
    """A listening socket's backlog: Linux reports it as tcp_info.tcpi_sacked."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return int(struct.unpack_from("I", info, 28)[0])


async def test_serving_workers_keep_the_accept_queue_the_supervisor_made() -> None:
    async with HttpBackend("a") as a, supervised(full([a.url], health=HEALTH)) as (sup, url):
        assert await served_by(url) == {"a"}
        await sup.rolling_restart()  # a new worker listens on the same sockets again
        sizes = [accept_queue_size(s) for slot in sup.sockets for s in slot["web"]]
        assert sizes == [BACKLOG, BACKLOG], sizes


async def test_a_rolling_restart_under_load_fails_no_request() -> None:
    connections = 4
    async with (
        HttpBackend("a") as a,
        HttpBackend("b") as b,
        supervised(full([a.url, b.url], health=HEALTH, timeouts=STALLS)) as (sup, url),
    ):
        # a client that never retries: a request written and not answered is a failure, and
        # so is a refused connect (the port always has a worker taking connections)
        host, port = address(url)
        async with Hammer(host, port, connections, fresh=2) as hammer:
            load = hammer.load
            await eventually(lambda: load.ok > 100, timeout=30)
            before = worker_pids(sup)
            for _ in range(2):
                done = await sup.rolling_restart()
                assert len(done["restarted"]) == 2
            after = worker_pids(sup)
            assert before.isdisjoint(after) and len(after) == 2
            count = load.ok
            await eventually(lambda: load.ok > count + 100, timeout=30)
        problems = load.failures + load.refused
        assert problems == [], (load.summary(), problems[:5])
        # each kept-alive connection was on a retired worker, which asked it to close
        assert load.closes >= connections, load.summary()


async def test_a_worker_that_dies_is_started_again() -> None:
    async with (
        HttpBackend("a") as a,
        supervised(full([a.url], health=HEALTH)) as (sup, url),
    ):
        victim = sup.describe()[0]
        os.kill(victim["pid"], signal.SIGKILL)
        # (restarts counts once _spawn returns, a moment after the new worker says it serves)
        await eventually(
            lambda: (
                victim["pid"] not in worker_pids(sup)
                and len(worker_pids(sup)) == 2
                and sup.restarts == 1
            ),
            timeout=30,
        )
        assert await served_by(url) == {"a"}


async def test_registry_instances_reach_every_worker() -> None:
    doc = {
        "listeners": [{"name": "web", "listen": "127.0.0.1:0", "upstream": "users"}],
        "upstreams": {"users": {"service": "users", "health_check": HEALTH}},
        "registry": {"store": "memory", "listen": "127.0.0.1:0"},
    }
    async with (
        HttpBackend("u1") as u1,
        HttpBackend("u2") as u2,
        supervised(doc) as (sup, url),
        httpx.AsyncClient(timeout=10) as client,
    ):
        assert sup.server.registry_address is not None
        host, port = sup.server.registry_address
        api = f"http://{host}:{port}/v1/services/users/instances"
        for name, backend in (("u1", u1), ("u2", u2)):
            body = {"host": "127.0.0.1", "port": int(backend.url.rsplit(":", 1)[1]), "ttl": "30s"}
            r = await client.put(f"{api}/{name}", json=body)
            assert r.status_code in (200, 201), r.text
        await routes_to(url, {"u1", "u2"})
        assert (await client.delete(f"{api}/u1")).status_code in (200, 204)
        await routes_to(url, {"u2"})


async def test_tcp_listeners_run_in_the_workers_too() -> None:
    async with TcpEcho() as echo, supervised(tcp_doc([echo.address])) as (sup, url):
        host, port = address(url)
        for i in range(12):  # fresh connections: on either worker
            data = f"message {i}".encode() * 100
            assert await roundtrip((host, port), data) == data
        await eventually(
            lambda: sup.dataplane()["l4"]["listeners"]["t"].get("accepted") == 12, timeout=10
        )


def test_poise_run_workers_reloads_on_sighup_and_drains_on_sigterm(tmp_path: Path) -> None:
    async def main() -> None:
        async with HttpBackend("a") as a, HttpBackend("b") as b:
            port, admin = free_port(), free_port()
            token = "t" * 24
            doc = full([a.url], health=HEALTH)
            doc["listeners"][0]["listen"] = f"127.0.0.1:{port}"
            doc["admin"] = {"listen": f"127.0.0.1:{admin}", "token": token}
            path = tmp_path / "poise.json"
            path.write_text(json.dumps(doc))
            proc = subprocess.Popen(
                [sys.executable, "-m", "poise", "run", "-c", str(path), "--workers", "2"],
                stderr=subprocess.PIPE,
            )
            url = f"http://127.0.0.1:{port}"
            headers = {"Authorization": f"Bearer {token}"}
            try:
                async with httpx.AsyncClient(timeout=5, headers=headers) as client:
                    workers: list[dict[str, Any]] = []

                    async def serving() -> bool:
                        nonlocal workers
                        try:
                            r = await client.get(f"http://127.0.0.1:{admin}/v1/workers")
                        except httpx.HTTPError:
                            return False
                        workers = r.json()["workers"]
                        return [w["state"] for w in workers] == ["serving", "serving"]

                    deadline = time.monotonic() + 60
                    while not await serving():
                        assert proc.poll() is None, proc.communicate()[1].decode()
                        assert time.monotonic() < deadline, "workers did not start"
                        await asyncio.sleep(0.1)
                    await routes_to(url, {"a"})
                    doc["upstreams"]["app"]["backends"] = [b.url]
                    path.write_text(json.dumps(doc))
                    proc.send_signal(signal.SIGHUP)
                    await routes_to(url, {"b"})
                proc.send_signal(signal.SIGTERM)
                code = await asyncio.to_thread(proc.wait, 60)
                err = proc.stderr.read().decode() if proc.stderr else ""
                assert code == 0, err
                assert "configuration reloaded" in err
                for w in workers:  # the workers are gone too
                    with pytest.raises(ProcessLookupError):
                        os.kill(w["pid"], 0)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()

    asyncio.run(main())


async def test_tls_sessions_resume_on_any_worker_and_after_a_restart(tmp_path: Path) -> None:
    from tests.tls.certgen import CA
    from tests.tls.helpers import client_context, visit

    ca = CA(tmp_path)
    pair = ca.issue("web", ["web.test"])
    async with HttpBackend("a") as a:
        doc = full([a.url], health=HEALTH)
        doc["listeners"][0]["tls"] = {"cert": str(pair.cert), "key": str(pair.key)}
        async with supervised(doc) as (sup, plain_url):
            url = plain_url.replace("http://", "https://")
            ctx = client_context(ca)
            first, reused, _ = await asyncio.to_thread(visit, url, ctx, None, "web.test")
            assert not reused

            async def resumed_everywhere() -> None:
                # new connections go to either worker (the kernel picks by address and
                # port): every one resumes the first session, whichever worker issued it
                for _ in range(16):
                    _, reused, reply = await asyncio.to_thread(visit, url, ctx, first, "web.test")
                    assert reused and reply.startswith(b"HTTP/1.1 200")

            def resumed_per_worker() -> list[int]:
                return [
                    (w.report or {}).get("tls", {}).get("web", {}).get("resumed", 0)
                    for w in sup.alive
                ]

            await resumed_everywhere()
            await eventually(lambda: sum(resumed_per_worker()) == 16, 10)
            assert min(resumed_per_worker()) > 0, resumed_per_worker()  # both workers did
            before = worker_pids(sup)
            await sup.rolling_restart()
            assert not worker_pids(sup) & before
            await resumed_everywhere()  # the new workers have the same keys
            await eventually(lambda: sup.dataplane()["tls"]["web"]["resumed"] == 32, 10)
