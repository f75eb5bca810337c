"""Shared by the head-scanner tests: the C scanner built from src/poise/l7/_scan.c (by
``pip install .``, or here into a temporary directory), and the inputs both scanners see."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from tests.native import SRC, compile_extension

SOURCE = SRC / "l7" / "_scan.c"

REQUESTS = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /a/b?c=d&e=f HTTP/1.1\r\nHost: svc.test:8080\r\nUser-Agent: curl/8.0\r\n"
    b"Accept: */*\r\nCookie: sid=abc; theme=dark\r\nX-Request-Id: 1234\r\n\r\n",
    b"HEAD /x HTTP/1.1\r\nConnection: close\r\nHost: [::1]:80\r\nX_Y: 1\r\nKeep-Alive: 5\r\n"
    b"TE: trailers\r\nUpgrade: h2c\r\nProxy-Authorization: Basic eA==\r\n\r\n",
    b"DELETE /item/7 HTTP/1.1\r\nHost: api.test\r\nConnection: Keep-Alive\r\n"
    b"Authorization: Bearer x\r\nAccept-Language: fr\xc3\xa9\r\nX-T: a\tb\r\n\r\n",
    b"OPTIONS /o HTTP/1.1\r\nhost: h\r\nX-Client-Subject: CN=evil\r\nX-User: u1\r\n"
    b"Expect: 100-continue\r\n\r\n",
    b"POST /form HTTP/1.1\r\nHost: 10.0.0.1\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
    b"PUT /p HTTP/1.1\r\nHost: p\r\nContent-Length: 0\r\n\r\n",
    b"POST /api/items?x=1 HTTP/1.1\r\nHost: api.test\r\nContent-Type: application/json\r\n"
    b"Content-Length: 13\r\nIdempotency-Key: k1\r\n\r\n" + b'{"name":"ab"}',
    b"PATCH /i HTTP/1.1\r\nContent-Length: 5\r\nHost: h\r\nConnection: close\r\n\r\nhel",
]
RESPONSES = [
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 22 Nov 2026 04:31:14 GMT\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 16\r\n"
    b'Connection: keep-alive\r\nETag: "6740a0a7-10"\r\nAccept-Ranges: bytes\r\n\r\n'
    b"0123456789abcdef",
    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nconnection: close\r\nContent-Length:  3 \r\nKeep-Alive: timeout=5\r\n"
    b"X-Empty:\r\nProxy-Authenticate: Basic\r\n\r\nabc",
    b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\nX-Obs: caf\xe9\r\nX-Tab: a\tb\r\n\r\nok",
    b"HTTP/1.1 302 \r\nLocation: /x\r\nContent-Length: 0\r\nUpgrade: h2\r\nTrailer: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n",
]
# bytes that matter to a head's syntax, tried at every position
INTERESTING = b"\x00\t\n\r :_,;/#\\\x7f\x80\xffAz0"


def mutations(head: bytes) -> list[bytes]:
    """Every byte of ``head`` replaced by, and preceded by, each INTERESTING byte; every byte
    left out; every prefix."""
    out = []
    for i in range(len(head)):
        out.append(head[:i] + head[i + 1 :])
        out.append(head[:i])
        for b in INTERESTING:
            c = bytes((b,))
            out.append(head[:i] + c + head[i + 1 :])
            out.append(head[:i] + c + head[i:])
    return out


def build_native(directory: Path) -> ModuleType | None:
    """The C scanner: the installed one when ``pip install .`` built it, else compiled from
    the source into ``directory``; None without a C compiler."""
    try:
        from poise.l7 import _scan  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        pass
    else:
        return _scan  # type: ignore[no-any-return,unused-ignore]
    return compile_scanner(directory, [])


def compile_scanner(directory: Path, flags: list[str]) -> ModuleType | None:
    return compile_extension(SOURCE, directory, flags)
