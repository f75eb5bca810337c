#!/usr/bin/env python3
"""poise benchmark harness: poise vs nginx vs HAProxy, same run, same machine, same backends.

    python bench/run.py [--scenarios small,large] [--duration 8] [--warmup 2]
                        [--systems poise,nginx,haproxy] [--out bench/results]

See bench/README.md and docs/benchmarking.md. Speed is judged as a ratio against nginx and HAProxy
measured in the same run, never as an absolute number. Stdlib only.

Layout on a 2-core box: 3 backends (nginx-light, or bench/backend.py when nginx is absent) and
wrk pinned to cpu0; the system under test pinned to cpu1, started fresh for each scenario, one
system at a time, always on the same front port.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
SMALL_BODY = b"0123456789abcdef"
LARGE_SIZE = 1 << 20
LOOPBACK = "127.0.0.1"
START_DEADLINE = 10.0  # seconds for a process to accept connections / serve 200s
STOP_TIMEOUT = 5.0  # seconds between SIGTERM and SIGKILL
CPU_LOAD = "0"  # backends and wrk
CPU_PROXY = "1"  # the system under test
CLK_TCK = os.sysconf("SC_CLK_TCK")
SYSTEMS = ("poise", "nginx", "haproxy")
# optional: the minimal unhardened Python proxy, a ceiling for what Python costs (not default)
EXTRA_SYSTEMS = ("ceiling", "poise-pure", "poise-base")
SYSTEM_LABELS = {
    "poise": "poise",
    "nginx": "nginx",
    "haproxy": "HAProxy",
    "ceiling": "ceiling (minimal Python proxy)",
    "poise-pure": "poise, pure Python",
    "poise-base": "poise, --base-src tree",
}
BASE_SRC: list[str] = []  # --base-src: another poise source tree, measured as "poise-base"


@dataclass(frozen=True)
class Scenario:
    name: str
    path: str
    connections: int
    body_size: int
    # every request and every response head differs (a counter in the query; the backend adds
    # a request id): nothing a proxy remembers from one head applies to the next
    varied: bool = False


SCENARIOS: dict[str, Scenario] = {
    "small": Scenario("small", "/", 64, len(SMALL_BODY)),
    "large": Scenario("large", "/1m", 16, LARGE_SIZE),
    "varied": Scenario("varied", "/vary", 64, len(SMALL_BODY), varied=True),
}


class BenchError(Exception):
    """A system failed to start, serve, or be measured; recorded, then the run carries on."""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# /proc helpers


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the ``comm`` field (index 0 = state, 1 = ppid, ...)."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return data[data.rindex(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """``root`` and all its live descendants (found through the ppid field of /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _proc_stat(int(entry))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    if _proc_stat(root) is None:
        return []
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def cpu_ticks(pids: Sequence[int]) -> dict[int, int]:
    """utime + stime in clock ticks per live pid."""
    out: dict[int, int] = {}
    for pid in pids:
        fields = _proc_stat(pid)
        if fields is not None:
            out[pid] = int(fields[11]) + int(fields[12])
    return out


def status_kib(pids: Sequence[int], key: str) -> int:
    """Sum of a ``kB`` field (VmRSS, VmHWM, ...) of /proc/PID/status over ``pids``."""
    total = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        m = re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.MULTILINE)
        if m:
            total += int(m.group(1))
    return total


# --------------------------------------------------------------------------------------------
# processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def can_pin() -> bool:
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # pragma: no cover - not Linux
        return False
    return shutil.which("taskset") is not None and {0, 1} <= cpus


