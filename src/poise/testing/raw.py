"""Raw-TCP test doubles for protocol edge cases that a correct HTTP server cannot produce.

`ScriptedBackend` records every byte each connection sends it and answers with
whatever bytes a script says (a truncated head, a bogus Content-Length, a response
split at an awkward place, nothing at all...). `raw_request()` is the matching
client: it sends exact bytes and returns exactly what came back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import httptools

from poise.testing._server import _TcpServer

__all__ = ["Script", "ScriptedBackend", "raw_request"]

Script = Callable[[bytes], bytes | None]


class ScriptedBackend(_TcpServer):
    """A TCP server on 127.0.0.1 that replies according to a script.

    `reply` is either

    * bytes: sent once per connection, as soon as the bytes received on it contain a
      blank line (``b"\\r\\n\\r\\n"``, the end of an HTTP request head); or
    * a callable, called after every read with all the bytes received so far on that
      connection. It returns the bytes to send now, or None to wait for more. An
      empty ``b""`` sends nothing but still counts as a reply. If it raises, the
      exception is kept in `errors` and the connection is closed.

    With `close_after_reply`, the connection is closed (FIN) after the first reply.
    A client closing its side ends the connection too.
    """

    def __init__(
        self,
        reply: bytes | Script,
        *,
        close_after_reply: bool = False,
        name: str = "scripted",
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(name, host, port)
        self.reply = reply
        self.close_after_reply = close_after_reply
        self._received: list[bytearray] = []

    @property
    def received(self) -> list[bytes]:
        """Bytes received, one entry per connection in accept order (a snapshot)."""
        return [bytes(buffer) for buffer in self._received]

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return (
            f"<ScriptedBackend {self.name!r} {self.url} {state}"
            f" connections={self.connections_accepted} open={self.open_connections}"
            f" received={sum(map(len, self._received))}B errors={len(self.errors)}>"
        )

    async def _handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, connection_id: int
    ) -> None:
        buffer = bytearray()
        self._received.append(buffer)
        replied = False
        while data := await reader.read(65536):
            buffer += data
            self._notify()
            if isinstance(self.reply, bytes):
                out = None if replied or b"\r\n\r\n" not in buffer else self.reply
            else:
                out = self.reply(bytes(buffer))
            if out is None:
                continue
            replied = True
            if out:
                writer.write(out)
                await writer.drain()
            if self.close_after_reply:
                return


class _ResponseEnd:
    """Tells when a complete HTTP/1.x response (a final one, not 1xx) has arrived."""

    def __init__(self, head_request: bool) -> None:
        self.done = False
        self._head_request = head_request
        self._broken = False
        self._parser = httptools.HttpResponseParser(self)

    def feed(self, data: bytes) -> bool:
        if not (self.done or self._broken):
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                self.done = True  # 101: what follows is another protocol
            except httptools.HttpParserError:
                self._broken = True  # not HTTP: read until close or timeout
        return self.done

    def _final(self) -> bool:
        status = int(self._parser.get_status_code())
        return status >= 200 or status == 101

    def on_headers_complete(self) -> None:
        if self._head_request and self._final():
            self.done = True

    def on_message_complete(self) -> None:
        if self._final():
            self.done = True


async def raw_request(
    host: str,
    port: int,
    data: bytes,
    *,
    timeout: float = 5.0,
    read_until_close: bool = True,
) -> bytes:
    """Open a connection, send `data` as is, and return every byte received.

    Reads until the server closes the connection, or, with ``read_until_close=False``,
    until one complete final HTTP response has arrived (framed by Content-Length or
    chunked encoding; for a request starting with ``HEAD `` the head is enough). It
    returns what it has when `timeout` (which covers the whole exchange) expires or
    the connection is reset. Raises OSError if the connection cannot be made and
    TimeoutError if it cannot be made in time.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with asyncio.timeout_at(deadline):
        reader, writer = await asyncio.open_connection(host, port)
    chunks: list[bytes] = []
    detector = None if read_until_close else _ResponseEnd(data.startswith(b"HEAD "))
    try:
        async with asyncio.timeout_at(deadline):
            with contextlib.suppress(ConnectionError):
                writer.write(data)
                await writer.drain()
            while chunk := await reader.read(65536):
                chunks.append(chunk)
                if detector is not None and detector.feed(chunk):
                    break
    except (TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return b"".join(chunks)
