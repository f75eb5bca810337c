"""gRPC through poise to grpcio servers (PyPI grpcio, no generated code: the methods take
and give raw bytes): per-request balancing over 3 backends, unary and the three streaming
kinds, grpc-status passed through in trailers, poise's own errors as grpc-status, the
grpc-timeout deadline, and grpc.health.v1 health checks. Both engines (``h2_engine``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from tests.h2.support import H2Client
from tests.integration.support import eventually, running

pytestmark = pytest.mark.usefixtures("h2_engine")

SERVING = b"\x08\x01"  # HealthCheckResponse{status: SERVING}
NOT_SERVING = b"\x08\x02"


@dataclass
class Backend:
    name: str
    server: Any = None
    port: int = 0
    calls: list[str] = field(default_factory=list)
    health: bytes = SERVING

    async def start(self) -> None:
        me = self

        async def unary(request: bytes, context: Any) -> bytes:
            me.calls.append("unary")
            return me.name.encode() + b":" + request

        async def server_stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
            me.calls.append("server_stream")
            for i in range(int(request)):
                yield b"%d:" % i + b"x" * 1000

        async def client_stream(requests: AsyncIterator[bytes], context: Any) -> bytes:
            me.calls.append("client_stream")
            return b"".join([r async for r in requests])

        async def bidi(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
            me.calls.append("bidi")
            async for r in requests:
                yield r.upper()

        async def fail(request: bytes, context: Any) -> bytes:
            me.calls.append("fail")
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing: " + request.decode())
            return b""

        async def slow(request: bytes, context: Any) -> bytes:
            me.calls.append("slow")
            await asyncio.sleep(3)
            return b"late"

        async def check(request: bytes, context: Any) -> bytes:
            return me.health

        raw: dict[str, Any] = {"request_deserializer": None, "response_serializer": None}
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(unary, **raw),
            "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream, **raw),
            "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream, **raw),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi, **raw),
            "Fail": grpc.unary_unary_rpc_method_handler(fail, **raw),
            "Slow": grpc.unary_unary_rpc_method_handler(slow, **raw),
        }
        health = {"Check": grpc.unary_unary_rpc_method_handler(check, **raw)}
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers((
            grpc.method_handlers_generic_handler("test.Echo", handlers),
            grpc.method_handlers_generic_handler("grpc.health.v1.Health", health),
        ))  # fmt: skip
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop(0)


@pytest.fixture
async def backends() -> AsyncIterator[list[Backend]]:
    found = [Backend(f"b{i}") for i in (1, 2, 3)]
    for b in found:
        await b.start()
    try:
        yield found
    finally:
        for b in found:
            await b.stop()


def doc(backends: list[Backend], **health: Any) -> dict[str, Any]:
    return {
        "listeners": [{"name": "web", "listen": "127.0.0.1:0", "upstream": "api", "http2": True}],
        "upstreams": {"api": {
            "protocol": "grpc",
            "backends": [f"http://127.0.0.1:{b.port}" for b in backends],
            "health_check": {"interval": "200ms", "timeout": "200ms", **health},
        }},
    }  # fmt: skip


def target(server: Any) -> str:
    host, port = server.addresses["web"]
    return f"{host}:{port}"


async def test_unary_calls_are_balanced_per_request(backends: list[Backend]) -> None:
    async with (
        running(doc(backends)) as (server, _),
        grpc.aio.insecure_channel(target(server)) as channel,
    ):
        call = channel.unary_unary("/test.Echo/Unary")
        replies = [await call(b"m%d" % i, timeout=10) for i in range(30)]
    assert {r.split(b":")[1] for r in replies} == {b"m%d" % i for i in range(30)}
    # one client connection, one HTTP/2 connection: every request balanced on its own
    assert [b.calls.count("unary") for b in backends] == [10, 10, 10]


async def test_streaming_calls_of_every_kind(backends: list[Backend]) -> None:
    async with (
        running(doc(backends)) as (server, _),
        grpc.aio.insecure_channel(target(server)) as channel,
    ):
        got = [m async for m in channel.unary_stream("/test.Echo/ServerStream")(b"200")]
        assert [m.split(b":")[0] for m in got] == [b"%d" % i for i in range(200)]
        assert all(len(m) > 1000 for m in got)

        async def pieces() -> AsyncIterator[bytes]:
            for i in range(50):
                yield b"p%d," % i

        joined = await channel.stream_unary("/test.Echo/ClientStream")(pieces(), timeout=10)
        assert joined == b"".join(b"p%d," % i for i in range(50))

        call = channel.stream_stream("/test.Echo/Bidi")()
        for word in (b"one", b"two", b"three"):
            await call.write(word)
            assert await asyncio.wait_for(call.read(), 10) == word.upper()
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK


async def test_the_backends_status_and_message_pass_through_in_trailers(
    backends: list[Backend],
) -> None:
    async with (
        running(doc(backends)) as (server, _),
        grpc.aio.insecure_channel(target(server)) as channel,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await channel.unary_unary("/test.Echo/Fail")(b"x", timeout=10)
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    assert failed.value.details() == "no such thing: x"


async def test_no_healthy_backend_is_unavailable(backends: list[Backend]) -> None:
    for b in backends:
        b.health = NOT_SERVING
    async with (
        running(doc(backends)) as (server, _),
        grpc.aio.insecure_channel(target(server)) as channel,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await channel.unary_unary("/test.Echo/Unary")(b"x", timeout=10)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert failed.value.details() == "No healthy server available"
    assert all(not b.calls for b in backends)


async def test_a_not_serving_backend_is_taken_out_by_the_health_check(
    backends: list[Backend],
) -> None:
    async with running(doc(backends)) as (server, _):
        backends[1].health = NOT_SERVING
        table = lambda: server.membership.table.groups["api"].up  # noqa: E731
        await eventually(lambda: table() == (True, False, True))
        async with grpc.aio.insecure_channel(target(server)) as channel:
            call = channel.unary_unary("/test.Echo/Unary")
            for i in range(10):
                await call(b"%d" % i, timeout=10)
        assert backends[1].calls == []
        backends[1].health = SERVING
        await eventually(lambda: table() == (True, True, True))


async def test_grpc_timeout_is_the_requests_deadline(backends: list[Backend]) -> None:
    """A raw client (grpcio would enforce its own deadline first): poise answers
    DEADLINE_EXCEEDED itself when the backend is slower than grpc-timeout."""
    async with running(doc(backends)) as (server, _):
        client = await H2Client.connect(*server.addresses["web"])
        try:
            reply = await client.request(
                "/test.Echo/Slow", method="POST", timeout=10,
                headers=[(b"content-type", b"application/grpc"), (b"te", b"trailers"),
                         (b"grpc-timeout", b"300m")],
                body=b"\x00\x00\x00\x00\x01x",
            )  # fmt: skip
        finally:
            await client.close()
        assert reply.status == 200
        assert reply.header(b"grpc-status") == b"4"  # DEADLINE_EXCEEDED
        assert reply.header(b"content-type") == b"application/grpc"
