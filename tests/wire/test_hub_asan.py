"""The C hub (src/poise/wire/_hub.c) under AddressSanitizer and UBSan.

The module is built with ``-fsanitize=address,undefined`` into a temporary directory, and a
separate Python process (the sanitizer runtime preloaded, every Python object its own
``malloc`` block) serves loopback clients through it on an asyncio loop, as
``poise.wire.create_server`` sets it up: 200 connections open at once (the slots grow past
64 twice) with echo, some ended with a FIN and some with a reset; a big write to a slow
reader (its buffer and pause/resume_writing); close with data waiting; abort; resets with
data waiting; protocol callbacks and a factory that raise; writelines of many pieces;
half-closes each way; set_protocol; accept out of descriptors and the listener resumed;
and the hub closed with live connections. A read or write past a buffer shows as a
sanitizer report, a reference counted once too often as a use after free; either stops
that process and fails the test. Two more drivers each hold one misuse the hub must
survive: a listen() that fails, and a list given to writelines that pause_writing empties.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.native import SRC, run_sanitized

SOURCE = SRC / "wire" / "_hub.c"

PRELUDE = """
import asyncio, gc, hashlib, importlib.util, logging, os, random, resource, socket, struct
import sys, time
spec = importlib.util.spec_from_file_location("_hub", sys.argv[1])
native = importlib.util.module_from_spec(spec)
spec.loader.exec_module(native)
sys.path[:0] = [sys.argv[2] + "/src"]
from poise import wire

wire._native = native
wire.ACCEPT_RETRY = 0.05
assert wire.native_error() is None, wire.native_error()
rng = random.Random(11)


class P(asyncio.Protocol):
    keep_open = None

    def __init__(self):
        self.log, self.t, self.data, self.exc = [], None, bytearray(), "not lost"

    def connection_made(self, t):
        self.t = t
        self.log.append("made")

    def data_received(self, d):
        assert type(d) is bytes
        self.log.append("data")
        self.data += d

    def eof_received(self):
        self.log.append("eof")
        return self.keep_open

    def pause_writing(self):
        self.log.append("pause")

    def resume_writing(self):
        self.log.append("resume")

    def connection_lost(self, exc):
        self.log.append("lost")
        self.exc = exc


class Echo(P):
    def data_received(self, d):
        super().data_received(d)
        self.t.write(d)


async def until(cond, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "no progress: " + what
        await asyncio.sleep(0.005)


async def client(addr, rcvbuf=None):
    s = socket.socket()
    s.setblocking(False)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await asyncio.wait_for(asyncio.get_running_loop().sock_connect(s, addr), 60)
    return s


async def recv_exactly(s, n):
    loop = asyncio.get_running_loop()
    got = bytearray()
    while len(got) < n:
        chunk = await asyncio.wait_for(loop.sock_recv(s, min(n - len(got), 1 << 18)), 60)
        assert chunk, ("early EOF", len(got), n)
        got += chunk
    return bytes(got)


async def read_to_end(s):
    loop = asyncio.get_running_loop()
    got = bytearray()
    while True:
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(s, 1 << 18), 60)
        except ConnectionResetError:
            return bytes(got), "reset"
        if not chunk:
            return bytes(got), "eof"
        got += chunk


def reset(s):
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
"""

DRIVER = (
    PRELUDE
    + """

