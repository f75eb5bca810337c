"""Active health probes: one HTTP request or TCP connect, with a timeout. No thresholds here:
a probe only reports what it saw, as a ProbeResult with a human reason."""

from __future__ import annotations

import asyncio
import re
import time

from poise.config.model import HealthCheckConfig
from poise.health.state import ProbeResult
from poise.models import Backend

_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: [^\r\n]*)?\r?\n")


def status_expected(status: int, expected: tuple[tuple[int, int], ...]) -> bool:
    return any(lo <= status <= hi for lo, hi in expected)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connect refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "connection closed before a response"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return type(exc).__name__


async def probe(backend: Backend, hc: HealthCheckConfig) -> ProbeResult:
    started = time.monotonic()
    try:
        async with asyncio.timeout(hc.timeout):
            ok, reason = await (_http(backend, hc) if hc.type == "http" else _tcp(backend))
    except TimeoutError:
        ok, reason = False, f"timeout {hc.timeout:g}s"
    except (OSError, asyncio.IncompleteReadError) as exc:
        ok, reason = False, _describe(exc)
    finished = time.monotonic()
    return ProbeResult(ok=ok, reason=reason, latency=finished - started, at=finished)


async def _tcp(backend: Backend) -> tuple[bool, str]:
    _, writer = await asyncio.open_connection(backend.host, backend.port)
    writer.close()
    return True, "connected"


async def _http(backend: Backend, hc: HealthCheckConfig) -> tuple[bool, str]:
    reader, writer = await asyncio.open_connection(backend.host, backend.port)
    try:
        host = hc.host or backend.authority
        writer.write(
            f"{hc.method} {hc.path} HTTP/1.1\r\nHost: {host}\r\n"
            "User-Agent: poise-health\r\nConnection: close\r\n\r\n".encode("latin-1")
        )
        line = await reader.readuntil(b"\n")
    finally:
        writer.close()
    m = _STATUS_LINE.fullmatch(line)
    if m is None:
        return False, "not an HTTP response"
    status = int(m.group(1))
    return status_expected(status, hc.expected_status), f"status {status}"