class Processes:
    """Every child this harness starts, each in its own session so Ctrl-C reaches only us;
    ``stop``/``stop_all`` terminate them (SIGTERM, then SIGKILL after a timeout)."""

    def __init__(self, logdir: Path, pin: bool) -> None:
        self.logdir = logdir
        self.pin = pin
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self,
        name: str,
        argv: list[str],
        cpu: str | None,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        if self.pin and cpu is not None:
            argv = ["taskset", "-c", cpu, *argv]  # taskset execs: the pid is the program's
        with open(self.logdir / f"{name}.log", "ab") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
        self.procs.append((name, proc))
        return proc

    def log_tail(self, name: str, lines: int = 15) -> str:
        try:
            text = (self.logdir / f"{name}.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        # Remember the descendants that share the leader's process group (nginx workers,
        # poise workers) so they can be killed by pid if they outlive the leader.
        group = [
            pid for pid in process_tree(proc.pid) if pid != proc.pid and _pgid(pid) == proc.pid
        ]
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(STOP_TIMEOUT)
        deadline = time.monotonic() + STOP_TIMEOUT
        for pid in group:
            while _pgid(pid) == proc.pid:
                if time.monotonic() > deadline:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
                    break
                time.sleep(0.05)
        self.procs = [(n, p) for n, p in self.procs if p is not proc]

    def stop_all(self) -> None:
        for _, proc in reversed(list(self.procs)):
            try:
                self.stop(proc)
            except Exception as exc:  # keep cleaning up whatever happens
                log(f"cleanup of pid {proc.pid} failed: {exc!r}")
                with contextlib.suppress(Exception):
                    proc.kill()


def _pgid(pid: int) -> int | None:
    fields = _proc_stat(pid)
    if fields is None or fields[0] == "Z":
        return None
    return int(fields[2])


def wait_accepting(port: int, proc: subprocess.Popen[bytes], deadline: float) -> None:
    while True:
        if proc.poll() is not None:
            raise BenchError(f"exited with status {proc.returncode} before listening")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"not accepting on {LOOPBACK}:{port} within {START_DEADLINE:.0f}s")
        time.sleep(0.05)


def http_get(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=3)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_serving(port: int, proc: subprocess.Popen[bytes], deadline: float) -> None:
    """Until ``GET /`` answers 200 with the 16-byte body (poise may still be health-checking)."""
    last = "no answer"
    while True:
        if proc.poll() is not None:
            raise BenchError(f"exited with status {proc.returncode}")
        try:
            status, body = http_get(port, "/")
            if status == 200 and body == SMALL_BODY:
                return
            last = f"GET / -> {status}, {len(body)} bytes"
        except (OSError, http.client.HTTPException) as exc:
            last = f"GET / -> {exc!r}"
        if time.monotonic() > deadline:
            raise BenchError(f"not serving within {START_DEADLINE:.0f}s ({last})")
        time.sleep(0.1)


def wait_port_free(port: int, timeout: float = STOP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.2):
                pass
        except OSError:
            return
        time.sleep(0.05)
    raise BenchError(f"port {port} still accepting after the previous system stopped")


# --------------------------------------------------------------------------------------------
# configs


