"""`BackendProcess`: a real HTTP/1.1 backend in its own OS process, for kill -9 tests.

The in-process doubles (`HttpBackend`) can only pretend to die; this one really does.
The parent spawns ``python -m poise.testing.procs --port N --log FILE [--name NAME]``,
SIGKILLs it, and restarts it on the same port. The child:

* answers every ``GET`` (any path) with 200 and ``backend NAME\\n``; ``HEAD`` with the same
  head and no body (poise's health check is ``HEAD /`` expecting 200); keep-alive,
  pipelining, Content-Length and chunked request bodies (read and dropped);
* ``/slow?ms=N`` answers after N ms;
* appends ``METHOD TARGET REQUEST-ID`` to the log (``X-Request-Id`` or ``-``) once per request
  *fully read*, before answering, with one ``os.write`` on an O_APPEND fd: the line is on disk
  even if the process is SIGKILLed a moment later, so tests can count deliveries exactly;
* ``/die`` (or every non-HEAD request with ``--die-after-read``): logs the delivery, then
  SIGKILLs itself without answering — a backend that dies after reading the request;
* exits when its parent is gone, so a crashed test run leaves no orphans behind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections import deque
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self, cast
from urllib.parse import parse_qs, urlsplit

import httptools

__all__ = ["BackendProcess", "free_port"]

HOST = "127.0.0.1"
START_DEADLINE = 10.0  # seconds for a spawned backend to accept connections
STOP_TIMEOUT = 5.0  # seconds between SIGTERM and SIGKILL in stop()
_PARENT_CHECK = 0.5  # seconds between the child's "is my parent still there?" checks
_SRC = str(Path(__file__).resolve().parents[2])  # the directory holding the poise package


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (bind to 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _accepting(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _reap(proc: subprocess.Popen[bytes], stderr: IO[bytes]) -> None:
    """SIGKILL and wait; the finalizer behind every spawn, so nothing outlives its owner."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(STOP_TIMEOUT)
    stderr.close()


