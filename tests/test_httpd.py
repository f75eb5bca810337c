"""poise.httpd: the eager start of handlers (``_resume`` continuing a coroutine that first
ran outside any task) and malformed input on the wire."""

from __future__ import annotations

import asyncio

import pytest

from poise.httpd import HttpServer, Reply, Request, Router, _resume


async def run_eagerly(coro: object) -> asyncio.Task[None] | None:
    """What the server does: start at once; a task only if it suspends."""
    try:
        yielded = coro.send(None)  # type: ignore[attr-defined]
    except StopIteration:
        return None
    return asyncio.get_running_loop().create_task(_resume(coro, yielded))  # type: ignore[arg-type]


async def test_a_coroutine_that_never_waits_finishes_without_a_task() -> None:
    done = []

    async def quick() -> None:
        done.append(1)

    assert await run_eagerly(quick()) is None and done == [1]


async def test_waits_results_and_errors_reach_the_coroutine() -> None:
    seen: list[object] = []
    fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    bad: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def waits() -> None:
        seen.append(await fut)
        await asyncio.sleep(0)  # a bare yield
        try:
            await bad
        except ValueError as exc:
            seen.append(str(exc))
        seen.append(await asyncio.wait_for(asyncio.sleep(0.01, "slept"), 5))

    task = await run_eagerly(waits())
    assert task is not None and seen == []
    fut.set_result(7)
    await asyncio.sleep(0.01)
    bad.set_exception(ValueError("boom"))
    await asyncio.wait_for(task, 5)
    assert seen == [7, "boom", "slept"]


async def test_cancelling_the_task_cancels_the_coroutine() -> None:
    cleaned = asyncio.Event()

    async def blocked() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.set()

    task = await run_eagerly(blocked())
    assert task is not None
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned.is_set()


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", b"431"),
        (b"NOT-HTTP\r\n\r\n", b"400"),
    ],
    ids=["two-content-lengths", "huge-head", "not-http"],
)
async def test_malformed_requests_get_4xx_and_close(raw: bytes, status: bytes) -> None:
    async def hello(request: Request) -> Reply:
        return Reply(data={"ok": True})

    router = Router()
    router.add("GET", "/", hello)
    server = HttpServer(router, name="test")
    host, port = await server.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(raw)
        data = await asyncio.wait_for(reader.read(-1), 5)  # read to EOF: it closes
        writer.close()
        assert data.startswith(b"HTTP/1.1 " + status), data[:80]
    finally:
        await server.close()


async def echo_server() -> tuple[HttpServer, str, int]:
    async def put(request: Request) -> Reply:
        return Reply(data={"got": len(request.body)})

    router = Router()
    router.add("PUT", "/x", put)
    server = HttpServer(router, name="test")  # max_body 64 KiB
    host, port = await server.start("127.0.0.1", 0)
    return server, host, port


async def test_a_body_over_the_limit_is_refused_by_its_head() -> None:
    server, host, port = await echo_server()
    try:
        reader, writer = await asyncio.open_connection(host, port)
        # the head alone, as a slow client would send it: 413 comes without a body byte
        writer.write(b"PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: 70000\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 413"), head
        assert b"connection: close" in head.lower()
        writer.close()
    finally:
        await server.close()


async def test_a_client_that_sends_a_large_body_before_reading_gets_its_413() -> None:
    server, host, port = await echo_server()
    try:
        reader, writer = await asyncio.open_connection(host, port)
        body = b"x" * (10 * 1024 * 1024)
        writer.write(b"PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body))
        writer.write(body)
        await asyncio.wait_for(writer.drain(), 20)  # all of it is taken (and discarded)
        data = await asyncio.wait_for(reader.read(-1), 20)  # not ECONNRESET: a clean close
        assert data.startswith(b"HTTP/1.1 413"), data[:80]
        writer.close()
    finally:
        await server.close()


async def test_expect_100_continue_is_answered_before_the_body() -> None:
    server, host, port = await echo_server()
    try:
        reader, writer = await asyncio.open_connection(host, port)
        expect = b"PUT /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
        writer.write(expect + b"Content-Length: 2\r\n\r\n")
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"{}")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        assert await asyncio.wait_for(reader.readexactly(length), 5) == b'{"got":2}\n'
        # one that will not be read gets its final answer instead of a 100
        writer.write(expect + b"Content-Length: 70000\r\n\r\n")
        data = await asyncio.wait_for(reader.read(-1), 5)
        assert b"100 Continue" not in data and b"HTTP/1.1 413" in data, data[:120]
        writer.close()
    finally:
        await server.close()


@pytest.mark.parametrize(
    ("ctype", "status"),
    [
        ("application/json", b"200"),
        ("APPLICATION/JSON", b"200"),
        ("Application/Json; charset=UTF-8", b"200"),
        ("text/plain", b"415"),
    ],
)
async def test_the_json_media_type_is_case_insensitive(ctype: str, status: bytes) -> None:
    async def put(request: Request) -> Reply:
        return Reply(data=request.json())

    router = Router()
    router.add("PUT", "/x", put)
    server = HttpServer(router, name="test")
    host, port = await server.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(
            b"PUT /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Type: %s\r\n"
            b"Content-Length: 2\r\n\r\n{}" % ctype.encode()
        )
        data = await asyncio.wait_for(reader.read(-1), 5)
        writer.close()
        assert data.startswith(b"HTTP/1.1 " + status), data[:80]
    finally:
        await server.close()
