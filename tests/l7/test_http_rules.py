from __future__ import annotations

import pytest

from poise.l7 import http
from poise.routing import Route


@pytest.mark.parametrize(
    "value",
    [b"+5", b"-1", b"0x5", b"5_0", b"5 5", b"", b"\xef\xbc\x91", b"9" * 19, b" 5"],
)
def test_content_length_grammar_rejects_what_int_accepts(value: bytes) -> None:
    assert http.CONTENT_LENGTH_RE.fullmatch(value) is None


@pytest.mark.parametrize("value", [b"0", b"5", b"000", b"123456789012345678"])
def test_content_length_grammar_accepts_digits(value: bytes) -> None:
    assert http.CONTENT_LENGTH_RE.fullmatch(value) is not None


def test_connection_tokens_split_and_lower() -> None:
    assert http.connection_tokens(b" Keep-Alive ,X-Foo,,close ") == [
        b"keep-alive",
        b"x-foo",
        b"close",
    ]


def test_drop_nominated_removes_named_fields_only() -> None:
    headers = [b"X-Foo", b": ", b"1", b"\r\n", b"X-Bar", b": ", b"2", b"\r\n"]
    assert http.drop_nominated(headers, [b"x-foo", b"close"]) == [b"X-Bar", b": ", b"2", b"\r\n"]
    assert http.drop_nominated(headers, [b"keep-alive"]) is headers


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        (b"Example.COM:8080", b"example.com"),
        (b"a.test.", b"a.test"),
        (b"[::1]:80", b"[::1]"),
        (b"h", b"h"),
    ],
)
def test_host_normalised_for_routing(host: bytes, expected: bytes) -> None:
    assert http.host_without_port(host) == expected


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        (b"a.example:80", True),
        (b"[::1]:8080", True),
        (b"user@a", False),
        (b"a/b", False),
        (b"a,b", False),
        (b"a b", False),
    ],
)
def test_host_header_syntax(host: bytes, ok: bool) -> None:
    assert (http.HOST_RE.fullmatch(host) is not None) is ok


def test_error_response_is_complete_and_fixed() -> None:
    r = http.error_response(
        503, "No healthy server available", b"Sun, 22 Nov 2026 00:00:00 GMT", close=False
    )
    head, body = r.split(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"Content-Length: %d" % len(body) in head
    assert b"Connection: close" not in head
    assert body == b"No healthy server available\n"


@pytest.mark.parametrize(
    ("prefix", "path", "hit"),
    [
        (b"/", b"/anything", True),
        (b"/api", b"/api", True),
        (b"/api", b"/api/x", True),
        (b"/api", b"/apix", False),
        (b"/api/", b"/api/x", True),
        (b"/api", b"/other", False),
    ],
)
def test_route_prefix_matches_on_segments(prefix: bytes, path: bytes, hit: bool) -> None:
    assert Route(frozenset(), prefix, "g").matches(b"h", path) is hit


def test_route_host_must_match_when_named() -> None:
    r = Route(frozenset({b"a.test"}), b"/", "g")
    assert r.matches(b"a.test", b"/")
    assert not r.matches(b"b.test", b"/")


def test_strip_hop_fields_removes_hop_and_nominated_keeps_framing() -> None:
    block = (
        b"\r\nServer: x\r\nConnection: X-Secret, keep-alive\r\nX-Secret: s\r\n"
        b"Keep-Alive: timeout=5\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked"
        b"\r\nX-Keep: 1"
    )
    out, te = http.strip_hop_fields(block, block.lower())
    assert out == b"\r\nServer: x\r\nX-Keep: 1"
    assert te == b"gzip,chunked"


def test_strip_hop_fields_cannot_drop_content_length() -> None:
    block = b"\r\nConnection: content-length\r\nContent-Length: 2"
    out, te = http.strip_hop_fields(block, block.lower())
    assert out == b"\r\nContent-Length: 2"
    assert te is None


def test_response_scan_finds_special_fields_in_order() -> None:
    low = b"\r\ncontent-length: 2\r\nx-connection: no\r\nconnection: keep-alive"
    assert http.RESPONSE_SCAN_RE.findall(low) == http.CL_CONNECTION


def test_client_address_rightmost_untrusted() -> None:
    import ipaddress

    lb = [ipaddress.ip_network("10.0.0.0/8")]
    # an untrusted peer: its X-Forwarded-For proves nothing
    assert http.client_address("203.0.113.9", ["1.2.3.4"], lb) == "203.0.113.9"
    # a trusted proxy: the rightmost address it did not add itself
    assert http.client_address("10.0.0.2", ["6.6.6.6, 198.51.100.7"], lb) == "198.51.100.7"
    # several trusted hops are skipped
    assert http.client_address("10.0.0.2", ["198.51.100.7", "10.0.0.5"], lb) == "198.51.100.7"
    # garbage ends the chain of trust
    assert http.client_address("10.0.0.2", ["1.1.1.1, unknown"], lb) == "unknown"
    # all trusted: the leftmost
    assert http.client_address("10.0.0.2", ["10.1.1.1"], lb) == "10.1.1.1"
    assert http.client_address("10.0.0.2", [], lb) == "10.0.0.2"


def test_retry_after_seconds_and_dates() -> None:
    assert http.retry_after_seconds(b"120") == 120.0
    assert http.retry_after_seconds(b"0") == 0.0
    # an HTTP-date 30 s after "now"
    now = 784111777.0  # Sun, 06 Nov 1994 08:49:37 GMT
    assert http.retry_after_seconds(b"Sun, 06 Nov 1994 08:50:07 GMT", now) == 30.0
    assert http.retry_after_seconds(b"Sun, 06 Nov 1994 08:49:00 GMT", now) is None  # past
    assert http.retry_after_seconds(b"soon") is None
    assert http.retry_after_seconds(b"-5") is None


def test_field_value_from_a_lowered_block() -> None:
    block = b"\r\ncontent-length: 5\r\nretry-after:  7 \r\nx: y"
    assert http.field_value(block, b"retry-after") == b"7"
    assert http.field_value(block, b"x") == b"y"
    assert http.field_value(block, b"missing") == b""
