"""`HttpBackend`: a small, real HTTP/1.1 server to stand behind poise in tests and demos.

It listens on 127.0.0.1 (port 0 by default), records every request it receives
(`requests`), and answers through a `Handler` coroutine that returns a `Response`.
It speaks enough HTTP/1.1 to exercise a proxy honestly: keep-alive, pipelining,
Content-Length and chunked request bodies, chunked streaming responses, HEAD,
`Expect: 100-continue`, 400 on malformed input, 500 when the handler raises
(the exception is kept in `errors`). `stop()` behaves like a killed process and
`start()` brings it back on the same port.

Parsing is done by httptools; the server itself is plain asyncio streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import httptools

from poise.testing._server import _TcpServer

__all__ = ["Handler", "HttpBackend", "RecordedRequest", "Response", "echo_handler"]

_READ_SIZE = 256 * 1024


@dataclass
class RecordedRequest:
    """One request as the backend received it."""

    method: str  # "GET"
    target: str  # "/x?y=1", exactly as sent
    version: str  # "1.1"
    headers: list[tuple[str, str]]  # as received, order kept (latin-1 decoded)
    body: bytes  # decoded from Content-Length or chunked framing
    connection_id: int  # which TCP connection carried it (1, 2, ... per backend)
    trailers: list[tuple[str, str]] = field(default_factory=list)  # chunked trailers

    def header(self, name: str) -> str | None:
        """The first header called `name` (case-insensitive), or None."""
        wanted = name.lower()
        return next((v for k, v in self.headers if k.lower() == wanted), None)


@dataclass
class Response:
    """What a handler answers.

    Framing: a bytes body gets a Content-Length unless the headers already carry
    Content-Length or Transfer-Encoding (then the bytes are sent as they are). An
    async-iterator body is sent chunked unless a Content-Length header is given
    (then the chunks are sent raw); to an HTTP/1.0 client it is sent unframed and
    the connection is closed after it. A `Connection: close` header closes the
    connection after the response. Status 101 turns the connection into a byte echo.
    """

    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | AsyncIterator[bytes] = b""
    delay: float = 0.0  # seconds to wait before the response head is sent


Handler = Callable[[RecordedRequest], Awaitable[Response]]


async def echo_handler(request: RecordedRequest) -> Response:
    """A ready `Handler`: body = the request body; `X-Request-Headers` = JSON of its headers."""
    return Response(
        headers=[
            ("Content-Type", "application/octet-stream"),
            ("X-Request-Headers", json.dumps(request.headers)),
        ],
        body=request.body,
    )


class _RequestParser:
    """httptools callbacks; completed requests queue up in `ready` in wire order."""

    def __init__(self, connection_id: int, on_expect_continue: Callable[[], None]) -> None:
        self._connection_id = connection_id
        self._on_expect_continue = on_expect_continue
        self.ready: deque[tuple[RecordedRequest, bool]] = deque()  # (request, keep_alive)
        self.error: str | None = None  # malformed input
        self.upgrade_rest: bytes | None = None  # bytes after an Upgrade/CONNECT request
        self.closing = False  # a request without keep-alive completed: ignore what follows
        self.reset()

    def reset(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self.upgrade_rest = None
        self._begin()

    def _begin(self) -> None:
        self._url: list[bytes] = []
        self._headers: list[tuple[str, str]] = []
        self._trailers: list[tuple[str, str]] = []
        self._body: list[bytes] = []
        self._in_body = False

    def feed(self, data: bytes) -> None:
        if self.closing or self.error is not None or self.upgrade_rest is not None:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.upgrade_rest = data[exc.args[0] :]
        except httptools.HttpParserError as exc:
            if not self.closing:
                self.error = str(exc) or type(exc).__name__

    # httptools callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._begin()

    def on_url(self, url: bytes) -> None:
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        pair = (name.decode("latin-1"), value.decode("latin-1"))
        (self._trailers if self._in_body else self._headers).append(pair)

    def on_headers_complete(self) -> None:
        self._in_body = True
        expect = next((v for k, v in self._headers if k.lower() == "expect"), "")
        version = self._parser.get_http_version()
        if expect.lower() == "100-continue" and version == "1.1" and not self.ready:
            self._on_expect_continue()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        keep_alive = bool(self._parser.should_keep_alive())
        request = RecordedRequest(
            method=self._parser.get_method().decode("ascii"),
            target=b"".join(self._url).decode("latin-1"),
            version=str(self._parser.get_http_version()),
            headers=self._headers,
            body=b"".join(self._body),
            connection_id=self._connection_id,
            trailers=self._trailers,
        )
        self.ready.append((request, keep_alive))
        if not keep_alive:
            self.closing = True


class HttpBackend(_TcpServer):
    """A real HTTP/1.1 server on 127.0.0.1 that records requests; see the module doc."""

    def __init__(
        self,
        name: str = "backend",
        handler: Handler | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(name, host, port, ssl_context)
        self.handler: Handler = handler if handler is not None else self._default_handler
        self.requests: list[RecordedRequest] = []
        self.bad_requests = 0

    async def _default_handler(self, request: RecordedRequest) -> Response:
        return Response(headers=[("Content-Type", "text/plain")], body=f"{self.name}\n".encode())

    def statistics(self) -> dict[str, int]:
        return {
            **super().statistics(),
            "requests": len(self.requests),
            "bad_requests": self.bad_requests,
        }

    async def wait_for_requests(self, count: int, timeout: float = 5.0) -> None:
        """Wait until at least `count` requests have been received in total."""
        await self.wait_until(lambda: len(self.requests) >= count, timeout)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return (
            f"<HttpBackend {self.name!r} {self.url} {state} requests={len(self.requests)}"
            f" connections={self.connections_accepted} open={self.open_connections}"
            f" errors={len(self.errors)}>"
        )

    # -- per connection ----------------------------------------------------------------

    async def _handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, connection_id: int
    ) -> None:
        parser = _RequestParser(
            connection_id, lambda: writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        )
        data = await reader.read(_READ_SIZE)
        while data:
            parser.feed(data)
            status = 0
            while parser.ready:
                request, keep_alive = parser.ready.popleft()
                self.requests.append(request)
                self._notify()
                status, keep_alive = await self._respond(writer, request, keep_alive)
                if not keep_alive:
                    return
            if parser.error is not None:
                self.bad_requests += 1
                body = f"bad request: {parser.error}\n".encode()
                writer.write(
                    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\n"
                    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
                )
                await writer.drain()
                return
            if parser.upgrade_rest is not None:
                rest = parser.upgrade_rest
                if status == 101:
                    await self._echo(reader, writer, rest)
                    return
                parser.reset()  # upgrade declined: go on with HTTP/1.1
                if rest:
                    data = rest
                    continue
            data = await reader.read(_READ_SIZE)

    async def _respond(
        self, writer: asyncio.StreamWriter, request: RecordedRequest, keep_alive: bool
    ) -> tuple[int, bool]:
        """Send the handler's response; returns (status, keep the connection open)."""
        try:
            response = await self.handler(request)
            if not isinstance(response, Response):
                raise TypeError(f"handler returned {type(response).__name__}, not Response")
        except Exception as exc:
            self.errors.append(exc)
            self._notify()
            response = Response(
                500, [("Content-Type", "text/plain")], f"{type(exc).__name__}: {exc}\n".encode()
            )
        if response.delay > 0:
            await asyncio.sleep(response.delay)
        if writer.transport.is_closing():  # dropped meanwhile, e.g. by stop()
            return 0, False

        status, body = response.status, response.body
        headers, send_body, chunked, keep_alive = _framing(response, request, keep_alive)
        head = [f"HTTP/1.1 {status} {_reason(status)}\r\n"]
        head += [f"{name}: {value}\r\n" for name, value in headers]
        head.append("\r\n")
        writer.write("".join(head).encode("latin-1"))

        if isinstance(body, bytes | bytearray | memoryview):
            if send_body and body:
                writer.write(body)
        elif not send_body:
            await _aclose(body)
        elif not await self._stream(writer, body, chunked):
            return status, False
        await writer.drain()
        return status, keep_alive

    async def _stream(
        self, writer: asyncio.StreamWriter, body: AsyncIterator[bytes], chunked: bool
    ) -> bool:
        """Send an async-iterator body; False if it raised (the connection is then aborted).

        A client going away shows as ConnectionError from drain(): not the body's fault,
        so it propagates and is not recorded in `errors`.
        """
        try:
            while True:
                try:
                    chunk = await anext(body)
                except StopAsyncIteration:
                    break
                except Exception as exc:
                    self.errors.append(exc)
                    self._notify()
                    writer.transport.abort()  # the head is out: only a cut body can signal it
                    return False
                if not chunk:
                    continue  # an empty chunk would end a chunked body
                if chunked:
                    writer.writelines([b"%x\r\n" % len(chunk), chunk, b"\r\n"])
                else:
                    writer.write(chunk)
                await writer.drain()
        finally:
            await _aclose(body)
        if chunked:
            writer.write(b"0\r\n\r\n")
        return True

    @staticmethod
    async def _echo(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rest: bytes
    ) -> None:
        """After a 101 response: send back every byte received until the peer closes."""
        data = rest
        while True:
            if data:
                writer.write(data)
                await writer.drain()
            data = await reader.read(_READ_SIZE)
            if not data:
                return


