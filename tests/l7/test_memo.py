"""The repeated-head shortcuts (l7/memo.py's RequestMemo, l7/response.py's ResponseMemo): a
head that comes again must give exactly what parsing it again would give, whatever the reads
look like.

The protocols are driven directly with in-memory transports: a fresh connection (which
has nothing remembered) is the reference for what a reused one must produce.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from poise.config import parse_config
from poise.l7.client import ClientConnection
from poise.l7.context import Context
from poise.l7.upstream import UpstreamConnection
from poise.routing import build_table

GET = b"GET /a?x=1 HTTP/1.1\r\nHost: svc.test\r\nUser-Agent: t\r\n\r\n"
HEAD = b"HEAD /a?x=1 HTTP/1.1\r\nHost: svc.test\r\nUser-Agent: t\r\n\r\n"
OK = (
    b"HTTP/1.1 200 OK\r\nServer: s\r\nContent-Length: 5\r\nConnection: keep-alive\r\n"
    b"Content-Type: text/plain\r\n\r\n"
)
OK_HEAD = OK  # what a backend answers to HEAD: the same head, no body


class Sink:
    """A transport that keeps what is written to it."""

    def __init__(self, peer: str = "127.0.0.2") -> None:
        self.out: list[bytes] = []
        self.closed = False
        self.paused = False
        self.peer = peer

    def data(self) -> bytes:
        return b"".join(bytes(b) for b in self.out)

    def write(self, data: bytes) -> None:
        self.out.append(bytes(data))

    def writelines(self, data: Any) -> None:
        self.out.extend(bytes(d) for d in data)

    def get_extra_info(self, name: str) -> Any:
        return (self.peer, 40000) if name == "peername" else None

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return False

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


class Rig:
    """One upstream group with one backend, and a pool holding one connection to it."""

    def __init__(self, **proxy: Any) -> None:
        doc: dict[str, Any] = {
            "listeners": [{"name": "web", "listen": "127.0.0.1:0", "upstream": "app"}],
            "upstreams": {"app": {"backends": ["http://127.0.0.1:9"]}},
            "proxy": proxy,
        }
        self.doc = doc
        config = parse_config(doc)
        self.table = build_table(config, random.Random(1))
        self.ctx = Context(config, self.table, asyncio.get_running_loop())
        self.up_transport = Sink()
        self.up = self.new_upstream()

    def new_upstream(self) -> UpstreamConnection:
        group = self.table.groups["app"]
        up = UpstreamConnection(self.ctx, group.pools[0], group.backends[0])
        self.up_transport = Sink()
        up.connection_made(self.up_transport)  # type: ignore[arg-type]
        group.pools[0].put(up, 0.0)
        return up

    def client(self, peer: str = "127.0.0.2") -> tuple[ClientConnection, Sink]:
        client = ClientConnection(self.ctx, "web")
        sink = Sink(peer)
        client.connection_made(sink)  # type: ignore[arg-type]
        return client, sink

    def exchange(
        self, client: ClientConnection, request: bytes, reads: list[bytes]
    ) -> tuple[bytes, bytes]:
        """Send ``request``; answer with ``reads`` from the backend. Returns (what the
        backend got, what the client got) for this exchange."""
        assert isinstance(client.transport, Sink)
        sent, got = len(self.up_transport.out), len(client.transport.out)
        client.data_received(request)
        up = client.queue[0].conn if client.queue else None
        assert up is self.up, "the request did not reach the pooled connection"
        for data in reads:
            up.data_received(data)
        return (
            b"".join(self.up_transport.out[sent:]),
            b"".join(client.transport.out[got:]),
        )


def test_a_repeated_request_head_is_forwarded_the_same_and_counted() -> None:
    async def run() -> None:
        rig = Rig()
        client, _ = rig.client()
        first = rig.exchange(client, GET, [OK + b"hello"])
        assert client.reader.memo is not None  # the head was remembered
        second = rig.exchange(client, GET, [OK + b"hello"])
        assert second == first
        assert first[0].startswith(b"GET /a?x=1 HTTP/1.1\r\nHost: svc.test\r\n")
        assert b"X-Forwarded-For: 127.0.0.2\r\n" in first[0]
        assert first[1].endswith(b"\r\n\r\nhello")
        assert (rig.ctx.stats.requests, rig.ctx.stats.responses) == (2, 2)
        assert rig.ctx.latency.count == 2

    asyncio.run(run())


def test_a_different_head_is_parsed_again() -> None:
    async def run() -> None:
        rig = Rig()
        client, _ = rig.client()
        rig.exchange(client, GET, [OK + b"hello"])
        other = GET.replace(b"/a?x=1", b"/b")
        sent, _ = rig.exchange(client, other, [OK + b"hello"])
        assert sent.startswith(b"GET /b HTTP/1.1\r\n")
        # and a broken variant is still refused
        client.data_received(GET.replace(b"Host: svc.test", b"Host: a b"))
        assert client.transport is not None
        assert b"HTTP/1.1 400 Bad Request" in b"".join(client.transport.out)  # type: ignore[attr-defined]

    asyncio.run(run())


def test_a_reload_invalidates_remembered_request_heads() -> None:
    async def run() -> None:
        rig = Rig()
        client, _ = rig.client()
        sent, _ = rig.exchange(client, GET, [OK + b"hello"])
        assert b"Via:" not in sent
        rig.doc["proxy"] = {"via": True}
        rig.ctx.configure(parse_config(rig.doc))
        sent, _ = rig.exchange(client, GET, [OK + b"hello"])
        assert b"Via: 1.1 poise\r\n" in sent

    asyncio.run(run())


def test_requests_with_a_body_are_not_remembered() -> None:
    async def run() -> None:
        rig = Rig()
        client, _ = rig.client()
        post = b"POST /p HTTP/1.1\r\nHost: svc.test\r\nContent-Length: 3\r\n\r\n"
        for body in (b"abc", b"xyz"):
            sent, _ = rig.exchange(client, post + body, [OK + b"hello"])
            assert sent.endswith(b"\r\n\r\n" + body)
        assert client.reader.memo is None

    asyncio.run(run())


def test_two_pipelined_copies_in_one_read_are_both_answered_in_order() -> None:
    async def run() -> None:
        rig = Rig()
        client, sink = rig.client()
        rig.exchange(client, GET, [OK + b"hello"])  # remembered
        client.data_received(GET + GET)  # not the remembered bytes: parsed
        assert len(client.queue) == 2
        rig.up.data_received(OK + b"one!!")
        # the second request now runs on the same (released) connection
        assert client.queue and client.queue[0].conn is rig.up
        rig.up.data_received(OK + b"two!!")
        plain = OK.replace(b"Connection: keep-alive\r\n", b"")
        assert sink.data().endswith(b"one!!" + plain + b"two!!")
        assert not client.queue

    asyncio.run(run())


CLOSE = GET.replace(b"User-Agent: t\r\n", b"User-Agent: t\r\nConnection: close\r\n")


def test_a_new_connection_from_the_same_peer_takes_the_head_remembered_on_the_last() -> None:
    async def run() -> None:
        rig = Rig()
        first, _ = rig.client()
        reference = rig.exchange(first, CLOSE, [OK + b"hello"])
        assert first.closed and reference[1].endswith(b"\r\n\r\nhello")
        assert b"Connection: close\r\n" in reference[1]
        second, _ = rig.client()
        got = rig.exchange(second, CLOSE, [OK + b"hello"])
        assert got == reference
        assert second.reader._begun == 0  # not parsed: taken from the first connection's memo
        assert second.closed
        assert (rig.ctx.stats.requests, rig.ctx.stats.responses) == (2, 2)
        assert not rig.ctx.clients

    asyncio.run(run())


def test_a_new_connection_from_another_peer_does_not_take_its_head() -> None:
    async def run() -> None:
        rig = Rig()
        rig.exchange(rig.client()[0], CLOSE, [OK + b"hello"])
        other, _ = rig.client("127.0.0.3")
        sent, _ = rig.exchange(other, CLOSE, [OK + b"hello"])
        assert b"X-Forwarded-For: 127.0.0.3\r\n" in sent
        assert b"127.0.0.2" not in sent
        assert other.reader._begun == 1  # parsed

    asyncio.run(run())


def test_a_head_remembered_for_new_connections_is_dropped_on_reload() -> None:
    async def run() -> None:
        rig = Rig()
        rig.exchange(rig.client()[0], CLOSE, [OK + b"hello"])
        rig.doc["proxy"] = {"via": True}
        rig.ctx.configure(parse_config(rig.doc))
        sent, _ = rig.exchange(rig.client()[0], CLOSE, [OK + b"hello"])
        assert b"Via: 1.1 poise\r\n" in sent

    asyncio.run(run())


def test_bytes_after_a_remembered_request_without_keep_alive_are_refused_as_when_parsed() -> None:
    """llhttp refuses anything but CR/LF after a request without keep-alive; a head taken
    from a memo was never fed to the parser, so the connection must refuse it itself."""

    async def run() -> None:
        rig = Rig()
        results = []
        for _ in range(2):  # the first parses CLOSE, the second takes it from the memo
            client, sink = rig.client()
            bad = rig.ctx.stats.bad_requests
            client.data_received(CLOSE)
            client.data_received(b"\r\n")  # skipped by llhttp too
            assert rig.ctx.stats.bad_requests == bad
            client.data_received(GET.replace(b"/a?x=1", b"/smuggled"))
            assert client.queue[0].conn is rig.up
            rig.up.data_received(OK + b"hello")
            results.append(
                (rig.ctx.stats.bad_requests - bad, client.reader._begun, sink.data(), client.closed)
            )
        (bad1, begun1, out1, closed1), (bad2, begun2, out2, closed2) = results
        assert (begun1, begun2) == (1, 0)
        assert bad1 == bad2 == 1
        assert out1 == out2 and out1.endswith(b"\r\n\r\nhello") and closed1 and closed2
        assert b"/smuggled" not in b"".join(rig.up_transport.out)

    asyncio.run(run())


def test_a_repeated_response_head_is_the_same_for_every_split_of_the_reads() -> None:
    async def run() -> None:
        rig = Rig()
        client, _ = rig.client()
        body = b"hello"
        _, reference = rig.exchange(client, GET, [OK + body])
        assert b"Connection: keep-alive" not in reference
        assert rig.up._memo is not None
        data = OK + body
        for cut in range(1, len(data)):
            _, got = rig.exchange(client, GET, [data[:cut], data[cut:]])
            assert got == reference, cut
        assert rig.table.groups["app"].pools[0].idle == [rig.up]

    asyncio.run(run())


def test_bytes_after_a_repeated_response_close_its_connection() -> None:
    async def run() -> None:
        rig = Rig()
        client, _ = rig.client()
        rig.exchange(client, GET, [OK + b"hello"])
        _, got = rig.exchange(client, GET, [OK + b"hello" + b"HTTP/1.1 200 OK\r\n"])
        assert got.endswith(b"\r\n\r\nhello")  # the response itself is whole
        assert rig.up.closed and rig.up_transport.closed
        assert rig.table.groups["app"].pools[0].idle == []

    asyncio.run(run())


def test_head_after_a_remembered_get_gets_no_body() -> None:
    async def run() -> None:
        rig = Rig()
        client, _ = rig.client()
        rig.exchange(client, GET, [OK + b"hello"])
        _, got = rig.exchange(client, HEAD, [OK_HEAD])
        assert got.endswith(b"\r\n\r\n") and b"hello" not in got
        # and the connection is still in step: the next GET gets its body
        _, got = rig.exchange(client, GET, [OK + b"again"])
        assert got.endswith(b"\r\n\r\nagain")

    asyncio.run(run())


def test_per_request_fields_are_added_to_a_repeated_response() -> None:
    async def run() -> None:
        rig = Rig(x_forwarded_server=True)
        client, _ = rig.client()
        _, first = rig.exchange(client, GET, [OK + b"hello"])
        close = GET.replace(b"User-Agent: t\r\n", b"User-Agent: t\r\nConnection: close\r\n")
        _, last = rig.exchange(client, close, [OK + b"hello"])
        assert b"X-Forwarded-Server: 127.0.0.1:9\r\n" in first
        assert b"X-Forwarded-Server: 127.0.0.1:9\r\n" in last
        assert b"Connection: close\r\n" in last and b"Connection: close" not in first

    asyncio.run(run())


def test_a_long_repeated_body_is_counted_across_reads() -> None:
    async def run() -> None:
        rig = Rig()
        client, _ = rig.client()
        body = bytes(range(256)) * 200  # 51200 bytes: beyond the 16 KiB that stops llhttp
        head = OK.replace(b"Content-Length: 5", b"Content-Length: %d" % len(body))
        _, reference = rig.exchange(client, GET, [head + body[:30000], body[30000:]])
        _, got = rig.exchange(client, GET, [head + body[:20000], body[20000:]])
        assert got == reference and got.endswith(body)
        assert rig.table.groups["app"].pools[0].idle == [rig.up]

    asyncio.run(run())


def test_a_connection_whose_heads_keep_changing_stops_remembering() -> None:
    async def run() -> None:
        rig = Rig()
        client, _ = rig.client()
        heads = [GET.replace(b"/a?x=1", b"/v%d" % i) for i in range(8)]
        for i, head in enumerate(heads):
            reply = OK.replace(b"Server: s", b"Server: s%d" % i)
            rig.exchange(client, head, [reply + b"hello"])
        # the 4th miss in a row was not remembered, nor anything after it, on either side
        assert client.reader.memo is not None and client.reader.memo.raw == heads[3]
        assert rig.up._memo is not None and b"Server: s3\r\n" in rig.up._memo.head
        # the remembered head coming again is still used, and remembering starts again
        sent, got = rig.exchange(
            client, heads[3], [OK.replace(b"Server: s", b"Server: s3") + b"hello"]
        )
        assert sent.startswith(b"GET /v3 ") and got.endswith(b"hello")
        rig.exchange(client, heads[7], [OK + b"hello"])
        assert client.reader.memo.raw == heads[7]

    asyncio.run(run())


def decoded(response: bytes) -> tuple[bytes, bytes]:
    """(head, body) of what a client received, the body de-chunked when it was chunked."""
    head, _, body = response.partition(b"\r\n\r\n")
    if b"\r\ntransfer-encoding: chunked" not in head.lower():
        return head, body
    out = b""
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return head, out
        out, body = out + body[:size], body[size + 2 :]


# Responses a backend may send; each is (head, body) and is valid for a GET.
RESPONSES = [
    (OK, b"hello"),
    (OK.replace(b"200 OK", b"404 Not Found"), b"nope!"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b""),
    (b"HTTP/1.1 204 No Content\r\nServer: s\r\n\r\n", b""),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"3\r\nabc\r\n0\r\n\r\n"),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\n", b"ok"),
    (b"HTTP/1.1 100 Continue\r\n\r\n" + OK, b"hello"),
]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(range(len(RESPONSES))), st.integers(0, 200)),
        min_size=1,
        max_size=8,
    )
)
@example(plan=[(4, 51)])  # a cut inside chunk data: once a false failure of this test's oracle
@example(plan=[(4, 52)])
def test_a_reused_connection_answers_as_a_fresh_one_would(plan: list[tuple[int, int]]) -> None:
    """Whatever came before on a connection (what it remembered), each response reaches the
    client exactly as it does on a fresh connection given the same reads, for any split of
    the backend's reads.

    Like is compared with like: a chunked body is re-chunked read by read, so a cut inside
    chunk data legitimately changes the chunk sizes the client sees. The fresh connection
    therefore gets the same split as the reused one; the body a client decodes must not
    depend on the split at all, which the second assertion checks against one unsplit read.
    """

    async def run() -> None:
        reused = Rig()
        client, _ = reused.client()
        for which, at in plan:
            head, body = RESPONSES[which]
            data = head + body
            cut = min(at, len(data))
            reads = [data[:cut], data[cut:]] if 0 < cut < len(data) else [data]
            fresh = Rig()
            fresh_client, _ = fresh.client()
            expected = fresh.exchange(fresh_client, GET, reads)
            got = reused.exchange(client, GET, reads)
            assert got == expected, (which, cut)
            whole = Rig()
            whole_client, _ = whole.client()
            unsplit = whole.exchange(whole_client, GET, [data])
            assert got[0] == unsplit[0]
            assert decoded(got[1]) == decoded(unsplit[1]), (which, cut)
            assert reused.up.closed == fresh.up.closed
            if reused.up.closed:
                reused.up = reused.new_upstream()

    asyncio.run(run())


# Bodiless requests a client may send on a keep-alive connection (all valid HTTP/1.1).
REQUESTS = [
    GET,
    HEAD,
    b"GET /a?x=1 HTTP/1.1\r\nhost: svc.test\r\nUser-Agent: t\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: svc.test\r\n\r\n",
    b"DELETE /item/7 HTTP/1.1\r\nHost: svc.test\r\nContent-Length: 0\r\n\r\n",
    b"GET http://other.test/x HTTP/1.1\r\nHost: svc.test\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: svc.test\r\nX-Forwarded-For: 6.6.6.6\r\nForwarded: for=x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: svc.test\r\nConnection: X-Foo, TE\r\nX-Foo: 1\r\nTE: trailers\r\n"
    b"\r\n",
    b"GET / HTTP/1.1\r\nHost: svc.test\r\nUpgrade: websocket\r\nKeep-Alive: 5\r\n\r\n",
]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(range(len(REQUESTS))), min_size=1, max_size=10))
def test_a_reused_client_connection_forwards_as_fresh_ones_would(plan: list[int]) -> None:
    """Whatever a client sent before on its connection (what was remembered), each request
    reaches the backend, and its response the client, exactly as on a fresh connection."""

    async def run() -> None:
        rig = Rig()
        client, _ = rig.client()
        for which in plan:
            request = REQUESTS[which]
            reply = [OK_HEAD] if request.startswith(b"HEAD") else [OK + b"hello"]
            fresh_client, _ = rig.client()
            expected = rig.exchange(fresh_client, request, reply)
            got = rig.exchange(client, request, reply)
            assert got == expected, which
            assert not client.closed and not client.queue
        assert rig.ctx.stats.requests == 2 * len(plan) == rig.ctx.stats.responses

    asyncio.run(run())


def test_a_reload_applies_new_request_limits_to_open_connections() -> None:
    async def run() -> None:
        rig = Rig()
        client, sink = rig.client()
        long_target = GET.replace(b"/a?x=1", b"/" + b"a" * 100)
        sent, _ = rig.exchange(client, long_target, [OK + b"hello"])
        assert sent.startswith(b"GET /aaaa")
        rig.doc["limits"] = {"max_target": 64}
        rig.ctx.configure(parse_config(rig.doc))
        client.data_received(long_target)  # the same bytes, now over the limit
        assert sink.data().endswith(b"Connection: close\r\n\r\nURI Too Long\n")
        assert b"\r\nhelloHTTP/1.1 414 " in sink.data()

    asyncio.run(run())


def test_trusted_proxies_are_known_per_peer_and_follow_a_reload() -> None:
    """Context.is_trusted keeps its answers by peer address: each right, and a reload that
    changes proxy.trusted_proxies is followed by the connections made after it."""

    async def run() -> None:
        rig = Rig(trusted_proxies=["127.0.0.2/32"])
        spoof = GET.replace(b"User-Agent: t\r\n", b"User-Agent: t\r\nX-Forwarded-For: 10.9.9.9\r\n")
        for _ in range(2):  # the second time from the cache
            assert rig.ctx.is_trusted("127.0.0.2") and not rig.ctx.is_trusted("127.0.0.3")
            assert not rig.ctx.is_trusted("not an address")
            sent, _ = rig.exchange(rig.client()[0], spoof, [OK + b"hello"])
            assert b"X-Forwarded-For: 10.9.9.9, 127.0.0.2\r\n" in sent
            sent, _ = rig.exchange(rig.client("127.0.0.3")[0], spoof, [OK + b"hello"])
            assert b"X-Forwarded-For: 127.0.0.3\r\n" in sent
        rig.doc["proxy"] = {"trusted_proxies": ["127.0.0.3/32"]}
        rig.ctx.configure(parse_config(rig.doc))
        assert not rig.ctx.is_trusted("127.0.0.2") and rig.ctx.is_trusted("127.0.0.3")
        sent, _ = rig.exchange(rig.client()[0], spoof, [OK + b"hello"])
        assert b"X-Forwarded-For: 127.0.0.2\r\n" in sent

    asyncio.run(run())
