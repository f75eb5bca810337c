"""The HTTP/2 framing engine of a connection: frames and HPACK in, events out; responses
(or, in the client role, requests) in, bytes out. No I/O: the connection does that
(h2/front.py towards clients; h2/upstream.py and the gRPC health probe towards backends,
which use the client role: ``request``, and RESPONSE and GOAWAY events).

Two engines answer the same calls:

* ``NativeEngine``, over the PyPI package ``ngh2`` (libnghttp2, C): the default;
* ``PureEngine``, over the pure-Python ``h2`` package: its twin, used where ngh2 is not
  installed (or when ``POISE_H2_ENGINE=pure``), and run by every HTTP/2 test beside the
  native one (the ``h2_engine`` fixture).

What both guarantee to the connection:

* ``feed(data)`` returns the events of those bytes as tuples ``(kind, stream id, payload,
  end of stream)``: ``REQUEST`` (payload: the header list as (name, value) pairs), ``DATA``
  (the bytes), ``TRAILERS`` (the trailer list; always the end of the stream), ``RESET``
  (the client reset the stream: the error code), ``WINDOW`` (the client opened a window:
  queued response data may go). A connection error raises ``EngineError``; what the engine
  still has to say (a GOAWAY) is then in ``take()``.
* Response data is queued whatever the client's flow-control window: ``queued(sid)`` says
  how much of a stream's is still waiting, and the connection stops reading the stream's
  backend past a bound (backpressure per stream).
* Request data is acknowledged (``consumed``) only when poise has passed it on: the window
  the client sees is what poise can hold, never more (manual flow control).
* Limits against abuse, the same on both: at most ``max_continuations`` CONTINUATION
  frames per header block (CVE-2024 "CONTINUATION flood"), RST_STREAM from the client at a
  bounded rate (CVE-2023-44487 "rapid reset": a token bucket, then GOAWAY
  ENHANCE_YOUR_CALM), a decoded header list of at most ``max_header_list_size`` bytes
  (HPACK bombs).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Final

NO_ERROR: Final = 0x0
PROTOCOL_ERROR: Final = 0x1
INTERNAL_ERROR: Final = 0x2
REFUSED_STREAM: Final = 0x7
CANCEL: Final = 0x8
ENHANCE_YOUR_CALM: Final = 0xB

# event kinds
REQUEST: Final = 1
DATA: Final = 2
TRAILERS: Final = 3
RESET: Final = 4
WINDOW: Final = 5
RESPONSE: Final = 6  # (client role) a response head: payload the header list
GOAWAY: Final = 7  # (client role) the server's GOAWAY: payload its last stream id

Event = tuple[int, int, Any, bool]
Headers = list[tuple[bytes, bytes]]

MAX_CONTINUATIONS: Final = 8
RESET_BURST: Final = 1000  # client resets taken at once ...
RESET_RATE: Final = 33.0  # ... and per second after that (nghttp2's defaults)


CONTROL_BURST: Final = 1000  # PING and SETTINGS frames from a client taken at once ...
CONTROL_RATE: Final = 100.0  # ... and per second after that


class Bucket:
    """A token bucket: ``take`` is False once the client has sent more than ``burst``
    frames of a kind beyond ``rate`` per second."""

    __slots__ = ("burst", "clock", "rate", "t", "tokens")

    def __init__(self, burst: int, rate: float, clock: Any) -> None:
        self.burst = float(burst)
        self.rate = rate
        self.clock = clock
        self.tokens = float(burst)
        self.t = clock()

    def take(self) -> bool:
        now = self.clock()
        tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if tokens < 1:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1
        return True


def goaway_frame(code: int, last_id: int) -> bytes:
    """A GOAWAY frame (RFC 9113 §6.8), for when the engine itself can say nothing more."""
    return (
        b"\x00\x00\x08\x07\x00\x00\x00\x00\x00"
        + (last_id & 0x7FFFFFFF).to_bytes(4, "big")
        + code.to_bytes(4, "big")
    )


class EngineError(Exception):
    """The client broke HTTP/2 on the connection (or exceeded a limit): it ends."""

    def __init__(self, message: str, code: int = PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Settings:
    """What poise announces in its SETTINGS (config: a listener's ``http2``)."""

    max_concurrent_streams: int = 128
    initial_window_size: int = 256 * 1024  # per stream, for request bodies
    connection_window: int = 1024 * 1024  # the connection's receive window
    max_frame_size: int = 16384
    max_header_list_size: int = 65536
    max_continuations: int = MAX_CONTINUATIONS


def available() -> tuple[str, ...]:
    """The engines that can run here, the default first."""
    found = []
    try:
        import ngh2  # noqa: F401
    except ImportError:
        pass
    else:
        found.append("native")
    try:
        import h2  # noqa: F401
    except ImportError:
        pass
    else:
        found.append("pure")
    return tuple(found)


def default_engine() -> str | None:
    """The engine connections get: ``POISE_H2_ENGINE`` when set and available, else the
    first available (None: HTTP/2 cannot be served here)."""
    have = available()
    wanted = os.environ.get("POISE_H2_ENGINE", "")
    if wanted in have:
        return wanted
    return have[0] if have else None


def make(kind: str, settings: Settings, *, client: bool = False) -> NativeEngine | PureEngine:
    """An engine of ``kind``; ``client``: poise's side of a connection to a backend
    (h2/upstream.py), which sends requests and gets RESPONSE and GOAWAY events."""
    if kind == "native":
        return NativeEngine(settings, client=client)
    return PureEngine(settings, client=client)


class NativeEngine:
    """libnghttp2 through ngh2 (its own limits do the work the docstring lists)."""

    __slots__ = ("conn", "control", "dead", "ev", "last")

    name = "native"

    def __init__(self, settings: Settings, clock: Any = None, *, client: bool = False) -> None:
        import time

        import ngh2

        self.dead = False  # nghttp2 refused the connection: it says nothing more
        self.last = b""  # what poise says instead (a GOAWAY)
        self.control = Bucket(CONTROL_BURST, CONTROL_RATE, clock or time.monotonic)
        self.ev: Any = ngh2
        cfg = ngh2.Configuration(
            auto_window_update=False,
            peer_max_concurrent_streams=100,
            max_continuations=settings.max_continuations,
            stream_reset_rate_limit=(RESET_BURST, int(RESET_RATE)),
            max_inbound_header_list_size=settings.max_header_list_size,
        )
        role = ngh2.Role.CLIENT if client else ngh2.Role.SERVER
        self.conn = conn = ngh2.Connection(role, cfg)
        S = ngh2.Setting
        ours = {
            S.INITIAL_WINDOW_SIZE: settings.initial_window_size,
            S.MAX_FRAME_SIZE: settings.max_frame_size,
            S.MAX_HEADER_LIST_SIZE: settings.max_header_list_size,
            S.ENABLE_PUSH: 0,
            S.NO_RFC7540_PRIORITIES: 1,
        }
        if not client:
            ours[S.MAX_CONCURRENT_STREAMS] = settings.max_concurrent_streams
        conn.initiate_connection(ours)
        extra = settings.connection_window - 65535
        if extra > 0:
            conn.set_local_window_size(settings.connection_window)

    def feed(self, data: bytes) -> list[Event]:
        ng = self.ev
        if self.dead:
            return []
        try:
            self.conn.receive_data(data)
        except ng.DenialOfServiceError as exc:
            self.dead = True
            raise EngineError(str(exc), ENHANCE_YOUR_CALM) from None
        except ng.NGH2Error as exc:
            raise EngineError(str(exc)) from None
        out: list[Event] = []
        events: list[Any] = self.conn.events()
        for e in events:
            t = type(e)
            if t is ng.DataReceived:
                out.append((DATA, e.stream_id, e.data, e.end_stream))
            elif t is ng.RequestReceived:
                out.append((REQUEST, e.stream_id, e.headers, e.end_stream))
            elif t is ng.StreamReset:
                out.append((RESET, e.stream_id, e.error_code, True))
            elif t is ng.TrailersReceived:
                out.append((TRAILERS, e.stream_id, e.headers, True))
            elif t is ng.WindowUpdated:
                out.append((WINDOW, e.stream_id, 0, False))
            elif t is ng.ResponseReceived:
                out.append((RESPONSE, e.stream_id, e.headers, e.end_stream))
            elif t is ng.GoAwayReceived:
                out.append((GOAWAY, 0, e.last_stream_id, False))
            elif t is ng.PingReceived or t is ng.SettingsReceived:
                if not self.control.take():
                    raise EngineError("too many PING or SETTINGS frames", ENHANCE_YOUR_CALM)
            elif t is ng.ConnectionClosed and e.error_code != NO_ERROR:
                raise EngineError("the connection ended with an error", e.error_code)
        return out

    def take(self) -> bytes:
        if self.dead:
            last, self.last = self.last, b""
            return last
        try:
            return self.conn.data_to_send()
        except self.ev.NGH2Error:
            self.dead = True
            return b""

    @property
    def closing(self) -> bool:
        """The engine will read no more (it sent or got GOAWAY with an error)."""
        return not self.conn.want_read

    def headers(self, sid: int, headers: Headers, end: bool) -> None:
        self.conn.send_response(sid, headers, end_stream=end)

    def request(self, headers: Headers, end: bool) -> int:
        """(client role) Open a stream with a request; its id."""
        sid: int = self.conn.send_request(headers, end_stream=end)
        return sid

    def peer_streams(self) -> int:
        """(client role) The streams the server lets poise have open at once (0 once the
        connection is ending)."""
        try:
            return int(self.conn.remote_settings.get(3, 100))
        except self.ev.NGH2Error:
            return 0

    def data(self, sid: int, data: bytes, end: bool) -> None:
        self.conn.send_data(sid, data, end_stream=end)

    def trailers(self, sid: int, headers: Headers) -> None:
        self.conn.send_trailers(sid, headers)

    def queued(self, sid: int) -> int:
        try:
            return self.conn.queued_body_size(sid)
        except self.ev.NGH2Error:
            return 0

    def consumed(self, sid: int, n: int) -> None:
        # (a stream that is gone gave the connection's window back with it)
        with contextlib.suppress(self.ev.NGH2Error):
            self.conn.acknowledge_received_data(n, sid)

    def reset(self, sid: int, code: int) -> None:
        with contextlib.suppress(self.ev.NGH2Error):  # (closed already)
            self.conn.reset_stream(sid, code)

    def goaway(self, code: int, last_id: int) -> None:
        if not self.dead:
            try:
                self.conn.send_goaway(code, last_stream_id=last_id)
                return
            except self.ev.NGH2Error:
                self.dead = True  # (past a flood, nghttp2 refuses to say more)
        self.last = goaway_frame(code, last_id)


class PureEngine:
    """The pure-Python twin, over the ``h2`` package. ``h2`` refuses to send past the
    client's window, so response data waits here (``_held``) until a WINDOW_UPDATE; and
    it has no limits of its own on CONTINUATION frames or resets, so a walk over the frame
    headers (``_guard``) enforces them before the bytes reach it."""

    __slots__ = (
        "_block",
        "_buf",
        "_control",
        "_held",
        "_need",
        "_preface",
        "_resets",
        "_room",
        "client",
        "clock",
        "conn",
        "ev",
        "failed",
        "settings",
    )

    name = "pure"

    def __init__(self, settings: Settings, clock: Any = None, *, client: bool = False) -> None:
        import time

        import h2.config
        import h2.connection
        import h2.events
        import h2.settings

        self.ev: Any = h2.events
        self.settings = settings
        cfg = h2.config.H2Configuration(
            client_side=client,
            header_encoding=None,
            # the header rules are poise's own (h2/convert.py), as with nghttp2: a bad
            # field refuses its stream, not the connection (h2 would end the connection)
            validate_inbound_headers=False,
            normalize_inbound_headers=False,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.conn = conn = h2.connection.H2Connection(cfg)
        codes = h2.settings.SettingCodes
        announced = {
            codes.MAX_CONCURRENT_STREAMS: settings.max_concurrent_streams,
            codes.INITIAL_WINDOW_SIZE: settings.initial_window_size,
            codes.MAX_FRAME_SIZE: settings.max_frame_size,
            codes.MAX_HEADER_LIST_SIZE: settings.max_header_list_size,
            codes.ENABLE_PUSH: 0,
        }
        # h2 ends the whole connection when a client opens one stream too many; nghttp2
        # refuses that stream alone (RFC 9113 §5.1.2 allows either). So h2 is told no
        # limit, the client is told ``max_concurrent_streams`` (the SETTINGS frame is
        # written here: its other values are the ones h2 holds), and ``_convert`` refuses
        # the streams over it, as nghttp2 does.
        self.client = client
        conn.local_settings = h2.settings.Settings(
            client=client, initial_values={**announced, codes.MAX_CONCURRENT_STREAMS: 2**31 - 1}
        )
        conn.initiate_connection()
        self._preface = b""
        if client:  # (a client announces no stream limit: its peer opens none)
            self._preface = conn.data_to_send()
        else:
            conn.data_to_send()  # (h2's SETTINGS: replaced by the one below)
            payload = b"".join(int(k).to_bytes(2, "big") + v.to_bytes(4, "big")
                               for k, v in announced.items())  # fmt: skip
            self._preface = len(payload).to_bytes(3, "big") + b"\x04\x00\x00\x00\x00\x00" + payload
        self._room = 0  # streams this batch may still open (see feed)
        extra = settings.connection_window - 65535
        if extra > 0:
            conn.increment_flow_control_window(extra)
        self._held: dict[int, list[Any]] = {}  # sid -> [bytearray of data, end, trailers]
        self._buf = b""  # a frame header split across reads
        # bytes to skip before the next frame header (a client's preface; a server sends none)
        self._need = 0 if client else 24
        self._block = -1  # CONTINUATIONs seen in the header block now open (-1: none open)
        self.clock = clock if clock is not None else time.monotonic
        self._resets = Bucket(RESET_BURST, RESET_RATE, self.clock)
        self._control = Bucket(CONTROL_BURST, CONTROL_RATE, self.clock)
        self.failed = False

    # -- the frame-header walk ---------------------------------------------------------------

    def _guard(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        i = 0
        n = len(buf)
        while True:
            if self._need:
                step = min(self._need, n - i)
                self._need -= step
                i += step
                if self._need:
                    break
            if n - i < 9:
                break
            length = buf[i] << 16 | buf[i + 1] << 8 | buf[i + 2]
            kind = buf[i + 3]
            flags = buf[i + 4]
            i += 9
            self._need = length
            if kind == 0x1:  # HEADERS
                self._block = -1 if flags & 0x4 else 0
            elif kind == 0x9:  # CONTINUATION
                if self._block >= 0:
                    self._block += 1
                    if self._block > self.settings.max_continuations:
                        raise EngineError("too many CONTINUATION frames", ENHANCE_YOUR_CALM)
                    if flags & 0x4:
                        self._block = -1
            elif kind == 0x3:  # RST_STREAM
                if not self._resets.take():
                    raise EngineError("too many stream resets", ENHANCE_YOUR_CALM)
            elif (kind == 0x6 or (kind == 0x4 and not flags & 0x1)) and not self._control.take():
                raise EngineError("too many PING or SETTINGS frames", ENHANCE_YOUR_CALM)
        self._buf = buf[i:] if not self._need else b""

    def feed(self, data: bytes) -> list[Event]:
        import h2.exceptions

        if self.failed:
            return []
        try:
            self._guard(data)
            events: list[Any] = self.conn.receive_data(data)
        except EngineError as exc:
            self.failed = True
            self.conn.close_connection(exc.code)
            raise
        except h2.exceptions.ProtocolError as exc:
            self.failed = True
            code = getattr(exc, "error_code", PROTOCOL_ERROR)
            raise EngineError(str(exc), int(code)) from None
        out: list[Event] = []
        ev = self.ev
        new = 0
        for e in events:
            if type(e) is ev.RequestReceived:
                new += 1
        if new and not self.client:
            self._room = self.settings.max_concurrent_streams - (
                self.conn.open_inbound_streams - new
            )
        for e in events:
            self._convert(e, out)
        return out

    def _convert(self, e: Any, out: list[Event]) -> None:
        """One of h2's events as poise's (StreamEnded is not one: h2 flags the DATA,
        HEADERS or trailers it ends, and reports it after them)."""
        ev = self.ev
        t = type(e)
        if t is ev.DataReceived:
            # the padding counts in flow control but never reaches poise: given back now
            pad = e.flow_controlled_length - len(e.data)
            if pad:
                self.conn.acknowledge_received_data(pad, e.stream_id)
            out.append((DATA, e.stream_id, e.data, e.stream_ended is not None))
        elif t is ev.RequestReceived:
            if self._room <= 0:  # over max_concurrent_streams: refused (see __init__)
                self.conn.reset_stream(e.stream_id, REFUSED_STREAM)
                return
            self._room -= 1
            size = sum(len(k) + len(v) + 32 for k, v in e.headers)
            if size > self.settings.max_header_list_size:
                self.failed = True
                self.conn.close_connection(ENHANCE_YOUR_CALM)
                raise EngineError("header list too large", ENHANCE_YOUR_CALM)
            out.append((REQUEST, e.stream_id, list(e.headers), e.stream_ended is not None))
        elif t is ev.StreamReset:
            self._held.pop(e.stream_id, None)
            out.append((RESET, e.stream_id, int(e.error_code), True))
        elif t is ev.TrailersReceived:
            out.append((TRAILERS, e.stream_id, list(e.headers), True))
        elif t is ev.WindowUpdated or t is ev.RemoteSettingsChanged:
            self._pump()
            out.append((WINDOW, getattr(e, "stream_id", 0), 0, False))
        elif t is ev.ResponseReceived:
            out.append((RESPONSE, e.stream_id, list(e.headers), e.stream_ended is not None))
        elif t is ev.ConnectionTerminated:
            if self.client:
                out.append((GOAWAY, 0, int(e.last_stream_id or 0), False))
                return
            self.failed = True
            if e.error_code:
                raise EngineError("the client ended the connection", int(e.error_code))

    def take(self) -> bytes:
        if self._preface:
            first, self._preface = self._preface, b""
            return first + self.conn.data_to_send()
        return self.conn.data_to_send()

    @property
    def closing(self) -> bool:
        return self.failed

    def headers(self, sid: int, headers: Headers, end: bool) -> None:
        self.conn.send_headers(sid, headers, end_stream=end)

    def request(self, headers: Headers, end: bool) -> int:
        sid: int = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, headers, end_stream=end)
        return sid

    def peer_streams(self) -> int:
        return int(self.conn.remote_settings.max_concurrent_streams or 100)

    def data(self, sid: int, data: bytes, end: bool) -> None:
        held = self._held.get(sid)
        if held is None:
            held = self._held[sid] = [bytearray(), False, None]
        held[0] += data
        held[1] = end
        self._pump_one(sid, held)

    def trailers(self, sid: int, headers: Headers) -> None:
        held = self._held.get(sid)
        if held is None:
            held = self._held[sid] = [bytearray(), False, None]
        held[2] = headers
        self._pump_one(sid, held)

    def queued(self, sid: int) -> int:
        held = self._held.get(sid)
        return 0 if held is None else len(held[0])

    def _pump(self) -> None:
        for sid, held in list(self._held.items()):
            self._pump_one(sid, held)

    def _pump_one(self, sid: int, held: list[Any]) -> None:
        import h2.exceptions

        conn = self.conn
        buf: bytearray = held[0]
        try:
            sent_end = False
            while buf:
                room = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                if room <= 0:
                    return
                piece = bytes(buf[:room])
                del buf[:room]
                sent_end = not buf and held[1] and held[2] is None
                conn.send_data(sid, piece, end_stream=sent_end)
            if held[2] is not None:
                conn.send_headers(sid, held[2], end_stream=True)
            elif held[1] and not sent_end:
                conn.end_stream(sid)
            del self._held[sid]
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, KeyError):
            self._held.pop(sid, None)

    def consumed(self, sid: int, n: int) -> None:
        import h2.exceptions

        with contextlib.suppress(
            h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, KeyError
        ):
            self.conn.acknowledge_received_data(n, sid)

    def reset(self, sid: int, code: int) -> None:
        import h2.exceptions

        self._held.pop(sid, None)
        with contextlib.suppress(
            h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, KeyError
        ):
            self.conn.reset_stream(sid, code)

    def goaway(self, code: int, last_id: int) -> None:
        self.conn.close_connection(code, last_stream_id=last_id)
