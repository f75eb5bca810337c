"""Retries, failover, passive ejection, panic mode, admin states, slow start and request
limits, end to end: real sockets on 127.0.0.1, real (scripted) backends."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from poise.testing import HttpBackend, RecordedRequest, Response, ScriptedBackend
from tests.integration.support import eventually, full, running

NO_HEALTH = {"enabled": False}


def doc(backends: list[str], **upstream: Any) -> dict[str, Any]:
    top = upstream.pop("top", {})
    d = full(backends, health=upstream.pop("health", NO_HEALTH), **top)
    d["upstreams"]["app"].update(upstream)
    return d


def hangup() -> ScriptedBackend:
    """Reads a request, then closes the connection without a byte of response."""
    return ScriptedBackend(b"", close_after_reply=True, name="hangup")


def status_backend(status: int, headers: list[tuple[str, str]] | None = None) -> HttpBackend:
    async def handler(request: RecordedRequest) -> Response:
        return Response(status=status, headers=headers or [], body=b"from the failing one\n")

    return HttpBackend(name=f"s{status}", handler=handler)


@contextlib.contextmanager
def black_hole() -> Iterator[str]:
    """A listening socket that never accepts, its queue already full: connects hang."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(0)
    port = sock.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        filler.close()
        sock.close()


@contextlib.asynccontextmanager
async def started(*servers: HttpBackend | ScriptedBackend) -> AsyncIterator[None]:
    for s in servers:
        await s.start()
    try:
        yield
    finally:
        for s in servers:
            await s.stop()


# -- retries -------------------------------------------------------------------------------


async def test_get_goes_to_another_backend_when_the_first_hangs_up() -> None:
    a, b = hangup(), HttpBackend(name="b")
    async with started(a, b), running(doc([a.url, b.url], policy="first")) as (server, url):
        async with httpx.AsyncClient() as client:
            responses = [await client.get(url + f"/x{i}") for i in range(5)]
        assert [r.status_code for r in responses] == [200] * 5
        assert {r.text for r in responses} == {"b\n"}
        assert len(a.received) == 5  # each GET reached the first backend once
        assert server.ctx is not None and server.ctx.stats.retries == 5


async def test_post_is_not_retried_and_reaches_the_backend_exactly_once() -> None:
    a, b = hangup(), HttpBackend(name="b")
    async with started(a, b), running(doc([a.url, b.url], policy="first")) as (_, url):
        async with httpx.AsyncClient() as client:
            r = await client.post(url + "/orders", content=b"one order")
        assert r.status_code == 502
        deliveries = [d for d in a.received if d.startswith(b"POST /orders")]
        assert len(deliveries) == 1
        assert b.requests == []


async def test_post_with_an_idempotency_key_is_retried_when_configured() -> None:
    a, b = hangup(), HttpBackend(name="b")
    async with (
        started(a, b),
        running(doc([a.url, b.url], policy="first", retry={"idempotency_key": True})) as (_, url),
    ):
        async with httpx.AsyncClient() as client:
            keyed = await client.post(
                url + "/pay", content=b"x" * 5000, headers={"Idempotency-Key": "k-1"}
            )
            plain = await client.post(url + "/pay", content=b"y" * 10)
        assert keyed.status_code == 200
        assert [r.body for r in b.requests] == [b"x" * 5000]  # the body went again, whole
        assert plain.status_code == 502


async def test_chunked_put_body_is_replayed_on_retry() -> None:
    a, b = hangup(), HttpBackend(name="b")
    async with started(a, b), running(doc([a.url, b.url], policy="first")) as (_, url):

        async def body() -> AsyncIterator[bytes]:
            for part in (b"abc", b"defg", b"h" * 3000):
                yield part

        async with httpx.AsyncClient() as client:
            r = await client.put(url + "/doc", content=body())
        assert r.status_code == 200
        assert b.requests[0].body == b"abcdefg" + b"h" * 3000


