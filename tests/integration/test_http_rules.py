"""Numbered cases of docs/http-rules.md: a raw socket client, backends that record bytes.

"400+close" means: that status, then EOF, and the backend received 0 bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from poise.testing import HttpBackend, RecordedRequest, Response, ScriptedBackend
from tests.integration.support import address, exchange, full, running

# every case with the C hub and with the loop's own server (tests/wire/helpers.py)
pytestmark = pytest.mark.usefixtures("wire_hub")

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[ScriptedBackend, str]]:
    async with (
        ScriptedBackend(OK) as backend,
        running(full([backend.url], health={"enabled": False})) as (_, url),
    ):
        yield backend, url


def post(headers: bytes, body: bytes = b"") -> bytes:
    return b"POST / HTTP/1.1\r\nHost: a\r\n" + headers + b"\r\n" + body


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        # case 3: Content-Length grammar
        *[
            (post(b"Content-Length: " + v + b"\r\n", b"hello"), 400)
            for v in (b"-1", b"0x5", b"5_0", b"5 5", b"", "\uff11\uff12".encode(), b"9" * 20)
        ],
        # case 4: transfer codings
        (post(b"Transfer-Encoding: xchunked\r\n"), 501),
        (post(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"), 400),
        # case 5: whitespace before the colon
        (post(b"Transfer-Encoding : chunked\r\n", b"0\r\n\r\n"), 400),
        # case 7: chunk-size grammar
        *[
            (post(b"Transfer-Encoding: chunked\r\n", size + b"\r\nab\r\n0\r\n\r\n"), 400)
            for size in (b"0x2", b"+2", b"2_0", b" 2", b"Z", b"FFFFFFFFFFFFFFFFF")
        ],
        # case 8: chunk data longer than its size
        (post(b"Transfer-Encoding: chunked\r\n", b"5\r\nAAAAAXX\r\n0\r\n\r\n"), 400),
        # case 12: bare CR, NUL in a value
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\rc\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\x00c\r\n\r\n", 400),
        # case 14: versions
        (b"GET / HTTP/1.01\r\nHost: a\r\n\r\n", 400),
        (b"GET / http/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET / HTTP/1.1 \r\nHost: a\r\n\r\n", 400),
        # a lone LF as line ending
        (b"GET / HTTP/1.1\nHost: a\n\n", 400),
        # the request line: one space between its parts
        (b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET /  HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ],
)
async def test_refused_with_close_and_nothing_forwarded(
    scripted: tuple[ScriptedBackend, str], request_bytes: bytes, status: int
) -> None:
    backend, url = scripted
    answer = await exchange(url, request_bytes + b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:80]
    assert answer.count(b"HTTP/1.1 ") == 1
    assert b"".join(backend.received) == b""


async def test_case6_mixed_case_chunked_accepted_and_normalised() -> None:
    async with (
        HttpBackend() as backend,
        running(full([backend.url], health={"enabled": False})) as (_, url),
    ):
        answer = await exchange(
            url,
            b"POST / HTTP/1.1\r\nHost: a\r\nTrAnSfEr-EnCoDiNg: cHuNkEd\r\nConnection: close"
            b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        )
    assert answer.startswith(b"HTTP/1.1 200 ")
    req = backend.requests[-1]
    assert req.body == b"abc"
    assert req.header("Transfer-Encoding") == "chunked"


async def test_case9_trailer_never_used_for_framing(
    scripted: tuple[ScriptedBackend, str],
) -> None:
    # llhttp refuses a Content-Length trailer outright; whatever follows is never parsed.
    backend, url = scripted
    answer = await exchange(
        url,
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nab\r\n0\r\nContent-Length: 5\r\n\r\n"
        b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"/next" not in b"".join(backend.received)


async def test_trailers_are_dropped_and_the_next_request_proceeds() -> None:
    async with (
        HttpBackend() as backend,
        running(full([backend.url], health={"enabled": False})) as (_, url),
    ):
        answer = await exchange(
            url,
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nab\r\n0\r\nX-Trailer: t\r\n\r\n"
            b"GET /next HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
    assert answer.count(b"HTTP/1.1 200 ") == 2
    assert [r.target for r in backend.requests] == ["/", "/next"]
    assert backend.requests[0].body == b"ab"
    assert backend.requests[0].trailers == []


async def test_case10_get_with_body_then_pipelined_request() -> None:
    async with (
        HttpBackend() as backend,
        running(full([backend.url], health={"enabled": False})) as (_, url),
    ):
        answer = await exchange(
            url,
            b"GET /1 HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n0123456789"
            b"GET /2 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
    assert answer.count(b"HTTP/1.1 200 ") == 2
    assert [(r.target, r.body) for r in backend.requests] == [("/1", b"0123456789"), ("/2", b"")]


PIPELINED_FIRST = {
    "bodiless": b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n",
    "content_length": b"POST /1 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc",
    "chunked": b"POST /1 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"3\r\nabc\r\n0\r\n\r\n",
}  # fmt: skip


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize("line", [b"GET  /2 HTTP/1.1", b"GET /2  HTTP/1.1"])
@pytest.mark.parametrize("first", list(PIPELINED_FIRST))
async def test_doubled_space_in_a_pipelined_request_line(
    first: str, line: bytes, bytewise: bool
) -> None:
    """A request pipelined behind another in the same read begins where httptools does not
    say: its request line is checked all the same."""
    async with (
        HttpBackend() as backend,
        running(full([backend.url], health={"enabled": False})) as (_, url),
    ):
        answer = await exchange(
            url,
            PIPELINED_FIRST[first] + line + b"\r\nHost: a\r\n\r\n"
            b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
            bytewise=bytewise,
        )
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:80]
    assert answer.count(b"HTTP/1.1 ") == 2
    assert b"HTTP/1.1 400 " in answer
    assert [r.target for r in backend.requests] == ["/1"]


async def test_pipelined_requests_with_double_spaces_in_values_are_served() -> None:
    async with (
        HttpBackend() as backend,
        running(full([backend.url], health={"enabled": False})) as (_, url),
    ):
        answer = await exchange(
            url,
            b"GET /1 HTTP/1.1\r\nHost: a\r\nX-A: a  b\r\n\r\n"
            b"\r\nGET /2 HTTP/1.1\r\nHost: a\r\nX-B: c  d\r\n\r\n"
            b"POST /3 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
        )
    assert answer.count(b"HTTP/1.1 200 ") == 3, answer[:300]
    assert [r.target for r in backend.requests] == ["/1", "/2", "/3"]


async def test_case21_expect_100_continue() -> None:
    async with (
        HttpBackend() as backend,
        running(full([backend.url], health={"enabled": False})) as (_, url),
    ):
        host, port = address(url)
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        async with asyncio.timeout(5):
            interim = await reader.readuntil(b"\r\n\r\n")
        assert interim.startswith(b"HTTP/1.1 100 ")
        writer.write(b"hello")
        async with asyncio.timeout(5):
            final = await reader.readuntil(b"\r\n\r\n")
        assert final.startswith(b"HTTP/1.1 200 ")
        writer.close()
    assert backend.requests[-1].body == b"hello"


async def test_case21_early_417_leaves_nothing_to_parse() -> None:
    refuse = b"HTTP/1.1 417 Expectation Failed\r\nContent-Length: 0\r\n\r\n"
    async with (
        ScriptedBackend(refuse) as backend,
        running(full([backend.url], health={"enabled": False})) as (server, url),
    ):
        host, port = address(url)
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 30\r\nExpect: 100-continue\r\n\r\n"
        )
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 417 ")
        # the body the client then sends looks like a request; it must never become one
        try:
            writer.write(b"GET /smuggled HTTP/1.1\r\nH: x\r\n")
            await writer.drain()
        except ConnectionError:
            pass
        async with asyncio.timeout(5):
            rest = await reader.read()
        writer.close()
        assert server.ctx is not None
        assert (
            server.ctx.table.groups["app"].pools[0].idle == []
        )  # that backend connection is not reused
    assert rest == b""
    assert b"/smuggled" not in b"".join(backend.received)


async def test_case24_post_to_a_backend_that_dies_is_not_retried() -> None:
    died = ScriptedBackend(lambda received: b"" if b"\r\n\r\n" in received else None,
                           close_after_reply=True)  # fmt: skip
    async with died, HttpBackend(name="healthy") as healthy:
        doc = full([died.url, healthy.url], health={"enabled": False})
        async with running(doc) as (_, url), httpx.AsyncClient() as client:
            statuses = [(await client.post(url, content=b"pay once")).status_code for _ in range(2)]
    assert sorted(statuses) == [200, 502]
    assert [r.body for r in healthy.requests] == [b"pay once"]


async def test_case26_backend_stalls_mid_body_client_sees_truncation() -> None:
    async def stall(_: RecordedRequest) -> Response:
        async def body() -> AsyncIterator[bytes]:
            yield b"x" * 100
            await asyncio.sleep(30)
            yield b"never"

        return Response(headers=[("Content-Length", "200")], body=body())

    async with HttpBackend(handler=stall) as backend:
        doc = full([backend.url], health={"enabled": False},
                   timeouts={"upstream_response": "500ms"})  # fmt: skip
        async with running(doc) as (_, url):
            answer = await exchange(url, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", timeout=10)
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 ")
    assert body == b"x" * 100  # then EOF, never a late 504


async def test_case27_client_abort_mid_upload_reaches_backend() -> None:
    closed = asyncio.Event()
    received = bytearray()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(65536):
                received.extend(chunk)
        finally:
            closed.set()
            writer.close()

    server = await asyncio.start_server(sink, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        doc = full([f"http://127.0.0.1:{port}"], health={"enabled": False})
        async with running(doc) as (proxy, url):
            host, fport = address(url)
            _, writer = await asyncio.open_connection(host, fport)
            writer.write(
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n" + b"y" * 500
            )
            await writer.drain()
            for _ in range(200):
                if len(received) > 500:
                    break
                await asyncio.sleep(0.01)
            writer.transport.abort()
            async with asyncio.timeout(1.0):
                await closed.wait()
            assert proxy.ctx is not None
            for _ in range(100):
                if not proxy.ctx.clients:
                    break
                await asyncio.sleep(0.01)
            assert not proxy.ctx.clients
    finally:
        server.close()


async def test_half_close_after_a_complete_request_still_gets_the_response() -> None:
    async def slow(_: RecordedRequest) -> Response:
        return Response(body=b"late but here", delay=0.2)

    async with (
        HttpBackend(handler=slow) as backend,
        running(full([backend.url], health={"enabled": False})) as (_, url),
    ):
        host, port = address(url)
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        writer.write_eof()  # shutdown(SHUT_WR): a half-close, not an abort
        async with asyncio.timeout(5):
            answer = await reader.read()
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.endswith(b"late but here")


async def test_half_close_after_pipelined_requests_still_gets_every_response() -> None:
    """The half-close arrives while the first request is at the backend: the requests
    queued behind it were read in full, so each still gets its response, in order."""

    async def echo(request: RecordedRequest) -> Response:
        return Response(body=b"answer to " + request.target.encode(), delay=0.1)

    async with (
        HttpBackend(handler=echo) as backend,
        running(full([backend.url], health={"enabled": False})) as (_, url),
    ):
        host, port = address(url)
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"".join(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(3)))
        writer.write_eof()
        async with asyncio.timeout(5):
            answer = await reader.read()
        writer.close()
    assert answer.count(b"HTTP/1.1 200 ") == 3
    answers = [answer.index(b"answer to /%d" % i) for i in range(3)]
    assert answers == sorted(answers)
    assert answer.count(b"Connection: close") == 1  # on the last response only
    assert answer.index(b"Connection: close") > answer.index(b"answer to /1")
