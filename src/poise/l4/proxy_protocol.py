"""The PROXY protocol (HAProxy's spec, versions 1 and 2): encode and decode. Pure.

Theory of operation
-------------------
A proxy that relays TCP hides the client's address from the backend. The PROXY protocol
puts it back: before any relayed byte, the proxy sends one header naming the original
source and destination. Version 1 is a text line::

    PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\\r\\n      (at most 107 bytes)
    PROXY UNKNOWN\\r\\n                                      (address not known)

Version 2 is binary: a 12-byte signature, a version/command byte (0x21 PROXY, 0x20
LOCAL), an address family/transport byte (0x11 TCP over IPv4, 0x21 TCP over IPv6, 0x00
unspecified), a 16-bit big-endian length of what follows, then the addresses and ports in
network order (12 bytes for IPv4, 36 for IPv6) and optional TLVs, which a receiver may skip.

The spec requires a receiver to know whether a header is coming (it "MUST NOT try to guess"),
so poise reads one only from peers configured as trusted, and from them it is mandatory.
``decode`` is incremental: it returns ``None`` while the header is incomplete, a
``ProxyHeader`` (with how many bytes it used) once complete, and raises ``ProxyProtocolError``
as soon as the bytes cannot start a valid header. ``LOCAL`` and unspecified or non-TCP
families carry no usable address: ``source`` is then None and the real peer stands.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

__all__ = [
    "V1_MAX",
    "V2_SIGNATURE",
    "ProxyHeader",
    "ProxyProtocolError",
    "decode",
    "encode",
    "encode_v1",
    "encode_v2",
]

V1_MAX = 107  # the longest v1 line, CRLF included (spec section 2.1)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_MAX_PAYLOAD = 2048  # addresses + TLVs poise accepts after the 16-byte v2 prefix
_V1_PREFIX = b"PROXY "
_CMD_LOCAL, _CMD_PROXY = 0x0, 0x1
_FAM_TCP4, _FAM_TCP6 = 0x11, 0x21

Address = tuple[str, int]  # (ip, port)


class ProxyProtocolError(ValueError):
    """The bytes are not a valid PROXY protocol header."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    version: int  # 1 or 2
    source: Address | None  # None: LOCAL, UNKNOWN or a family without TCP addresses
    destination: Address | None
    length: int  # bytes the header took; the relayed stream starts after them


def _family(src: Address, dst: Address) -> tuple[int, bytes, bytes] | None:
    """(4 or 6, packed source, packed destination); IPv4 beside IPv6 is written as
    v4-mapped IPv6, and a v4-mapped pair as plain IPv4."""
    try:
        a, b = ipaddress.ip_address(src[0]), ipaddress.ip_address(dst[0])
    except ValueError:
        return None
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        a = a.ipv4_mapped
    if isinstance(b, ipaddress.IPv6Address) and b.ipv4_mapped is not None:
        b = b.ipv4_mapped
    if a.version == b.version == 4:
        return 4, a.packed, b.packed
    if a.version == 4:
        a = ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + a.packed)
    if b.version == 4:
        b = ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + b.packed)
    return 6, a.packed, b.packed


def encode_v1(src: Address | None, dst: Address | None) -> bytes:
    fam = _family(src, dst) if src is not None and dst is not None else None
    if fam is None or src is None or dst is None:
        return b"PROXY UNKNOWN\r\n"
    version, s, d = fam
    if version == 4:
        proto, sa, da = "TCP4", ipaddress.IPv4Address(s), ipaddress.IPv4Address(d)
    else:
        proto, sa, da = "TCP6", ipaddress.IPv6Address(s), ipaddress.IPv6Address(d)  # type: ignore[assignment]
    return f"PROXY {proto} {sa} {da} {src[1]} {dst[1]}\r\n".encode("ascii")


def encode_v2(src: Address | None, dst: Address | None, *, local: bool = False) -> bytes:
    """A v2 header; ``local`` (or unknown addresses) sends the LOCAL command / UNSPEC family
    (a connection the proxy made for itself, e.g. a health check)."""
    fam = None if local or src is None or dst is None else _family(src, dst)
    if fam is None or src is None or dst is None:
        cmd = _CMD_LOCAL if local else _CMD_PROXY
        return V2_SIGNATURE + bytes((0x20 | cmd, 0x00, 0, 0))
    version, s, d = fam
    body = s + d + src[1].to_bytes(2, "big") + dst[1].to_bytes(2, "big")
    family = _FAM_TCP4 if version == 4 else _FAM_TCP6
    return V2_SIGNATURE + bytes((0x21, family)) + len(body).to_bytes(2, "big") + body