async def main():
    loop = asyncio.get_running_loop()
    errors = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    logged = []
    handler = logging.Handler()
    handler.emit = logged.append
    logging.getLogger("poise.wire").addHandler(handler)
    protocols = []
    kind = [Echo]

    def factory():
        made = kind[0]()  # a class, or a function that raises
        protocols.append(made)
        return made

    server = await wire.create_server(loop, factory, backlog=512, host="127.0.0.1", port=0)
    await server.start_serving()
    hub = wire._hubs[loop]
    addr = server.sockets[0].getsockname()

    async def pair(cls=Echo, rcvbuf=None):
        kind[0] = cls
        n = len(protocols)
        s = await client(addr, rcvbuf)
        await until(lambda: len(protocols) > n and protocols[n].log, "accepted")
        return s, protocols[n]

    # 200 connections open at once, each its own echo; the slots grow 64 -> 128 -> 256
    async def talk(i):
        s = await client(addr)
        data = rng.randbytes(1 + 331 * i)
        await loop.sock_sendall(s, data)
        assert await recv_exactly(s, len(data)) == data
        return s

    socks = await asyncio.gather(*(talk(i) for i in range(200)))
    assert len(hub) == 200 and len(protocols) == 200
    for i, s in enumerate(socks):
        s.close() if i % 2 else reset(s)
    await until(lambda: all(p.exc != "not lost" for p in protocols), "200 lost")
    assert len(hub) == 0
    assert all(p.log.count("lost") == 1 for p in protocols)
    # the slots are used again (a stale event never reaches a new connection)
    socks = await asyncio.gather(*(talk(i) for i in range(70)))
    assert len(hub) == 70
    for s in socks:
        s.close()
    await until(lambda: len(hub) == 0, "70 lost")

    # a big write to a slow reader: pause_writing, the buffer, resume_writing
    big = rng.randbytes(8 << 20)
    s, p = await pair(P, rcvbuf=16384)
    p.t.write(big)
    assert p.log == ["made", "pause"] and p.t.get_write_buffer_size() > 0
    got = await recv_exactly(s, len(big))
    assert hashlib.sha256(got).digest() == hashlib.sha256(big).digest()
    await until(lambda: "resume" in p.log, "resume_writing")
    p.t.set_write_buffer_limits(high=100, low=10)
    assert p.t.get_write_buffer_limits() == (10, 100)
    try:
        p.t.set_write_buffer_limits(high=1, low=2)
        raise AssertionError("no ValueError")
    except ValueError:
        pass
    p.t.close()
    s.close()

    # close with data waiting: all of it, then EOF, then connection_lost(None)
    s, p = await pair(P, rcvbuf=16384)
    p.t.write(big)
    p.t.close()
    p.t.close()
    p.t.write(b"dropped")
    got, how = await read_to_end(s)
    assert how == "eof" and got == big
    await until(lambda: "lost" in p.log, "lost after close")
    assert p.exc is None
    s.close()

    # abort with data waiting; writes after it dropped; the Conn outlives its end
    s, p = await pair(P, rcvbuf=16384)
    p.t.write(big)
    p.t.abort()
    assert "lost" not in p.log
    p.t.write(b"x")
    p.t.writelines([b"y"] * 100)
    p.t.abort()
    p.t.close()
    p.t.pause_reading()
    p.t.resume_reading()
    p.t.set_protocol(P())
    await until(lambda: "lost" in p.log, "lost after abort")
    assert p.t.get_extra_info("peername") == s.getsockname()
    assert p.t.get_extra_info("socket", 3) == 3 and p.t.get_write_buffer_size() == 0
    await read_to_end(s)
    s.close()

    # resets: with data waiting, idle, and with reading paused and data waiting
    for case in range(3):
        s, p = await pair(P, rcvbuf=16384)
        if case != 1:
            p.t.write(big)
        if case == 2:
            p.t.pause_reading()
        reset(s)
        await until(lambda: "lost" in p.log, "lost after reset")
        assert isinstance(p.exc, ConnectionError), p.exc

    # protocol callbacks that raise: the connection ends with that exception
    class RaisingData(P):
        def data_received(self, d):
            super().data_received(d)
            raise ValueError("data")

    class RaisingMade(P):
        def connection_made(self, t):
            super().connection_made(t)
            raise ValueError("made")

    class RaisingEof(P):
        def eof_received(self):
            super().eof_received()
            raise ValueError("eof")

    class RaisingPause(Echo):
        def pause_writing(self):
            raise ValueError("pause")

    for cls, word in ((RaisingData, "data"), (RaisingMade, "made"), (RaisingEof, "eof")):
        s, p = await pair(cls)
        try:  # (the server may have closed already: a reset)
            await loop.sock_sendall(s, b"hello")
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        await until(lambda: "lost" in p.log, "lost after " + word)
        assert isinstance(p.exc, ValueError) and str(p.exc) == word, p.exc
        assert any(c.get("exception") is p.exc for c in errors)
        await read_to_end(s)
        s.close()
    s, p = await pair(RaisingPause, rcvbuf=16384)
    p.t.write(big)  # its pause_writing raises: reported, the connection goes on
    assert await recv_exactly(s, len(big)) == big
    s.close()

    def failing():
        raise RuntimeError("factory")

    before = len(protocols)
    kind[0] = failing
    s = await client(addr)
    assert (await read_to_end(s))[1] in ("eof", "reset")
    s.close()
    assert any(str(c.get("exception")) == "factory" for c in errors)
    s, p = await pair(Echo)  # the listener goes on
    assert len(protocols) == before + 1
    s.close()

    # writelines of many pieces, part kept, kept in order
    pieces = []
    for i in range(300):
        piece = rng.randbytes(rng.choice([0, 1, 100, 5000, 70000]))
        pieces.append((bytes, bytearray, memoryview)[i % 3](piece))
    s, p = await pair(P, rcvbuf=16384)
    p.t.writelines(pieces)
    p.t.writelines(iter(pieces[:70]))
    try:
        p.t.writelines([b"ok"] * 70 + ["not bytes"])
        raise AssertionError("no TypeError")
    except TypeError:
        pass
    expected = b"".join(pieces) + b"".join(pieces[:70]) + b"ok" * 64
    assert await recv_exactly(s, len(expected)) == expected
    s.close()

    # write_last: many pieces, part kept, then the end
    s, p = await pair(P, rcvbuf=16384)
    p.t.write_last(pieces)
    p.t.write_last(pieces)  # closing: dropped
    assert await recv_exactly(s, len(b"".join(pieces))) == b"".join(pieces)
    assert await loop.sock_recv(s, 10) == b""
    s.close()

    # write_eof, then the client still talks; the client's half-close kept open
    s, p = await pair(P, rcvbuf=16384)
    p.t.write(big[:3 << 20])
    p.t.write_eof()
    try:
        p.t.write(b"x")
        raise AssertionError("no RuntimeError")
    except RuntimeError:
        pass
    got, how = await read_to_end(s)
    assert how == "eof" and got == big[:3 << 20]
    await loop.sock_sendall(s, b"more")
    await until(lambda: p.data == b"more", "data after write_eof")
    s.close()
    await until(lambda: "lost" in p.log, "lost after both ends")

    class HalfOpen(P):
        keep_open = True

    s, p = await pair(HalfOpen)
    await loop.sock_sendall(s, b"question")
    s.shutdown(socket.SHUT_WR)
    await until(lambda: "eof" in p.log, "eof_received")
    p.t.write(b"answer")
    p.t.close()
    assert await read_to_end(s) == (b"answer", "eof")
    s.close()

    # pause_reading holds data back; set_protocol hands the rest to another protocol
    s, p = await pair(P)
    p.t.pause_reading()
    await loop.sock_sendall(s, b"held")
    await asyncio.sleep(0.05)
    assert p.data == b""
    p.t.resume_reading()
    await until(lambda: p.data == b"held", "data after resume")
    other = Echo()
    other.t = p.t
    p.t.set_protocol(other)
    await loop.sock_sendall(s, b"echoed")
    assert await recv_exactly(s, 6) == b"echoed"
    s.close()
    await until(lambda: "lost" in other.log, "lost for the new protocol")
    assert "lost" not in p.log

    # accept out of descriptors: the listener waits, is resumed, and accepts
    kind[0] = Echo
    waiting = socket.socket()
    waiting.setblocking(False)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
    fillers = []
    try:
        while True:
            fillers.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    n = len(protocols)
    try:
        await asyncio.wait_for(loop.sock_connect(waiting, addr), 60)
        await until(lambda: any("accept() failed" in r.getMessage() for r in logged), "EMFILE")
        assert len(protocols) == n
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    await until(lambda: len(protocols) > n, "accepted after resume")
    await loop.sock_sendall(waiting, b"back")
    assert await recv_exactly(waiting, 4) == b"back"
    waiting.close()
    await until(lambda: len(hub) == 0, "all ended")

    # the hub closed with live connections, some with data waiting
    live = []
    for i in range(70):
        s, p = await pair(P if i % 3 else Echo, rcvbuf=16384)
        if i % 5 == 0:
            p.t.write(big[: 1 << 20])
        live.append((s, p))
    assert len(hub) == 70
    server.close()
    wire.shutdown(loop)
    assert len(hub) == 0
    assert hub.fileno() == -1
    hub.run()
    await until(lambda: all("lost" in p.log for _, p in live), "lost at shutdown")
    for s, p in live:
        assert p.log.count("lost") == 1 and p.exc is None
        assert p.t.is_closing()
        p.t.write(b"after")
        p.t.close()
        await read_to_end(s)
        s.close()
    for bad in (lambda: hub.listen(0, Echo, 5), lambda: hub.unlisten(0), lambda: hub.resume(9)):
        try:
            bad()
            raise AssertionError("accepted on a closed hub")
        except (RuntimeError, ValueError):
            pass
    hub.close()
    return len(protocols)


