"""The head scanners (poise.l7.scan, and its C twin src/poise/l7/_scan.c).

Three things are checked:
1. what they answer for hand-written heads (plain ones, and every reason to answer None);
2. the C and Python scanners agree on every input: hand-written, every single-byte change at
   every position of them, every prefix, and generated heads;
3. the contract that makes them safe on the request path: on every input a scanner answers
   for, the proxy does exactly what the general path (httptools and the parser callbacks)
   does with it: the same head reaches the backend, the same bytes reach the client, the
   connections end the same way.
"""

from __future__ import annotations

import asyncio
import random
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.l7.scanrig import REQUESTS, RESPONSES, build_native, mutations
from tests.l7.test_memo import Sink

from poise.config import parse_config
from poise.l7 import http, scan
from poise.l7.client import ClientConnection
from poise.l7.context import Context
from poise.l7.upstream import UpstreamConnection
from poise.routing import build_table

LIMITS = (8192, 100, 65536, 0, ())


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> ModuleType | None:
    return build_native(tmp_path_factory.mktemp("scan"))


@pytest.fixture(scope="module")
def native(built: ModuleType | None) -> ModuleType:
    if built is None:
        pytest.skip("no C compiler: the pure-Python scanner only")
    return built


def req(data: bytes, *args: Any) -> Any:
    return scan._scan_request(data, *(args or LIMITS))


# -- 1. what they answer ------------------------------------------------------------------


def test_a_plain_request_head_is_scanned() -> None:
    got = req(REQUESTS[1])
    assert got == (
        b"GET",
        b"/a/b?c=d&e=f",
        b"svc.test:8080",
        b"User-Agent: curl/8.0\r\nAccept: */*\r\nCookie: sid=abc; theme=dark\r\n"
        b"X-Request-Id: 1234\r\n",
        True,
        None,
        len(REQUESTS[1]),
    )


def test_hop_by_hop_fields_and_names_with_underscores_are_left_out() -> None:
    assert req(REQUESTS[2]) == (b"HEAD", b"/x", b"[::1]:80", b"", False, None, len(REQUESTS[2]))
    assert req(REQUESTS[3])[3:5] == (
        b"Authorization: Bearer x\r\nAccept-Language: fr\xc3\xa9\r\nX-T: a\tb\r\n",
        True,
    )


def test_a_content_length_body_may_follow_the_head_up_to_its_length(native: ModuleType) -> None:
    head = b"POST /api HTTP/1.1\r\nHost: a\r\nContent-Length: 007\r\nX-A: 1\r\n\r\n"
    for f in (scan._scan_request, native.scan_request):
        for body in (b"", b"abc", b"abcdefg"):
            # the digits as sent (the general path forwards them so), where the head ends
            assert f(head + body, *LIMITS) == (
                b"POST", b"/api", b"a", b"X-A: 1\r\n", True, b"007", len(head)
            )  # fmt: skip
        assert f(head + b"abcdefgGET", *LIMITS) is None  # a pipelined request: parsed
        # a read that ends with an empty line is taken for one bodiless head: a body that
        # ends so goes the general way (both scanners alike)
        assert f(head.replace(b"007", b"4") + b"\r\n\r\n", *LIMITS) is None
        assert f(head, 8192, 100, 65536, 7, ()) is not None
        assert f(head, 8192, 100, 65536, 6, ()) is None  # over max_body_size: a 413, parsed
        assert f(REQUESTS[6], *LIMITS)[5] == b"0"
        assert f(REQUESTS[6] + b"x", *LIMITS) is None
    # the client-certificate subject fields (Context.dropped_fields), in any case
    got = req(REQUESTS[4], 8192, 100, 65536, 0, (b"x-client-subject",))
    assert got[3] == b"X-User: u1\r\nExpect: 100-continue\r\n"


