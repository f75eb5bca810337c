"""``poise.registry.etcdwire``: the lean HTTP/1.1 client the etcd store talks through, against
small servers on 127.0.0.1 that answer as told (keep-alive, chunked streams, cut-offs)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from poise.registry.etcdwire import WireClient, WireError

pytestmark = pytest.mark.timeout(30)
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    line, *fields = head.decode("latin-1").split("\r\n")[:-2]
    headers = {k.lower(): v.strip() for k, _, v in (f.partition(":") for f in fields)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return line.encode(), headers, body


@asynccontextmanager
async def server(handler: Handler) -> AsyncIterator[tuple[str, list[int]]]:
    """A server running ``handler`` per connection; yields its base URL and the list of
    connection numbers seen (one entry per accepted connection)."""
    accepted: list[int] = []

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(len(accepted))
        try:
            await handler(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", accepted
    finally:
        srv.close()
        await srv.wait_closed()


def reply(status: int, body: bytes, *, close: bool = False) -> bytes:
    extra = "Connection: close\r\n" if close else ""
    return (f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body  # fmt: skip


async def echo_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        line, headers, body = await read_request(reader)
        data = {"line": line.decode(), "body": json.loads(body), "leader": headers.get("x-t")}
        writer.write(reply(200, json.dumps(data).encode()))
        await writer.drain()


async def test_posts_json_and_keeps_the_connection_alive() -> None:
    client = WireClient(headers={"X-T": "yes"})
    async with server(echo_forever) as (url, accepted):
        for n in range(5):
            r = await client.post(url, "/v3/kv/range", {"n": n})
            assert r.status == 200
            assert r.json() == {"line": "POST /v3/kv/range HTTP/1.1", "body": {"n": n},
                                "leader": "yes"}  # fmt: skip
        assert len(accepted) == 1, "five calls, one connection"
        # concurrent calls each get a connection; they go back to the idle list after
        got = await asyncio.gather(*(client.post(url, "/p", {"i": i}) for i in range(4)))
        assert [r.json()["body"]["i"] for r in got] == [0, 1, 2, 3]
        assert len(accepted) == 4
    await client.close()


async def test_an_idle_connection_the_peer_closed_is_replaced_once() -> None:
    async def one_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(reply(200, b"{}"))  # keep-alive, as far as the client knows
        await writer.drain()
        # then the server goes away without a word (an idle timeout, a restart)

    client = WireClient()
    async with server(one_then_close) as (url, accepted):
        assert (await client.post(url, "/a", {})).status == 200
        await asyncio.sleep(0.05)
        assert (await client.post(url, "/b", {})).status == 200  # on a new connection
        assert len(accepted) == 2
    await client.close()


async def test_a_response_cut_short_or_not_http_is_a_wire_error() -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(reply(200, b'{"a": 1234567}')[:-5])

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-nope\r\n\r\n")

    client = WireClient()
    for handler, message in ((cut, "before the response ended"), (garbage, "not a valid")):
        async with server(handler) as (url, _):
            with pytest.raises(WireError, match=message):
                await client.post(url, "/x", {})
    with pytest.raises(WireError, match="cannot connect"):
        await client.post("http://127.0.0.1:1", "/x", {})
    await client.close()


async def test_a_connection_close_answer_is_not_reused() -> None:
    async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(reply(503, b'{"code": 14}', close=True))
        await writer.drain()

    client = WireClient()
    async with server(closing) as (url, accepted):
        for _ in range(3):
            r = await client.post(url, "/x", {})
            assert (r.status, r.json()) == (503, {"code": 14})
        assert len(accepted) == 3
    await client.close()


async def test_a_stream_yields_lines_as_they_come_across_chunks() -> None:
    go = asyncio.Event()

    async def watch(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        pieces = [b'{"result":{"n":1}}\n{"res', b'ult":{"n":2}}\n', b'{"result":{"n":3}}\n']
        for piece in pieces:
            writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            await writer.drain()
            await go.wait()  # the client has the lines so far before the next piece
            go.clear()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    client = WireClient()
    async with server(watch) as (url, _):
        response, lines = await client.open_stream(url, "/v3/watch", {"create_request": {}})
        assert response.status == 200
        got = []
        async for line in lines:
            got.append(json.loads(line)["result"]["n"])
            if got in ([1], [1, 2], [1, 2, 3]):
                go.set()
        assert got == [1, 2, 3]
    await client.close()


async def test_a_stream_refused_comes_with_its_body_and_no_lines() -> None:
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(reply(400, b'{"code": 3, "message": "bad"}'))
        await writer.drain()

    client = WireClient()
    async with server(refuse) as (url, _):
        response, lines = await client.open_stream(url, "/v3/watch", {})
        assert (response.status, response.json()["message"]) == (400, "bad")
        assert [line async for line in lines] == []
    await client.close()


async def test_a_stream_the_peer_drops_ends_with_a_wire_error_and_close_ends_it() -> None:
    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabc\n\n\r\n")
        await writer.drain()

    client = WireClient()
    async with server(drop) as (url, _):
        _, lines = await client.open_stream(url, "/v3/watch", {})
        assert await anext(lines) == b"abc"
        assert await anext(lines) == b""
        with pytest.raises(WireError, match="closed"):
            await anext(lines)
    async with server(echo_forever) as (url, _):
        hold = asyncio.Event()

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            await writer.drain()
            await hold.wait()

        async with server(silent) as (quiet, _):
            _, lines = await client.open_stream(quiet, "/v3/watch", {})
            waiting = asyncio.ensure_future(anext(lines))
            await asyncio.sleep(0.05)
            await client.close()  # closes the stream's connection: the reader ends
            with pytest.raises(WireError):
                await asyncio.wait_for(waiting, 5)
            hold.set()
