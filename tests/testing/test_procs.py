"""poise.testing.procs.BackendProcess: a real backend process, killed with SIGKILL and restarted.

Plain blocking sockets on 127.0.0.1 with timeouts; responses are parsed by hand so the tests
do not trust the parser the backend uses. Nothing sleeps in the hope that something happened:
a backend logs a delivery before it answers, so once the answer is read the line is there.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from poise.testing.procs import BackendProcess, free_port

pytestmark = pytest.mark.timeout(60)

STEP = 5.0  # upper bound for any single network step


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[BackendProcess]:
    proc = BackendProcess(free_port(), tmp_path / "b1.log", "b1")
    try:
        proc.start()
        yield proc
    finally:
        proc.stop()  # also when the test failed: no orphans


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=STEP)


class Reader:
    """Responses from one socket, keeping bytes that arrive ahead (pipelined answers)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self, what: str) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed {what}: {self.buf!r}")
        self.buf += chunk

    def response(self, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
        """One response: (status, lower-cased headers, body by Content-Length)."""
        while b"\r\n\r\n" not in self.buf:
            self._fill("before a full response head")
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines)}
        length = 0 if head_only else int(headers["content-length"])
        while len(self.buf) < length:
            self._fill("mid-body")
        body, self.buf = self.buf[:length], self.buf[length:]
        return int(status_line.split()[1]), headers, body


def read_response(
    sock: socket.socket, head_only: bool = False
) -> tuple[int, dict[str, str], bytes]:
    """One response, and nothing after it: these tests send one request at a time."""
    reader = Reader(sock)
    got = reader.response(head_only)
    assert reader.buf == b"", f"unexpected bytes after the response: {reader.buf!r}"
    return got


def request(port: int, raw: bytes, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
    with connect(port) as sock:
        sock.sendall(raw)
        return read_response(sock, head_only)


def wait_until(cond: Callable[[], bool], what: str, timeout: float = STEP) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        time.sleep(0.01)


def refused(port: int) -> bool:
    try:
        connect(port).close()
    except ConnectionRefusedError:
        return True
    return False


def test_get_and_head_answer_and_are_logged(backend: BackendProcess) -> None:
    with connect(backend.port) as sock:  # one keep-alive connection for both
        sock.sendall(b"GET /a/b?x=1 HTTP/1.1\r\nHost: t\r\nX-Request-Id: req-1\r\n\r\n")
        status, headers, body = read_response(sock)
        assert (status, body) == (200, b"backend b1\n")
        assert headers["x-backend"] == "b1"
        sock.sendall(b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\n")
        status, headers, body = read_response(sock, head_only=True)
        assert (status, headers["content-length"], body) == (200, "11", b"")
        # the HEAD answer carried no body: the next response starts right away
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_response(sock)[2] == b"backend b1\n"
    assert backend.deliveries() == ["GET /a/b?x=1 req-1", "HEAD / -", "GET / -"]


def test_request_bodies_and_pipelining(backend: BackendProcess) -> None:
    with connect(backend.port) as sock:
        sock.sendall(
            b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nX-Request-Id: p1\r\n\r\nhello"
            b"GET /slow?ms=200 HTTP/1.1\r\nHost: t\r\nX-Request-Id: s1\r\n\r\n"
            b"GET /after HTTP/1.1\r\nHost: t\r\nX-Request-Id: a1\r\n\r\n"
        )
        t0 = time.monotonic()
        reader = Reader(sock)
        assert reader.response()[0] == 200
        assert reader.response()[0] == 200  # /slow ...
        assert time.monotonic() - t0 >= 0.2  # ... took its 200 ms
        assert reader.response()[0] == 200  # and /after waited for it: order kept
        assert reader.buf == b""
    assert backend.deliveries() == ["POST /up p1", "GET /slow?ms=200 s1", "GET /after a1"]


def test_connection_close_is_honoured(backend: BackendProcess) -> None:
    with connect(backend.port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        status, headers, _ = read_response(sock)
        assert (status, headers["connection"]) == (200, "close")
        assert sock.recv(1) == b""


def test_kill_refuses_then_restart_on_the_same_port(backend: BackendProcess) -> None:
    first_pid = backend.pid
    assert request(backend.port, b"GET /one HTTP/1.1\r\nHost: t\r\n\r\n")[0] == 200
    backend.kill()
    assert not backend.alive
    assert backend.returncode == -9
    assert refused(backend.port)
    backend.restart()
    assert backend.alive and backend.pid != first_pid
    assert request(backend.port, b"GET /two HTTP/1.1\r\nHost: t\r\n\r\n")[0] == 200
    assert backend.deliveries() == ["GET /one -", "GET /two -"]  # one log across restarts


def test_kill_drops_open_connections(backend: BackendProcess) -> None:
    with connect(backend.port) as sock:
        sock.sendall(b"GET /slow?ms=30000 HTTP/1.1\r\nHost: t\r\n\r\n")
        wait_until(lambda: len(backend.deliveries()) == 1, "the slow request to be read")
        backend.kill()
        with contextlib.suppress(ConnectionResetError):  # RST or FIN: either way, gone
            assert sock.recv(1) == b""


def test_post_die_logs_one_delivery_and_never_answers(backend: BackendProcess) -> None:
    with connect(backend.port) as sock:
        sock.sendall(
            b"POST /die HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nX-Request-Id: d-1\r\n\r\nbody"
        )
        try:
            got = sock.recv(65536)
        except ConnectionResetError:
            got = b""
        assert got == b"", f"a dying backend answered: {got!r}"
    wait_until(lambda: not backend.alive, "the backend to be dead")
    assert backend.returncode == -9
    assert backend.deliveries() == ["POST /die d-1"]
    assert refused(backend.port)


def test_die_after_read_mode(tmp_path: Path) -> None:
    proc = BackendProcess(free_port(), tmp_path / "d.log", "d", die_after_read=True)
    try:
        proc.start()
        # HEAD (the health check) is still answered: poise sees the backend as up
        assert request(proc.port, b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\n", head_only=True)[0] == 200
        with connect(proc.port) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nX-Request-Id: g\r\n\r\n")
            with pytest.raises((ConnectionError, AssertionError)):
                read_response(sock)
        wait_until(lambda: not proc.alive, "the backend to be dead")
        assert proc.deliveries() == ["HEAD / -", "GET / g"]
    finally:
        proc.stop()


def test_context_manager_stops_the_process(tmp_path: Path) -> None:
    with BackendProcess(free_port(), tmp_path / "c.log", "c") as proc:
        assert proc.alive and proc.pid is not None
    assert not proc.alive
    assert refused(proc.port)


def test_start_refuses_a_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        proc = BackendProcess(other.getsockname()[1], tmp_path / "x.log")
        with pytest.raises(RuntimeError, match="already in use"):
            proc.start()
        assert not proc.alive


def test_start_failure_reports_the_child_stderr(tmp_path: Path) -> None:
    proc = BackendProcess(free_port(), tmp_path / "missing-dir" / "x.log")
    with pytest.raises(RuntimeError, match="FileNotFoundError"):
        proc.start()
    assert not proc.alive
