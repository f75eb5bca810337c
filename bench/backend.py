#!/usr/bin/env python3
"""Tiny, fast HTTP/1.1 keep-alive backend for the benchmarks (used when nginx is absent).

    python bench/backend.py --port 5001 [--port 5002 ...] [--host 127.0.0.1]

Routes (anything else is 404, methods other than GET/HEAD are 405):

* ``GET /``   -> 200, 16-byte body ``0123456789abcdef``
* ``GET /1m`` -> 200, 1 MiB body (1048576 bytes)
* ``GET /vary`` -> as ``/``, plus an ``X-Request-Id`` field that differs in every response
* ``HEAD`` of either -> the same head, no body (the load balancer health-checks ``HEAD /``)

Every response carries Content-Length. Requests may arrive split across reads or pipelined;
request bodies announced by Content-Length are skipped. ``Transfer-Encoding`` request bodies
are refused (501, connection closed): wrk and health checks never send them.

Runs on uvloop when it is installed (it is a poise dependency), plain asyncio otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable
from typing import cast

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a poise dependency
    uvloop = None  # type: ignore[assignment]

SMALL_BODY = b"0123456789abcdef"
LARGE_BODY = (b"0123456789abcdef" * 65536)[: 1 << 20]
MAX_HEAD = 64 * 1024


def _response(status: str, body: bytes, *, keep_alive: bool = True) -> tuple[bytes, bytes]:
    """Return (GET response, HEAD response) as ready-to-write bytes."""
    head = (
        f"HTTP/1.1 {status}\r\n"
        "Server: poise-bench-backend\r\n"
        "Content-Type: application/octet-stream\r\n"
        f"Content-Length: {len(body)}\r\n"
        + ("" if keep_alive else "Connection: close\r\n")
        + "\r\n"
    ).encode("latin-1")
    return head + body, head


_ROUTES: dict[bytes, tuple[bytes, bytes]] = {
    b"/": _response("200 OK", SMALL_BODY),
    b"/1m": _response("200 OK", LARGE_BODY),
}
_ROUTES_CLOSE: dict[bytes, tuple[bytes, bytes]] = {
    b"/": _response("200 OK", SMALL_BODY, keep_alive=False),
    b"/1m": _response("200 OK", LARGE_BODY, keep_alive=False),
}
_NOT_FOUND = _response("404 Not Found", b"not found\n")
_NOT_FOUND_CLOSE = _response("404 Not Found", b"not found\n", keep_alive=False)
_BAD_REQUEST = _response("400 Bad Request", b"bad request\n", keep_alive=False)[0]
_TOO_LARGE = _response("431 Request Header Fields Too Large", b"too large\n", keep_alive=False)[0]
_NOT_ALLOWED = _response("405 Method Not Allowed", b"method not allowed\n", keep_alive=False)[0]
_NOT_IMPLEMENTED = _response("501 Not Implemented", b"not implemented\n", keep_alive=False)[0]


_ROUTES[b"/vary"], _ROUTES_CLOSE[b"/vary"] = _ROUTES[b"/"], _ROUTES_CLOSE[b"/"]
_served = 0


def _varied(resp: tuple[bytes, bytes]) -> tuple[bytes, bytes]:
    """``resp`` with a request id of its own (as nginx's ``add_header ... $request_id``)."""
    global _served
    _served += 1
    field = b"\r\nX-Request-Id: %032x" % _served
    i = resp[1].index(b"\r\n")
    return resp[0][:i] + field + resp[0][i:], resp[1][:i] + field + resp[1][i:]


def _header(headers: bytes, name: bytes) -> bytes | None:
    """Value of the first header ``name`` (lower-case, with leading CRLF and colon) or None."""
    start = headers.find(name)
    if start < 0:
        return None
    start += len(name)
    return headers[start : headers.find(b"\r\n", start)].strip()


class BackendProtocol(asyncio.Protocol):
    """One client connection: parse request heads from a buffer, answer in order."""

    __slots__ = ("buf", "closing", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they implement its interface
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.buf = b""

    # Flow control: with a 1 MiB body the write buffer fills; stop reading (and so stop
    # queueing more responses for pipelined requests) until the kernel has drained it.
    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.closing:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or self.closing:
            return
        buf = self.buf + data if self.buf else data
        out: list[bytes] = []
        pos = 0
        n = len(buf)
        while pos < n:
            end = buf.find(b"\r\n\r\n", pos)
            if end < 0:
                if n - pos > MAX_HEAD:
                    out.append(_TOO_LARGE)
                    self.closing = True
                break
            line_end = buf.find(b"\r\n", pos, end + 2)
            parts = buf[pos:line_end].split(b" ")
            if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
                out.append(_BAD_REQUEST)
                self.closing = True
                break
            method, target, version = parts
            keep_alive = version != b"HTTP/1.0"
            body_len = 0
            if line_end < end:
                # "\r\nname: value\r\n..." so every header name follows a CRLF
                headers = buf[line_end : end + 2].lower()
                conn = _header(headers, b"\r\nconnection:")
                if conn is not None:
                    if b"close" in conn:
                        keep_alive = False
                    elif b"keep-alive" in conn:
                        keep_alive = True
                if _header(headers, b"\r\ntransfer-encoding:") is not None:
                    out.append(_NOT_IMPLEMENTED)
                    self.closing = True
                    break
                length = _header(headers, b"\r\ncontent-length:")
                if length is not None:
                    try:
                        body_len = int(length)
                    except ValueError:
                        body_len = -1
                    if body_len < 0:
                        out.append(_BAD_REQUEST)
                        self.closing = True
                        break
            total = end + 4 + body_len
            if total > n:
                break  # the request body has not fully arrived yet
            pos = total
            q = target.find(b"?")
            if q >= 0:
                target = target[:q]
            routes = _ROUTES if keep_alive else _ROUTES_CLOSE
            resp = routes.get(target) or (_NOT_FOUND if keep_alive else _NOT_FOUND_CLOSE)
            if target == b"/vary":
                resp = _varied(resp)
            if method == b"GET":
                out.append(resp[0])
            elif method == b"HEAD":
                out.append(resp[1])
            else:
                out.append(_NOT_ALLOWED)
                self.closing = True
                break
            if not keep_alive:
                self.closing = True
                break
        self.buf = b"" if self.closing else buf[pos:]
        if out:
            transport.write(out[0] if len(out) == 1 else b"".join(out))
        if self.closing:
            transport.close()  # flushes pending writes first


async def serve(host: str, ports: list[int]) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()

    def _stop() -> None:
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, _stop)
    factory: Callable[[], asyncio.Protocol] = BackendProtocol
    servers = [
        await loop.create_server(factory, host, port, reuse_address=True, backlog=4096)
        for port in ports
    ]
    print(f"backend listening on {host} ports {ports}", file=sys.stderr, flush=True)
    try:
        await stop
    finally:
        for server in servers:
            server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--port", type=int, action="append", required=True, help="port to serve (repeatable)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    args = parser.parse_args(argv)
    loop_factory = uvloop.new_event_loop if uvloop is not None else None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