@pytest.mark.parametrize(
    "head",
    [
        REQUESTS[5],  # forwarding fields: the general path judges them
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1" + b"0" * 18 + b"\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.0\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",  # no Host
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
        b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"get / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"TRACE / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /# HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /\\ HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost:a\r\n\r\n",  # not "Name: value"
        b"GET / HTTP/1.1\r\nHost: a\r\nX:  y\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: y \r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: \r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX : y\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: y\r\n z\r\n\r\n",  # obs-fold
        b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x7fb\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: y\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close, x-a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",  # pipelined
        b"GET / HTTP/1.1\r\nHost: a\r\n",  # not all here
    ],
)
def test_anything_not_plain_is_left_to_the_general_path(head: bytes, native: ModuleType) -> None:
    assert req(head) is None
    assert native.scan_request(head, *LIMITS) is None


def test_the_limits_leave_a_head_to_the_general_path(native: ModuleType) -> None:
    head = b"GET /" + b"a" * 99 + b" HTTP/1.1\r\nHost: a\r\nX: 1\r\nY: 2\r\n\r\n"
    for f in (scan._scan_request, native.scan_request):
        assert f(head, 100, 3, 1000, 0, ()) is not None
        assert f(head, 99, 3, 1000, 0, ()) is None  # the target's length
        assert f(head, 100, 2, 1000, 0, ()) is None  # the number of fields
        assert f(head, 100, 3, len(head) - 1, 0, ()) is None  # the head's size
        assert f(head, 100, 3, len(head), 0, ()) is not None


def test_a_plain_response_head_is_scanned() -> None:
    data = RESPONSES[0]
    got = scan._scan_response(data)
    head = data[: data.index(b"\r\n\r\n")]
    assert got == (
        200,
        head.replace(b"\r\nConnection: keep-alive", b""),
        16,
        len(head) + 4,
        True,
    )
    # the Content-Length as it came; the hop-by-hop fields dropped; "close" said
    rewritten = b"HTTP/1.1 200 OK\r\nContent-Length:  3 \r\nX-Empty:"
    end = len(RESPONSES[2]) - 3
    assert scan._scan_response(RESPONSES[2]) == (200, rewritten, 3, end, False)
    got = scan._scan_response(RESPONSES[4])
    assert got is not None and got[1] == b"HTTP/1.1 302 \r\nLocation: /x\r\nContent-Length: 0"


@pytest.mark.parametrize(
    "data",
    [
        RESPONSES[5],  # chunked
        RESPONSES[6],  # 5xx: passive health and retries read the head
        b"HTTP/1.1 200 OK\r\n\r\nclose-delimited",
        b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1" + b"0" * 18 + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, x\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n X: folded\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n",  # not all here
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX: \x00\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n" + b"X: y\r\n" * 20000 + b"\r\n",  # > 64 KiB
    ],
)
def test_a_response_not_plain_is_left_to_the_general_path(data: bytes, native: ModuleType) -> None:
    assert scan._scan_response(data) is None
    assert native.scan_response(data) is None


def test_the_scanners_refuse_wrong_argument_types(native: ModuleType) -> None:
    with pytest.raises(TypeError):
        native.scan_request("GET", *LIMITS)
    with pytest.raises(TypeError):
        native.scan_request(REQUESTS[0], 1, 2, 3, 0, [b"x"])
    with pytest.raises(TypeError):
        native.scan_request(REQUESTS[0], 1, 2, 3, 0, ("x",))
    with pytest.raises(TypeError):
        native.scan_request(REQUESTS[0])
    with pytest.raises(TypeError):
        native.scan_response(bytearray(RESPONSES[0]))


# -- 2. the C scanner is the Python one ---------------------------------------------------


def both_agree(native: ModuleType, data: bytes) -> None:
    drop = (b"x-client-subject",)
    assert native.scan_request(data, 8192, 100, 65536, 0, drop) == scan._scan_request(
        data, 8192, 100, 65536, 0, drop
    ), data
    small = (8, 3, 64, 5, ())
    assert native.scan_request(data, *small) == scan._scan_request(data, *small), data
    assert native.scan_response(data) == scan._scan_response(data), data