def nginx_backend_conf(tmp: Path, ports: Sequence[int]) -> Path:
    www = tmp / "www"
    www.mkdir(exist_ok=True)
    (www / "small").write_bytes(SMALL_BODY)
    (www / "1m").write_bytes((SMALL_BODY * (LARGE_SIZE // len(SMALL_BODY)))[:LARGE_SIZE])
    main, http_common = _nginx_parts(tmp, "backend")
    servers = "".join(
        f"    server {{\n"
        f"        listen {LOOPBACK}:{port} reuseport backlog=4096;\n"
        f"        root {www};\n"
        "        location = / { try_files /small =404; }\n"
        "        location = /vary { add_header X-Request-Id $request_id; try_files /small =404; }\n"
        "        location = /1m { }\n"
        "    }\n"
        for port in ports
    )
    conf = tmp / "backend.conf"
    conf.write_text(
        main + "http {\n" + http_common + "    sendfile on;\n    tcp_nopush on;\n"
        "    open_file_cache max=64 inactive=60s;\n"
        "    default_type application/octet-stream;\n" + servers + "}\n"
    )
    return conf


def nginx_proxy_conf(tmp: Path, port: int, backends: Sequence[int]) -> Path:
    main, http_common = _nginx_parts(tmp, "nginx")
    servers = "".join(f"        server {LOOPBACK}:{b};\n" for b in backends)
    conf = tmp / "nginx-proxy.conf"
    conf.write_text(
        main + "http {\n" + http_common + "    upstream u {\n" + servers + "        keepalive 64;\n"
        "        keepalive_requests 100000;\n"
        "    }\n"
        "    server {\n"
        f"        listen {LOOPBACK}:{port} backlog=4096;\n"
        "        location / {\n"
        "            proxy_pass http://u;\n"
        "            proxy_http_version 1.1;\n"
        '            proxy_set_header Connection "";\n'
        "            proxy_set_header X-Forwarded-For $remote_addr;\n"
        "        }\n"
        "    }\n"
        "}\n"
    )
    return conf


def _nginx_parts(tmp: Path, name: str) -> tuple[str, str]:
    temp = tmp / f"{name}-temp"
    temp.mkdir(exist_ok=True)
    user = "user root;\n" if os.geteuid() == 0 else ""
    main = (
        f"{user}worker_processes 1;\n"
        f"pid {tmp / (name + '.pid')};\n"
        f"error_log {tmp / (name + '-error.log')} warn;\n"
        "events { worker_connections 8192; }\n"
    )
    http_common = (
        "    access_log off;\n"
        "    keepalive_requests 100000;\n"
        "    keepalive_timeout 65s;\n"
        "    tcp_nodelay on;\n"
        f"    client_body_temp_path {temp / 'client'};\n"
        f"    proxy_temp_path {temp / 'proxy'};\n"
        f"    fastcgi_temp_path {temp / 'fastcgi'};\n"
        f"    uwsgi_temp_path {temp / 'uwsgi'};\n"
        f"    scgi_temp_path {temp / 'scgi'};\n"
    )
    return main, http_common


def nginx_argv(tmp: Path, conf: Path, name: str) -> list[str]:
    return [
        "nginx",
        "-p",
        str(tmp),
        "-e",
        str(tmp / f"{name}-error.log"),
        "-c",
        str(conf),
        "-g",
        "daemon off;",
    ]


def haproxy_conf(tmp: Path, port: int, backends: Sequence[int]) -> Path:
    servers = "".join(
        f"    server s{i} {LOOPBACK}:{b} check inter 2s\n" for i, b in enumerate(backends, 1)
    )
    conf = tmp / "haproxy.cfg"
    conf.write_text(
        "global\n"
        "    nbthread 1\n"
        "    maxconn 4096\n"
        "\n"
        "defaults\n"
        "    mode http\n"
        "    option forwardfor\n"
        "    http-reuse always\n"
        "    timeout connect 3s\n"
        "    timeout client 60s\n"
        "    timeout server 60s\n"
        "    timeout http-request 10s\n"
        "    timeout http-keep-alive 60s\n"
        "\n"
        "frontend fe\n"
        f"    bind {LOOPBACK}:{port}\n"
        "    default_backend be\n"
        "\n"
        "backend be\n"
        "    balance roundrobin\n"
        "    option httpchk HEAD /\n" + servers
    )
    return conf


POISE_POLICY: object = "round_robin"  # set from --poise-policy
WRK_HEADERS: list[str] = []  # --header: sent with every request (a hashing policy's key)
POISE_SRC = REPO / "src"  # what poise runs from: this tree, or its compiled copy (--poise-build)


def build_compiled(tmp: Path) -> Path:
    """The tree as ``pip install .`` installs it: a copy with the hot path compiled by
    setup.py (mypyc). Returns the copy's src directory."""
    tree = tmp / "poise-tree"
    tree.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tree / name)
    shutil.copytree(REPO / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "POISE_PURE_PYTHON"}
    log("compiling poise's hot path (setup.py build_ext, about a minute)")
    done = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
        cwd=tree, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0 or not list((tree / "src/poise/l7").glob("client.*.so")):
        raise BenchError(f"compiling failed: {(done.stderr or done.stdout)[-2000:]}")
    return tree / "src"


def poise_conf(tmp: Path, port: int, backends: Sequence[int]) -> Path:
    conf = tmp / "poise.json"
    conf.write_text(
        json.dumps(
            {
                "listeners": [
                    {"name": "bench", "listen": f"{LOOPBACK}:{port}", "upstream": "bench"}
                ],
                "upstreams": {
                    "bench": {
                        "backends": [f"http://{LOOPBACK}:{b}" for b in backends],
                        "health_check": {"interval": "2s"},
                        "policy": POISE_POLICY,
                    }
                },
                "proxy": {"x_forwarded": True},
                "log": {"level": "warning"},
            },
            indent=2,
        )
    )
    return conf


# --------------------------------------------------------------------------------------------
# wrk


@dataclass
class WrkResult:
    rps: float
    requests: int
    duration_s: float
    latency_ms: dict[str, float]  # "50", "75", "90", "99" -> ms
    latency_avg_ms: float | None
    socket_errors: dict[str, int]  # connect/read/write/timeout
    non_2xx_3xx: int

    @property
    def errors(self) -> int:
        return sum(self.socket_errors.values()) + self.non_2xx_3xx


_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_DUR = r"([\d.]+)(us|ms|s|m|h)"


def _ms(value: str, unit: str) -> float:
    return round(float(value) * _UNITS_MS[unit], 6)


def parse_wrk(out: str) -> WrkResult:
    m = re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h),", out, re.MULTILINE)
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.MULTILINE)
    if not m or not rps:
        raise BenchError("could not parse wrk output:\n" + out[-2000:])
    latency = {
        pct: _ms(val, unit)
        for pct, val, unit in re.findall(rf"^\s+(50|75|90|99)%\s+{_DUR}\s*$", out, re.MULTILINE)
    }
    avg = re.search(rf"^\s+Latency\s+{_DUR}", out, re.MULTILINE)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    socket_errors = dict.fromkeys(("connect", "read", "write", "timeout"), 0)
    if sock:
        socket_errors = dict(zip(socket_errors, map(int, sock.groups()), strict=True))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return WrkResult(
        rps=float(rps.group(1)),
        requests=int(m.group(1)),
        duration_s=_ms(m.group(2), m.group(3)) / 1e3,
        latency_ms=latency,
        latency_avg_ms=_ms(avg.group(1), avg.group(2)) if avg else None,
        socket_errors=socket_errors,
        non_2xx_3xx=int(non2xx.group(1)) if non2xx else 0,
    )


