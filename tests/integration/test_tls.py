"""HTTPS listeners through the whole proxy: SNI certificates, mTLS, forwarding headers,
bad handshakes, the redirect listener. Certificates are made per test in tmp_path."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from pathlib import Path
from typing import Any

import pytest

from poise.admin.metrics import render
from poise.testing import HttpBackend, echo_handler
from tests.integration.support import exchange, running
from tests.tls.certgen import CA, Pair
from tests.tls.helpers import TlsClient, client_context, get, visit

# every test runs with the C record engine and with its twin (tests/tls/helpers.py)
pytestmark = pytest.mark.usefixtures("tls_engine", "wire_hub")


def https_doc(backend: str, tls: dict[str, Any], **top: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "listeners": [{"name": "web", "listen": "127.0.0.1:0", "upstream": "app", "tls": tls}],
        "upstreams": {"app": {"backends": [backend]}},
    }
    doc.update(top)
    return doc


def proxied(backend: HttpBackend) -> list[Any]:
    """The requests that came through poise (not its health probes)."""
    return [r for r in backend.requests if r.header("user-agent") != "poise-health"]


def url_of(server: Any, name: str, scheme: str = "https") -> str:
    host, port = server.addresses[name]
    return f"{scheme}://{host}:{port}"


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Any]:
    ca = CA(tmp_path)
    return {
        "ca": ca,
        "default": ca.issue("default", ["default.test"]),
        "a": ca.issue("a", ["a.example.test"]),
        "wild": ca.issue("wild", ["*.w.example.test"]),
        "alice": ca.issue("alice", cn="alice", client=True, organization="Example"),
    }


def sni_tls(pki: dict[str, Any]) -> dict[str, Any]:
    d, a, w = pki["default"], pki["a"], pki["wild"]
    return {
        "cert": str(d.cert), "key": str(d.key),
        "certificates": [
            {"cert": str(a.cert), "key": str(a.key)},  # names from the certificate
            {"names": ["*.w.example.test"], "cert": str(w.cert), "key": str(w.key)},
        ],
    }  # fmt: skip


async def test_each_sni_name_gets_its_certificate(pki: dict[str, Any]) -> None:
    ca = pki["ca"]
    async with (
        HttpBackend("b1", echo_handler) as backend,
        running(https_doc(backend.url, sni_tls(pki))) as (server, _),
    ):
        url = url_of(server, "web")
        ctx = client_context(ca)
        for name, pair in [
            ("a.example.test", pki["a"]),
            ("A.Example.Test", pki["a"]),
            ("x.w.example.test", pki["wild"]),
            ("default.test", pki["default"]),
        ]:
            reply, serial = await get(url, ctx, name)
            assert reply.status == 200, name
            assert serial == pki_serial(pair), name
        # a name nobody serves, a wildcard one level too deep, no SNI at all: default
        loose = client_context(None)
        for name in ("nobody.test", "a.b.w.example.test", "w.example.test", None):
            reply, serial = await get(url, loose, name)
            assert reply.status == 200
            assert serial == pki_serial(pki["default"]), name
        assert server.statistics()["tls"]["web"]["handshakes"] >= 8


def pki_serial(pair: Pair) -> int:
    return pair.serial


async def test_https_sets_forwarded_proto_and_alpn(pki: dict[str, Any]) -> None:
    async with HttpBackend("b1", echo_handler) as backend:
        doc = https_doc(backend.url, sni_tls(pki), proxy={"forwarded": True})
        doc["listeners"][0]["http2"] = False  # (on by default: tests/h2 for HTTP/2)
        async with running(doc) as (server, _):
            ctx = client_context(pki["ca"])
            ctx.set_alpn_protocols(["h2", "http/1.1"])  # this listener offers http/1.1 only
            client = await TlsClient.connect(url_of(server, "web"), ctx, "a.example.test")
            try:
                assert client.alpn == "http/1.1"
                reply = await client.request(extra="X-Forwarded-Proto: http\r\n")
                seen = reply.request_headers()
                assert seen["x-forwarded-proto"] == "https"
                assert "proto=https" in seen["forwarded"]
                # the fast path (no client forwarding fields, no Forwarded) too
            finally:
                await client.close()
        async with running(https_doc(backend.url, sni_tls(pki))) as (server, _):
            reply, _ = await get(url_of(server, "web"), client_context(pki["ca"]), "default.test")
            assert reply.request_headers()["x-forwarded-proto"] == "https"


def mtls(pki: dict[str, Any], **extra: Any) -> dict[str, Any]:
    d = pki["default"]
    return {"cert": str(d.cert), "key": str(d.key), "client_ca": str(pki["ca"].path),
            "client_subject_header": "X-Client-Subject", **extra}  # fmt: skip


async def test_mtls_required_accepts_verified_clients_and_passes_the_subject(
    pki: dict[str, Any],
) -> None:
    async with HttpBackend("b1", echo_handler) as backend:
        doc = https_doc(backend.url, mtls(pki))
        doc["listeners"].append({"name": "plain", "listen": "127.0.0.1:0", "upstream": "app"})
        async with running(doc) as (server, _):
            url = url_of(server, "web")
            forged = "X-Client-Subject: CN=admin\r\nx-client-subject: CN=root\r\n"
            reply, _ = await get(url, client_context(pki["ca"], pki["alice"]), "default.test",
                                 extra=forged)  # fmt: skip
            assert reply.status == 200
            seen = [v for k, v in __import__("json").loads(reply.headers["x-request-headers"])
                    if k.lower() == "x-client-subject"]  # fmt: skip
            assert seen == ["CN=alice,O=Example"]
            # fast path and general path (a client X-Forwarded-For forces the latter)
            reply, _ = await get(url, client_context(pki["ca"], pki["alice"]), "default.test",
                                 extra="X-Forwarded-For: 1.2.3.4\r\n")  # fmt: skip
            assert reply.request_headers()["x-client-subject"] == "CN=alice,O=Example"
            # the plain listener strips a client-sent copy too
            raw = await exchange(
                url_of(server, "plain", "http"),
                b"GET / HTTP/1.1\r\nHost: x\r\nX-Client-Subject: CN=admin\r\nConnection: close"
                b"\r\n\r\n",
            )
            assert b"200 OK" in raw.split(b"\r\n", 1)[0]
            assert b"CN=admin" not in raw
            # without a client certificate the handshake (or the first read) fails
            n = len(proxied(backend))
            with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
                await get(url, client_context(pki["ca"]), "default.test")
            assert len(proxied(backend)) == n
            # poise is unharmed
            reply, _ = await get(url, client_context(pki["ca"], pki["alice"]), "default.test")
            assert reply.status == 200


async def test_mtls_refuses_a_certificate_from_another_ca(
    pki: dict[str, Any], tmp_path: Path
) -> None:
    (tmp_path / "other").mkdir()
    mallory = CA(tmp_path / "other", "other CA").issue("mallory", cn="alice", client=True)
    async with (
        HttpBackend("b1", echo_handler) as backend,
        running(https_doc(backend.url, mtls(pki))) as (server, _),
    ):
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            await get(url_of(server, "web"), client_context(pki["ca"], mallory),
                      "default.test")  # fmt: skip
        assert proxied(backend) == []


async def test_mtls_optional_passes_anonymous_clients_without_the_header(
    pki: dict[str, Any],
) -> None:
    async with (
        HttpBackend("b1", echo_handler) as backend,
        running(https_doc(backend.url, mtls(pki, client_auth="optional"))) as (s, _),
    ):
        url = url_of(s, "web")
        reply, _ = await get(url, client_context(pki["ca"]), "default.test",
                             extra="X-Client-Subject: CN=admin\r\n")  # fmt: skip
        assert reply.status == 200
        assert "x-client-subject" not in reply.request_headers()
        reply, _ = await get(url, client_context(pki["ca"], pki["alice"]), "default.test")
        assert reply.request_headers()["x-client-subject"] == "CN=alice,O=Example"


async def test_bad_handshakes_do_not_hurt_the_listener(pki: dict[str, Any]) -> None:
    async with HttpBackend("b1", echo_handler) as backend:
        doc = https_doc(backend.url, sni_tls(pki), timeouts={"client_header": "1s"})
        async with running(doc) as (server, _):
            url = url_of(server, "web")
            plain = url.replace("https://", "http://")
            # plain HTTP on the TLS port, garbage, a truncated ClientHello (closed when the
            # handshake timeout, timeouts.client_header, runs out)
            for junk in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\x00\x05abc",
                         b"\x00" * 100):  # fmt: skip
                raw = await exchange(plain, junk, timeout=5)
                assert b"HTTP/1.1 200" not in raw
            # a client that does not trust the certificate gives up mid-handshake
            with pytest.raises(ssl.SSLError):
                await get(url, ssl.create_default_context(), "a.example.test")
            reply, _ = await get(url, client_context(pki["ca"]), "a.example.test")
            assert reply.status == 200


async def test_a_handshake_that_stalls_after_the_client_hello_is_cut_off(
    pki: dict[str, Any],
) -> None:
    async with HttpBackend("b1", echo_handler) as backend:
        doc = https_doc(backend.url, sni_tls(pki), timeouts={"client_header": "1s"})
        async with running(doc) as (server, _):
            assert server.ctx is not None
            url = url_of(server, "web")
            # a whole ClientHello, then silence: TLS has started, the handshake never ends
            client = client_context(pki["ca"]).wrap_bio(
                ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname="a.example.test"
            )
            with contextlib.suppress(ssl.SSLWantReadError):
                client.do_handshake()
            started = asyncio.get_running_loop().time()
            raw = await exchange(url.replace("https://", "http://"), outgoing.read(), timeout=8)
            assert raw[:1] == b"\x16"  # the server's flight came, then the close
            assert asyncio.get_running_loop().time() - started < 6
            assert not server.ctx.handshaking
            # a completed handshake leaves no deadline behind either
            reply, _ = await get(url, client_context(pki["ca"]), "a.example.test")
            assert reply.status == 200 and not server.ctx.handshaking


async def test_redirect_listener(pki: dict[str, Any]) -> None:
    async with HttpBackend("b1", echo_handler) as backend:
        doc = https_doc(backend.url, sni_tls(pki))
        doc["listeners"] += [
            {"name": "r301", "listen": "127.0.0.1:0", "redirect_https": True},
            {"name": "r308", "listen": "127.0.0.1:0",
             "redirect_https": {"status": 308, "port": 8443}},
        ]  # fmt: skip
        async with running(doc) as (server, _):
            r301 = url_of(server, "r301", "http")
            raw = await exchange(
                r301, b"GET /a/b?c=1&d=%20 HTTP/1.1\r\nHost: Example.test:8080\r\n\r\n"
            )
            head = raw.split(b"\r\n\r\n")[0]
            assert head.startswith(b"HTTP/1.1 301 Moved Permanently\r\n")
            assert b"\r\nLocation: https://example.test/a/b?c=1&d=%20\r\n" in head
            raw = await exchange(
                url_of(server, "r308", "http"),
                b"POST /up HTTP/1.1\r\nHost: [::1]:80\r\nContent-Length: 3\r\n\r\nabc",
            )
            assert raw.startswith(b"HTTP/1.1 308 Permanent Redirect\r\n")
            assert b"\r\nLocation: https://[::1]:8443/up\r\n" in raw
            raw = await exchange(r301, b"GET http://abs.test/x HTTP/1.1\r\nHost: other\r\n\r\n")
            assert b"\r\nLocation: https://abs.test/x\r\n" in raw
            for bad in (b"GET / HTTP/1.1\r\n\r\n", b"GET / HTTP/1.0\r\n\r\n",
                        b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", b"garbage\r\n\r\n"):  # fmt: skip
                raw = await exchange(r301, bad)
                assert raw.startswith(b"HTTP/1.1 400 "), bad
                assert b"Location" not in raw
            assert proxied(backend) == []
            assert server.statistics()["proxy"]["stats"]["redirects"] == 3


async def test_tls_metrics(pki: dict[str, Any]) -> None:
    async with (
        HttpBackend("b1", echo_handler) as backend,
        running(https_doc(backend.url, sni_tls(pki))) as (server, _),
    ):
        await get(url_of(server, "web"), client_context(pki["ca"]), "a.example.test")
        text = render(server)
        assert 'poise_tls_handshakes_total{listener="web"} 1' in text
        assert 'poise_tls_reloads_total{listener="web",result="fail"} 0' in text
        expiry = [line for line in text.splitlines()
                  if line.startswith("poise_tls_certificate_not_after_seconds{")]  # fmt: skip
        assert len(expiry) == 3 and f'cert="{pki["a"].cert}"' in expiry[1]


async def test_plain_http_to_the_https_port_gets_a_400_saying_so(pki: dict[str, Any]) -> None:
    async with (
        HttpBackend("b1", echo_handler) as backend,
        running(https_doc(backend.url, sni_tls(pki))) as (server, _),
    ):
        plain = url_of(server, "web", "http")
        for request in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"POST /form HTTP/1.0\r\n"):
            raw = await exchange(plain, request, timeout=5)
            head, _, body = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n"), raw
            assert b"\r\nConnection: close" in head
            assert body == b"The plain HTTP request was sent to HTTPS port\n"
        assert server.statistics()["tls"]["web"]["plain_http"] == 2
        text = render(server)
        assert 'poise_tls_refused_total{listener="web",reason="plain_http"} 2\n' in text
        assert 'poise_tls_refused_total{listener="web",reason="tls_version"} 0\n' in text
        assert proxied(backend) == []
        reply, _ = await get(url_of(server, "web"), client_context(pki["ca"]), "a.example.test")
        assert reply.status == 200


def tls10_hello() -> bytes:
    """A TLS 1.0 client's ClientHello (no extensions, as such clients send it)."""
    body = b"\x03\x01" + b"\x11" * 32 + b"\x00" + b"\x00\x04\x00\x2f\x00\x35" + b"\x01\x00"
    msg = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(msg).to_bytes(2, "big") + msg


