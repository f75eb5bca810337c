"""The request head codec (poise.l7.head): bytes in, result out.

Three sources of truth: hand-written cases; the black-box request cases of
tests/blackbox/test_requests.py (what poise's live path answers, so the codec and the live path
agree on every one of them); and h11, differentially, on generated heads.
"""

from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.blackbox.test_requests import CASES, Forwarded, Refused

from poise.l7.head import Rejection, RequestHead, Settings, parse_request

S = Settings(peer=b"10.0.0.9")


def ok(data: bytes, s: Settings = S) -> RequestHead:
    out = parse_request(data, s)
    assert isinstance(out, RequestHead), out
    return out


def status(data: bytes, s: Settings = S) -> int:
    out = parse_request(data, s)
    return out.status if isinstance(out, Rejection) else 200


def test_plain_get_is_rebuilt() -> None:
    out = ok(b"GET /a?b=1 HTTP/1.1\r\nHost: example.test\r\nX-A: 1\r\n\r\n")
    assert (out.method, out.target, out.host) == (b"GET", b"/a?b=1", b"example.test")
    assert out.keep_alive and not out.chunked and out.content_length is None
    assert out.head == (
        b"GET /a?b=1 HTTP/1.1\r\nHost: example.test\r\nX-A: 1\r\nX-Forwarded-For: 10.0.0.9\r\n"
        b"X-Forwarded-Proto: http\r\nX-Forwarded-Host: example.test\r\n\r\n"
    )


