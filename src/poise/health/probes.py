"""Active health probes: one HTTP request or TCP connect, with a timeout. No thresholds here:
a probe only reports what it saw, as a ProbeResult with a human reason.

Theory of operation (HTTP)
--------------------------
One request per connection, sent with ``Connection: close`` so the backend may end the body by
closing (RFC 9112 §6.3 item 8: a response without Content-Length or chunked framing is
"close-delimited"). The response is parsed by httptools (llhttp), so framing is understood
rather than guessed: Content-Length, chunked, close-delimited, bodiless 204/304, and interim
1xx responses, which are skipped (RFC 9110 §15.2: a client must accept them before the final
response).

Without a body check the probe stops at the end of the final response head. With one, it
reads the body until the message ends, the connection closes, or ``BODY_LIMIT`` bytes have
arrived (a backend streaming forever must not hold the probe until its timeout), then
searches the first ``BODY_LIMIT`` bytes for the regex. A HEAD response has no body (RFC 9110
§9.3.2), so a body check turns a configured HEAD into GET.
"""

from __future__ import annotations

import asyncio
import re
import time

import httptools

from poise import grpc
from poise.config.model import HealthCheckConfig
from poise.health.state import ProbeResult
from poise.models import Backend
from poise.netreasons import describe_error
from poise.tls.contexts import ClientTls

BODY_LIMIT = 64 * 1024  # body bytes searched by a body check
_READ_SIZE = 64 * 1024
_FRAMING = (b"content-length", b"transfer-encoding")


def status_expected(status: int, expected: tuple[tuple[int, int], ...]) -> bool:
    return any(lo <= status <= hi for lo, hi in expected)


def probe_method(hc: HealthCheckConfig) -> str:
    """The method actually sent: HEAD responses carry no body, so a body check needs GET."""
    return "GET" if hc.body is not None and hc.method == "HEAD" else hc.method


