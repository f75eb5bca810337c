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
