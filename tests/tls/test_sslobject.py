"""DirectObject (poise.tls.sslobject): poise's contexts make TLS objects whose record calls
go straight to ``_ssl``, and which behave as ``ssl.SSLObject`` over memory BIOs, the way the
event loop's TLS transports use them."""

from __future__ import annotations

import contextlib
import random
import ssl
from pathlib import Path
from typing import Any

import pytest

from poise.config.model import CertificateConfig, ListenerTlsConfig, UpstreamTlsConfig
from poise.tls.contexts import client_context, server_context
from poise.tls.sslobject import DirectObject
from tests.tls.certgen import CA

VERSIONS = [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3]


class Pair:
    """A poise backend context (client) and listener context (server) over memory BIOs."""

    def __init__(self, tmp_path: Path, version: ssl.TLSVersion) -> None:
        ca = CA(tmp_path)
        cert = ca.issue("a", ["a.test"])
        pem = CertificateConfig(str(cert.cert), str(cert.key))
        listener = server_context(ListenerTlsConfig(certificates=(pem,)), pem)
        backend = client_context(UpstreamTlsConfig(ca=str(ca.path)))
        backend.maximum_version = version
        self.c_in, self.c_out, self.s_in, self.s_out = (ssl.MemoryBIO() for _ in range(4))
        self.client = backend.wrap_bio(self.c_in, self.c_out, server_hostname="a.test")
        self.server = listener.wrap_bio(self.s_in, self.s_out, server_side=True)
        for _ in range(6):
            for end, out, into in (
                (self.client, self.c_out, self.s_in),
                (self.server, self.s_out, self.c_in),
            ):
                with contextlib.suppress(ssl.SSLWantReadError):
                    end.do_handshake()
                into.write(out.read())
        with contextlib.suppress(ssl.SSLWantReadError):
            self.client.read(1)  # takes in the server's TLS 1.3 tickets

    def drain(self, end: ssl.SSLObject, bio: ssl.MemoryBIO) -> bytes:
        """As uvloop's SSLProtocol reads: while the BIO or OpenSSL holds bytes (a record
        not complete yet: SSLWantReadError)."""
        got = b""
        with contextlib.suppress(ssl.SSLWantReadError):
            while bio.pending or end.pending():
                chunk = end.read(262144)
                if not chunk:
                    break
                got += chunk
        return got


@pytest.mark.parametrize("version", VERSIONS, ids=["1.2", "1.3"])
def test_listener_and_backend_objects_call_ssl_directly(
    tmp_path: Path, version: ssl.TLSVersion
) -> None:
    pair = Pair(tmp_path, version)
    for end in (pair.client, pair.server):
        assert isinstance(end, DirectObject)
        inner = end._sslobj  # type: ignore[attr-defined]
        # the transports cache these bound methods: _ssl's own, no Python wrapper between
        for name in ("read", "write", "pending"):
            method = getattr(end, name)
            assert type(method).__name__ == "builtin_function_or_method"
            assert method.__self__ is inner
    names = {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}
    assert pair.server.version() == names[version]
    assert pair.client.server_hostname == "a.test"


@pytest.mark.parametrize("seed", range(6))
def test_records_both_ways_arrive_whole_and_in_order(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    pair = Pair(tmp_path, VERSIONS[seed % 2])
    for sender, out, receiver, into in (
        (pair.client, pair.c_out, pair.server, pair.s_in),
        (pair.server, pair.s_out, pair.client, pair.c_in),
    ):
        sent = got = b""
        for _ in range(rng.randint(1, 8)):
            data = rng.randbytes(rng.choice([1, 100, 5000, 40000]))
            assert sender.write(data) == len(data)
            sent += data
            wire = out.read()
            pos = 0
            while pos < len(wire):  # fed in pieces cut anywhere, drained after each
                cut = min(len(wire), pos + rng.choice([1, 5, 300, 17000]))
                into.write(wire[pos:cut])
                pos = cut
                got += pair.drain(receiver, into)
        assert got == sent
    buf = bytearray(8)
    pair.client.write(b"0123456789")
    pair.s_in.write(pair.c_out.read())
    read_into: Any = pair.server.read  # read(len, buffer) answers the count
    assert read_into(8, buf) == 8 and bytes(buf) == b"01234567"
    assert pair.server.pending() == 2
    assert pair.server.read(8) == b"89"
    with pytest.raises(ssl.SSLWantReadError):
        pair.server.read(8)


def test_close_notify_reads_as_the_end(tmp_path: Path) -> None:
    pair = Pair(tmp_path, ssl.TLSVersion.TLSv1_3)
    with pytest.raises(ssl.SSLWantReadError):
        pair.client.unwrap()  # sends close_notify, waits for the server's
    pair.s_in.write(pair.c_out.read())
    assert pair.server.read(1024) == b""