async def test_retry_on_chosen_statuses_only() -> None:
    a, b = status_backend(503), HttpBackend(name="b")
    async with started(a, b):
        cfg = doc([a.url, b.url], policy="first", passive=False)
        async with running(cfg) as (_, url), httpx.AsyncClient() as client:
            assert (await client.get(url + "/")).status_code == 503  # default: forwarded
        cfg = doc([a.url, b.url], policy="first", passive=False, retry={"on": [503]})
        async with running(cfg) as (_, url), httpx.AsyncClient() as client:
            r = await client.get(url + "/")
            assert (r.status_code, r.text) == (200, "b\n")
            # nothing left to try: the last answer is forwarded, not replaced by a 502
            solo = doc([a.url], policy="first", passive=False, retry={"on": [503]})
            async with running(solo) as (_, url2):
                assert (await client.get(url2 + "/")).status_code == 503


async def test_attempts_and_budget_bound_retries() -> None:
    a, b = hangup(), HttpBackend(name="b")
    async with started(a, b):
        cfg = doc([a.url, b.url], policy="first", retry={"attempts": 1})
        async with running(cfg) as (_, url), httpx.AsyncClient() as client:
            assert (await client.get(url + "/")).status_code == 502
        cfg = doc([a.url, b.url], policy="first", retry={"budget_min": 0, "budget_percent": 0})
        async with running(cfg) as (server, url), httpx.AsyncClient() as client:
            assert (await client.get(url + "/")).status_code == 502
            assert server.ctx is not None
            assert server.ctx.stats.retries_over_budget == 1
    assert b.requests == []


async def test_connect_black_hole_times_out_then_another_backend() -> None:
    b = HttpBackend(name="b")
    timeouts = {"timeouts": {"upstream_connect": "300ms"}}
    with black_hole() as hole:
        async with (
            started(b),
            running(doc([hole, b.url], policy="first", top=timeouts)) as (server, url),
            httpx.AsyncClient() as client,
        ):
            t0 = time.monotonic()
            r = await client.post(url + "/", content=b"never reached the first")
            elapsed = time.monotonic() - t0
        assert (r.status_code, r.text) == (200, "b\n")
        assert elapsed >= 0.25
        assert server.ctx is not None and server.ctx.stats.upstream_connect_errors == 1


async def test_silent_backend_gives_504_at_the_response_timeout() -> None:
    silent = ScriptedBackend(lambda data: None, name="silent")
    async with started(silent):
        cfg = doc([silent.url], top={"timeouts": {"upstream_response": "400ms"}})
        async with running(cfg) as (server, url), httpx.AsyncClient() as client:
            t0 = time.monotonic()
            r = await client.get(url + "/")
            elapsed = time.monotonic() - t0
        assert r.status_code == 504
        assert 0.4 <= elapsed < 5  # never before the configured timeout
        assert server.ctx is not None and server.ctx.stats.upstream_timeouts == 1


async def test_per_try_timeout_moves_a_get_on_but_a_post_gets_504() -> None:
    silent = ScriptedBackend(lambda data: None, name="silent")
    b = HttpBackend(name="b")
    async with started(silent, b):
        cfg = doc([silent.url, b.url], policy="first", retry={"per_try_timeout": "300ms"})
        async with running(cfg) as (_, url), httpx.AsyncClient() as client:
            get = await client.get(url + "/")
            post = await client.post(url + "/", content=b"z")
        assert (get.status_code, get.text) == (200, "b\n")
        assert post.status_code == 504
        assert len(b.requests) == 1


