"""Where a hashing policy finds its key: the client address, a header, a cookie, the URI or
a query parameter. Parsing the spec happens once at config time; extraction is pure."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

KINDS = ("ip", "header", "cookie", "uri", "query")


@dataclass(frozen=True, slots=True)
class KeySource:
    kind: str  # one of KINDS
    name: bytes = b""  # header name (lower case), cookie name or query parameter

    @classmethod
    def parse(cls, spec: str) -> KeySource:
        """``ip``, ``uri``, ``header:X-User``, ``cookie:session``, ``query:key``."""
        kind, _, name = spec.partition(":")
        kind = kind.strip().lower()
        if kind not in KINDS:
            raise ValueError(
                f"unknown key source {spec!r} (use ip, uri, header:NAME, cookie:NAME or query:NAME)"
            )
        if kind in ("header", "cookie", "query"):
            if not name.strip():
                raise ValueError(f"key source {kind!r} needs a name, e.g. {kind}:NAME")
            raw = name.strip().encode("ascii", "strict")
            return cls(kind, raw.lower() if kind == "header" else raw)
        if name:
            raise ValueError(f"key source {kind!r} takes no name")
        return cls(kind)

    def __str__(self) -> str:
        return f"{self.kind}:{self.name.decode()}" if self.name else self.kind


def extract(source: KeySource, peer: bytes, target: bytes, headers: list[bytes]) -> bytes | None:
    """The key for one request, or None when the request does not carry it. ``headers`` is
    the proxy's flat list: name, b": ", value, b"\r\n", repeated. Runs per request: plain
    loops, no per-call lists or comprehensions (each of those is a function call in 3.11)."""
    kind = source.kind
    if kind == "header":  # the usual one first
        wanted = source.name
        found = None
        for i in range(0, len(headers), 4):
            if headers[i].lower() == wanted:
                # repeated fields: their values joined with commas (RFC 9110 5.3)
                found = headers[i + 2] if found is None else found + b"," + headers[i + 2]
        return found
    if kind == "ip":
        return peer
    if kind == "uri":
        return target
    if kind == "query":
        q = target.find(b"?")
        if q < 0:
            return None
        for pair in target[q + 1 :].split(b"&"):
            name, eq, value = pair.partition(b"=")
            if unquote_to_bytes(name) == source.name:
                return unquote_to_bytes(value) if eq else b""
        return None
    for i in range(0, len(headers), 4):  # cookie: the first pair of that name
        if headers[i].lower() == b"cookie":
            for part in headers[i + 2].split(b";"):
                name, eq, value = part.strip().partition(b"=")
                if eq and name == source.name:
                    return value
    return None
