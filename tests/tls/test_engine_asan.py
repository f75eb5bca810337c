"""The C TLS record engine (src/poise/tls/_engine.c) under AddressSanitizer and UBSan.

The module is built with ``-fsanitize=address,undefined`` into a temporary directory, and a
separate Python process (the sanitizer runtime preloaded, every Python object its own
``malloc`` block) drives engines over memory BIOs: handshakes in TLS 1.2 and 1.3, records
from one byte to 1 MiB cut at random places both ways, close_notify each way, a corrupted
record, a failed handshake, and engines dropped in every state. A read or write past a
buffer shows as a sanitizer report, a reference counted once too often as a use after
free; either stops or fails that process.
"""

from __future__ import annotations

from pathlib import Path

from tests.native import SRC, run_sanitized

DRIVER = """
import gc, importlib.util, random, ssl, sys, tempfile
from pathlib import Path
sys.path[:0] = [sys.argv[2] + "/src", sys.argv[2]]
spec = importlib.util.spec_from_file_location("_engine", sys.argv[1])
native = importlib.util.module_from_spec(spec)
spec.loader.exec_module(native)
from poise.config.model import CertificateConfig, ListenerTlsConfig
from poise.tls import engine as engines
from poise.tls.contexts import server_context
from tests.tls.certgen import CA

engines._native = native
assert engines.native_error() is None, engines.native_error()
ca = CA(Path(tempfile.mkdtemp()))
pair = ca.issue("a", ["a.test"])
pem = CertificateConfig(str(pair.cert), str(pair.key))
ctx = server_context(ListenerTlsConfig(certificates=(pem,)), pem)
rng = random.Random(3)

def client(version, ciphers=None):
    c = ssl.create_default_context(cafile=str(ca.path))
    c.maximum_version = version
    if ciphers:
        c.set_ciphers(ciphers)
    bi, bo = ssl.MemoryBIO(), ssl.MemoryBIO()
    return c.wrap_bio(bi, bo, server_hostname="a.test"), bi, bo

def step(c):
    try:
        c.do_handshake()
        return True
    except ssl.SSLWantReadError:
        return False

def feed(c, bi, data):
    bi.write(data)
    got = b""
    while True:
        try:
            chunk = c.read(1 << 20)
        except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
            return got
        if not chunk:
            return got
        got += chunk

def connect(version):
    c, bi, bo = client(version)
    e = engines.make(ctx)
    assert type(e) is native.Engine
    for _ in range(8):
        done_c = step(c)
        if e.handshake(bo.read() or None):
            feed(c, bi, e.take())
            if step(c):
                return c, bi, bo, e
        else:
            feed(c, bi, e.take())
    raise AssertionError("no handshake")

for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
    for rounds in range(3):
        c, bi, bo, e = connect(version)
        assert e.tls13 == (version == ssl.TLSVersion.TLSv1_3)
        for size in (1, 5000, 16384, 16385, 70000, 1 << 20):
            payload = rng.randbytes(size)
            c.write(payload)
            wire = bo.read()
            got = b""
            while wire:
                cut = rng.randint(1, len(wire))
                got += e.read(wire[:cut])
                wire = wire[cut:]
            assert got == payload
            assert feed(c, bi, e.write(payload)) == payload
            assert feed(c, bi, e.writelines([payload[:7], b"", bytearray(payload[7:])])) == payload
        if rounds == 0:  # the client closes first
            try:
                c.unwrap()
            except ssl.SSLWantReadError:
                pass
            assert e.read(bo.read()) == b"" and e.peer_closed
            assert e.shutdown()
        elif rounds == 1:  # we close first
            assert not e.shutdown()
            feed(c, bi, e.take())
        else:  # a corrupted record
            c.write(b"z" * 300)
            wire = bytearray(bo.read())
            wire[-5] ^= 0x55
            try:
                e.read(bytes(wire))
                raise AssertionError("a corrupted record was accepted")
            except ssl.SSLError:
                pass
        assert e.sslobj is not None
        del c, e
    # a failed handshake, and engines dropped half-way
    c, bi, bo = client(ssl.TLSVersion.TLSv1_2, "AES128-SHA")
    strict = server_context(ListenerTlsConfig(certificates=(pem,)), pem)
    strict.set_ciphers("ECDHE+AESGCM")
    e = engines.make(strict)
    step(c)
    try:
        e.handshake(bo.read())
        raise AssertionError("the handshake should fail")
    except ssl.SSLError:
        pass
    assert e.take()[:1] == b"\\x15"
    for _ in range(50):
        e = engines.make(ctx)
        c, bi, bo = client(version)
        step(c)
        e.handshake(bo.read())
        del e
    gc.collect()
print("ok")
"""


def test_the_engine_under_address_sanitizer(tmp_path: Path) -> None:
    out = run_sanitized(SRC / "tls" / "_engine.c", tmp_path, DRIVER)
    assert out.strip().endswith("ok")
