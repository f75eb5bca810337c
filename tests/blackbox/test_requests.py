"""Black-box request cases (docs/http-rules.md): raw bytes in, exact bytes out.

Every case runs twice: the request sent whole, and sent in tiny pieces (one byte per write,
or 997-byte pieces for the big ones), so no rule depends on how reads are split.

A *refused* case expects the status, ``Connection: close``, EOF, and no request reaching the
backend: a ``GET /smuggled`` appended after it is never forwarded. When the request is sent
whole, the backend receives nothing at all; when it is sent in pieces, a head that was valid
may already be on its way before the body breaks the rules — that backend connection is then
closed mid-request, which no server can take for a complete request.

A *forwarded* case expects a 200 from the backend and checks the exact bytes it received.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from poise.testing import ScriptedBackend
from tests.integration.support import address, full, running

# every case with the C hub and with the loop's own server (tests/wire/helpers.py)
pytestmark = pytest.mark.usefixtures("wire_hub")

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"


@dataclass(frozen=True)
class Refused:
    status: int


@dataclass(frozen=True)
class Forwarded:
    has: tuple[bytes, ...] = ()
    lacks: tuple[bytes, ...] = ()
    ends_with: bytes | None = None
    first_line: bytes | None = None
    extra: dict[str, object] = field(default_factory=dict)


def req(head: bytes, body: bytes = b"", host: bytes | None = b"a") -> bytes:
    lines = head + (b"Host: " + host + b"\r\n" if host is not None else b"")
    return lines + b"\r\n" + body


POST = b"POST / HTTP/1.1\r\n"
GET = b"GET / HTTP/1.1\r\n"
CHUNKED = POST + b"Transfer-Encoding: chunked\r\n"

CASES: dict[str, tuple[bytes, Refused | Forwarded]] = {
    # framing: Content-Length and Transfer-Encoding (RFC 9112 §6)
    "cl_and_te": (req(CHUNKED + b"Content-Length: 5\r\n", b"0\r\n\r\n"), Refused(400)),
    "cl_twice_differing": (req(POST + b"Content-Length: 1\r\nContent-Length: 2\r\n", b"ab"),
                           Refused(400)),
    "cl_list": (req(POST + b"Content-Length: 5, 5\r\n", b"hello"), Refused(400)),
    **{
        f"cl_{name}": (req(POST + b"Content-Length: " + v + b"\r\n", b"hello"), Refused(400))
        for name, v in {
            "plus": b"+5", "minus": b"-1", "hex": b"0x5", "underscore": b"5_0",
            "space_inside": b"5 5", "empty": b"", "fullwidth": "\uff15".encode(),
            "huge": b"9" * 20,
        }.items()
    },
    "te_xchunked": (req(POST + b"Transfer-Encoding: xchunked\r\n"), Refused(501)),
    "te_gzip": (req(POST + b"Transfer-Encoding: gzip\r\n"), Refused(501)),
    "te_identity": (req(POST + b"Transfer-Encoding: identity\r\n"), Refused(501)),
    "te_chunked_gzip": (req(POST + b"Transfer-Encoding: chunked, gzip\r\n"), Refused(400)),
    "te_chunked_twice": (req(CHUNKED + b"Transfer-Encoding: chunked\r\n", b"0\r\n\r\n"),
                         Refused(400)),
    "te_space_before_colon": (req(POST + b"Transfer-Encoding : chunked\r\n", b"0\r\n\r\n"),
                              Refused(400)),
    "te_in_http10": (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                     Refused(400)),
    # chunked bodies (RFC 9112 §7.1)
    **{
        f"chunk_size_{name}": (req(CHUNKED, size + b"\r\nab\r\n0\r\n\r\n"), Refused(400))
        for name, size in {
            "hex_prefix": b"0x2", "plus": b"+2", "underscore": b"2_0", "leading_space": b" 2",
            "not_hex": b"Z", "overflow": b"F" * 17,
        }.items()
    },
    "chunk_spill": (req(CHUNKED, b"5\r\nAAAAAXX\r\n0\r\n\r\n"), Refused(400)),
    "chunk_missing_crlf": (req(CHUNKED, b"2\r\nab0\r\n\r\n"), Refused(400)),
    "chunk_bare_lf": (req(CHUNKED, b"2\nab\r\n0\r\n\r\n"), Refused(400)),
    "trailer_content_length": (req(CHUNKED, b"2\r\nab\r\n0\r\nContent-Length: 5\r\n\r\n"),
                               Refused(400)),
    # header syntax (RFC 9112 §5)
    "obs_fold": (req(GET + b"X-A: b\r\n c\r\n"), Refused(400)),
    "bare_cr_in_value": (req(GET + b"X-A: b\rc\r\n"), Refused(400)),
    "nul_in_value": (req(GET + b"X-A: b\x00c\r\n"), Refused(400)),
    "space_before_colon": (req(GET + b"X-A : b\r\n"), Refused(400)),
    "bad_name_char": (req(GET + b"X(A): b\r\n"), Refused(400)),
    "whitespace_line_after_request_line": (b"GET / HTTP/1.1\r\n Host: a\r\n\r\n", Refused(400)),
    "lf_only_lines": (b"GET / HTTP/1.1\nHost: a\n\n", Refused(400)),
    # limits
    "101_headers": (req(GET + b"X-A: 1\r\n" * 101), Refused(431)),
    "70k_header": (req(GET + b"X-Big: " + b"v" * 70 * 1024 + b"\r\n"), Refused(431)),
    "16k_target": (req(b"GET /" + b"a" * 16 * 1024 + b" HTTP/1.1\r\n"), Refused(414)),
    # Host (RFC 9112 §3.2)
    "no_host_http11": (req(GET, host=None), Refused(400)),
    "two_hosts": (req(GET + b"Host: b\r\n"), Refused(400)),
    # field names are case-insensitive, however a client spells them
    "two_hosts_spelled_differently": (req(GET + b"HOST: b\r\n"), Refused(400)),
    "cl_and_te_spelled_oddly": (
        req(POST + b"transfer-ENCODING: chunked\r\ncontent-LENGTH: 5\r\n", b"0\r\n\r\n"),
        Refused(400),
    ),
    "connection_spelled_oddly": (
        req(GET + b"CONNECTION: X-Foo\r\nx-FOO: 1\r\nX-Forwarded-FOR: 6.6.6.6\r\n"),
        Forwarded(lacks=(b"X-Foo", b"x-FOO", b"CONNECTION", b"6.6.6.6")),
    ),
    "host_userinfo": (req(GET, host=b"user@a"), Refused(400)),
    "host_path": (req(GET, host=b"a/b"), Refused(400)),
    "host_comma": (req(GET, host=b"a,b"), Refused(400)),
    "host_space": (req(GET, host=b"a b"), Refused(400)),
    # versions
    "version_1_01": (req(b"GET / HTTP/1.01\r\n"), Refused(400)),
    "version_lowercase": (req(b"GET / http/1.1\r\n"), Refused(400)),
    "version_trailing_space": (req(b"GET / HTTP/1.1 \r\n"), Refused(400)),
    "version_2_0": (req(b"GET / HTTP/2.0\r\n"), Refused(505)),
    # kept alive on request, as 1.1 is by default: the version is still read
    "version_2_0_keep_alive": (req(b"GET / HTTP/2.0\r\nConnection: keep-alive\r\n"),
                               Refused(505)),
    "version_0_9_keep_alive": (req(b"GET / HTTP/0.9\r\nConnection: keep-alive\r\n"),
                               Refused(400)),
    "http_0_9": (b"GET /\r\n\r\n", Refused(400)),
    # the request line: method SP request-target SP HTTP-version, one space each (RFC 9112 §3)
    "request_line_two_spaces_after_method": (req(b"GET  / HTTP/1.1\r\n"), Refused(400)),
    "request_line_two_spaces_before_version": (req(b"GET /  HTTP/1.1\r\n"), Refused(400)),
    "request_line_many_spaces": (req(b"POST    /a    HTTP/1.1\r\n"), Refused(400)),
    "request_line_tab_after_method": (req(b"GET\t/ HTTP/1.1\r\n"), Refused(400)),
    "request_line_tab_before_version": (req(b"GET /\tHTTP/1.1\r\n"), Refused(400)),
    # methods and targets
    "connect": (req(b"CONNECT a:443 HTTP/1.1\r\n", host=b"a:443"), Refused(405)),
    "fragment": (req(b"GET /a#b HTTP/1.1\r\n"), Refused(400)),
    "backslash": (req(b"GET /a\\b HTTP/1.1\r\n"), Refused(400)),
    "raw_non_ascii": (req(b"GET /caf\xc3\xa9 HTTP/1.1\r\n"), Refused(400)),
    "nul_in_target": (req(b"GET /a\x00b HTTP/1.1\r\n"), Refused(400)),
    "asterisk_not_options": (req(b"GET * HTTP/1.1\r\n"), Refused(400)),
    # forwarded, and exactly how
    "plain_get": (req(GET), Forwarded(first_line=b"GET / HTTP/1.1", has=(b"\r\nHost: a\r\n",))),
    "http10_keep_alive_without_host": (
        b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        Forwarded(first_line=b"GET / HTTP/1.1", has=(b"\r\nHost: 127.0.0.1:",)),
    ),
    "http10_without_host": (
        b"GET / HTTP/1.0\r\n\r\n",
        Forwarded(first_line=b"GET / HTTP/1.1", has=(b"\r\nHost: 127.0.0.1:",)),
    ),
    "options_asterisk": (req(b"OPTIONS * HTTP/1.1\r\n"),
                         Forwarded(first_line=b"OPTIONS * HTTP/1.1")),
    "absolute_form": (b"GET http://api.test/x?y=1 HTTP/1.1\r\nHost: other\r\n\r\n",
                      Forwarded(first_line=b"GET /x?y=1 HTTP/1.1",
                                has=(b"\r\nHost: api.test\r\n",), lacks=(b"other",))),
    "percent_encoding_kept": (req(b"GET /a%2Fb?x=%20&y=%zz HTTP/1.1\r\n"),
                              Forwarded(first_line=b"GET /a%2Fb?x=%20&y=%zz HTTP/1.1")),
    "mixed_case_chunked": (req(POST + b"TrAnSfEr-EnCoDiNg: cHuNkEd\r\n", b"3\r\nabc\r\n0\r\n\r\n"),
                           Forwarded(has=(b"\r\nTransfer-Encoding: chunked\r\n",),
                                     lacks=(b"cHuNkEd",), ends_with=b"3\r\nabc\r\n0\r\n\r\n")),
    "empty_list_element_te": (req(POST + b"Transfer-Encoding: ,chunked\r\n",
                                  b"1\r\na\r\n0\r\n\r\n"),
                              Forwarded(has=(b"\r\nTransfer-Encoding: chunked\r\n",),
                                        ends_with=b"1\r\na\r\n0\r\n\r\n")),
    "chunk_extensions_and_trailers_stripped": (
        req(CHUNKED, b"3;ext=1;q=\"x\"\r\nabc\r\n0\r\nX-T: 1\r\n\r\n"),
        Forwarded(ends_with=b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n", lacks=(b"ext=", b"X-T")),
    ),
    # llhttp refuses even identical repeats; the rules allow collapsing or refusing
    "cl_twice_identical": (req(POST + b"Content-Length: 3\r\nContent-Length: 3\r\n", b"abc"),
                           Refused(400)),
    "get_with_body": (req(GET + b"Content-Length: 4\r\n", b"body"),
                      Forwarded(ends_with=b"Content-Length: 4\r\n\r\nbody")),
    "hop_by_hop_removed": (
        req(GET + b"Connection: keep-alive, X-Foo\r\nX-Foo: 1\r\nKeep-Alive: timeout=5\r\n"
            b"Proxy-Connection: keep-alive\r\nUpgrade: h2c\r\nTE: trailers\r\nX-Keep: 1\r\n"),
        Forwarded(has=(b"\r\nX-Keep: 1\r\n",),
                  lacks=(b"X-Foo", b"Keep-Alive", b"Proxy-Connection", b"Upgrade", b"TE:",
                         b"Connection")),
    ),
    "connection_cannot_remove_ours": (
        req(GET + b"Connection: close, X-Forwarded-For\r\n"),
        Forwarded(has=(b"\r\nX-Forwarded-For: 127.0.0.1\r\n",)),
    ),
    "spoofed_forwarding_replaced": (
        req(GET + b"X-Forwarded-For: 1.2.3.4\r\nX-Forwarded-Proto: https\r\n"),
        Forwarded(has=(b"\r\nX-Forwarded-For: 127.0.0.1\r\n", b"\r\nX-Forwarded-Proto: http\r\n"),
                  lacks=(b"1.2.3.4", b"https")),
    ),
    # a "_" in a field name: dropped (nginx's underscores_in_headers off), since some
    # frameworks read "_" as "-" and "Transfer_Encoding" would become framing behind us
    "underscore_fields_dropped": (
        req(POST + b"Transfer_Encoding: chunked\r\nContent-Length: 3\r\nX_User: evil\r\n"
            b"Content_Length: 9\r\nX-Keep: 1\r\n", b"abc"),
        Forwarded(has=(b"\r\nX-Keep: 1\r\n", b"\r\nContent-Length: 3\r\n"),
                  lacks=(b"_", b"chunked", b"evil", b": 9"), ends_with=b"\r\n\r\nabc"),
    ),
    "underscore_host_is_not_host": (req(GET + b"Ho_st: b\r\n"),
                                    Forwarded(has=(b"\r\nHost: a\r\n",), lacks=(b"Ho_st",))),
    "empty_lines_before_request": (b"\r\n" + req(GET),
                                   Forwarded(first_line=b"GET / HTTP/1.1")),
    "header_order_and_case_kept": (
        req(GET + b"X-b: 2\r\nx-A: 1\r\n"),
        Forwarded(has=(b"\r\nX-b: 2\r\nx-A: 1\r\n",)),
    ),
}  # fmt: skip


def pieces(data: bytes, whole: bool) -> list[bytes]:
    if whole:
        return [data]
    size = 1 if len(data) < 4096 else 997
    return [data[i : i + size] for i in range(0, len(data), size)]


async def send(url: str, data: bytes, whole: bool) -> bytes:
    """Send ``data`` and read until EOF or until the backend's one response ("ok") is in."""
    host, port = address(url)
    reader, writer = await asyncio.open_connection(host, port)
    answer = b""
    try:
        for piece in pieces(data, whole):
            writer.write(piece)
            await writer.drain()
    except ConnectionError:
        pass  # refused mid-way: what was answered is still readable
    try:
        async with asyncio.timeout(10):
            while not answer.endswith(b"\r\n\r\nok"):
                chunk = await reader.read(65536)
                if not chunk:
                    break
                answer += chunk
    finally:
        writer.close()
    return answer