class Managed:
    """A ``with`` block for something started and stopped (a process, a cluster): started on
    entry (and stopped again if the start fails half-way), stopped on exit."""

    def start(self) -> object:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class BackendProcess(Managed):
    """Parent-side handle on one backend process on ``127.0.0.1:port``.

    ``cpu`` pins the process with ``taskset -c`` when taskset is installed (benchmarks).
    ``die_after_read`` starts it with ``--die-after-read``.
    """

    def __init__(
        self,
        port: int,
        log_path: str | os.PathLike[str],
        name: str = "backend",
        *,
        die_after_read: bool = False,
        cpu: int | None = None,
    ) -> None:
        self.port = port
        self.log_path = Path(log_path)
        self.name = name
        self.die_after_read = die_after_read
        self.cpu = cpu
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None

    # -- state -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The pid of the current (or last) process; None before the first start()."""
        return None if self._proc is None else self._proc.pid

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """Exit status of the last process (-9 after kill()); None while it runs."""
        return None if self._proc is None else self._proc.poll()

    def deliveries(self) -> list[str]:
        """Every line logged so far, across restarts: one per request fully read."""
        try:
            return self.log_path.read_text(encoding="latin-1").splitlines()
        except FileNotFoundError:
            return []

    # -- lifecycle ---------------------------------------------------------------------

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "poise.testing.procs", "--port", str(self.port)]
        argv += ["--log", str(self.log_path), "--name", self.name]
        if self.die_after_read:
            argv.append("--die-after-read")
        if self.cpu is not None and shutil.which("taskset"):
            argv = ["taskset", "-c", str(self.cpu), *argv]  # taskset execs: same pid
        return argv

    def start(self) -> None:
        """Spawn the process and return once the port accepts connections (10 s at most)."""
        if self.alive:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self._release()
        # Polling for "accepting" would be fooled by someone else on the port.
        if _accepting(self.port):
            raise RuntimeError(f"{self.name}: {HOST}:{self.port} is already in use")
        env = dict(os.environ)
        # The child must import this very poise, installed or not.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_SRC, env.get("PYTHONPATH")]))
        # a file, not a pipe: a chatty child cannot block; closed by _reap()
        stderr = tempfile.TemporaryFile()  # noqa: SIM115
        proc = subprocess.Popen(
            self.argv(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=env,
            start_new_session=False,  # same process group: a Ctrl-C reaches it too
        )
        self._proc, self._stderr = proc, stderr
        self._finalizer = weakref.finalize(self, _reap, proc, stderr)
        deadline = time.monotonic() + START_DEADLINE
        while not _accepting(self.port):
            if proc.poll() is not None or time.monotonic() > deadline:
                why = (
                    f"exited with status {proc.returncode}"
                    if proc.poll() is not None
                    else f"not accepting within {START_DEADLINE:.0f}s"
                )
                text = self.stderr_text()
                self.stop()
                raise RuntimeError(f"{self.name} on port {self.port} {why}:\n{text}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL the process and wait until it is gone (its port then refuses)."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGKILL)
        self._proc.wait(STOP_TIMEOUT)

    def restart(self) -> None:
        """kill() if running, then start() on the same port."""
        self.kill()
        self.start()

    def stop(self) -> None:
        """SIGTERM, wait, SIGKILL after 5 s; safe to call at any time, more than once."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()
        self._release()

    def stderr_text(self) -> str:
        """What the current (or last) process wrote to stderr."""
        if self._stderr is None or self._stderr.closed:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def _release(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # kills if still running, closes the stderr file
            self._finalizer = None


# ---------------------------------------------------------------------------------------
# the child


def _clean(text: str) -> str:
    """One log field: no spaces or control characters, so lines always split into three."""
    return "".join(c if "!" <= c <= "~" else "_" for c in text) or "_"


class _Request:
    __slots__ = ("keep_alive", "method", "request_id", "target")

    def __init__(self, method: str, target: str, request_id: str, keep_alive: bool) -> None:
        self.method = method
        self.target = target
        self.request_id = request_id
        self.keep_alive = keep_alive


class _Conn(asyncio.Protocol):
    """One client connection; responses go out in request order, /slow ones included."""

    def __init__(self, name: str, log_fd: int, die_after_read: bool) -> None:
        self.name = name
        self.log_fd = log_fd
        self.die_after_read = die_after_read
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.pending: deque[_Request] = deque()
        self.waiting = False  # a /slow response is being waited for
        self.url = b""
        self.request_id = "-"
        body = f"backend {name}\n".encode()
        self.head = (
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
            f"X-Backend: {_clean(name)}\r\nContent-Length: {len(body)}\r\n"
        ).encode()
        self.body = body

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.url = b""
        self.request_id = "-"

    def on_url(self, url: bytes) -> None:
        self.url += url  # may arrive in pieces

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"x-request-id":
            self.request_id = _clean(value.decode("latin-1").strip())

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode("latin-1")
        target = _clean(self.url.decode("latin-1"))
        req = _Request(method, target, self.request_id, self.parser.should_keep_alive())
        # The delivery is recorded before anything else can happen to this request.
        os.write(self.log_fd, f"{method} {target} {req.request_id}\n".encode("latin-1"))
        path = urlsplit(target).path
        if path == "/die" or (self.die_after_read and method != "HEAD"):
            os.kill(os.getpid(), signal.SIGKILL)
            os._exit(137)  # not reached; in case SIGKILL is somehow not delivered
        self.pending.append(req)

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they implement its interface
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", close=True)
            return
        self._answer_pending()

    def _answer_pending(self) -> None:
        while self.pending and not self.waiting and self.transport is not None:
            req = self.pending.popleft()
            split = urlsplit(req.target)
            if split.path == "/slow":
                try:
                    ms = float(parse_qs(split.query).get("ms", ["0"])[0])
                except ValueError:
                    ms = 0.0
                self.waiting = True
                asyncio.get_running_loop().call_later(max(ms, 0.0) / 1e3, self._slow_done, req)
                return
            self._respond(req)

    def _slow_done(self, req: _Request) -> None:
        self.waiting = False
        self._respond(req)
        self._answer_pending()

    def _respond(self, req: _Request) -> None:
        head = self.head + (b"\r\n" if req.keep_alive else b"Connection: close\r\n\r\n")
        self._write(head if req.method == "HEAD" else head + self.body, close=not req.keep_alive)

    def _write(self, data: bytes, close: bool) -> None:
        if self.transport is None:
            return
        self.transport.write(data)
        if close:
            self.pending.clear()
            self.transport.close()
            self.transport = None


async def _serve(port: int, name: str, log_fd: int, die_after_read: bool) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _Conn(name, log_fd, die_after_read), HOST, port, reuse_address=True, backlog=1024
    )
    parent = os.getppid()
    stop: asyncio.Future[None] = loop.create_future()

    def on_signal() -> None:
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    # Reparented (our parent died without stopping us): exit rather than linger.
    while not stop.done() and os.getppid() == parent:
        await asyncio.wait([stop], timeout=_PARENT_CHECK)
    # No wait_closed(): it may wait for idle keep-alive clients; exiting closes them anyway.
    server.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="a killable HTTP/1.1 test backend (poise.testing)")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--log", required=True, help="file to append one line per request to")
    p.add_argument("--name", default="backend")
    p.add_argument(
        "--die-after-read",
        action="store_true",
        help="SIGKILL self after reading (and logging) any non-HEAD request",
    )
    args = p.parse_args(argv)
    log_fd = os.open(args.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a poise dependency
        runner = asyncio.run
    try:
        runner(_serve(args.port, args.name, log_fd, args.die_after_read))
    finally:
        os.close(log_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