def run_wrk(
    procs: Processes, port: int, scenario: Scenario, seconds: float
) -> tuple[WrkResult, str]:
    argv = [
        "wrk",
        "-t1",
        f"-c{scenario.connections}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        *(arg for header in WRK_HEADERS for arg in ("-H", header)),
        f"http://{LOOPBACK}:{port}{scenario.path}",
    ]
    if scenario.varied:
        argv[-1:-1] = ["-s", str(BENCH_DIR / "varied.lua")]
    if procs.pin:
        argv = ["taskset", "-c", CPU_LOAD, *argv]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=seconds + 60, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk did not finish within {seconds + 60:.0f}s") from exc
    if done.returncode != 0:
        raise BenchError(f"wrk exited {done.returncode}: {(done.stderr or done.stdout)[-1000:]}")
    return parse_wrk(done.stdout), done.stdout


# --------------------------------------------------------------------------------------------
# one measurement


@dataclass
class Measurement:
    system: str
    scenario: str
    ok: bool = False
    error: str | None = None
    rps: float | None = None
    requests: int | None = None
    duration_s: float | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    latency_avg_ms: float | None = None
    socket_errors: dict[str, int] = field(default_factory=dict)
    non_2xx_3xx: int | None = None
    errors: int | None = None
    cpu_ticks: int | None = None
    cpu_s: float | None = None
    cpu_us_per_req: float | None = None
    cpu_utilisation: float | None = None  # proxy CPU seconds / wall seconds of the measured run
    rss_before_kib: int | None = None
    peak_rss_kib: int | None = None
    rss_growth_kib: int | None = None
    pids: list[int] = field(default_factory=list)
    warmup: dict[str, Any] | None = None
    wrk_output: str | None = None
    round: int = 0
    rounds_ok: int = 1  # in a median row: how many rounds succeeded


@dataclass
class Env:
    tmp: Path
    procs: Processes
    front_port: int
    backend_ports: list[int]


def start_system(env: Env, system: str, logname: str) -> subprocess.Popen[bytes]:
    port, backends, tmp = env.front_port, env.backend_ports, env.tmp
    if system in ("poise", "poise-pure", "poise-base"):
        conf = poise_conf(tmp, port, backends)
        penv = dict(os.environ)
        src = str(POISE_SRC if system == "poise" else REPO / "src")
        if system == "poise-base":
            src = BASE_SRC[0]
        penv["PYTHONPATH"] = src + (os.pathsep + penv["PYTHONPATH"] if "PYTHONPATH" in penv else "")
        argv = [sys.executable, "-m", "poise", "run", "-c", str(conf)]
        return env.procs.start(logname, argv, CPU_PROXY, cwd=REPO, env=penv)
    if system == "ceiling":
        argv = [sys.executable, str(BENCH_DIR / "ceiling_proxy.py"), str(port), *map(str, backends)]
        return env.procs.start(logname, argv, CPU_PROXY)
    if system == "nginx":
        if not shutil.which("nginx"):
            raise BenchError("nginx is not installed (apt-get install -y nginx-light)")
        conf = nginx_proxy_conf(tmp, port, backends)
        return env.procs.start(logname, nginx_argv(tmp, conf, "nginx"), CPU_PROXY)
    if system == "haproxy":
        if not shutil.which("haproxy"):
            raise BenchError("haproxy is not installed (apt-get install -y haproxy)")
        conf = haproxy_conf(tmp, port, backends)
        return env.procs.start(logname, ["haproxy", "-db", "-f", str(conf)], CPU_PROXY)
    raise BenchError(f"unknown system {system!r}")


