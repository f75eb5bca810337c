"""The two framing engines (h2/engine.py) answer the same calls the same way: a request and
its response, manual flow control both ways, data queued past the window, the client role,
and the limits. Each case runs with the native engine and with its twin."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from poise.h2 import engine as E


@pytest.fixture(params=["native", "pure"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def client(window: int = 65535) -> h2.connection.H2Connection:
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                             header_encoding=None))  # fmt: skip
    c.local_settings = h2.settings.Settings(
        client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window}
    )
    c.initiate_connection()
    return c


def server(kind: str, **kw: int) -> E.NativeEngine | E.PureEngine:
    return E.make(kind, E.Settings(**kw))


def pump(c: h2.connection.H2Connection, s: E.NativeEngine | E.PureEngine) -> list[E.Event]:
    events = s.feed(c.data_to_send())
    c.receive_data(s.take())
    return events


GET = [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"), (b":authority", b"a")]


def test_a_request_and_its_response(kind: str) -> None:
    c, s = client(), server(kind)
    c.receive_data(s.take())  # the server's SETTINGS
    c.send_headers(1, [*GET, (b"x-a", b"1")], end_stream=True)
    events = pump(c, s)
    assert [(k, sid, list(p), end) for k, sid, p, end in events if k == E.REQUEST] == [
        (E.REQUEST, 1, [*GET, (b"x-a", b"1")], True)
    ]
    s.headers(1, [(b":status", b"200")], False)
    s.data(1, b"hello", False)
    s.trailers(1, [(b"grpc-status", b"0")])
    got = c.receive_data(s.take())
    kinds = [type(e).__name__ for e in got]
    assert kinds[:3] == ["ResponseReceived", "DataReceived", "TrailersReceived"]
    assert any(isinstance(e, h2.events.StreamEnded) for e in got)


def test_request_data_is_acknowledged_only_when_consumed(kind: str) -> None:
    c, s = client(), server(kind, initial_window_size=1024, connection_window=1 << 20)
    c.receive_data(s.take())
    c.send_headers(1, [*GET[:1], (b":path", b"/u"), *GET[2:]])
    pump(c, s)
    c.send_data(1, b"x" * 1024)
    events = pump(c, s)
    assert [(k, p) for k, _, p, _ in events if k == E.DATA] == [(E.DATA, b"x" * 1024)]
    assert c.local_flow_control_window(1) == 0  # nothing given back yet
    s.consumed(1, 1024)
    c.receive_data(s.take())
    assert c.local_flow_control_window(1) == 1024


def test_response_data_waits_for_the_clients_window(kind: str) -> None:
    c, s = client(window=100), server(kind)
    c.receive_data(s.take())
    c.send_headers(1, GET, end_stream=True)
    pump(c, s)
    s.headers(1, [(b":status", b"200")], False)
    s.data(1, b"y" * 1000, True)
    got = c.receive_data(s.take())
    assert sum(len(e.data) for e in got if isinstance(e, h2.events.DataReceived)) == 100
    assert s.queued(1) == 900
    c.acknowledge_received_data(100, 1)
    c.increment_flow_control_window(900, 1)
    s.feed(c.data_to_send())
    got = c.receive_data(s.take())
    assert sum(len(e.data) for e in got if isinstance(e, h2.events.DataReceived)) == 900
    assert any(isinstance(e, h2.events.StreamEnded) for e in got)
    assert s.queued(1) == 0


def test_the_client_role(kind: str) -> None:
    far = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False,
                                                               header_encoding=None))  # fmt: skip
    far.initiate_connection()
    us = E.make(kind, E.Settings(), client=True)
    far.receive_data(us.take())
    us.feed(far.data_to_send())
    sid = us.request(GET, True)
    got = far.receive_data(us.take())
    assert [e.stream_id for e in got if isinstance(e, h2.events.RequestReceived)] == [sid]
    far.send_headers(sid, [(b":status", b"204")], end_stream=True)
    events = us.feed(far.data_to_send())
    assert [(k, s, end) for k, s, _, end in events if k == E.RESPONSE] == [(E.RESPONSE, sid, True)]
    assert us.peer_streams() >= 1
    far.close_connection(0, last_stream_id=sid)
    events = us.feed(far.data_to_send())
    assert [(k, p) for k, _, p, _ in events if k == E.GOAWAY] == [(E.GOAWAY, sid)]


def test_ping_and_settings_are_limited(kind: str) -> None:
    c, s = client(), server(kind)
    c.receive_data(s.take())
    for _ in range(E.CONTROL_BURST + 50):
        c.ping(b"12345678")
    with pytest.raises(E.EngineError) as info:
        s.feed(c.data_to_send())
    assert info.value.code == E.ENHANCE_YOUR_CALM
    s.goaway(info.value.code, 0)
    out = s.take()
    codes = []
    while len(out) >= 9:
        n = int.from_bytes(out[:3], "big")
        if out[3] == 0x7:  # GOAWAY
            codes.append(int.from_bytes(out[13:17], "big"))
        out = out[9 + n :]
    assert E.ENHANCE_YOUR_CALM in codes


def test_the_bucket_refills_at_its_rate() -> None:
    clock = Clock()
    b = E.Bucket(2, 10.0, clock)
    assert b.take() and b.take()
    assert not b.take()
    clock.now += 0.25  # 2.5 tokens back, at most the burst
    assert b.take() and b.take()
    assert not b.take()


def test_a_goaway_frame() -> None:
    assert E.goaway_frame(0xB, 7) == (
        b"\x00\x00\x08\x07\x00\x00\x00\x00\x00\x00\x00\x00\x07\x00\x00\x00\x0b"
    )
