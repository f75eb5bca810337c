"""TCP probes with send/expect against real loopback servers."""

from __future__ import annotations

from poise.config.model import HealthCheckConfig
from poise.health.probes import BODY_LIMIT, probe
from poise.models import Backend
from poise.testing import ScriptedBackend, TcpEcho


def backend(port: int) -> Backend:
    return Backend(id=f"127.0.0.1:{port}", scheme="tcp", host="127.0.0.1", port=port,
                   authority=f"127.0.0.1:{port}")  # fmt: skip


def tcp(**kw: object) -> HealthCheckConfig:
    return HealthCheckConfig(type="tcp", timeout=0.5, **kw)  # type: ignore[arg-type]


async def test_send_then_expect_a_substring() -> None:
    def pong(received: bytes) -> bytes | None:
        return b"+PONG\r\n" if received.endswith(b"PING\r\n") else None

    async with ScriptedBackend(pong) as s:
        result = await probe(backend(s.port), tcp(send=b"PING\r\n", expect=b"PONG"))
        assert (result.ok, result.reason) == (True, "got b'PONG'")
        assert s.received == [b"PING\r\n"]


async def test_expect_a_banner_without_sending() -> None:
    async with TcpEcho(banner=b"220 mail.example ESMTP\r\n") as e:
        assert (await probe(backend(e.port), tcp(expect=b"220 "))).ok


async def test_expect_arriving_in_pieces() -> None:
    async with TcpEcho() as e:
        result = await probe(backend(e.port), tcp(send=b"abcdef" * 1000, expect=b"fabcdef"))
        assert result.ok


async def test_wrong_answer_and_close() -> None:
    async with ScriptedBackend(b"-ERR\r\n", close_after_reply=True) as s:
        result = await probe(backend(s.port), tcp(send=b"PING\r\n\r\n", expect=b"+PONG"))
        assert (result.ok, result.reason) == (False, "closed before b'+PONG', got b'-ERR\\r\\n'")


async def test_silence_is_a_timeout() -> None:
    async with TcpEcho() as e:
        result = await probe(backend(e.port), tcp(expect=b"hello"))
        assert (result.ok, result.reason) == (False, "timeout 0.5s")


async def test_expect_must_come_within_the_limit() -> None:
    async with TcpEcho(banner=b"x" * (BODY_LIMIT + 10)) as e:
        result = await probe(backend(e.port), tcp(expect=b"never"))
        assert not result.ok
        assert "not in the first" in result.reason


async def test_plain_connect_sends_nothing() -> None:
    async with TcpEcho() as e:
        result = await probe(backend(e.port), tcp())
        assert (result.ok, result.reason) == (True, "connected")
        await e.wait_until(lambda: e.connections_accepted == 1 and e.open_connections == 0)
        assert e.received == 0
