"""HTTP/2 header lists to HTTP/1.1 and back (h2/convert.py): what a proxy must refuse
(RFC 9113 §8.2, §8.3), what it passes on, and a property: whatever the list, what is passed
on could never be read differently by an HTTP/1.1 backend."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from poise.h2 import convert
from poise.l7 import http
from poise.l7.request import Reject

BASE = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a.test"),
        (b":path", b"/p?q=1")]  # fmt: skip


def conv(headers: list[tuple[bytes, bytes]]) -> convert.Request:
    return convert.request(headers, http.REQUEST_HEADER_KIND, max_target=8192, max_fields=100)


def status_of(headers: list[tuple[bytes, bytes]]) -> int:
    with pytest.raises(Reject) as info:
        conv(headers)
    return info.value.status


def test_a_plain_request() -> None:
    req = conv([*BASE, (b"user-agent", b"x"), (b"cookie", b"a=1"), (b"cookie", b"b=2"),
                (b"te", b"trailers"), (b"content-type", b"application/grpc"),
                (b"grpc-timeout", b"5S"), (b"x_under", b"dropped"),
                (b"x-forwarded-for", b"1.2.3.4"), (b"content-length", b"0")])  # fmt: skip
    assert (req.method, req.target, req.authority) == (b"GET", b"/p?q=1", b"a.test")
    assert b"".join(req.fields) == (
        b"user-agent: x\r\ncontent-type: application/grpc\r\ngrpc-timeout: 5S\r\n"
        b"cookie: a=1; b=2\r\n"
    )
    assert req.content_length == b"0"
    assert req.fwd == [(b"x-forwarded-for", b"x-forwarded-for", b"1.2.3.4")]
    assert (req.content_type, req.grpc_timeout) == (b"application/grpc", b"5S")


def test_host_stands_in_for_a_missing_authority() -> None:
    req = conv([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
                (b"host", b"b.test:8080")])  # fmt: skip
    assert req.authority == b"b.test:8080"
    assert conv([*BASE, (b"host", b"A.TEST")]).authority == b"a.test"


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([*BASE, (b"connection", b"close")], 400),
        ([*BASE, (b"transfer-encoding", b"chunked")], 400),
        ([*BASE, (b"keep-alive", b"5")], 400),
        ([*BASE, (b"upgrade", b"websocket")], 400),
        ([*BASE, (b"proxy-connection", b"x")], 400),
        ([*BASE, (b"te", b"gzip")], 400),
        ([*BASE, (b"X-Upper", b"v")], 400),
        ([*BASE, (b"x-bad", b"a\r\nb")], 400),
        ([*BASE, (b"x-bad", b"a\x00b")], 400),
        ([*BASE, (b"x-bad", b" padded")], 400),
        ([*BASE, (b"bad name", b"v")], 400),
        ([*BASE, (b"host", b"other.test")], 400),
        ([*BASE, (b"content-length", b"12a")], 400),
        ([*BASE, (b"content-length", b"1"), (b"content-length", b"2")], 400),
        ([*BASE, (b":method", b"GET")], 400),  # repeated pseudo-header
        ([(b"x", b"1"), *BASE], 400),  # pseudo-header after a field
        ([*BASE[:3]], 400),  # no :path
        ([*BASE[1:]], 400),  # no :method
        ([(b":method", b"GET"), (b":path", b"/")], 400),  # no :scheme
        (
            [(b":method", b"GET"), (b":scheme", b"ftp"), (b":path", b"/"), (b":authority", b"a")],
            400,
        ),
        ([(b":method", b"CONNECT"), (b":authority", b"a.test:443")], 405),
        (
            [
                (b":method", b"GET"),
                (b":scheme", b"http"),
                (b":path", b"/"),
                (b":protocol", b"websocket"),
            ],
            400,
        ),
        ([(b":method", b"G T"), *BASE[1:]], 400),
        ([BASE[0], BASE[1], BASE[2], (b":path", b"relative")], 400),
        ([BASE[0], BASE[1], BASE[2], (b":path", b"/a#frag")], 400),
        ([BASE[0], BASE[1], BASE[2], (b":path", b"/a\\b")], 400),
        ([BASE[0], BASE[1], BASE[2], (b":path", "/é".encode())], 400),
        ([BASE[0], BASE[1], BASE[2], (b":path", b"/a b")], 400),  # (a request line of 4)
        ([BASE[0], BASE[1], BASE[2], (b":path", b"/a\tb")], 400),
        ([*BASE, (b"x-bad", b"a\x01b")], 400),
        ([*BASE, (b"x-bad", b"a\x7fb")], 400),
        ([BASE[0], BASE[1], (b":authority", b"user@a.test"), BASE[3]], 400),
        ([BASE[0], BASE[1], BASE[2], (b":path", b"/" + b"a" * 9000)], 414),
        ([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/")], 400),  # no authority
    ],
)
def test_what_a_proxy_must_refuse(headers: list[tuple[bytes, bytes]], status: int) -> None:
    assert status_of(headers) == status


def test_too_many_fields_is_a_431() -> None:
    assert status_of([*BASE, *[(b"x-%d" % i, b"v") for i in range(200)]]) == 431


def test_options_star() -> None:
    req = conv([(b":method", b"OPTIONS"), (b":scheme", b"http"), (b":authority", b"a"),
                (b":path", b"*")])  # fmt: skip
    assert req.target == b"*"


def test_framing() -> None:
    req = conv(BASE)
    assert convert.framing(req, body=False) == (b"", False)
    assert convert.framing(req, body=True) == (b"Transfer-Encoding: chunked\r\n", True)
    post = conv([(b":method", b"POST"), *BASE[1:]])
    assert convert.framing(post, body=False) == (b"Content-Length: 0\r\n", False)
    sized = conv([*BASE, (b"content-length", b"5")])
    assert convert.framing(sized, body=True) == (b"Content-Length: 5\r\n", False)


def test_a_response_head() -> None:
    status, headers = convert.response(
        b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nConnection: close\r\n"
        b"Transfer-Encoding: chunked\r\nX-A:  v \r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\n"
    )
    assert status == 404
    assert headers == [(b":status", b"404"), (b"content-type", b"text/plain"), (b"x-a", b"v"),
                       (b"set-cookie", b"a=1"), (b"set-cookie", b"b=2")]  # fmt: skip
    again = convert.response(memoryview(b"HTTP/1.1 200 OK\r\nA: 1\r\n\r\n"))
    assert again == (200, [(b":status", b"200"), (b"a", b"1")])
    assert convert.response(b"HTTP/1.1 200 OK\r\nA: 1\r\n\r\n") is again  # remembered


NAMES = st.sampled_from([
    b":method", b":path", b":scheme", b":authority", b":protocol", b"host", b"cookie",
    b"content-length", b"connection", b"te", b"transfer-encoding", b"x-forwarded-for",
    b"x-a", b"X-A", b"x_a", b"a b", b"", b"forwarded", b"upgrade",
])  # fmt: skip
VALUES = st.one_of(
    st.sampled_from([b"GET", b"/", b"http", b"a.test", b"trailers", b"1", b"chunked",
                     b"/a b", b"/a\tb", b"v\x01", b" v", b"a;b"]),
    st.binary(max_size=12),
    st.builds(lambda a, b: b"/" + a + b, st.binary(max_size=4), st.binary(max_size=4)),
)  # fmt: skip


@given(st.lists(st.tuples(NAMES, VALUES), max_size=12))
def test_what_passes_is_unambiguous_http1(headers: list[tuple[bytes, bytes]]) -> None:
    try:
        req = conv(headers)
    except Reject as exc:
        assert exc.status in (400, 405, 414, 431)
        return
    line = b"".join(req.fields)
    controls = set(range(0x20)) - {0x09} | {0x7F}
    for piece in (req.method, req.target, req.authority, line.replace(b"\r\n", b"")):
        assert not controls & set(piece)
    for field in line.split(b"\r\n")[:-1]:
        name, sep, value = field.partition(b": ")
        assert sep and b"\r" not in value and b"\n" not in value
        assert name not in convert.CONNECTION_SPECIFIC
        assert name not in (b"host", b"content-length", b"te")
        assert name == name.lower() and b"_" not in name
    assert all(0x21 <= c <= 0x7E for c in req.target)
    assert http.HOST_RE.fullmatch(req.authority)
    assert req.target[:1] == b"/" or (req.target == b"*" and req.method == b"OPTIONS")