def test_the_c_and_python_scanners_agree_on_every_mutation(native: ModuleType) -> None:
    for head in (*REQUESTS, *RESPONSES):
        for data in (head, *mutations(head)):
            both_agree(native, data)


_token = st.sampled_from(["Host", "host", "X-A", "Connection", "Content-Length", "X_B", "TE"])
_value = st.sampled_from(
    ["a", "a b", " a", "a ", "close", "keep-alive", "Keep-Alive", "1", "[::1]:80", "h:99999",
     "h:123456", "x\x7f", "caf\xe9", "a\tb", ""]
)  # fmt: skip
_sep = st.sampled_from([": ", ":", ":  ", " : ", ":\t"])


@st.composite
def heads(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        line = "HTTP/1.1 {} {}\r\n".format(
            draw(st.sampled_from(["200", "204", "404", "500", "20", "2000"])),
            draw(st.sampled_from(["OK", "", "O\x01K"])),
        )
    else:
        line = "{} {} {}\r\n".format(
            draw(st.sampled_from(["GET", "HEAD", "POST", "get", "BREW", "OPTIONS", "PATCH"])),
            draw(st.sampled_from(["/", "/a?b=c", "*", "/a b", "/%7e", '/{}|^`"<>'])),
            draw(st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "http/1.1"])),
        )
    fields = draw(st.lists(st.tuples(_token, _sep, _value), max_size=6))
    text = line + "".join(f"{n}{s}{v}\r\n" for n, s, v in fields) + "\r\n"
    return text.encode("latin-1") + draw(st.sampled_from([b"", b"body", b"GET / HTTP/1.1\r\n"]))


@settings(max_examples=500)
@given(data=heads())
def test_the_c_and_python_scanners_agree_on_generated_heads(
    native: ModuleType, data: bytes
) -> None:
    both_agree(native, data)


