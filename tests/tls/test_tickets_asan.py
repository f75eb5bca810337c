"""The C ticket key callback (src/poise/tls/_tickets.c) under AddressSanitizer and UBSan.

The module is built with ``-fsanitize=address,undefined`` into a temporary directory, and a
separate Python process (the sanitizer runtime preloaded, every Python object its own
``malloc`` block) runs listeners through it over memory BIOs: full and resumed handshakes
in TLS 1.2 and 1.3, a key lookup that raises, keys that come back as None, and listeners
made and dropped until slots are reused. A reference counted once too often shows as a
use after free, a slot freed too early as a wrong key; either stops or fails that process.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.native import SRC, run_sanitized

DRIVER = """
import gc, importlib.util, ssl, sys, tempfile
from pathlib import Path
sys.path[:0] = [sys.argv[2] + "/src", sys.argv[2]]
spec = importlib.util.spec_from_file_location("_tickets", sys.argv[1])
native = importlib.util.module_from_spec(spec)
spec.loader.exec_module(native)
from poise.config.model import CertificateConfig, ListenerTlsConfig
from poise.tls import tickets
from poise.tls.contexts import ListenerTls
from tests.tls.certgen import CA

tickets._native = native
assert tickets.native_error() is None, tickets.native_error()
ca = CA(Path(tempfile.mkdtemp()))
pair = ca.issue("a", ["a.test"])
cfg = ListenerTlsConfig(certificates=(CertificateConfig(str(pair.cert), str(pair.key)),))
clients = {}

def connect(listener, version, session=None):
    client = clients.get(version)
    if client is None:
        client = clients[version] = ssl.create_default_context(cafile=str(ca.path))
        client.maximum_version = version
    bios = [ssl.MemoryBIO() for _ in range(4)]
    c = client.wrap_bio(bios[0], bios[1], server_hostname="a.test", session=session)
    s = listener.context.wrap_bio(bios[2], bios[3], server_side=True)
    for _ in range(8):
        for end, out, into in ((c, bios[1], bios[2]), (s, bios[3], bios[0])):
            try:
                end.do_handshake()
            except ssl.SSLWantReadError:
                pass
            into.write(out.read())
    c.write(b"x"); bios[2].write(bios[1].read()); s.read(1)
    s.write(b"y"); bios[0].write(bios[3].read()); c.read(1)
    return c.session, c.session_reused

resumed = 0
for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
    listener = ListenerTls("web", cfg)
    assert listener.ticket_callback == "C"
    session, _ = connect(listener, version)
    for _ in range(150):
        session, reused = connect(listener, version, session)
        resumed += reused
    keys = listener.tickets
    def broken(name):
        raise RuntimeError("lookup failed")
    keys.find = broken
    _, reused = connect(listener, version, session)
    assert not reused
    del keys.find
    keys.encrypting = lambda: None  # no key: no ticket
    assert connect(listener, version)[0] is not None
    del listener, keys
# listeners made and dropped: slots freed with their contexts and used again
gc.collect()
before = native.in_use()
for round in range(3):
    made = [ListenerTls(f"l{i}", cfg) for i in range(80)]  # more than the 64 slots
    kinds = {m.ticket_callback for m in made}
    assert kinds == {"C", "ctypes"}, kinds
    session, _ = connect(made[0], ssl.TLSVersion.TLSv1_3)
    assert connect(made[0], ssl.TLSVersion.TLSv1_3, session)[1]
    del made
    gc.collect()
    assert native.in_use() == before, (native.in_use(), before)
print("resumed", resumed)
"""


@pytest.mark.timeout(300)
def test_the_ticket_callback_is_clean_under_address_and_undefined_behaviour_sanitizers(
    tmp_path: Path,
) -> None:
    out = run_sanitized(SRC / "tls" / "_tickets.c", tmp_path, DRIVER)
    assert out.strip() == "resumed 300", out