def measure(
    env: Env, system: str, scenario: Scenario, duration: float, warmup: float
) -> Measurement:
    result = Measurement(system=system, scenario=scenario.name)
    logname = f"{system}-{scenario.name}"
    proc: subprocess.Popen[bytes] | None = None
    try:
        wait_port_free(env.front_port)
        proc = start_system(env, system, logname)
        deadline = time.monotonic() + START_DEADLINE
        wait_accepting(env.front_port, proc, deadline)
        wait_serving(env.front_port, proc, deadline)
        if scenario.path != "/":
            status, body = http_get(env.front_port, scenario.path)
            if status != 200 or len(body) != scenario.body_size:
                raise BenchError(f"GET {scenario.path} -> {status}, {len(body)} bytes")
        result.rss_before_kib = status_kib(process_tree(proc.pid), "VmRSS")
        if warmup > 0:
            log(f"  {system}: warm-up {warmup:g}s")
            w, _ = run_wrk(env.procs, env.front_port, scenario, warmup)
            result.warmup = {"rps": w.rps, "requests": w.requests, "errors": w.errors}
        if proc.poll() is not None:
            raise BenchError(f"exited with status {proc.returncode} during warm-up")
        log(f"  {system}: measuring {duration:g}s")
        pids_before = process_tree(proc.pid)
        ticks_before = cpu_ticks(pids_before)
        t0 = time.monotonic()
        w, raw = run_wrk(env.procs, env.front_port, scenario, duration)
        wall = time.monotonic() - t0
        pids_after = process_tree(proc.pid)
        ticks_after = cpu_ticks(pids_after)
        # Processes that existed at both ends contribute their delta; ones born during the run
        # contribute all their ticks (ones that died during the run are lost - none should).
        ticks = sum(t - ticks_before.get(pid, 0) for pid, t in ticks_after.items())
        result.pids = sorted(set(pids_before) | set(pids_after))
        result.peak_rss_kib = status_kib(pids_after, "VmHWM")
        result.rss_growth_kib = result.peak_rss_kib - result.rss_before_kib
        result.cpu_ticks = ticks
        result.cpu_s = ticks / CLK_TCK
        result.cpu_utilisation = result.cpu_s / wall if wall > 0 else None
        result.cpu_us_per_req = result.cpu_s * 1e6 / w.requests if w.requests else None
        result.rps, result.requests, result.duration_s = w.rps, w.requests, w.duration_s
        result.latency_ms, result.latency_avg_ms = w.latency_ms, w.latency_avg_ms
        result.socket_errors, result.non_2xx_3xx, result.errors = (
            w.socket_errors,
            w.non_2xx_3xx,
            w.errors,
        )
        result.wrk_output = raw
        if proc.poll() is not None:  # keep the partial figures, but the run does not count
            raise BenchError(f"exited with status {proc.returncode} during the measured run")
        result.ok = True
    except (BenchError, OSError, http.client.HTTPException) as exc:
        result.error = str(exc) if isinstance(exc, BenchError) else repr(exc)
        if proc is not None:
            tail = env.procs.log_tail(logname)
            if tail:
                result.error += f"\n--- {system} output (tail) ---\n{tail}"
        log(f"  {system}: FAILED: {result.error}")
    finally:
        if proc is not None:
            env.procs.stop(proc)
    return result


# --------------------------------------------------------------------------------------------
# backends


