"""poise.looptune: the loop's record of live transports with plain weak references still
refuses add_reader on a live transport's descriptor, and only on a live one."""

from __future__ import annotations

import asyncio
import gc
import socket
import weakref
from typing import Any

import pytest
import uvloop

from poise.looptune import FdRecord, lighten


def record(loop: asyncio.AbstractEventLoop) -> weakref.WeakValueDictionary[int, object]:
    found = [o for o in gc.get_referents(loop) if isinstance(o, weakref.WeakValueDictionary)]
    assert len(found) == 1
    return found[0]


async def connections(n: int) -> list[int]:
    """Open and close ``n`` loopback connections through transports; their descriptors."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    fds = []
    try:
        for _ in range(n):
            transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
            fd = transport.get_extra_info("socket").fileno()
            fds.append(fd)
            with pytest.raises(RuntimeError, match="is used by transport"):
                loop.add_reader(fd, lambda: None)  # a live transport's descriptor: refused
            transport.close()
            await asyncio.sleep(0)
            await asyncio.sleep(0)
    finally:
        server.close()
        await server.wait_closed()
    return fds


@pytest.mark.parametrize("make", [uvloop.new_event_loop, asyncio.SelectorEventLoop])
def test_a_lightened_record_refuses_only_live_transports_descriptors(make: Any) -> None:
    loop = make()  # uvloop, and asyncio's selector loop, which keeps the same record
    try:
        assert lighten(loop)
        assert type(record(loop)) is FdRecord
        fds = loop.run_until_complete(connections(50))
        # closed and collected: their descriptors are free for add_reader again
        gc.collect()
        left = record(loop)
        assert all(left.get(fd) is None for fd in fds)
        a, b = socket.socketpair()
        try:
            loop.add_reader(a.fileno(), lambda: None)
            loop.remove_reader(a.fileno())
        finally:
            a.close()
            b.close()
        # one entry per descriptor number: the dead ones are replaced, not piled up
        assert len(left.data) <= len(set(fds)) + 2  # type: ignore[attr-defined]
    finally:
        loop.close()


def test_a_loop_without_the_record_is_left_alone() -> None:
    assert not lighten(asyncio.AbstractEventLoop())