def encode(version: int, src: Address | None, dst: Address | None) -> bytes:
    return encode_v1(src, dst) if version == 1 else encode_v2(src, dst)


def decode(data: bytes | bytearray) -> ProxyHeader | None:
    """The header at the start of ``data``; None when more bytes are needed."""
    if not data:
        return None
    if data[0] == _V1_PREFIX[0]:
        return _decode_v1(data)
    if data[0] == V2_SIGNATURE[0]:
        return _decode_v2(data)
    raise ProxyProtocolError("not a PROXY protocol header")


def _decode_v1(data: bytes | bytearray) -> ProxyHeader | None:
    n = min(len(data), len(_V1_PREFIX))
    if data[:n] != _V1_PREFIX[:n]:
        raise ProxyProtocolError("not a PROXY protocol header")
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyProtocolError(f"v1 header longer than {V1_MAX} bytes")
        return None
    line = bytes(data[:end])
    length = end + 2
    parts = line.split(b" ")
    if len(parts) >= 2 and parts[1] == b"UNKNOWN":
        return ProxyHeader(1, None, None, length)  # the rest of the line is to be ignored
    if len(parts) != 6 or parts[1] not in (b"TCP4", b"TCP6"):
        raise ProxyProtocolError(f"malformed v1 header: {line[:V1_MAX]!r}")
    version = 4 if parts[1] == b"TCP4" else 6
    try:
        src_ip = ipaddress.ip_address(parts[2].decode("ascii"))
        dst_ip = ipaddress.ip_address(parts[3].decode("ascii"))
    except ValueError:
        raise ProxyProtocolError(f"bad address in v1 header: {line!r}") from None
    if src_ip.version != version or dst_ip.version != version:
        raise ProxyProtocolError(f"address family does not match {parts[1].decode()}")
    ports = [_port(p) for p in parts[4:]]
    return ProxyHeader(1, (str(src_ip), ports[0]), (str(dst_ip), ports[1]), length)


def _port(raw: bytes) -> int:
    # decimal, no leading zeroes (spec 2.1), 0..65535
    if not raw.isdigit() or (len(raw) > 1 and raw[:1] == b"0") or len(raw) > 5:
        raise ProxyProtocolError(f"bad port in v1 header: {raw!r}")
    port = int(raw)
    if port > 65535:
        raise ProxyProtocolError(f"bad port in v1 header: {raw!r}")
    return port


def _decode_v2(data: bytes | bytearray) -> ProxyHeader | None:
    n = min(len(data), len(V2_SIGNATURE))
    if data[:n] != V2_SIGNATURE[:n]:
        raise ProxyProtocolError("not a PROXY protocol header")
    if len(data) < 16:
        return None
    ver_cmd, family = data[12], data[13]
    if ver_cmd >> 4 != 2:
        raise ProxyProtocolError(f"unsupported v2 version {ver_cmd >> 4}")
    cmd = ver_cmd & 0x0F
    if cmd not in (_CMD_LOCAL, _CMD_PROXY):
        raise ProxyProtocolError(f"unknown v2 command {cmd}")
    size = int.from_bytes(data[14:16], "big")
    if size > V2_MAX_PAYLOAD:
        raise ProxyProtocolError(f"v2 header too long ({size} bytes)")
    if len(data) < 16 + size:
        return None
    body = bytes(data[16 : 16 + size])
    length = 16 + size
    if cmd == _CMD_LOCAL or family not in (_FAM_TCP4, _FAM_TCP6):
        return ProxyHeader(2, None, None, length)  # UNSPEC, UDP, UNIX: keep the real peer
    need = 12 if family == _FAM_TCP4 else 36
    if size < need:
        raise ProxyProtocolError(f"v2 address block too short ({size} < {need} bytes)")
    alen = 4 if family == _FAM_TCP4 else 16
    src = str(ipaddress.ip_address(body[:alen]))
    dst = str(ipaddress.ip_address(body[alen : 2 * alen]))
    sport = int.from_bytes(body[2 * alen : 2 * alen + 2], "big")
    dport = int.from_bytes(body[2 * alen + 2 : 2 * alen + 4], "big")
    return ProxyHeader(2, (src, sport), (dst, dport), length)