def start_backends(env: Env, kind: str) -> str:
    """Start 3 backends on cpu0; return which kind ran ("nginx" or "python")."""
    if kind == "auto":
        kind = "nginx" if shutil.which("nginx") else "python"
    if kind == "nginx":
        conf = nginx_backend_conf(env.tmp, env.backend_ports)
        procs = [env.procs.start("backend", nginx_argv(env.tmp, conf, "backend"), CPU_LOAD)]
    else:
        script = str(BENCH_DIR / "backend.py")
        procs = [
            env.procs.start(f"backend-{p}", [sys.executable, script, "--port", str(p)], CPU_LOAD)
            for p in env.backend_ports
        ]
    if len(procs) == 1:  # one nginx serves all three ports
        procs *= len(env.backend_ports)
    deadline = time.monotonic() + START_DEADLINE
    for port, proc in zip(env.backend_ports, procs, strict=True):
        try:
            wait_accepting(port, proc, deadline)
            checks = [
                (http_get(port, "/"), 200, SMALL_BODY),
                (http_get(port, "/", "HEAD"), 200, b""),
            ]
            status, body = http_get(port, "/1m")
        except (BenchError, OSError, http.client.HTTPException) as exc:
            raise SystemExit(f"backend on port {port} failed: {exc}") from exc
        for (got_status, got_body), want_status, want_body in checks:
            if got_status != want_status or got_body != want_body:
                raise SystemExit(f"backend on port {port} answered {got_status} {got_body[:40]!r}")
        if status != 200 or len(body) != LARGE_SIZE:
            raise SystemExit(f"backend on port {port}: GET /1m -> {status}, {len(body)} bytes")
    return kind


# --------------------------------------------------------------------------------------------
# machine info and reporting


def _cmd_output(argv: list[str]) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (done.stdout + done.stderr).strip()
    return text.splitlines()[0].strip() if text else None