async def probe(
    backend: Backend, hc: HealthCheckConfig, tls: ClientTls | None = None
) -> ProbeResult:
    """Probe ``backend`` once; with ``tls`` (an https:// backend) over TLS, the handshake
    included, so a certificate the proxy would refuse fails the check too."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(hc.timeout):
            if hc.type == "http":
                ok, reason = await _http(backend, hc, tls)
            elif hc.type == "grpc":
                ok, reason = await _grpc(backend, hc, tls)
            else:
                ok, reason = await _tcp(backend, hc, tls)
    except TimeoutError:
        ok, reason = False, f"timeout {hc.timeout:g}s"
    except OSError as exc:
        ok, reason = False, describe_error(exc)
    latency = time.monotonic() - started
    # ``at`` is wall-clock time: it is shown to people (admin API), not used for scheduling.
    return ProbeResult(ok=ok, reason=reason, latency=latency, at=time.time())


async def _open(
    backend: Backend, hc: HealthCheckConfig, tls: ClientTls | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if tls is None:
        return await asyncio.open_connection(backend.host, hc.port or backend.port)
    return await asyncio.open_connection(
        backend.host,
        hc.port or backend.port,
        ssl=tls.context,
        server_hostname=tls.name_for(backend.host),
    )


async def _tcp(backend: Backend, hc: HealthCheckConfig, tls: ClientTls | None) -> tuple[bool, str]:
    """Connect; then, if configured, send ``hc.send`` and read until ``hc.expect`` appears in
    the first ``BODY_LIMIT`` bytes (HAProxy's tcp-check send/expect string)."""
    reader, writer = await _open(backend, hc, tls)
    try:
        if hc.send:
            writer.write(hc.send)
        if hc.expect is None:
            return True, "connected" if tls is None else "connected (tls)"
        seen = b""
        while hc.expect not in seen:
            if len(seen) >= BODY_LIMIT:
                return False, f"expected {hc.expect!r} not in the first {BODY_LIMIT} bytes"
            chunk = await reader.read(_READ_SIZE)
            if not chunk:
                got = f", got {seen[:40]!r}" if seen else ""
                return False, f"closed before {hc.expect!r}{got}"
            seen += chunk
        return True, f"got {hc.expect!r}"
    finally:
        writer.close()


def _request(backend: Backend, hc: HealthCheckConfig) -> bytes:
    lines = [
        f"{probe_method(hc)} {hc.path} HTTP/1.1",
        f"Host: {hc.host or backend.authority}",
        "User-Agent: poise-health",
        "Connection: close",
        *(f"{name}: {value}" for name, value in hc.headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _http(backend: Backend, hc: HealthCheckConfig, tls: ClientTls | None) -> tuple[bool, str]:
    reader, writer = await _open(backend, hc, tls)
    try:
        writer.write(_request(backend, hc))
        response = _Response()
        failure = await response.read(reader, want_body=hc.body is not None)
    finally:
        writer.close()
    if failure is not None:
        return False, failure
    status = response.status
    if not status_expected(status, hc.expected_status):
        return False, f"status {status}"
    if hc.body is not None and not re.search(hc.body.encode("utf-8"), response.body()):
        return False, f"body did not match {hc.body!r}"
    return True, f"status {status}"


class _Response:
    """httptools callbacks collecting the final response's status and first body bytes."""

    __slots__ = ("_chunks", "_parser", "complete", "framed", "head_done", "size", "status")

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._chunks: list[bytes] = []
        self.status = 0
        self.head_done = False  # the final (non-1xx) response head has been parsed
        self.framed = False  # Content-Length or Transfer-Encoding: the close is not the end
        self.complete = False  # the final response ended by its own framing
        self.size = 0  # body bytes kept

    async def read(self, reader: asyncio.StreamReader, *, want_body: bool) -> str | None:
        """Read until the head (and, with ``want_body``, the body) is in; a reason on failure."""
        received = False
        while data := await reader.read(_READ_SIZE):
            received = True
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                pass  # a 101 response: the head is all there is
            except httptools.HttpParserError:
                return "malformed response body" if self.head_done else "not an HTTP response"
            if self.head_done and (not want_body or self.complete or self.size >= BODY_LIMIT):
                return None
        # The peer closed the connection.
        if not received:
            return "connection closed before a response"
        if not self.head_done:
            return "response head cut short"
        if self.framed and not self.complete:
            return "response body cut short"
        return None  # close-delimited body: the close is its end

    def body(self) -> bytes:
        return b"".join(self._chunks)[:BODY_LIMIT]

    # httptools callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.framed = False

    def on_header(self, name: bytes, _value: bytes) -> None:
        if name.lower() in _FRAMING:
            self.framed = True

    def on_headers_complete(self) -> None:
        status = int(self._parser.get_status_code())
        if status >= 200 or status == 101:  # other 1xx are interim: the real one follows
            self.status = status
            self.head_done = True

    def on_body(self, data: bytes) -> None:
        if self.head_done and self.size < BODY_LIMIT:
            self._chunks.append(data)
            self.size += len(data)

    def on_message_complete(self) -> None:
        if self.head_done:
            self.complete = True


async def _grpc(backend: Backend, hc: HealthCheckConfig, tls: ClientTls | None) -> tuple[bool, str]:
    """grpc.health.v1.Health/Check over HTTP/2 (h2c, or TLS with ALPN h2): healthy when
    the answer is grpc-status 0 with SERVING (gRPC's health checking protocol)."""
    from poise.h2.engine import (
        DATA,
        RESET,
        RESPONSE,
        TRAILERS,
        EngineError,
        Settings,
        default_engine,
        make,
    )  # fmt: skip

    reader, writer = await _open(backend, hc, tls)
    try:
        engine = make(default_engine() or "pure", Settings(), client=True)
        scheme = b"https" if tls is not None else b"http"
        headers = [
            (b":method", b"POST"), (b":scheme", scheme),
            (b":authority", (hc.host or backend.authority).encode("latin-1")),
            (b":path", grpc.HEALTH_PATH.encode()), (b"content-type", b"application/grpc"),
            (b"te", b"trailers"), (b"user-agent", b"poise-health"),
        ]  # fmt: skip
        sid = engine.request(headers, False)
        engine.data(sid, grpc.health_request(hc.service), True)
        writer.write(engine.take())
        body = b""
        status: bytes | None = None
        while True:
            data = await reader.read(_READ_SIZE)
            if not data:
                return False, "closed before the answer"
            try:
                events = engine.feed(data)
            except EngineError as exc:
                return False, f"HTTP/2: {exc}"
            writer.write(engine.take())
            for kind, got, payload, end in events:
                if got != sid:
                    continue
                if kind == RESET:
                    return False, f"stream reset ({payload})"
                if kind == DATA:
                    body += payload
                    engine.consumed(sid, len(payload))
                elif kind in (RESPONSE, TRAILERS):
                    for name, value in payload:
                        if name == b":status" and value != b"200":
                            return False, f"status {value.decode()}"
                        if name == b"grpc-status":
                            status = value
                if end or kind == TRAILERS:
                    return _health_verdict(status, body)
    finally:
        writer.close()


def _health_verdict(status: bytes | None, body: bytes) -> tuple[bool, str]:
    if status != b"0":
        return False, f"grpc-status {status.decode() if status else 'missing'}"
    serving = grpc.parse_health_response(body)
    if serving is None:
        return False, "not a HealthCheckResponse"
    if serving != grpc.SERVING:
        names = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}
        return False, names.get(serving, f"status {serving}")
    return True, "SERVING"
