"""PROXY protocol v1/v2 encoding and decoding (HAProxy's proxy-protocol.txt)."""

from __future__ import annotations

import pytest

from poise.l4.proxy_protocol import (
    V1_MAX,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    decode,
    encode,
    encode_v1,
    encode_v2,
)

SRC4, DST4 = ("192.0.2.1", 56324), ("198.51.100.1", 443)
SRC6, DST6 = ("2001:db8::1", 40000), ("2001:db8::2", 5432)


def test_v1_tcp4_is_the_spec_line() -> None:
    assert encode_v1(SRC4, DST4) == b"PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\r\n"


def test_v1_tcp6_and_unknown() -> None:
    assert encode_v1(SRC6, DST6) == b"PROXY TCP6 2001:db8::1 2001:db8::2 40000 5432\r\n"
    assert encode_v1(None, None) == b"PROXY UNKNOWN\r\n"
    assert encode_v1(("not-an-ip", 1), DST4) == b"PROXY UNKNOWN\r\n"


def test_v4_mapped_addresses_are_written_as_ipv4() -> None:
    line = encode_v1(("::ffff:192.0.2.1", 1000), ("::ffff:198.51.100.1", 80))
    assert line == b"PROXY TCP4 192.0.2.1 198.51.100.1 1000 80\r\n"


def test_mixed_families_become_v4_mapped_ipv6() -> None:
    line = encode_v1(SRC4, DST6)
    assert line == b"PROXY TCP6 ::ffff:c000:201 2001:db8::2 56324 5432\r\n"
    assert decode(line) == ProxyHeader(1, ("::ffff:c000:201", 56324), DST6, len(line))


def test_v2_tcp4_layout() -> None:
    raw = encode_v2(SRC4, DST4)
    assert raw[:12] == V2_SIGNATURE == b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"
    assert raw[12] == 0x21  # version 2, PROXY
    assert raw[13] == 0x11  # AF_INET, STREAM
    assert raw[14:16] == (12).to_bytes(2, "big")
    assert raw[16:20] == bytes([192, 0, 2, 1])
    assert raw[20:24] == bytes([198, 51, 100, 1])
    assert raw[24:26] == (56324).to_bytes(2, "big")
    assert raw[26:28] == (443).to_bytes(2, "big")
    assert len(raw) == 28


def test_v2_tcp6_layout() -> None:
    raw = encode_v2(SRC6, DST6)
    assert raw[13] == 0x21  # AF_INET6, STREAM
    assert int.from_bytes(raw[14:16], "big") == 36
    assert len(raw) == 16 + 36


def test_v2_local_and_unknown() -> None:
    local = encode_v2(SRC4, DST4, local=True)
    assert local == V2_SIGNATURE + b"\x20\x00\x00\x00"
    assert decode(local) == ProxyHeader(2, None, None, 16)
    unknown = encode_v2(None, None)
    assert unknown == V2_SIGNATURE + b"\x21\x00\x00\x00"
    assert decode(unknown) == ProxyHeader(2, None, None, 16)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize(("src", "dst"), [(SRC4, DST4), (SRC6, DST6)])
def test_round_trip(version: int, src: tuple[str, int], dst: tuple[str, int]) -> None:
    raw = encode(version, src, dst)
    assert decode(raw + b"payload") == ProxyHeader(version, src, dst, len(raw))


@pytest.mark.parametrize("version", [1, 2])
def test_incomplete_headers_ask_for_more(version: int) -> None:
    raw = encode(version, SRC6, DST6)
    for cut in range(len(raw)):
        assert decode(raw[:cut]) is None, cut
    assert decode(raw) is not None


def test_v2_tlvs_are_skipped() -> None:
    body = bytes([192, 0, 2, 1, 198, 51, 100, 1]) + (1).to_bytes(2, "big") + (2).to_bytes(2, "big")
    tlv = b"\x04\x00\x03abc"  # PP2_TYPE_NOOP with 3 bytes
    raw = V2_SIGNATURE + b"\x21\x11" + len(body + tlv).to_bytes(2, "big") + body + tlv
    assert decode(raw + b"x") == ProxyHeader(2, ("192.0.2.1", 1), ("198.51.100.1", 2), len(raw))


def test_v2_unix_and_udp_keep_the_real_peer() -> None:
    for family in (0x12, 0x31, 0x32):
        raw = V2_SIGNATURE + bytes([0x21, family]) + (216).to_bytes(2, "big") + bytes(216)
        assert decode(raw) == ProxyHeader(2, None, None, len(raw))


def test_v1_unknown_ignores_the_rest_of_the_line() -> None:
    raw = b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"
    assert decode(raw + b"GET") == ProxyHeader(1, None, None, len(raw))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"GET / HTTP/1.1\r\n", "not a PROXY protocol header"),
        (b"PROXX", "not a PROXY protocol header"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "malformed v1 header"),
        (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "malformed v1 header"),
        (b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n", "address family does not match"),
        (b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n", "address family does not match"),
        (b"PROXY TCP4 1.2.3.400 5.6.7.8 1 2\r\n", "bad address"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "bad port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", "bad port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "bad port"),
        (b"PROXY " + b"A" * V1_MAX, "longer than 107"),
        (b"\r\n\r\n\x00\r\nQUIX\n", "not a PROXY protocol header"),
        (V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12), "unsupported v2 version 1"),
        (V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12), "unknown v2 command 2"),
        (V2_SIGNATURE + b"\x21\x11\x00\x08" + bytes(8), "address block too short"),
        (V2_SIGNATURE + b"\x21\x11\xff\xff", "too long"),
    ],
)
def test_invalid_headers(raw: bytes, message: str) -> None:
    with pytest.raises(ProxyProtocolError, match=message):
        decode(raw)


def test_empty_input_needs_more() -> None:
    assert decode(b"") is None