def machine_info() -> dict[str, Any]:
    cpu_model = None
    with contextlib.suppress(OSError):
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        cpu_model = m.group(1) if m else None
    commit = None
    if shutil.which("git"):
        done = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        )
        commit = done.stdout.strip() if done.returncode == 0 else None
    return {
        "nproc": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "kernel": platform.release(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "nginx": _cmd_output(["nginx", "-v"]) if shutil.which("nginx") else None,
        "haproxy": _cmd_output(["haproxy", "-v"]) if shutil.which("haproxy") else None,
        "wrk": _cmd_output(["wrk", "-v"]) if shutil.which("wrk") else None,
        "git_commit": commit,
        "clk_tck": CLK_TCK,
        "loadavg_start": loadavg(),
    }


def loadavg() -> str | None:
    """/proc/loadavg's 1/5/15-minute figures: other work on this shared box skews a run."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return None


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _ms_fmt(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value * 1e3:.0f} µs" if value < 1 else f"{value:.2f} ms"


def median_of(ms: list[Measurement]) -> Measurement:
    """One row from several rounds of one system: medians of rps, latency and CPU per
    request (this machine is shared: a single round can be hit by a neighbour's burst), the
    worst RSS figures and the sum of errors."""
    ok = [m for m in ms if m.ok]
    if not ok:
        return ms[-1]

    def med(values: list[float | None]) -> float | None:
        vals = [v for v in values if v is not None]
        return statistics.median(vals) if vals else None

    row = Measurement(system=ok[0].system, scenario=ok[0].scenario, ok=True)
    row.rps = med([m.rps for m in ok])
    row.requests = sum(m.requests or 0 for m in ok)
    row.latency_ms = {
        k: v for k in ("50", "75", "90", "99")
        if (v := med([m.latency_ms.get(k) for m in ok])) is not None
    }  # fmt: skip
    row.cpu_us_per_req = med([m.cpu_us_per_req for m in ok])
    row.cpu_utilisation = med([m.cpu_utilisation for m in ok])
    row.peak_rss_kib = max((m.peak_rss_kib or 0) for m in ok)
    row.rss_growth_kib = max((m.rss_growth_kib or 0) for m in ok)
    row.errors = sum(m.errors or 0 for m in ms)
    row.non_2xx_3xx = sum(m.non_2xx_3xx or 0 for m in ms)
    row.socket_errors = {}
    for m in ms:
        for k, v in m.socket_errors.items():
            row.socket_errors[k] = row.socket_errors.get(k, 0) + v
    row.rounds_ok = len(ok)
    return row


def table(scenario: Scenario, rows: list[Measurement]) -> str:
    by = {r.system: r for r in rows if r.ok}
    ref = {k: by[k].rps if k in by else None for k in ("nginx", "haproxy")}
    out = [
        f"### {scenario.name}: GET {scenario.path}"
        + (
            "?n=COUNTER with 8 header fields (cookie and request id per request, "
            "bench/varied.lua), the backend adding a request id"
            if scenario.varied
            else ""
        )
        + f" ({scenario.body_size} B body), "
        f"wrk -t1 -c{scenario.connections}",
        "",
        "| system | rps | ×nginx | ×HAProxy | p50 | p99 | CPU-µs/req "  # noqa: RUF001
        "| peak RSS MiB | RSS growth MiB | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for r in rows:
        label = SYSTEM_LABELS.get(r.system, r.system)
        if not r.ok:
            lines = (r.error or "failed").splitlines()
            first = lines[0] + (f" … {lines[-1].strip()}" if len(lines) > 1 else "")
            out.append(f"| {label} | FAILED | — | — | — | — | — | — | — | see below |")
            notes.append(f"- **{label}** failed: `{first[:300]}`")
            continue
        assert r.rps is not None
        ratios = [
            _fmt(r.rps / base, ".2f") if base else "—" for base in (ref["nginx"], ref["haproxy"])
        ]
        err = str(r.errors)
        if r.errors:
            parts = [f"{k} {v}" for k, v in r.socket_errors.items() if v]
            if r.non_2xx_3xx:
                parts.append(f"non-2xx/3xx {r.non_2xx_3xx}")
            err += f" ({', '.join(parts)})"
        mib = 1024.0
        out.append(
            f"| {label} | {r.rps:,.0f} | {ratios[0]} | {ratios[1]} "
            f"| {_ms_fmt(r.latency_ms.get('50'))} | {_ms_fmt(r.latency_ms.get('99'))} "
            f"| {_fmt(r.cpu_us_per_req, '.1f')} "
            f"| {_fmt(None if r.peak_rss_kib is None else r.peak_rss_kib / mib, '.1f')} "
            f"| {_fmt(None if r.rss_growth_kib is None else r.rss_growth_kib / mib, '.1f')} "
            f"| {err} |"
        )
    if notes:
        out += ["", *notes]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------
# main


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def workspace() -> Iterator[tuple[Path, Processes]]:
    tmp = Path(tempfile.mkdtemp(prefix="poise-bench-"))
    tmp.chmod(0o755)  # nginx workers may run as another user when we are not root
    procs = Processes(tmp, can_pin())
    try:
        yield tmp, procs
    finally:
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip this
        try:
            procs.stop_all()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            signal.signal(signal.SIGINT, old)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="poise vs nginx vs HAProxy (see bench/README.md)")
    p.add_argument("--scenarios", default="small,large", help="comma list of: small, large, varied")
    p.add_argument("--duration", type=float, default=8, help="measured seconds (default 8)")
    p.add_argument("--warmup", type=float, default=2, help="warm-up seconds, 0 = none (default 2)")
    p.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help="comma list of: " + ", ".join(SYSTEMS + EXTRA_SYSTEMS),
    )
    p.add_argument(
        "--rounds", type=int, default=3, help="rounds per scenario; medians shown (default 3)"
    )
    p.add_argument(
        "--poise-policy",
        default="round_robin",
        help='poise\'s balancing policy: a name or JSON, e.g. \'{"name": "p2c"}\'',
    )
    p.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="a header wrk sends with every request, e.g. the key of a hashing policy (repeat)",
    )
    p.add_argument(
        "--poise-build",
        choices=("compiled", "pure"),
        default="compiled",
        help="poise as `pip install .` builds it (hot path compiled with mypyc: the default) "
        "or the pure-Python source tree",
    )
    p.add_argument(
        "--base-src",
        help="another poise source tree (e.g. an older commit's src/, from `git archive REV "
        "src | tar -x -C DIR`), measured as the system poise-base, to compare before and after",
    )
    p.add_argument("--out", default=str(BENCH_DIR / "results"), help="results directory")
    p.add_argument(
        "--backend",
        choices=("auto", "nginx", "python"),
        default="auto",
        help="backend servers: nginx-light, or bench/backend.py (auto: nginx when installed)",
    )
    args = p.parse_args(argv)
    args.scenario_list = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    args.system_list = [s.strip() for s in args.systems.split(",") if s.strip()]
    bad = [s for s in args.scenario_list if s not in SCENARIOS]
    bad += [s for s in args.system_list if s not in SYSTEMS + EXTRA_SYSTEMS]
    if bad or not args.scenario_list or not args.system_list:
        p.error(f"unknown or empty scenarios/systems: {bad}")
    if "poise-base" in args.system_list and not args.base_src:
        p.error("poise-base needs --base-src")
    if args.base_src:
        BASE_SRC[:] = [str(Path(args.base_src).resolve())]
    if args.duration < 1:
        p.error("--duration must be at least 1 second (wrk's resolution)")
    return args


def save_results(
    out_dir: str | Path, json_name: str, payload: dict[str, Any], latest: str, markdown: str
) -> Path:
    """Write a run's figures as ``json_name`` and its table as ``latest`` into ``out_dir``
    (every bench script's results go this way)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / json_name
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    (out / latest).write_text(markdown)
    log(f"wrote {json_path} and {out / latest}")
    return json_path


def main(argv: Sequence[str] | None = None) -> int:
    global POISE_POLICY, POISE_SRC, WRK_HEADERS
    args = parse_args(argv)
    policy = args.poise_policy.strip()
    POISE_POLICY = json.loads(policy) if policy.startswith("{") else policy
    WRK_HEADERS = list(args.header)
    if not shutil.which("wrk"):
        print("wrk is not installed: apt-get install -y nginx-light haproxy wrk", file=sys.stderr)
        return 2
    signal.signal(
        signal.SIGINT, signal.default_int_handler
    )  # even when started with SIGINT ignored
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    started = dt.datetime.now(dt.UTC)
    info = machine_info()
    load1 = float((info["loadavg_start"] or "0").split()[0])
    if load1 > 0.5:
        log(f"WARNING: load average {info['loadavg_start']} before starting: the box is busy")
    results: list[Measurement] = []  # per scenario and system: the median of the rounds
    rounds: list[Measurement] = []  # every single measurement
    try:
        with workspace() as (tmp, procs):
            env = Env(tmp, procs, free_port(), [free_port() for _ in range(3)])
            info["poise_build"] = args.poise_build
            if args.poise_build == "compiled" and "poise" in args.system_list:
                POISE_SRC = build_compiled(tmp)
            if not procs.pin:
                log("WARNING: cannot pin to cpu0/cpu1 (taskset missing or < 2 CPUs); unpinned")
            kind = start_backends(env, args.backend)
            info["backend"] = kind
            log(f"backends ({kind}) on {env.backend_ports}; front port {env.front_port}")
            for name in args.scenario_list:
                scenario = SCENARIOS[name]
                systems = list(args.system_list)
                for rnd in range(args.rounds):
                    log(f"scenario {name}, round {rnd + 1}/{args.rounds}")
                    for system in systems:
                        m = measure(env, system, scenario, args.duration, args.warmup)
                        m.round = rnd + 1
                        rounds.append(m)
                    systems = systems[1:] + systems[:1]  # rotate: no system always goes first
                for system in args.system_list:
                    results.append(
                        median_of([r for r in rounds if r.scenario == name and r.system == system])
                    )
    except KeyboardInterrupt:
        log("interrupted; all processes stopped")
        return 130

    info["loadavg_end"] = loadavg()
    md_parts = [
        f"# poise benchmark — {started:%Y-%m-%d %H:%M:%S} UTC",
        "",
        f"{info['nproc']} CPUs ({info['cpu_model']}), kernel {info['kernel']}, "
        f"Python {info['python']}; {info['nginx']}; {info['haproxy']}; {info['wrk']}; "
        f"backends: {info['backend']}; commit {info['git_commit'] or 'none'}; "
        f"load average {info['loadavg_start']} at start, {info['loadavg_end']} at end; "
        f"warm-up {args.warmup:g}s, measured {args.duration:g}s, {args.rounds} round(s) with "
        "the systems in rotating order, medians shown; "
        f"proxy on cpu{CPU_PROXY}, backends + wrk on cpu{CPU_LOAD}; "
        f"poise policy {json.dumps(POISE_POLICY)}, {args.poise_build} build"
        + ("" if procs.pin else " (NOT pinned)"),
        "",
    ]
    for name in args.scenario_list:
        md_parts.append(table(SCENARIOS[name], [r for r in results if r.scenario == name]))
    markdown = "\n".join(md_parts)
    print(markdown)

    payload = {
        "started_utc": started.isoformat(),
        "args": {
            "scenarios": args.scenario_list,
            "systems": args.system_list,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "backend": args.backend,
            "rounds": args.rounds,
            "poise_policy": POISE_POLICY,
            "poise_build": args.poise_build,
            "headers": args.header,
        },
        "machine": info,
        "scenarios": {name: asdict(SCENARIOS[name]) for name in args.scenario_list},
        "results": [asdict(r) for r in results],
        "rounds": [asdict(r) for r in rounds],
    }
    name = f"{started:%Y%m%dT%H%M%SZ}-{'-'.join(args.scenario_list)}.json"
    save_results(args.out, name, payload, "latest.md", markdown)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