made = asyncio.run(main())
gc.collect()
print("ok", made)
"""
)

FAILED_LISTEN = (
    PRELUDE
    + """
hub = native.Hub(lambda *a: None, lambda *a: None)
for bad in (-1, os.open("/dev/null", os.O_RDONLY)):  # not a descriptor; not a socket
    try:
        hub.listen(bad, Echo, 5)
        raise AssertionError("listen accepted " + str(bad))
    except OSError:
        pass
gc.collect()  # the hub's traverse visits every listener slot
hub.close()
print("ok")
"""
)

WRITELINES_CHANGED = (
    PRELUDE
    + """
pieces = [bytes([i]) * 70000 for i in range(200)]


class Clearing(P):
    def pause_writing(self):
        super().pause_writing()
        pieces.clear()  # the very list being written (a protocol may, it is Python code)


async def main():
    loop = asyncio.get_running_loop()
    made = []
    server = await wire.create_server(
        loop, lambda: made.append(Clearing()) or made[-1], backlog=5, host="127.0.0.1"
    )
    await server.start_serving()
    s = await client(server.sockets[0].getsockname(), rcvbuf=16384)
    await until(lambda: made and made[0].t, "accepted")
    made[0].t.writelines(pieces)
    assert "pause" in made[0].log
    made[0].t.abort()
    s.close()
    server.close()
    wire.shutdown(loop)


asyncio.run(main())
print("ok")
"""
)


@pytest.mark.timeout(300)
def test_the_hub_is_clean_under_address_and_undefined_behaviour_sanitizers(
    tmp_path: Path,
) -> None:
    out = run_sanitized(SOURCE, tmp_path, DRIVER)
    assert out.strip().startswith("ok "), out
    assert int(out.split()[1]) > 300, out


@pytest.mark.timeout(300)
def test_a_failed_listen_leaves_the_hub_sound(tmp_path: Path) -> None:
    out = run_sanitized(SOURCE, tmp_path, FAILED_LISTEN)
    assert out.strip() == "ok", out


@pytest.mark.timeout(300)
def test_a_list_emptied_by_pause_writing_during_writelines(tmp_path: Path) -> None:
    out = run_sanitized(SOURCE, tmp_path, WRITELINES_CHANGED)
    assert out.strip() == "ok", out
