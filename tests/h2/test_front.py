"""HTTP/2 clients through the whole proxy, HTTP/1.1 backends: curl (prior knowledge and
ALPN), httpx with http2=True, and the raw client of tests/h2/support.py for what those
cannot do. Every case runs with both framing engines (the ``h2_engine`` fixture)."""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from poise.admin.metrics import render
from poise.testing import HttpBackend, Response, echo_handler
from poise.testing.backend import RecordedRequest
from tests.h2.support import H2Client
from tests.integration.support import eventually, running
from tests.tls.certgen import CA

pytestmark = pytest.mark.usefixtures("h2_engine")

CURL = shutil.which("curl")


def doc(backends: list[str], *, tls: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    listener: dict[str, Any] = {"name": "web", "listen": "127.0.0.1:0", "upstream": "app"}
    if tls is not None:
        listener["tls"] = tls
    else:
        listener["http2"] = True
    d: dict[str, Any] = {"listeners": [listener], "upstreams": {"app": {"backends": backends}}}
    d.update(top)
    return d


def addr(server: Any) -> tuple[str, int]:
    host, port = server.addresses["web"]
    return str(host), int(port)


def proxied(backend: HttpBackend) -> list[RecordedRequest]:
    return [r for r in backend.requests if r.header("user-agent") != "poise-health"]


async def curl(*args: str) -> tuple[int, str, str]:
    assert CURL is not None, "curl is needed (the CI installs it)"
    proc = await asyncio.create_subprocess_exec(
        CURL, "-sS", "--max-time", "10", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Any]:
    ca = CA(tmp_path)
    return {"ca": ca, "site": ca.issue("site", ["site.test"])}


def tls_of(pki: dict[str, Any]) -> dict[str, Any]:
    return {"cert": str(pki["site"].cert), "key": str(pki["site"].key)}


@pytest.fixture
async def three() -> AsyncIterator[list[HttpBackend]]:
    async with (
        HttpBackend("b1", echo_handler) as b1,
        HttpBackend("b2", echo_handler) as b2,
        HttpBackend("b3", echo_handler) as b3,
    ):
        yield [b1, b2, b3]


# -- clients as users run them -----------------------------------------------------------


async def test_curl_with_prior_knowledge_on_a_plain_listener(three: list[HttpBackend]) -> None:
    async with running(doc([b.url for b in three])) as (server, _):
        host, port = addr(server)
        base = f"http://{host}:{port}"
        # (curl 7.88 cannot reuse a prior-knowledge connection: one URL per run)
        code, out, err = await curl(
            "--http2-prior-knowledge", "-D", "-", "-H", "X-Trace: t1", base + "/a/b?q=1"
        )
        assert code == 0, err
        head, _, _ = out.partition("\r\n\r\n")
        assert head.startswith("HTTP/2 200")
        sent = {k.lower(): v for k, v in json.loads(_header(head, "x-request-headers"))}
        assert sent["host"] == f"{host}:{port}"
        assert sent["x-trace"] == "t1"
        assert sent["x-forwarded-for"] == "127.0.0.1"
        assert sent["x-forwarded-proto"] == "http"
        code, out, err = await curl("--http2-prior-knowledge", "-d", "k=v&x=y", base + "/post")
        assert code == 0, err
        assert out == "k=v&x=y"
        # the same port still speaks HTTP/1.1
        code, out, err = await curl("--http1.1", "-w", "%{http_version}", "-o", "/dev/null",
                                    base + "/one")  # fmt: skip
        assert (code, out) == (0, "1.1"), err
        got = [r for b in three for r in proxied(b)]
        assert sorted(r.target for r in got) == ["/a/b?q=1", "/one", "/post"]
        assert all(r.version == "1.1" for r in got)
        text = render(server)
        assert "\npoise_http2_requests_total 2\n" in text  # (of 3 requests: one HTTP/1.1)
        assert "\npoise_requests_total 3\n" in text
        assert "# TYPE poise_http2_connections gauge" in text


async def test_curl_negotiates_h2_by_alpn_on_an_https_listener(
    three: list[HttpBackend], pki: dict[str, Any]
) -> None:
    async with running(doc([b.url for b in three], tls=tls_of(pki))) as (server, _):
        host, port = addr(server)
        url = f"https://site.test:{port}/x"
        common = ["--cacert", str(pki["ca"].path), "--resolve", f"site.test:{port}:{host}"]
        code, out, err = await curl(
            *common, "--http2", "-w", "%{http_version}", "-o", "/dev/null", url, url
        )
        assert (code, out) == (0, "22"), err  # two requests on one h2 connection
        code, out, err = await curl(
            *common, "--http1.1", "-w", "%{http_version}", "-o", "/dev/null", url
        )
        assert (code, out) == (0, "1.1"), err
        got = [r for b in three for r in proxied(b)]
        assert len(got) == 3
        assert all(r.header("x-forwarded-proto") == "https" for r in got)


async def test_httpx_http2_balances_each_request_over_one_connection(
    three: list[HttpBackend], pki: dict[str, Any]
) -> None:
    async with running(doc([b.url for b in three], tls=tls_of(pki))) as (server, _):
        _, port = addr(server)
        ctx = ssl.create_default_context(cafile=str(pki["ca"].path))
        transport = httpx.AsyncHTTPTransport(
            http2=True, verify=ctx, retries=0, local_address="127.0.0.1"
        )
        async with httpx.AsyncClient(transport=transport) as client:
            # httpx resolves site.test itself: the Host stays site.test, the socket 127.0.0.1
            transport._pool._network_backend = _Loopback(transport._pool._network_backend)
            replies = await asyncio.gather(
                *(client.get(f"https://site.test:{port}/r/{i}") for i in range(30))
            )
        assert {r.http_version for r in replies} == {"HTTP/2"}
        assert all(r.status_code == 200 for r in replies)
        counts = [len(proxied(b)) for b in three]
        assert counts == [10, 10, 10]  # round robin, per request (not per connection)
        conns = {(b.name, r.connection_id) for b in three for r in proxied(b)}
        assert len(conns) >= 3


class _Loopback:
    """An httpcore network backend that connects every name to 127.0.0.1."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def connect_tcp(self, host: str, port: int, **kw: Any) -> Any:
        return await self.inner.connect_tcp("127.0.0.1", port, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


# -- bodies and flow control --------------------------------------------------------------


async def test_request_bodies_with_and_without_a_length() -> None:
    async with HttpBackend("b", echo_handler) as backend, running(doc([backend.url])) as (s, _):
        client = await H2Client.connect(*addr(s))
        try:
            big = bytes(range(256)) * 4096  # 1 MiB: beyond any one window
            reply = await client.request(
                "/cl", method="PUT", headers=[(b"content-length", str(len(big)).encode())],
                body=big,
            )  # fmt: skip
            assert reply.status == 200
            assert bytes(reply.body) == big
            sid = client.start("/chunks", method="POST", end=False)
            for piece in (b"one,", b"two,", b"three"):
                client.conn.send_data(sid, piece)
                client.flush()
                await asyncio.sleep(0)
            client.conn.end_stream(sid)
            client.flush()
            reply = client.replies[sid]
            await asyncio.wait_for(reply.done.wait(), 10)
            assert bytes(reply.body) == b"one,two,three"
            empty = await client.request("/empty", method="POST")
            assert empty.status == 200
        finally:
            await client.close()
        by_target = {r.target: r for r in proxied(backend)}
        assert by_target["/cl"].header("content-length") == str(len(big))
        assert by_target["/cl"].body == big
        assert by_target["/chunks"].header("transfer-encoding") == "chunked"
        assert by_target["/chunks"].body == b"one,two,three"
        assert by_target["/empty"].header("content-length") == "0"


async def test_a_large_response_follows_the_clients_window() -> None:
    payload = b"0123456789abcdef" * (256 * 1024)  # 4 MiB

    async def big(request: RecordedRequest) -> Response:
        return Response(body=payload)

    async with HttpBackend("b", big) as backend, running(doc([backend.url])) as (s, _):
        client = await H2Client.connect(*addr(s), window=16384, auto_ack=False)
        try:
            sid = client.start("/big")
            reply = client.replies[sid]
            await eventually(lambda: len(reply.body) == 16384)
            await asyncio.sleep(0.2)
            assert len(reply.body) == 16384  # nothing beyond the window
            taken = 0
            while not reply.done.is_set():
                n = len(reply.body) - taken
                if n:
                    client.ack(sid, n)
                    taken += n
                await asyncio.sleep(0.001)
            assert reply.status == 200
            assert bytes(reply.body) == payload
        finally:
            await client.close()


async def test_streams_are_answered_as_their_backends_answer() -> None:
    """A slow response does not hold back a quick one on the same connection."""

    async def handler(request: RecordedRequest) -> Response:
        return Response(body=request.target.encode(), delay=1.0 if "slow" in request.target else 0)

    async with HttpBackend("b", handler) as backend, running(doc([backend.url])) as (s, _):
        client = await H2Client.connect(*addr(s))
        try:
            slow = client.start("/slow")
            fast = await client.request("/fast")
            assert bytes(fast.body) == b"/fast"
            assert not client.replies[slow].done.is_set()
            await asyncio.wait_for(client.replies[slow].done.wait(), 10)
            assert bytes(client.replies[slow].body) == b"/slow"
        finally:
            await client.close()


# -- errors --------------------------------------------------------------------------------


async def test_no_healthy_backend_is_a_503_on_the_stream() -> None:
    async with HttpBackend("b", echo_handler) as backend:
        url = backend.url
    async with running(doc([url])) as (s, _):
        client = await H2Client.connect(*addr(s))
        try:
            reply = await client.request("/x")
            assert reply.status == 503
            assert bytes(reply.body) == b"No healthy server available\n"
            assert reply.header(b"content-type") == b"text/plain; charset=utf-8"
            again = await client.request("/y")  # the connection goes on
            assert again.status == 503
        finally:
            await client.close()


async def test_a_backend_that_dies_mid_response_resets_the_stream() -> None:
    async def cut(request: RecordedRequest) -> Response:
        async def body() -> AsyncIterator[bytes]:
            yield b"x" * 1000
            raise ConnectionResetError

        return Response(headers=[("Content-Length", "100000")], body=body())

    async with HttpBackend("b", cut) as backend, running(doc([backend.url])) as (s, _):
        client = await H2Client.connect(*addr(s))
        try:
            reply = await client.request("/x")
            assert reply.status == 200
            assert reply.reset is not None  # never a truncated body taken as whole
            assert len(reply.body) < 100000
        finally:
            await client.close()


@pytest.mark.parametrize(
    "extra",
    [
        [(b"connection", b"keep-alive")],
        [(b"transfer-encoding", b"chunked")],
        [(b"te", b"gzip")],
        [(b"x-bad", b"a\x00b")],
        [(b"host", b"other.test")],
    ],
)
async def test_what_http1_would_refuse_is_never_forwarded(
    extra: list[tuple[bytes, bytes]],
) -> None:
    async with HttpBackend("b", echo_handler) as backend, running(doc([backend.url])) as (s, _):
        client = await H2Client.connect(*addr(s))
        client.conn.config.validate_outbound_headers = False
        client.conn.config.normalize_outbound_headers = False
        try:
            bad = await client.request("/bad", headers=extra)
            assert bad.status == 400 or bad.reset is not None
            good = await client.request("/good")  # the connection goes on
            assert good.status == 200
        finally:
            await client.close()
        assert [r.target for r in proxied(backend)] == ["/good"]


@pytest.mark.parametrize("sent", [b"short", b"x" * 20])
async def test_a_body_unlike_its_content_length_never_reaches_a_backend(sent: bytes) -> None:
    """The stream is malformed (RFC 9113 §8.1.1): nghttp2 resets it; h2 ends the
    connection (PROTOCOL_ERROR). Either way the backend never gets a whole request."""
    async with HttpBackend("b", echo_handler) as backend, running(doc([backend.url])) as (s, _):
        client = await H2Client.connect(*addr(s))
        try:
            sid = client.start(
                "/cl", method="POST", headers=[(b"content-length", b"10")], end=False
            )
            client.conn.send_data(sid, sent, end_stream=True)
            client.flush()
            reply = client.replies[sid]
            await asyncio.wait_for(reply.done.wait(), 10)
            ended = client.goaway is not None and client.goaway.error_code == 1
            assert reply.reset is not None or reply.status == 400 or ended
        finally:
            await client.close()
        other = await H2Client.connect(*addr(s))
        try:
            assert (await other.request("/good")).status == 200
        finally:
            await other.close()
        assert [r.target for r in proxied(backend)] == ["/good"]


async def test_drain_sends_goaway_and_finishes_the_streams_in_flight() -> None:
    async def slow(request: RecordedRequest) -> Response:
        return Response(body=b"done", delay=0.5)

    async with HttpBackend("b", slow) as backend, running(doc([backend.url])) as (s, _):
        client = await H2Client.connect(*addr(s))
        sid = client.start("/slow")
        await eventually(lambda: len(proxied(backend)) == 1)
        s.stop()
        reply = client.replies[sid]
        await asyncio.wait_for(reply.done.wait(), 10)
        assert (reply.status, bytes(reply.body)) == (200, b"done")
        await asyncio.wait_for(client.closed.wait(), 10)
        assert client.goaway is not None
        assert client.goaway.error_code == 0
        await client.close()


def _header(head: str, name: str) -> str:
    for line in head.split("\r\n")[1:]:
        k, _, v = line.partition(":")
        if k.strip().lower() == name:
            return v.strip()
    raise AssertionError(f"no {name} in {head!r}")


async def test_a_request_body_that_stops_gets_a_408_and_a_slow_backend_a_504() -> None:
    async def slow(request: RecordedRequest) -> Response:
        return Response(body=b"late", delay=3.0 if request.target == "/slow" else 0)

    timeouts = {"client_body": "1s", "upstream_response": "1s"}
    async with (
        HttpBackend("b", slow) as backend,
        running(doc([backend.url], timeouts=timeouts)) as (s, _),
    ):
        client = await H2Client.connect(*addr(s))
        try:
            sid = client.start("/upload", method="POST", end=False)
            client.conn.send_data(sid, b"part of it")
            client.flush()
            stalled = client.replies[sid]
            await asyncio.wait_for(stalled.done.wait(), 10)
            assert stalled.status == 408, stalled
            late = await client.request("/slow")
            assert (late.status, bytes(late.body)) == (504, b"Gateway Timeout\n")
            assert (await client.request("/after")).status == 200  # the connection goes on
        finally:
            await client.close()


@pytest.mark.parametrize("declared", [True, False])
async def test_a_body_over_the_limit_gets_its_413(declared: bool) -> None:
    async with (
        HttpBackend("b", echo_handler) as backend,
        running(doc([backend.url], limits={"max_body_size": 100})) as (s, _),
    ):
        client = await H2Client.connect(*addr(s))
        try:
            extra = [(b"content-length", b"1000")] if declared else []
            sid = client.start("/big", method="POST", headers=extra, end=False)
            client.conn.send_data(sid, b"x" * 1000)
            client.flush()
            reply = client.replies[sid]
            await asyncio.wait_for(reply.done.wait(), 10)
            assert (reply.status, bytes(reply.body)) == (413, b"Content Too Large\n")
            assert (await client.request("/after")).status == 200
        finally:
            await client.close()
        assert [r.target for r in proxied(backend)] == ["/after"]