@settings(max_examples=300)
@given(data=st.binary(max_size=200))
def test_the_c_and_python_scanners_agree_on_any_bytes(native: ModuleType, data: bytes) -> None:
    both_agree(native, data)
    both_agree(native, b"GET / HTTP/1.1\r\nHost: a\r\n" + data)
    both_agree(native, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n" + data)


# -- 3. the contract: where a scanner answers, the proxy does what the general path does --


def _never(*args: object) -> None:
    return None


_CONFIGS: dict[str, Any] = {}


def _config(name: str, settings: dict[str, Any]) -> Any:
    """The configuration for ``settings``, parsed once (a Config is immutable)."""
    if name not in _CONFIGS:
        settings = dict(settings)
        upstream = settings.pop("upstream", {})
        _CONFIGS[name] = parse_config(
            {
                "listeners": [{"name": "web", "listen": "127.0.0.1:0", "upstream": "app"}],
                "upstreams": {"app": {"backends": ["http://127.0.0.1:9"], **upstream}},
                "proxy": settings,
            }
        )
    return _CONFIGS[name]


class Proxy:
    """One listener, one backend with a pooled connection, on in-memory transports."""

    def __init__(self, scanner: tuple[Any, Any] | None, **settings: Any) -> None:
        config = _config(repr(sorted(settings.items())), settings)
        table = build_table(config, random.Random(1))
        self.ctx = ctx = Context(config, table, asyncio.get_running_loop())
        ctx.header_kinds = {**http.REQUEST_HEADER_KIND, b"x-client-subject": http.HOP}
        ctx.dropped_fields = (b"x-client-subject",)
        if scanner is None:
            ctx.scan_request = ctx.scan_response = _never
        else:
            ctx.scan_request, ctx.scan_response = scanner
        group = table.groups["app"]
        self.pool = group.pools[0]
        self.up = UpstreamConnection(ctx, self.pool, group.backends[0])
        self.up_sink = Sink()
        self.up.connection_made(self.up_sink)  # type: ignore[arg-type]
        self.pool.put(self.up, 0.0)
        self.client = ClientConnection(ctx, "web")
        self.sink = Sink("10.1.2.3")
        self.client.connection_made(self.sink)  # type: ignore[arg-type]

    def run(self, request: bytes | list[bytes], response: bytes) -> dict[str, Any]:
        for read in [request] if isinstance(request, bytes) else request:
            self.client.data_received(read)
        ex = self.client.queue[0] if self.client.queue else None
        at_backend = self.up_sink.data()
        if ex is not None and ex.conn is self.up:
            self.up.data_received(response)
        stats = self.ctx.stats
        return {
            "exchange": None
            if ex is None
            else (ex.method, ex.target, ex.host, ex.keep_alive, ex.is_head, ex.status),
            "backend got": at_backend,
            # (poise's own error responses carry the time: not what is compared)
            "client got": re.sub(rb"\r\nDate: [^\r]*", b"", self.sink.data()),
            "client": (self.sink.closed, self.client.closed, len(self.client.queue)),
            "upstream": (self.up_sink.closed, self.up.closed, self.up.ex is not None),
            "idle": len(self.pool.idle),
            "counts": (stats.requests, stats.responses, list(self.pool.responses)),
        }


def same_as_general(
    scanner: tuple[Any, Any], request: bytes, response: bytes, **settings: Any
) -> bool:
    """Run both ways; True when the scanners answered for the request or the response."""
    answered = scanner[0](request, *LIMITS[:4], (b"x-client-subject",)) is not None
    answered = answered or scanner[1](response) is not None
    if answered:
        fast = Proxy(scanner, **settings).run(request, response)
        general = Proxy(None, **settings).run(request, response)
        assert fast == general, (request, response)
    return answered


OK = RESPONSES[0]
CONFIGS: list[dict[str, Any]] = [
    {},
    {"via": True, "forwarded": True},
    {"x_forwarded": False},
    {"trusted_proxies": ["10.0.0.0/8"]},
    {"upstream": {"policy": {"name": "consistent_hash", "key": "header:X-User"}}},
    {"upstream": {"policy": {"name": "consistent_hash", "key": "cookie:sid"}}},
]


def the_scanner(built: ModuleType | None) -> tuple[Any, Any]:
    """The C scanner (the Python one answers the same, as the tests above show), or the
    Python one where there is no C compiler."""
    if built is None:
        return scan._scan_request, scan._scan_response
    return built.scan_request, built.scan_response


def test_the_proxy_does_the_same_with_a_scanned_request(built: ModuleType | None) -> None:
    async def run() -> None:
        scanner = the_scanner(built)
        answered = 0
        for head in REQUESTS:
            for settings_ in CONFIGS:
                answered += same_as_general(scanner, head, OK, **settings_)
            for data in mutations(head):
                answered += same_as_general(scanner, data, OK)
        assert answered > 500  # (the mutations keep many heads plain)

    asyncio.run(run())


def test_the_proxy_does_the_same_with_a_scanned_response(built: ModuleType | None) -> None:
    async def run() -> None:
        scanner = the_scanner(built)
        answered = 0
        for data in RESPONSES:
            for settings_ in CONFIGS:
                answered += same_as_general(scanner, REQUESTS[0], data, **settings_)
            # more body than the Content-Length (a stray byte), and the body cut short
            answered += same_as_general(scanner, REQUESTS[0], data + b"x")
            answered += same_as_general(scanner, REQUESTS[0], data[:-1])
            for mutated in mutations(data):
                answered += same_as_general(scanner, REQUESTS[0], mutated)
        assert answered > 500

    asyncio.run(run())


def test_a_scanned_body_in_any_number_of_reads_reaches_the_backend_as_a_parsed_one(
    built: ModuleType | None,
) -> None:
    """A request with a Content-Length body, split at every position into two reads, and
    into one read per byte; then the next request on the same connection."""

    async def run() -> None:
        scanner = the_scanner(built)
        for data in REQUESTS[7:9]:
            complete = data if data.startswith(b"POST") else data + b"lo"
            splits = [[complete[:k], complete[k:]] for k in range(1, len(complete))]
            splits.append([complete[k : k + 1] for k in range(len(complete))])
            splits.append([complete + REQUESTS[1]])  # a pipelined request after the body
            splits.append([complete, REQUESTS[1]])
            for reads in splits:
                for settings_ in ({}, {"trusted_proxies": ["10.0.0.0/8"]}):
                    fast = Proxy(scanner, **settings_).run(reads, OK)
                    general = Proxy(None, **settings_).run(reads, OK)
                    assert fast == general, reads

    asyncio.run(run())


@settings(max_examples=200)
@given(data=heads())
def test_the_proxy_does_the_same_with_generated_heads(
    built: ModuleType | None, data: bytes
) -> None:
    async def run() -> None:
        same_as_general(the_scanner(built), data, OK)
        same_as_general(the_scanner(built), REQUESTS[1], data)

    asyncio.run(run())


def test_the_pure_build_uses_the_python_scanner_and_says_so() -> None:
    if scan.NATIVE:
        assert scan.scan_request is not scan._scan_request
    else:
        assert scan.scan_request is scan._scan_request
        assert scan.scan_response is scan._scan_response


def test_the_scanner_source_is_in_the_repository() -> None:
    assert (Path(scan.__file__).parent / "_scan.c").exists()


# -- 4. a third opinion: h11 reads what a scanner answers for the same way ------------------

_H11_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade"}


def _h11_request(data: bytes) -> h11.Request:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    event = conn.next_event()
    assert isinstance(event, h11.Request), (data, event)
    return event


def _h11_response(data: bytes) -> h11.Response:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "a")]))
    conn.receive_data(data)
    event = conn.next_event()
    assert isinstance(event, h11.Response), (data, event)
    return event