async def test_backend_closing_idle_keep_alive_connections_causes_no_errors() -> None:
    """The backend closes a connection after 1 s idle; the client sends a GET each second,
    so poise keeps picking pooled connections that are being closed at that moment."""
    served = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        try:
            while True:
                try:
                    async with asyncio.timeout(1.0):
                        await reader.readuntil(b"\r\n\r\n")
                except (TimeoutError, asyncio.IncompleteReadError):
                    return
                served += 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
                await writer.drain()
        finally:
            writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        cfg = doc([f"http://127.0.0.1:{port}"], pool={"idle_timeout": "10s"})
        async with running(cfg) as (_, url), httpx.AsyncClient() as client:
            codes = []
            for _ in range(4):
                codes.append((await client.get(url + "/")).status_code)
                await asyncio.sleep(1.0)  # the interval under test, not a wait for a condition
        assert codes == [200] * 4
        assert served == 4
    finally:
        srv.close()
        await srv.wait_closed()


# -- passive health ------------------------------------------------------------------------


async def test_consecutive_5xx_eject_for_a_growing_time() -> None:
    a, b = status_backend(500), HttpBackend(name="b")
    passive = {"statuses": "500-599", "consecutive_failures": 2, "base_ejection": "400ms",
               "max_ejection": "10s"}  # fmt: skip
    async with (
        started(a, b),
        running(doc([a.url, b.url], policy="first", passive=passive)) as (
            server,
            url,
        ),
    ):
        outliers = server.membership.board.statuses["app"].outliers
        async with httpx.AsyncClient() as client:
            first = [(await client.get(url + "/")).status_code for _ in range(3)]
            assert first == [500, 500, 200]  # ejected after two in a row
            assert "ejected for 0.4s: 2 consecutive failures (status 500)" in outliers.reasons[0]
            await eventually(lambda: not outliers.ejected[0])  # back after its time
            again = [(await client.get(url + "/")).status_code for _ in range(3)]
            assert again == [500, 500, 200]
            assert "ejected for 0.8s" in outliers.reasons[0]  # second time: twice as long
        assert len(a.requests) == 4
        assert server.ctx is not None and server.ctx.stats.ejections == 2


async def test_503_with_retry_after_ejects_for_that_long() -> None:
    a, b = status_backend(503, [("Retry-After", "30")]), HttpBackend(name="b")
    async with started(a, b), running(doc([a.url, b.url], policy="first")) as (server, url):
        async with httpx.AsyncClient() as client:
            codes = [(await client.get(url + "/")).status_code for _ in range(4)]
        assert codes == [503, 200, 200, 200]
        assert len(a.requests) == 1
        stats = server.statistics()["backends"]["app"]["backends"][a.url]
        assert stats["ejected"] is True and 25 < stats["ejected_for"] <= 30


async def test_connect_failures_eject_a_dead_backend() -> None:
    b = HttpBackend(name="b")
    dead = "http://127.0.0.1:1"  # nothing listens on port 1
    passive = {"consecutive_failures": 3}
    async with (
        started(b),
        running(doc([dead, b.url], policy="first", passive=passive)) as (server, url),
        httpx.AsyncClient() as client,
    ):
        codes = [(await client.get(url + "/")).status_code for _ in range(6)]
        assert codes == [200] * 6
        assert server.ctx is not None
        assert server.ctx.stats.upstream_connect_errors == 3  # then it was out of rotation
        assert server.membership.board.statuses["app"].outliers.ejected[0]


# -- panic, admin states, slow start -------------------------------------------------------


def unhealthy_on_probe(name: str, healthy: bool) -> HttpBackend:
    async def handler(request: RecordedRequest) -> Response:
        if request.method == "HEAD":
            return Response(status=200 if healthy else 500)
        return Response(body=f"{name}\n".encode())

    return HttpBackend(name=name, handler=handler)