@pytest.mark.parametrize("whole", [True, False], ids=["whole", "pieces"])
@pytest.mark.parametrize("name", list(CASES))
async def test_request_case(name: str, whole: bool) -> None:
    request, expect = CASES[name]
    async with ScriptedBackend(OK) as backend:
        doc = full([backend.url], health={"enabled": False})
        async with running(doc) as (_, url):
            smuggled = SMUGGLED if isinstance(expect, Refused) else b""
            answer = await send(url, request + smuggled, whole)
    received = b"".join(backend.received)
    if isinstance(expect, Refused):
        assert answer.startswith(b"HTTP/1.1 %d " % expect.status), answer[:100]
        assert answer.count(b"HTTP/1.1 ") == 1
        assert b"\r\nConnection: close\r\n" in answer
        assert b"/smuggled" not in received
        if whole:
            assert received == b""
        else:
            # a head forwarded before its body broke the rules: that connection was dropped
            assert received == b"" or len(backend.received) == 1
        return
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:100]
    head = received.split(b"\r\n", 1)[0]
    if expect.first_line is not None:
        assert head == expect.first_line
    for needle in expect.has:
        assert needle in received, (needle, received[:400])
    for needle in expect.lacks:
        assert needle not in received, (needle, received[:400])
    if expect.ends_with is not None:
        assert received.endswith(expect.ends_with), received[-200:]
