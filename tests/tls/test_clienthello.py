"""The ClientHello SNI reader, on ClientHellos made by the ssl module (OpenSSL)."""

from __future__ import annotations

import contextlib
import ssl

from hypothesis import given, settings
from hypothesis import strategies as st

from poise.tls.clienthello import MORE, read_server_name


def client_hello(server_name: str | None, *, tls13_only: bool = False) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # no CA loading: only the hello is wanted
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if tls13_only:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def records(hello: bytes, size: int) -> bytes:
    """The same handshake message re-framed into records of ``size`` bytes."""
    msg = hello[5:]
    out = b""
    for i in range(0, len(msg), size):
        part = msg[i : i + size]
        out += b"\x16\x03\x01" + len(part).to_bytes(2, "big") + part
    return out


def test_reads_the_name() -> None:
    for name in ("example.com", "a.b-c.example.test", "x"):
        peek = read_server_name(client_hello(name))
        assert peek.done and peek.server_name == name
    peek = read_server_name(client_hello("Upper.Example.COM", tls13_only=True))
    assert peek.done and peek.server_name == "upper.example.com"


def test_no_sni_is_done_without_a_name() -> None:
    peek = read_server_name(client_hello(None))
    assert peek.done and peek.server_name is None
    # an IP address is never sent as SNI (RFC 6066 §3)
    peek = read_server_name(client_hello("127.0.0.1"))
    assert peek.done and peek.server_name is None


def test_every_prefix_asks_for_more_and_bytes_after_do_not_matter() -> None:
    hello = client_hello("prefix.test")
    for n in range(len(hello)):
        assert read_server_name(hello[:n]) == MORE, n
    assert read_server_name(hello + b"\x17\x03\x03\x00\x01x").server_name == "prefix.test"


def test_a_hello_fragmented_over_records() -> None:
    hello = client_hello("fragmented.test")
    for size in (1, 7, 100, 512):
        framed = records(hello, size)
        assert read_server_name(framed).server_name == "fragmented.test", size
        assert read_server_name(framed[:-1]) == MORE


def test_limit_bounds_buffering() -> None:
    hello = client_hello("big.test")
    peek = read_server_name(hello, limit=len(hello) - 10)
    assert peek.state == "invalid" and "limit" in peek.reason
    # fragmented into tiny records: the record headers count too
    peek = read_server_name(records(hello, 1), limit=len(hello) + 100)
    assert peek.state == "invalid"


def test_not_tls() -> None:
    for data in (
        b"GET / HTTP/1.1\r\n",
        b"\x16\x02\x00\x00\x10",
        b"\x16\x03\x01\x00\x00",
        b"\x15\x03\x01\x00\x02\x02\x28",
        b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",
    ):
        peek = read_server_name(data)
        assert peek.state == "invalid", data


def test_malformed_server_name_extension() -> None:
    hello = bytearray(client_hello("abc.test"))
    i = hello.index(b"abc.test")
    hello[i : i + 1] = b"\x00"  # a NUL in the name
    assert read_server_name(bytes(hello)).state == "invalid"
    assert read_server_name(b"").state == "more"


FUZZ_HELLO = client_hello("fuzz.example.test")


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutations_never_raise(data: st.DataObject) -> None:
    hello = bytearray(FUZZ_HELLO)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(hello) - 1))
        hello[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(hello)))
    peek = read_server_name(bytes(hello[:cut]))
    assert peek.state in ("more", "done", "invalid")


def tls10_hello() -> bytes:
    """A TLS 1.0 client's ClientHello, as old clients send it: no extensions at all."""
    body = b"\x03\x01" + b"\x11" * 32 + b"\x00" + b"\x00\x04\x00\x2f\x00\x35" + b"\x01\x00"
    msg = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(msg).to_bytes(2, "big") + msg


def test_the_versions_a_client_offers() -> None:
    assert read_server_name(tls10_hello()).versions == (0x0300, 0x0301)
    assert read_server_name(client_hello("v.test", tls13_only=True)).versions == (0x0304,)
    assert {0x0303, 0x0304} <= set(read_server_name(client_hello("v.test")).versions)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # no supported_versions: up to legacy_version
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname="v.test")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    assert max(read_server_name(out.read()).versions) == 0x0303