@pytest.mark.parametrize("threshold", [50, 0])
async def test_panic_mode_routes_to_all_when_too_few_are_healthy(threshold: int) -> None:
    backends = [unhealthy_on_probe("a", True), unhealthy_on_probe("b", False),
                unhealthy_on_probe("c", False)]  # fmt: skip
    async with (
        started(*backends),
        running(
            doc([x.url for x in backends], health={"interval": "5s"}, panic_threshold=threshold)
        ) as (server, url),
        httpx.AsyncClient() as client,
    ):
        bodies = Counter([(await client.get(url + "/")).text for _ in range(30)])
        group = server.table.groups["app"]
    if threshold:
        assert group.panic
        assert bodies == {"a\n": 10, "b\n": 10, "c\n": 10}
    else:
        assert not group.panic
        assert bodies == {"a\n": 30}


async def test_maint_and_drain_states() -> None:
    backends = [HttpBackend(name=n) for n in "abc"]
    sticky = {"name": "sticky", "secret": "0123456789abcdef0123"}
    async with started(*backends):
        cfg = doc(
            [backends[0].url, backends[1].url, {"url": backends[2].url, "state": "maint"}],
            policy=sticky,
        )
        async with running(cfg) as (server, url):
            async with httpx.AsyncClient() as client:
                r = await client.get(url + "/")
                cookie = r.headers["set-cookie"].split(";")[0]
                pinned = r.text.strip()
                server.membership.set_backend_state("app", f"http://{backends['ab'.index(pinned)].url[7:]}",
                                     "drain")  # fmt: skip
                # pinned clients keep their backend while it drains ...
                with_cookie = {
                    (await client.get(url + "/", headers={"Cookie": cookie})).text for _ in range(5)
                }
                assert with_cookie == {pinned + "\n"}
                # ... new ones go elsewhere (and never to the backend in maintenance)
                fresh = set()
                for _ in range(6):
                    client.cookies.clear()
                    fresh.add((await client.get(url + "/")).text)
                other = "b" if pinned == "a" else "a"
                assert fresh == {other + "\n"}
                server.membership.set_backend_state("app", backends[2].url, "enabled")
                seen = set()
                for _ in range(20):
                    client.cookies.clear()
                    seen.add((await client.get(url + "/")).text)
                assert "c\n" in seen
            with pytest.raises(KeyError):
                server.membership.set_backend_state("app", "http://127.0.0.1:9", "drain")
            with pytest.raises(ValueError):
                server.membership.set_backend_state("app", backends[0].url, "sleeping")


async def test_all_in_maintenance_is_503() -> None:
    a = HttpBackend(name="a")
    async with (
        started(a),
        running(doc([{"url": a.url, "state": "maint"}])) as (_, url),
        httpx.AsyncClient() as client,
    ):
        r = await client.get(url + "/")
    assert (r.status_code, r.text.strip()) == (503, "No healthy server available")


async def test_slow_start_gives_a_recovered_backend_a_small_share_first() -> None:
    a, b = HttpBackend(name="a"), unhealthy_on_probe("b", False)
    health = {"interval": "100ms"}
    async with (
        started(a, b),
        running(doc([a.url, b.url], health=health, slow_start="60s", panic_threshold=0)) as (
            server,
            url,
        ),
        httpx.AsyncClient() as client,
    ):
        await eventually(lambda: server.table.groups["app"].up == (True, False))
        b.handler = unhealthy_on_probe("b", True).handler
        await eventually(lambda: server.table.groups["app"].up == (True, True))
        ramp = server.table.groups["app"].ramp
        assert ramp is not None and ramp[1] < 0.2
        bodies = Counter([(await client.get(url + "/")).text for _ in range(200)])
    # round robin would give b 100; ramping from 10% it gets about 5% (p of > 50: ~1e-20)
    assert bodies["b\n"] < 50
    assert bodies["a\n"] + bodies["b\n"] == 200


# -- request limits ------------------------------------------------------------------------


def slow_counting(delay: float) -> tuple[HttpBackend, dict[str, int]]:
    seen = {"now": 0, "max": 0}

    async def handler(request: RecordedRequest) -> Response:
        seen["now"] += 1
        seen["max"] = max(seen["max"], seen["now"])
        await asyncio.sleep(delay)
        seen["now"] -= 1
        return Response(body=b"ok\n")

    return HttpBackend(name="slow", handler=handler), seen


