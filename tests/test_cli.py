"""The command line, run as a real subprocess."""

from __future__ import annotations

import json
import re
import shlex
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from poise import __version__
from poise.cli import main

POISE = [sys.executable, "-m", "poise"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str, deadline: float) -> tuple[int, bytes]:
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status, r.read()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    # an editable (development) install is pure Python; `pip install .` compiles (setup.py)
    assert capsys.readouterr().out.strip() in (
        f"poise {__version__} (pure Python)",
        f"poise {__version__} (pure Python, C head scanner)",
        f"poise {__version__} (compiled (mypyc))",
        f"poise {__version__} (compiled (mypyc, C head scanner))",
    )


def test_help_shows_the_demo_address_the_demo_uses(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    default = re.search(r"\(default (\S+)\)", capsys.readouterr().out)
    assert default is not None
    with pytest.raises(SystemExit):
        main(["--help"])
    demo_line = next(
        line for line in capsys.readouterr().out.splitlines() if line.startswith("  poise demo ")
    )
    assert demo_line.endswith(f" on {default.group(1)}"), demo_line


def test_check_ok_and_bad(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"port": ":8080", "servers": ["http://localhost:5001"]}))
    assert main(["check", "-c", str(good)]) == 0
    assert "OK (1 listener(s), 1 upstream(s), 1 backend(s))" in capsys.readouterr().out

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"port": "x", "servers": ["ftp://a", "foo"]}))
    assert main(["check", "-c", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n  - ") == 3  # every problem listed, one per line
    assert "servers[1]" in err


def test_run_without_backends_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["run"])
    assert exc.value.code == 2
    assert "--backend" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-2", "many", "257"])
def test_run_refuses_a_bad_workers_count(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["run", "--backend", "http://127.0.0.1:9", "--workers", value])
    assert exc.value.code == 2
    assert "--workers: expected a number from 1 to 256 or 'auto'" in capsys.readouterr().err


def test_workers_auto_counts_cpus_with_or_without_an_affinity_mask(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import os

    from poise.cli import usable_cpus

    if hasattr(os, "sched_getaffinity"):
        assert usable_cpus() == len(os.sched_getaffinity(0))
        monkeypatch.delattr(os, "sched_getaffinity")  # as on macOS
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert usable_cpus() == 6
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert usable_cpus() == 1


def test_run_with_backend_flags_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    backend_port, front = free_port(), free_port()
    backend = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "http.server",
            str(backend_port),
            "--bind",
            "127.0.0.1",
            "--directory",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    (tmp_path / "hello.txt").write_text("hello\n")
    proc = subprocess.Popen(
        [
            *POISE,
            "run",
            "--listen",
            f"127.0.0.1:{front}",
            "--backend",
            f"http://127.0.0.1:{backend_port}",
            "--log-format",
            "json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        status, body = get(f"http://127.0.0.1:{front}/hello.txt", time.monotonic() + 20)
        assert (status, body) == (200, b"hello\n")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0
        lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
        assert any("listening on" in line["message"] for line in lines)
    finally:
        proc.kill()
        backend.kill()
        backend.wait()
        proc.wait()


def test_demo_prints_urls_serves_and_exits_on_ctrl_c() -> None:
    front = free_port()
    proc = subprocess.Popen(
        [*POISE, "demo", "--listen", f"127.0.0.1:{front}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 20
        out = ""
        while "Ctrl-C" not in out and time.monotonic() < deadline:
            out += proc.stdout.readline()
        assert f"balancer:  http://127.0.0.1:{front}/" in out
        assert len(re.findall(r"backend:   http://127\.0\.0\.1:\d+", out)) == 3
        bodies = {get(f"http://127.0.0.1:{front}/", deadline)[1] for _ in range(6)}
        assert bodies == {b"demo-1\n", b"demo-2\n", b"demo-3\n"}
        # /svc goes to the instances registered as "demo": the first backend, at start
        assert get(f"http://127.0.0.1:{front}/svc", deadline)[1] == b"demo-1\n"
        registry = re.search(r"registry:  (http://127\.0\.0\.1:\d+)/v1/services", out)
        assert registry is not None
        listed = json.loads(get(registry.group(1) + "/v1/services/demo", deadline)[1])
        assert [i["id"] for i in listed["instances"]] == ["demo-1"]
        # the dashboard URL carries the admin token; the page itself is served
        dash = re.search(r"dashboard: (http://127\.0\.0\.1:\d+)/#token=(\S+)", out)
        assert dash is not None
        assert b"poise dashboard" in get(dash.group(1) + "/", deadline)[1]
        # the printed `poise status` line works as printed, against this demo
        shown = re.search(r"status:    (poise status --admin \S+ --token=\S+)\n", out)
        assert shown is not None, out
        command = shlex.split(shown.group(1))
        status = subprocess.run(
            [*POISE, *command[1:]], capture_output=True, text=True, timeout=30, check=False
        )
        assert status.returncode == 0, status.stderr
        assert all(b in status.stdout for b in re.findall(r"backend:   (\S+)", out))
        assert re.search(r"^default +\* +/svc +svc$", status.stdout, re.M), status.stdout
        # Ctrl-C right after proxied requests (pooled connections to the backends open):
        # silent, exit 0
        get(f"http://127.0.0.1:{front}/", deadline)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0
        assert "Traceback" not in err and "ERROR" not in err, err
    finally:
        proc.kill()
        proc.wait()


class _KeepAliveBackend(socketserver.ThreadingTCPServer):
    """A keep-alive HTTP/1.1 backend on 127.0.0.1; ``/slow`` answers after ``slow`` seconds."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, slow: float) -> None:
        self.slow = slow
        self.slow_started = threading.Event()
        super().__init__(("127.0.0.1", 0), _KeepAliveHandler)


class _KeepAliveHandler(socketserver.StreamRequestHandler):
    server: _KeepAliveBackend

    def handle(self) -> None:
        while True:
            line = self.rfile.readline()
            if not line:
                return
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            if b" /slow " in line:
                self.server.slow_started.set()
                time.sleep(self.server.slow)
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")


def test_run_stops_silently_with_pooled_and_in_flight_requests() -> None:
    """SIGINT while a request is in flight and keep-alive connections to the backend are
    pooled: the request completes, nothing is logged as an error, exit 0."""
    backend = _KeepAliveBackend(slow=1.0)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    front = free_port()
    proc = subprocess.Popen(
        [
            *POISE, "run", "--listen", f"127.0.0.1:{front}",
            "--backend", f"http://127.0.0.1:{backend.server_address[1]}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        for _ in range(3):  # leaves keep-alive connections in poise's pool
            assert get(f"http://127.0.0.1:{front}/", deadline) == (200, b"ok\n")
        slow: list[tuple[int, bytes]] = []
        client = threading.Thread(
            target=lambda: slow.append(get(f"http://127.0.0.1:{front}/slow", deadline))
        )
        client.start()
        assert backend.slow_started.wait(timeout=20)  # the request is in flight
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        client.join(timeout=10)
        assert proc.returncode == 0
        assert slow == [(200, b"ok\n")]
        assert "Traceback" not in err and "ERROR" not in err, err
    finally:
        proc.kill()
        proc.wait()
        backend.shutdown()
        backend.server_close()


def test_demo_on_a_taken_port_fails_clearly() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = subprocess.run(
            [*POISE, "demo", "--listen", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 1
    assert "cannot listen" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_reads_backends_files_as_run_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "poise.json"
    backends = tmp_path / "backends.txt"
    doc = {
        "listeners": [{"name": "web", "listen": "127.0.0.1:8080", "upstream": "app"}],
        "upstreams": {"app": {"file": str(backends)}},
    }
    config.write_text(json.dumps(doc))
    assert main(["check", "-c", str(config)]) == 1  # missing: `poise run` refuses it too
    err = capsys.readouterr().err
    assert "upstreams.app.file:" in err and "backends.txt" in err
    backends.write_text("http://127.0.0.1:5001\nhttp://127.0.0.1:5002\n")
    assert main(["check", "-c", str(config)]) == 0
    assert "2 backend(s)" in capsys.readouterr().out


def test_the_status_line_the_demo_prints_takes_a_token_that_begins_with_a_dash() -> None:
    """The demo's token is URL-safe base64, so 1 run in 64 it begins with "-": printed as
    ``--token <t>`` argparse took it for an option (a failure the demo test met by chance);
    ``--token=<t>`` is read whatever the token."""
    from poise.cli import _parser

    args = _parser().parse_args(["status", "--admin", "127.0.0.1:1", "--token=-x_9"])
    assert args.token == "-x_9"
