"""The L4 pump (src/poise/l4/_pump.c) under AddressSanitizer and UBSan, and its byte-exact
relaying of pairs driven directly (no event loop): bulk both ways with a slow reader (its
buffers and backpressure), half-closes each way, resets, and pairs closed by the caller.

The module is built with ``-fsanitize=address,undefined`` into a temporary directory and a
separate Python process (the sanitizer runtime preloaded) runs the driver; any
out-of-bounds access, use after free or undefined behaviour stops it with a report.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.native import SRC, run_sanitized

DRIVER = """
import hashlib, importlib.util, random, select, socket, struct, sys
spec = importlib.util.spec_from_file_location("_pump", sys.argv[1])
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
ended = {}
pump = m.Pump(lambda pid, failed, a, b: ended.__setitem__(pid, (failed, a, b)))

def pair():
    # client <-> [pump] <-> backend: two socket pairs, the pump gets the middle ends
    c, pc = socket.socketpair()
    pb, b = socket.socketpair()
    for s in (pc, pb):
        s.setblocking(False)
    pid = pump.add(os.dup(pc.fileno()), os.dup(pb.fileno()))
    pc.close(); pb.close()
    return pid, c, b

def spin(until, limit=20000):
    for _ in range(limit):
        pump.run()
        if until():
            return
        select.select([pump.fileno()], [], [], 0.05)
    raise AssertionError("no progress")

import os
rng = random.Random(5)
# bulk both ways, the reader slow: the pump buffers one read's worth and stops reading
pid, c, b = pair()
data = rng.randbytes(3 * 1024 * 1024)
c.setblocking(False); b.setblocking(False)
sent = got = 0
out = bytearray()
while got < len(data):
    if sent < len(data):
        try:
            sent += c.send(data[sent:sent + rng.choice([1, 100, 70000])])
        except BlockingIOError:
            pass
    pump.run()
    assert pump.buffered() <= 256 * 1024
    try:
        chunk = b.recv(rng.choice([1, 5000, 300000]))
        out += chunk; got += len(chunk)
    except BlockingIOError:
        select.select([b, pump.fileno()], [], [], 0.01)
assert bytes(out) == data, "mismatch"
# half-close: the client's FIN reaches the backend, which still answers
c.shutdown(socket.SHUT_WR)
spin(lambda: select.select([b], [], [], 0)[0])
assert b.recv(10) == b""
b.sendall(b"answer")
spin(lambda: select.select([c], [], [], 0)[0])
c.setblocking(True)
assert c.recv(10) == b"answer"
b.shutdown(socket.SHUT_WR)
spin(lambda: pid in ended)
assert ended[pid] == (-1, len(data), 6), ended[pid]
assert c.recv(10) == b""
c.close(); b.close()
# a backend reset: the pair ends as failed on the backend's side
pid, c, b = pair()
c.sendall(b"x" * 1000)
spin(lambda: select.select([b], [], [], 0)[0])
b.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
b.close()
spin(lambda: pid in ended)
assert ended[pid][0] in (1, -1), ended[pid]
c.close()
# many pairs at once, some closed by the caller, with bytes still held
pairs = [pair() for _ in range(40)]
for pid, c, b in pairs:
    c.sendall(rng.randbytes(rng.randrange(1, 200000)))
for _ in range(50):
    pump.run()
for pid, c, b in pairs[::2]:
    assert pump.close(pid, rng.random() < 0.5) is not None
    assert pump.counts(pid) is None
# an ended pair's id never finds the pair that takes its slot next
old = pairs[0][0]
new, c2, b2 = pair()
assert new & 0xffffffff == old & 0xffffffff and new != old, (old, new)
assert pump.counts(old) is None and pump.counts(new) == (0, 0)
assert pump.close(old, False) is None and len(pump) == 21
pairs.append((new, c2, b2))
for pid, c, b in pairs:
    c.close(); b.close()
spin(lambda: len(pump) == 0)
print("ok", len(ended))
"""


@pytest.mark.timeout(300)
def test_the_pump_is_clean_under_address_and_undefined_behaviour_sanitizers(
    tmp_path: Path,
) -> None:
    out = run_sanitized(SRC / "l4" / "_pump.c", tmp_path, DRIVER)
    assert out.startswith("ok "), out