async def test_per_backend_limit_queues_requests_and_serves_them_in_turn() -> None:
    backend, seen = slow_counting(0.2)
    limits = {"max_requests_per_backend": 1}
    async with (
        started(backend),
        running(doc([backend.url], limits=limits)) as (server, url),
        httpx.AsyncClient() as client,
    ):
        codes = await asyncio.gather(*(client.get(url + f"/{i}") for i in range(4)))
        assert [r.status_code for r in codes] == [200] * 4
        assert seen["max"] == 1
        assert server.ctx is not None and server.ctx.stats.queued == 3


async def test_full_queue_and_queue_timeout_answer_503() -> None:
    backend, seen = slow_counting(1.0)
    limits = {"max_requests": 1, "max_pending": 1, "queue_timeout": "300ms"}
    async with (
        started(backend),
        running(doc([backend.url], limits=limits)) as (server, url),
        httpx.AsyncClient() as client,
    ):
        results = await asyncio.gather(*(client.get(url + f"/{i}") for i in range(3)))
        codes = sorted(r.status_code for r in results)
        texts = {r.text.strip() for r in results if r.status_code == 503}
        assert codes == [200, 503, 503]
        assert texts == {
            "Upstream busy: too many requests waiting",
            "Upstream busy: no backend free within the queue timeout",
        }
        assert server.ctx is not None
        assert (server.ctx.stats.queue_full, server.ctx.stats.queue_timeouts) == (1, 1)
        assert seen["max"] == 1


def dead_url() -> str:
    """The URL of a port nothing listens on: connections to it are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def metric(text: str, sample: str) -> int:
    """The value of one sample line (name with labels) in a /metrics text."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return int(float(line.split()[-1]))
    raise AssertionError(f"no sample {sample}")


def answered_errors(text: str) -> int:
    return sum(
        int(float(line.split()[-1]))
        for line in text.splitlines()
        if line.startswith("poise_errors_total{")
    )


async def test_every_backend_refusing_the_connection_is_503_not_502() -> None:
    """The checks have not noticed yet (none run here): each backend refuses the connect.
    Nothing was sent anywhere, so no server could take the request: 503 with the same
    text as when the checks know (HAProxy answers 503 too), counted once."""
    cfg = doc([dead_url(), dead_url()])
    async with running(cfg) as (server, url), httpx.AsyncClient() as client:
        r = await client.get(url + "/")
        assert (r.status_code, r.text) == (503, "No healthy server available\n")
        # a POST too: nothing was sent, so a refused connect moves on whatever the method
        post = await client.post(url + "/", content=b"x")
        assert post.status_code == 503
        text = render_of(server)
    assert metric(text, 'poise_errors_total{kind="no_healthy_backend",status="503"}') == 2
    assert answered_errors(text) == 2
    assert metric(text, 'poise_upstream_attempt_failures_total{outcome="connect_error"}') == 4


async def test_a_backend_that_fails_after_taking_the_request_is_still_502() -> None:
    a = hangup()
    async with started(a):
        cfg = doc([a.url, dead_url()], policy="first")
        async with running(cfg) as (server, url), httpx.AsyncClient() as client:
            r = await client.get(url + "/")
            text = render_of(server)
    assert r.status_code == 502  # the first had the request; the second refused
    assert metric(text, 'poise_errors_total{kind="upstream_error",status="502"}') == 1
    assert answered_errors(text) == 1
    assert metric(text, 'poise_upstream_attempt_failures_total{outcome="reset"}') == 1
    assert metric(text, 'poise_upstream_attempt_failures_total{outcome="connect_error"}') == 1


def render_of(server: Any) -> str:
    from poise.admin.metrics import render

    return str(render(server))