async def test_a_client_without_an_accepted_version_gets_a_protocol_version_alert(
    pki: dict[str, Any],
) -> None:
    """OpenSSL answers with a protocol_version alert (70); the gate makes sure it is sent."""
    async with HttpBackend("b1", echo_handler) as backend:
        async with running(https_doc(backend.url, sni_tls(pki))) as (server, _):
            plain = url_of(server, "web", "http")
            for bytewise in (False, True):
                raw = await exchange(plain, tls10_hello(), timeout=5, bytewise=bytewise)
                assert raw == b"\x15\x03\x01\x00\x02\x02\x46"  # alert, fatal, protocol_version
            assert server.statistics()["tls"]["web"]["version_alerts"] == 2
            text = render(server)
            assert 'poise_tls_refused_total{listener="web",reason="tls_version"} 2\n' in text
        # a TLS 1.3-only listener and a client that stops at TLS 1.2: the client hears why
        tls13 = {**sni_tls(pki), "min_version": "1.3"}
        async with running(https_doc(backend.url, tls13)) as (server, _):
            old = client_context(pki["ca"])
            old.maximum_version = ssl.TLSVersion.TLSv1_2
            with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"):
                await get(url_of(server, "web"), old, "a.example.test")
            reply, _ = await get(url_of(server, "web"), client_context(pki["ca"]), "a.example.test")
            assert reply.status == 200