def _framing(
    response: Response, request: RecordedRequest, keep_alive: bool
) -> tuple[list[tuple[str, str]], bool, bool, bool]:
    """The head fields to send with ``response`` (its own, and the framing it leaves out),
    whether to send its body, whether chunked, and whether to keep the connection open."""
    status, body = response.status, response.body
    headers = list(response.headers)
    names = {name.lower() for name, _ in headers}
    bodiless = status < 200 or status in (204, 304)
    send_body = request.method != "HEAD" and not bodiless
    chunked = False
    if isinstance(body, bytes | bytearray | memoryview):
        if not bodiless and not names & {"content-length", "transfer-encoding"}:
            headers.append(("Content-Length", str(len(body))))
    elif not bodiless and "content-length" not in names:
        if request.version == "1.1":
            chunked = True
            if "transfer-encoding" not in names:
                headers.append(("Transfer-Encoding", "chunked"))
        else:
            keep_alive = False  # HTTP/1.0: the end of the body is the end of the connection
    connection = ",".join(v for k, v in headers if k.lower() == "connection").lower()
    if "close" in connection:
        keep_alive = False
    if status != 101 and "connection" not in names:
        if not keep_alive:
            headers.append(("Connection", "close"))
        elif request.version == "1.0":
            headers.append(("Connection", "keep-alive"))
    return headers, send_body, chunked, keep_alive


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


async def _aclose(body: AsyncIterator[bytes]) -> None:
    """Finalise an async generator body now rather than at garbage collection."""
    aclose = getattr(body, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()