def test_framing_and_flags() -> None:
    out = ok(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\nExpect: 100-continue\r\n\r\n")
    assert out.content_length == 12 and out.expect_continue
    assert out.head.endswith(b"\r\nContent-Length: 12\r\n\r\n")
    out = ok(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: cHuNkEd\r\n\r\n")
    assert out.chunked and out.head.endswith(b"\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert not ok(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").keep_alive
    assert not ok(b"GET / HTTP/1.0\r\n\r\n").keep_alive
    assert ok(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive


def test_upgrade_only_for_a_get_that_asks_for_it() -> None:
    up = b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
    out = ok(b"GET /ws HTTP/1.1\r\nHost: a\r\n" + up + b"\r\n")
    assert out.upgrade == b"websocket"
    assert out.head.endswith(b"\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    out = ok(b"POST /ws HTTP/1.1\r\nHost: a\r\n" + up + b"\r\n")
    assert out.upgrade is None and b"Upgrade" not in out.head


def test_hop_by_hop_and_nominated_fields_go_before_ours_are_added() -> None:
    out = ok(
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close, X-Forwarded-For, X-Foo\r\nX-Foo: 1\r\n"
        b"Keep-Alive: 5\r\nTE: trailers\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n"
    )
    assert b"X-Foo" not in out.head and b"Keep-Alive" not in out.head and b"TE:" not in out.head
    assert b"6.6.6.6" not in out.head and b"\r\nX-Forwarded-For: 10.0.0.9\r\n" in out.head
    trusted = Settings(peer=b"10.0.0.9", trusted=True, forwarded=True, via=True)
    out = ok(b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n", trusted)
    assert b"\r\nX-Forwarded-For: 1.2.3.4, 10.0.0.9\r\n" in out.head
    assert b'\r\nForwarded: for=10.0.0.9;proto=http;host="a"\r\nVia: 1.1 poise\r\n' in out.head


def test_underscore_fields_and_configured_fields_are_dropped() -> None:
    s = Settings(drop=frozenset({b"x-client-subject"}))
    out = ok(
        b"GET / HTTP/1.1\r\nHost: a\r\nTransfer_Encoding: chunked\r\nX-Client-Subject: CN=me\r\n"
        b"Ho_st: b\r\n\r\n",
        s,
    )
    assert not out.chunked and b"_" not in out.head and b"CN=me" not in out.head
    assert out.host == b"a"


def test_absolute_form() -> None:
    out = ok(b"GET http://api.test/x?y HTTP/1.1\r\nHost: other\r\n\r\n")
    assert (out.target, out.host) == (b"/x?y", b"api.test")
    assert ok(b"GET http://api.test?y HTTP/1.1\r\nHost: o\r\n\r\n").target == b"/?y"


def test_empty_lines_before_the_request_line_are_skipped() -> None:
    assert ok(b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n").target == b"/"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET /  HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET\t/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"FOO / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"get / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x7fb\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\nY: b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\nextra", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-A: 1\r\n" * 100 + b"\r\n", 431),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
         400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400),
        (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 405),
        (b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", 200),
    ],
)  # fmt: skip
def test_statuses(data: bytes, expected: int) -> None:
    assert status(data) == expected


def test_body_size_limit() -> None:
    data = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\n"
    assert status(data, Settings(max_body_size=10)) == 413
    assert status(data, Settings(max_body_size=11)) == 200


# -- the same verdicts as poise's live path on the black-box cases ------------------------

BODY_CASES = ("chunk", "trailer")  # refused for their body, which is not the codec's to read


@pytest.mark.parametrize("name", [n for n in CASES if not n.startswith(BODY_CASES)])
def test_blackbox_case(name: str) -> None:
    data, expect = CASES[name]
    cut = data.find(b"\r\n\r\n")
    head = data[: cut + 4] if cut >= 0 else data
    out = parse_request(head, Settings())
    if isinstance(expect, Refused):
        assert isinstance(out, Rejection), out
        assert out.status == expect.status
        return
    assert isinstance(expect, Forwarded)
    assert isinstance(out, RequestHead), out
    if expect.first_line is not None:
        assert out.head.split(b"\r\n", 1)[0] == expect.first_line
    for needle in expect.has:
        if b"127.0.0.1:" not in needle:  # the backend's host:port, added on the way out
            assert needle in out.head, (needle, out.head)
    for needle in expect.lacks:
        assert needle not in out.head, (needle, out.head)


# -- differential: h11 ------------------------------------------------------------------

# Each piece carries whether poise refuses it by design where h11 may accept it (True), so
# the oracle below knows, for every input, which verdict h11's must be matched.
METHOD = st.sampled_from(
    [(b"GET", False)] * 4
    + [(b"POST", False), (b"PURGE", False), (b"FOO", True), (b"M-SEARCH", False)]
)
TARGET = st.sampled_from(
    [(b"/", False)] * 6
    + [
        (b"/a?b=%20", False),
        (b"/a#f", True),
        (b"/a\\b", True),
        (b"/\xc3\xa9", True),
        (b"a", True),
        (b"http://h.test/x", False),
    ]
)
VERSION = st.sampled_from(
    [(b"HTTP/1.1", False)] * 4 + [(b"HTTP/1.0", False), (b"HTTP/2.0", True), (b"HTTP/1.2", True)]
)
FIELD = st.sampled_from([
    (b"X-A", b"1", False), (b"X-A", b"a  b", False), (b"X_A", b"1", False),
    (b"X-A", b"a\x80b", False), (b"X-A", b"a\x7fb", True), (b"X-A", b"", False),
    (b"Content-Length", b"3", False), (b"Content-Length", b"0", False),
    (b"Transfer-Encoding", b"chunked", False), (b"Connection", b"close", False),
    (b"Connection", b"keep-alive, X-A", False), (b"Expect", b"100-continue", False),
    (b"Host", b"b", False), (b"Host", b"a b", True), (b"Host", b"u@h", True),
])  # fmt: skip
SEP = st.sampled_from([b" "] * 8 + [b"  ", b"\t"])


@st.composite
def head(draw: st.DrawFn) -> tuple[bytes, bool]:
    """A request head and whether poise refuses it by design even where h11 accepts it."""
    (method, m_strict), (target, t_strict), (version, v_strict) = (
        draw(METHOD), draw(TARGET), draw(VERSION),
    )  # fmt: skip
    strict = m_strict or t_strict or v_strict
    line = method + draw(SEP) + target + draw(SEP) + version
    fields = [(b"Host", b"a", False)] if draw(st.integers(0, 3)) else []
    fields += draw(st.lists(FIELD, max_size=4))
    names = [n.lower() for n, _, _ in fields]
    strict |= any(s for _, _, s in fields)
    strict |= names.count(b"content-length") > 1  # h11 merges identical copies
    strict |= b"content-length" in names and b"transfer-encoding" in names
    strict |= b"transfer-encoding" in names and version == b"HTTP/1.0"
    strict |= target.startswith(b"http://") and b"host" not in names and version == b"HTTP/1.1"
    if method == b"M-SEARCH" and target.startswith(b"http"):
        strict = True
    return line + b"\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v, _ in fields) + b"\r\n", (
        strict
    )


def h11_view(data: bytes) -> tuple[bytes, bytes, bool, int | None] | None:
    """What h11 makes of a head: method, target, chunked, Content-Length; None: refused."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return None
    assert isinstance(event, h11.Request), event
    fields = dict(event.headers)
    cl = fields.get(b"content-length")
    return event.method, event.target, b"transfer-encoding" in fields, int(cl) if cl else None


@settings(max_examples=600, deadline=None)
@given(head())
def test_differential_against_h11(case: tuple[bytes, bool]) -> None:
    data, strict = case
    ours = parse_request(data, Settings())
    theirs = h11_view(data)
    if isinstance(ours, RequestHead):
        # poise accepts only what h11 accepts, and reads it the same way
        assert theirs is not None, data
        method, target, chunked, cl = theirs
        assert ours.method == method
        assert ours.chunked == chunked and ours.content_length == cl
        if not target.startswith(b"http://"):
            assert ours.target == target
    elif theirs is not None:
        # h11 accepts it: poise refuses only what it refuses by design
        assert strict, (data, ours)
