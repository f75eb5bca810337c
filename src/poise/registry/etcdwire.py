"""A lean HTTP/1.1 client for etcd's JSON gateway (and poise nodes' registry APIs):
keep-alive connections over asyncio streams, responses parsed by httptools.

Why not httpx: a unary call through httpx cost about 0.7 ms of Python on the reference box,
more than etcd's own commit of a put on a 3-member cluster (about 0.9 ms), and registry
latency is one or two such calls end to end. This client sends one prebuilt request and
parses one response, and costs a few tens of µs.

What it does: ``POST`` of a JSON body, ``Content-Length`` or chunked responses, keep-alive
(a connection goes back to its endpoint's idle list after a complete response that does not
ask to close), ``https://`` endpoints with the default CA bundle (loaded once, when first
needed), and streams (``open_stream``: the response body as lines, for etcd's watch).
Failures to connect, resets, a response cut short or not HTTP raise ``WireError``; a
deadline raises ``TimeoutError``.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections import deque
from collections.abc import AsyncGenerator
from typing import Any
from urllib.parse import urlsplit

import httptools

__all__ = ["Response", "WireClient", "WireError"]

_READ = 64 * 1024
MAX_RESPONSE = 64 * 1024 * 1024  # bytes: a listing of a large registry, with room


class WireError(Exception):
    """The connection failed or the answer was not a complete HTTP response."""


class Response:
    """One response: status and body (unary), or status then body pieces (streams)."""

    __slots__ = ("_parser", "body", "chunks", "complete", "head_done", "keep", "size", "status")

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.head_done = False
        self.complete = False
        self.keep = False
        self.chunks: list[bytes] = []
        self.size = 0
        self.body = b""

    def feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            raise WireError(f"not a valid HTTP response: {exc}") from exc

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    # httptools callbacks
    def on_headers_complete(self) -> None:
        self.status = int(self._parser.get_status_code())
        self.head_done = self.status >= 200

    def on_body(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > MAX_RESPONSE:
            raise WireError(f"response larger than {MAX_RESPONSE} bytes")
        self.chunks.append(data)

    def on_message_complete(self) -> None:
        if self.head_done:
            self.complete = True
            self.keep = bool(self._parser.should_keep_alive())


class _Stale(Exception):
    """The connection ended before any byte of a response came back."""


class _Endpoint:
    __slots__ = ("host", "hostport", "idle", "port", "tls")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http:// or https:// URL: {url!r}")
        self.tls = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        self.hostport = f"{parts.netloc}"
        self.idle: deque[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = deque()


class WireClient:
    """Connections to any number of endpoints (by base URL); at most ``limit`` unary calls
    in flight at once (a burst queues rather than opening thousands of sockets)."""

    def __init__(self, *, limit: int = 64, headers: dict[str, str] | None = None) -> None:
        self._endpoints: dict[str, _Endpoint] = {}
        self._slots = asyncio.Semaphore(limit)
        self._extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._tls: ssl.SSLContext | None = None
        self._streams: set[asyncio.StreamWriter] = set()
        self.closed = False

    async def post(
        self, base: str, path: str, payload: object, *, headers: dict[str, str] | None = None
    ) -> Response:
        """POST ``payload`` as JSON to ``base + path``; the whole response. Wrap it in a
        timeout: this waits as long as the peer does."""
        ep = self._endpoint(base)
        request = self._request(ep, path, payload, headers)
        async with self._slots:
            while True:
                reused, (reader, writer) = bool(ep.idle), await self._connection(ep)
                ok = False
                try:
                    writer.write(request)
                    response = await self._read(reader)
                    ok = response.complete and response.keep
                    return response
                except _Stale:
                    if not reused:
                        raise WireError("connection closed before a response") from None
                    # an idle connection the peer had closed: once more on a new one (the
                    # request was not answered; etcd's writes here are guarded, so a retry
                    # of one that did land is recognised)
                finally:
                    if ok and not self.closed:
                        ep.idle.append((reader, writer))
                    else:
                        writer.close()

    async def open_stream(
        self, base: str, path: str, payload: object
    ) -> tuple[Response, AsyncGenerator[bytes, None]]:
        """POST and read the response head; then the body's lines, as they come (each
        without its newline). A status other than 200 comes with its whole body and no
        lines. The connection is the stream's own; closing the generator closes it."""
        ep = self._endpoint(base)
        reader, writer = await self._open(ep)
        self._streams.add(writer)
        try:
            writer.write(self._request(ep, path, payload, None))
            response = Response()
            while not response.head_done:
                data = await reader.read(_READ)
                if not data:
                    raise WireError("connection closed before a response")
                response.feed(data)
            if response.status != 200:
                while not response.complete:
                    data = await reader.read(_READ)
                    if not data:
                        break
                    response.feed(data)
                response.body = b"".join(response.chunks)
                self._streams.discard(writer)
                writer.close()
                return response, _no_lines()
        except BaseException:
            self._streams.discard(writer)
            writer.close()
            raise
        return response, self._lines(response, reader, writer)

    async def close(self) -> None:
        self.closed = True
        for ep in self._endpoints.values():
            while ep.idle:
                ep.idle.popleft()[1].close()
        for writer in list(self._streams):
            writer.close()
        self._streams.clear()

    # -- internals -------------------------------------------------------------------------

    def _endpoint(self, base: str) -> _Endpoint:
        ep = self._endpoints.get(base)
        if ep is None:
            ep = self._endpoints[base] = _Endpoint(base)
        return ep

    def _request(
        self, ep: _Endpoint, path: str, payload: object, headers: dict[str, str] | None
    ) -> bytes:
        body = json.dumps(payload, separators=(",", ":")).encode()
        extra = self._extra + "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {ep.hostport}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n"
        )
        return head.encode("latin-1") + body

    async def _connection(self, ep: _Endpoint) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        while ep.idle:
            reader, writer = ep.idle.pop()
            if not reader.at_eof() and not writer.is_closing():
                return reader, writer
            writer.close()  # the peer closed it while idle
        return await self._open(ep)

    async def _open(self, ep: _Endpoint) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.closed:
            raise WireError("client closed")
        tls = None
        if ep.tls:
            if self._tls is None:
                self._tls = ssl.create_default_context()
            tls = self._tls
        try:
            return await asyncio.open_connection(
                ep.host, ep.port, ssl=tls, server_hostname=ep.host if tls else None, limit=_READ
            )
        except OSError as exc:
            raise WireError(f"cannot connect to {ep.hostport}: {exc}") from exc

    @staticmethod
    async def _read(reader: asyncio.StreamReader) -> Response:
        response = Response()
        try:
            while not response.complete:
                data = await reader.read(_READ)
                if not data:
                    if not response.size and not response.status:
                        raise _Stale  # nothing at all came back
                    raise WireError("connection closed before the response ended")
                response.feed(data)
        except ConnectionResetError:
            if not response.size and not response.status:
                raise _Stale from None
            raise WireError("connection reset before the response ended") from None
        except OSError as exc:
            raise WireError(f"connection failed: {exc}") from exc
        response.body = b"".join(response.chunks)
        return response

    async def _lines(
        self, response: Response, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> AsyncGenerator[bytes, None]:
        rest = b""
        try:
            while True:
                if response.chunks:  # (the first may have come with the head)
                    text = rest + b"".join(response.chunks)
                    response.chunks.clear()
                    response.size = 0
                    *lines, rest = text.split(b"\n")
                    for line in lines:
                        yield line
                if response.complete:
                    break
                try:
                    data = await reader.read(_READ)
                except OSError as exc:
                    raise WireError(f"stream failed: {exc}") from exc
                if not data:
                    raise WireError("stream closed by the peer")
                response.feed(data)
            if rest:
                yield rest
        finally:
            self._streams.discard(writer)
            writer.close()


async def _no_lines() -> AsyncGenerator[bytes, None]:
    return
    yield  # pragma: no cover - makes this an async generator