async def test_a_client_hello_arriving_byte_by_byte_still_handshakes(pki: dict[str, Any]) -> None:
    """The gate holds the first bytes until it can decide, then TLS takes them all."""
    async with (
        HttpBackend("b1", echo_handler) as backend,
        running(https_doc(backend.url, sni_tls(pki))) as (server, _),
    ):
        host, port = server.addresses["web"]
        reader, writer = await asyncio.open_connection(host, port)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        ctx = client_context(pki["ca"])
        obj = ctx.wrap_bio(incoming, outgoing, server_hostname="a.example.test")
        try:
            async with asyncio.timeout(10):
                first = True
                while True:
                    try:
                        obj.do_handshake()
                        break
                    except ssl.SSLWantReadError:
                        data = outgoing.read()
                        for i in range(len(data) if first else 1):
                            writer.write(data[i : i + 1] if first else data)
                            await writer.drain()
                        first = False
                        incoming.write(await reader.read(65536))
                obj.write(b"GET /slow HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                writer.write(outgoing.read())
                answer = b""
                while not answer.startswith(b"HTTP/1.1 200"):
                    incoming.write(await reader.read(65536))
                    with contextlib.suppress(ssl.SSLWantReadError):
                        answer += obj.read(65536)
            assert [r.target for r in proxied(backend)] == ["/slow"]
        finally:
            writer.close()


async def test_returning_clients_resume_and_are_counted(pki: dict[str, Any]) -> None:
    ca, alice = pki["ca"], pki["alice"]
    tls = {**sni_tls(pki), "client_ca": str(ca.path), "client_auth": "optional",
           "client_subject_header": "X-Client-Subject"}  # fmt: skip
    async with (
        HttpBackend("b1", echo_handler) as backend,
        running(https_doc(backend.url, tls)) as (server, _),
    ):
        url = url_of(server, "web")
        ctx = client_context(ca, alice)
        session, reused, reply = await asyncio.to_thread(visit, url, ctx, None, "a.example.test")
        assert not reused and reply.startswith(b"HTTP/1.1 200")
        for _ in range(3):
            session, reused, reply = await asyncio.to_thread(
                visit, url, ctx, session, "a.example.test"
            )
            assert reused and reply.startswith(b"HTTP/1.1 200")
        # a resumed session keeps its verified client certificate: the subject still goes on
        subjects = [r.header("x-client-subject") for r in proxied(backend)]
        assert subjects == ["CN=alice,O=Example"] * 4
        stats = server.statistics()["tls"]["web"]["sessions"]
        assert (stats["full"], stats["resumed"], stats["tickets"]) == (1, 3, "shared")
        from poise.admin import metrics

        text = metrics.render(server)
        assert 'poise_tls_handshakes_completed_total{listener="web",type="full"} 1\n' in text
        assert 'poise_tls_handshakes_completed_total{listener="web",type="resumed"} 3\n' in text


async def test_session_resumption_off_means_every_handshake_is_full(pki: dict[str, Any]) -> None:
    tls = {**sni_tls(pki), "session_resumption": False}
    async with (
        HttpBackend("b1", echo_handler) as backend,
        running(https_doc(backend.url, tls)) as (server, _),
    ):
        url, ctx = url_of(server, "web"), client_context(pki["ca"])
        session, reused, _ = await asyncio.to_thread(visit, url, ctx, None, "a.example.test")
        _, reused, reply = await asyncio.to_thread(visit, url, ctx, session, "a.example.test")
        assert not reused and reply.startswith(b"HTTP/1.1 200")
        assert server.statistics()["tls"]["web"]["sessions"]["resumed"] == 0