async def test_retried_failures_are_attempts_not_errors() -> None:
    """A refused connect and a timed-out GET, each retried into a 200: the client saw no
    error, so poise_errors_total stays 0; the failed attempts are counted as attempts."""
    silent = ScriptedBackend(lambda data: None, name="silent")
    b = HttpBackend(name="b")
    async with started(silent, b):
        cfg = doc(
            [dead_url(), silent.url, b.url], policy="first", retry={"per_try_timeout": "300ms"}
        )
        async with running(cfg) as (server, url), httpx.AsyncClient() as client:
            r = await client.get(url + "/")
            text = render_of(server)
    assert (r.status_code, r.text) == (200, "b\n")
    assert answered_errors(text) == 0
    assert metric(text, 'poise_upstream_attempt_failures_total{outcome="connect_error"}') == 1
    assert metric(text, 'poise_upstream_attempt_failures_total{outcome="timeout"}') == 1
    assert metric(text, "poise_retries_total") == 2


@pytest.mark.parametrize("threshold", [None, 50])
async def test_one_healthy_of_five_serves_every_request(threshold: int | None) -> None:
    """4 of 5 backends dead (connections refused), 1 healthy. By default there is no panic
    mode: all goes to the healthy one. With panic mode on, requests are spread over all five,
    and a retry after a refused connect goes to the healthy one first: none fails (it was
    100 of 200 answered 502)."""
    alive = HttpBackend(name="alive")
    extra = {} if threshold is None else {"panic_threshold": threshold}
    async with started(alive):
        urls = [dead_url(), dead_url(), alive.url, dead_url(), dead_url()]
        cfg = doc(urls, health={"interval": "5s", "timeout": "1s"}, **extra)
        async with running(cfg) as (server, url), httpx.AsyncClient() as client:
            statuses = Counter([(await client.get(url + "/")).status_code for _ in range(200)])
            group = server.table.groups["app"]
            text = render_of(server)
    assert statuses == {200: 200}
    assert group.panic is (threshold is not None)
    assert answered_errors(text) == 0


def got_request(backend: ScriptedBackend) -> bool:
    return any(b"GET " in data for data in backend.received)


async def test_retry_timeout_bounds_all_tries_together() -> None:
    """Three silent backends, 2 s per try, 3 s in all: the second try is cut at 3 s and the
    third never starts (without the total a GET waited 3 tries x 2 s)."""
    silent = [ScriptedBackend(lambda data: None, name=f"silent{i}") for i in range(3)]
    async with started(*silent):
        cfg = doc(
            [s.url for s in silent],
            policy="first",
            retry={"per_try_timeout": "2s", "timeout": "3s"},
        )
        async with running(cfg) as (server, url), httpx.AsyncClient(timeout=30) as client:
            t0 = time.monotonic()
            r = await client.get(url + "/")
            elapsed = time.monotonic() - t0
            text = render_of(server)
    assert r.status_code == 504
    assert elapsed >= 3  # never before the total
    assert elapsed < 5.5  # the generous side of 3 s, well short of the 6 s of three tries
    assert [got_request(s) for s in silent] == [True, True, False]
    assert metric(text, 'poise_upstream_attempt_failures_total{outcome="timeout"}') == 2
    assert metric(text, 'poise_errors_total{kind="upstream_timeout",status="504"}') == 1


async def test_by_default_retries_never_wait_longer_than_one_try() -> None:
    """retry.timeout defaults to timeouts.upstream_response: a GET whose backend stays silent
    for all of it is answered 504 then, not sent on for another full wait."""
    a, b = (ScriptedBackend(lambda data: None, name=n) for n in "ab")
    async with started(a, b):
        cfg = doc([a.url, b.url], policy="first", top={"timeouts": {"upstream_response": "400ms"}})
        async with running(cfg) as (_, url), httpx.AsyncClient(timeout=30) as client:
            r = await client.get(url + "/")
    assert r.status_code == 504
    assert got_request(a) and not got_request(b)
