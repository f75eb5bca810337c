"""An HTTP/2 test client over asyncio streams (the ``h2`` package as the client side), for
what curl and httpx cannot do: streams at will, windows held shut, raw frames."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings


@dataclass
class Reply:
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    reset: int | None = None  # the RST_STREAM code, when the stream was reset
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


class H2Client:
    """One HTTP/2 connection. ``auto_ack``: give data back to the window as it arrives."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: Any, auto_ack: bool
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = conn
        self.auto_ack = auto_ack
        self.replies: dict[int, Reply] = {}
        self.trailers: dict[int, list[tuple[bytes, bytes]]] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.closed = asyncio.Event()
        self.received = 0  # bytes read from the socket
        self.window = asyncio.Event()  # set on each WINDOW_UPDATE
        self.task = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None = None,
        window: int | None = None,
        auto_ack: bool = True,
        server_name: str | None = None,
    ) -> H2Client:
        if tls is not None:
            tls.set_alpn_protocols(["h2"])
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=tls, server_hostname=server_name), 10
        )
        if tls is not None:
            assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        if window is not None:
            conn.local_settings = h2.settings.Settings(
                client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window}
            )
        conn.initiate_connection()
        client = cls(reader, writer, conn, auto_ack)
        client.flush()
        return client

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    def start(
        self,
        path: str,
        *,
        method: str = "GET",
        headers: list[tuple[bytes, bytes]] | None = None,
        body: bytes | None = None,
        end: bool = True,
        authority: bytes = b"test.local",
    ) -> int:
        """Open a stream; its Reply is ``self.replies[sid]``."""
        sid = self.conn.get_next_available_stream_id()
        hdrs = [
            (b":method", method.encode()), (b":path", path.encode()), (b":scheme", b"http"),
            (b":authority", authority), *(headers or []),
        ]  # fmt: skip
        self.replies[sid] = Reply()
        self.conn.send_headers(sid, hdrs, end_stream=end and body is None)
        if body is not None:
            self.conn.send_data(sid, body, end_stream=end)
        self.flush()
        return sid

    async def send_body(self, sid: int, data: bytes, *, end: bool = True) -> None:
        """Send ``data`` on ``sid`` as poise's windows allow."""
        view = memoryview(data)
        while True:
            room = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            if room <= 0 and view:
                self.window.clear()
                await asyncio.wait_for(self.window.wait(), 10)
                continue
            piece, view = view[:room], view[room:]
            self.conn.send_data(sid, bytes(piece), end_stream=end and not view)
            self.flush()
            if not view:
                return

    async def request(
        self, path: str, timeout: float = 10.0, body: bytes | None = None, **kw: Any
    ) -> Reply:
        if body is not None and len(body) > 16384:
            sid = self.start(path, end=False, **kw)
            await self.send_body(sid, body)
        else:
            sid = self.start(path, body=body, **kw)
        reply = self.replies[sid]
        await asyncio.wait_for(reply.done.wait(), timeout)
        return reply

    def ack(self, sid: int, n: int) -> None:
        self.conn.acknowledge_received_data(n, sid)
        self.flush()

    async def _read(self) -> None:
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                self.received += len(data)
                for ev in self.conn.receive_data(data):
                    self._event(ev)
                self.flush()
        except (ConnectionError, h2.exceptions.ProtocolError, OSError):
            pass
        finally:
            self.closed.set()
            for reply in self.replies.values():
                reply.done.set()

    def _event(self, ev: Any) -> None:
        if isinstance(ev, h2.events.ResponseReceived):
            r = self.replies[ev.stream_id]
            r.headers = list(ev.headers)
            r.status = int(dict(ev.headers)[b":status"])
        elif isinstance(ev, h2.events.DataReceived):
            r = self.replies[ev.stream_id]
            r.body += ev.data
            if self.auto_ack:
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, h2.events.TrailersReceived):
            self.trailers[ev.stream_id] = list(ev.headers)
        elif isinstance(ev, h2.events.StreamEnded):
            self.replies[ev.stream_id].done.set()
        elif isinstance(ev, h2.events.StreamReset):
            r = self.replies.get(ev.stream_id)
            if r is not None:
                r.reset = int(ev.error_code)
                r.done.set()
        elif isinstance(ev, h2.events.WindowUpdated):
            self.window.set()
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.goaway = ev

    async def close(self) -> None:
        self.task.cancel()
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


