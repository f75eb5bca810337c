"""gRPC's wire rules that a balancer needs, as pure functions (no I/O, nothing else from poise).

Groundwork for HTTP/2 + gRPC (issue #22): these are the parts that do not depend on the
HTTP/2 engine. The rules are gRPC's own (its PROTOCOL-HTTP2, health-checking and status-code
documents):

* ``grpc-timeout`` is 1 to 8 ASCII digits and a unit: ``H`` hours, ``M`` minutes, ``S``
  seconds, ``m`` milliseconds, ``u`` microseconds, ``n`` nanoseconds. Absent means no
  deadline. A proxy forwards the time *remaining*, in the finest unit whose value fits.
* poise's own errors on a gRPC request are a *trailers-only* response: HTTP status 200, one
  header block ending the stream, ``content-type: application/grpc`` and ``grpc-status``
  (``grpc-message`` percent-encoded). Clients expect that, not an HTTP 5xx.
* Messages are framed: a compressed flag (1 byte), a length (4 bytes, big-endian), then the
  protobuf bytes. ``grpc.health.v1.Health/Check`` takes ``HealthCheckRequest{string service =
  1}`` and answers ``HealthCheckResponse{ServingStatus status = 1}`` (UNKNOWN 0, SERVING 1,
  NOT_SERVING 2, SERVICE_UNKNOWN 3); proto3 leaves out a default value, so an empty message
  means UNKNOWN.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Final

__all__ = [
    "CODES",
    "SERVING",
    "format_timeout",
    "health_request",
    "is_grpc",
    "parse_health_response",
    "parse_timeout",
    "trailers_only",
]

# grpc-status codes (the ones poise answers with are named in poise's failure table)
CODES: Final = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9, "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12,
    "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15, "UNAUTHENTICATED": 16,
}  # fmt: skip
SERVING: Final = 1  # HealthCheckResponse.ServingStatus
HEALTH_PATH: Final = "/grpc.health.v1.Health/Check"

_TIMEOUT = re.compile(r"([0-9]{1,8})([HMSmun])")
_UNITS: Final = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_FINEST_FIRST: Final = ("n", "u", "m", "S", "M", "H")
_NS: Final = {"n": 1, "u": 10**3, "m": 10**6, "S": 10**9, "M": 60 * 10**9, "H": 3600 * 10**9}
_MAX_VALUE: Final = 99_999_999
# grpc-message: percent-encode all but printable ASCII other than '%'
_PLAIN = frozenset(range(0x20, 0x7F)) - {ord("%")}


def is_grpc(content_type: str) -> bool:
    """A gRPC request: ``application/grpc``, alone or with a subtype (``+proto``) or
    parameters."""
    base = content_type.split(";", 1)[0].strip().lower()
    return base == "application/grpc" or base.startswith("application/grpc+")


def parse_timeout(value: str) -> float | None:
    """``grpc-timeout`` in seconds; None when it is not one (then a proxy ignores it)."""
    m = _TIMEOUT.fullmatch(value.strip())
    if m is None:
        return None
    return int(m.group(1)) * _UNITS[m.group(2)]


def format_timeout(seconds: float) -> str:
    """``seconds`` as a ``grpc-timeout``: to the nearest nanosecond, then in the finest unit
    whose value fits in 8 digits, rounded up to a whole unit (a forwarded deadline does not
    come sooner than it was; at least 1 unit)."""
    if not seconds > 0:  # (NaN too)
        return "1n"  # already due: the smallest deadline there is
    if math.isinf(seconds):
        return f"{_MAX_VALUE}H"
    ns = max(round(Fraction(seconds) * 1_000_000_000), 1)  # exact: no float rounding here
    for unit in _FINEST_FIRST:
        count = -(-ns // _NS[unit])
        if count <= _MAX_VALUE:
            return f"{count}{unit}"
    return f"{_MAX_VALUE}H"  # about 11,400 years


def trailers_only(status: int, message: str = "") -> list[tuple[str, str]]:
    """The header fields of a trailers-only response (HTTP status 200, ending the stream)."""
    fields = [(":status", "200"), ("content-type", "application/grpc"),
              ("grpc-status", str(status))]  # fmt: skip
    if message:
        encoded = "".join(chr(b) if b in _PLAIN else f"%{b:02X}" for b in message.encode("utf-8"))
        fields.append(("grpc-message", encoded))
    return fields


def health_request(service: str = "") -> bytes:
    """The framed ``HealthCheckRequest`` for ``service`` ("" = the server as a whole)."""
    name = service.encode("utf-8")
    body = b"" if not name else b"\x0a" + _varint(len(name)) + name
    return b"\x00" + len(body).to_bytes(4, "big") + body


def parse_health_response(data: bytes) -> int | None:
    """The serving status in a framed ``HealthCheckResponse`` (0 when left out); None when
    ``data`` is not one uncompressed, complete message."""
    if len(data) < 5 or data[0] != 0:
        return None  # cut short, or compressed (poise asks for identity)
    size = int.from_bytes(data[1:5], "big")
    body = data[5:]
    if len(body) != size:
        return None
    status = 0
    i = 0
    while i < len(body):
        got = _read_varint(body, i)
        if got is None:
            return None
        key, i = got
        field, wire = key >> 3, key & 7
        if wire == 0:  # varint
            got = _read_varint(body, i)
            if got is None:
                return None
            value, i = got
            if field == 1:
                status = value
        elif wire == 2:  # length-delimited: skip
            got = _read_varint(body, i)
            if got is None or got[1] + got[0] > len(body):
                return None
            i = got[1] + got[0]
        elif wire == 1:  # 64-bit
            i += 8
        elif wire == 5:  # 32-bit
            i += 4
        else:
            return None  # groups (3, 4) are not proto3; anything else is not protobuf
        if i > len(body):
            return None
    return status


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: bytes, i: int) -> tuple[int, int] | None:
    """(value, index after it), or None when cut short or longer than 10 bytes."""
    value = shift = 0
    for j in range(i, min(i + 10, len(data))):
        value |= (data[j] & 0x7F) << shift
        if not data[j] & 0x80:
            return value, j + 1
        shift += 7
    return None