def _pairs(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    out = []
    for line in lines:
        name, _, value = line.partition(b":")
        out.append((name, value.strip(b" \t")))
    return out


def test_h11_reads_every_scanned_head_the_same_way(built: ModuleType | None) -> None:
    scanner = the_scanner(built)
    requests = responses = 0
    for head in (*REQUESTS, *RESPONSES):
        for data in (head, *mutations(head)):
            got = scanner[0](data, *LIMITS)
            if got is not None:
                requests += 1
                method, target, host, fields, _, length, _ = got
                event = _h11_request(data)
                assert (event.method, event.target) == (method, target)
                theirs = event.headers.raw_items()
                assert [v for n, v in theirs if n.lower() == b"host"] == [host]
                declared = [v for n, v in theirs if n.lower() == b"content-length"]
                assert declared == ([] if length is None else [length])
                left_out = _H11_HOP | {b"host", b"proxy-authorization", b"content-length"}
                kept = [(n, v) for n, v in theirs if n.lower() not in left_out and b"_" not in n]
                assert kept == _pairs(fields.split(b"\r\n")[:-1]), data
            answer = scanner[1](data)
            if answer is not None:
                responses += 1
                status, rewritten, length, end, _ = answer
                response = _h11_response(data)
                assert response.status_code == status
                theirs = response.headers.raw_items()
                assert [int(v) for n, v in theirs if n.lower() == b"content-length"] == [length]
                kept = [(n, v) for n, v in theirs if n.lower() not in _H11_HOP]
                kept = [(n, v) for n, v in kept if n.lower() != b"proxy-authenticate"]
                assert kept == _pairs(rewritten.split(b"\r\n")[1:]), data
                assert data[end - 4 : end] == b"\r\n\r\n"
    assert requests > 500 and responses > 500