@dataclass
class Answer:
    """What ``H2Server``'s handler answers."""

    status: int = 200
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: list[bytes] = field(default_factory=list)  # sent as DATA frames, one each
    trailers: list[tuple[bytes, bytes]] | None = None
    refuse: bool = False  # RST_STREAM REFUSED_STREAM instead of answering
    delay: float = 0.0  # seconds before the answer


@dataclass
class Seen:
    """One request as ``H2Server`` got it."""

    headers: list[tuple[bytes, bytes]]
    body: bytes
    connection: int

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)


class H2Server:
    """A small HTTP/2 backend (h2c, or TLS with ALPN h2) over the ``h2`` package: records
    what it gets and answers what ``handler`` says. ``goaway_after``: send GOAWAY naming
    the last stream taken once this many requests came on a connection."""

    def __init__(self, handler: Any = None, *, tls: ssl.SSLContext | None = None,
                 goaway_after: int = 0, max_streams: int | None = None) -> None:  # fmt: skip
        self.handler = handler or (lambda seen: Answer(body=[seen.body or b"ok"]))
        self.tls = tls
        self.goaway_after = goaway_after
        self.max_streams = max_streams  # announced in SETTINGS
        self.open_now = 0  # streams being answered, over all connections
        self.most_open: dict[int, int] = {}  # by connection: the most streams open at once
        self.seen: list[Seen] = []
        self.connections = 0
        self.writers: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    async def __aenter__(self) -> H2Server:
        if self.tls is not None:
            self.tls.set_alpn_protocols(["h2"])
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):
            writer.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.add(writer)
        number = self.connections
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        if self.max_streams is not None:
            conn.local_settings = h2.settings.Settings(
                client=False,
                initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.max_streams},
            )
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        in_flight: set[int] = set()
        partial: dict[int, tuple[list[tuple[bytes, bytes]], bytearray]] = {}
        taken = 0
        try:
            while data := await reader.read(65536):
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        partial[ev.stream_id] = (list(ev.headers), bytearray())
                        if ev.stream_ended is None:
                            continue
                    elif isinstance(ev, h2.events.DataReceived):
                        partial[ev.stream_id][1].extend(ev.data)
                        conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                        if ev.stream_ended is None:
                            continue
                    else:
                        continue
                    headers, body = partial.pop(ev.stream_id)
                    seen = Seen(headers, bytes(body), number)
                    self.seen.append(seen)
                    taken += 1
                    answer = self.handler(seen)
                    in_flight.add(ev.stream_id)
                    self.most_open[number] = max(self.most_open.get(number, 0), len(in_flight))
                    if answer.delay:
                        asyncio.get_running_loop().call_later(
                            answer.delay, self._later, conn, writer, ev.stream_id, answer,
                            in_flight,
                        )  # fmt: skip
                    else:
                        in_flight.discard(ev.stream_id)
                        self._answer(conn, ev.stream_id, answer)
                    if self.goaway_after and taken == self.goaway_after:
                        conn.close_connection(0, last_stream_id=ev.stream_id)
                writer.write(conn.data_to_send())
        except (ConnectionError, h2.exceptions.ProtocolError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    def _later(self, conn: Any, writer: asyncio.StreamWriter, sid: int, a: Answer,
               in_flight: set[int]) -> None:  # fmt: skip
        in_flight.discard(sid)
        if writer.is_closing():
            return
        self._answer(conn, sid, a)
        writer.write(conn.data_to_send())

    @staticmethod
    def _answer(conn: Any, sid: int, a: Answer) -> None:
        if a.refuse:
            conn.reset_stream(sid, 7)
            return
        head = [(b":status", str(a.status).encode()), *a.headers]
        if not a.body and a.trailers is None:
            conn.send_headers(sid, head, end_stream=True)
            return
        conn.send_headers(sid, head)
        for i, piece in enumerate(a.body):
            last = i == len(a.body) - 1 and a.trailers is None
            conn.send_data(sid, piece, end_stream=last)
        if a.trailers is not None:
            conn.send_headers(sid, a.trailers, end_stream=True)
