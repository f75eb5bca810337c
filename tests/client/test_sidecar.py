"""``poise register`` as a real subprocess: registers while its command runs, gates on a
health URL, deregisters on exit or SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from poise.cli import main
from poise.testing import HttpBackend, RecordedRequest, Response
from tests.client.conftest import TOKEN
from tests.client.support import Harness, wait_until

pytestmark = pytest.mark.timeout(300)
START = 60.0  # seconds for a sidecar process to start: the shared machine can be very busy
SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture
def spawn() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(START)


def sidecar(
    procs: list[subprocess.Popen[bytes]],
    registry: Harness,
    *args: str,
    stderr: IO[bytes] | None = None,
) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))
    env["POISE_REGISTRY_TOKEN"] = TOKEN  # the token from the environment, not argv
    argv = [sys.executable, "-m", "poise", "register", "--registry", registry.url]
    argv += ["--service", "users", "--ttl", "1s", *args]
    proc = subprocess.Popen(argv, env=env, stderr=stderr)
    procs.append(proc)
    return proc


def test_registers_while_the_command_runs(
    registry: Harness, spawn: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    flag = tmp_path / "exit"
    # the command runs until the test creates a file, then exits with status 3
    code = (
        f"import os,sys,time\nwhile not os.path.exists({str(flag)!r}): time.sleep(0.02)\n"
        "sys.exit(3)"
    )
    proc = sidecar(
        spawn, registry, "--port", "8001", "--id", "s1", "--", sys.executable, "-c", code
    )
    wait_until(lambda: registry.ids("users") == ["s1"], "registered by the sidecar", START)
    assert registry.instances("users")[0].status == "passing"
    flag.touch()
    assert proc.wait(START) == 3  # the command's exit status passed through
    assert registry.ids("users") == []  # deregistered when the command exited


def test_sigterm_deregisters_and_stops_the_command(
    registry: Harness, spawn: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    pidfile = tmp_path / "pid"
    code = f"import os,time\nopen({str(pidfile)!r},'w').write(str(os.getpid()))\ntime.sleep(300)"
    proc = sidecar(
        spawn, registry, "--port", "8001", "--id", "s1", "--", sys.executable, "-c", code
    )
    wait_until(lambda: registry.ids("users") == ["s1"] and pidfile.exists(), "registered", START)
    wait_until(lambda: pidfile.read_text() != "", "the command wrote its pid")
    child = int(pidfile.read_text())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(START) == 0
    assert registry.ids("users") == []

    def gone() -> bool:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return True
        return False

    wait_until(gone, "the command stopped too")


def test_health_url_gates_the_status(
    registry: Harness, spawn: list[subprocess.Popen[bytes]]
) -> None:
    healthy = {"now": False}

    async def health(request: RecordedRequest) -> Response:
        return Response(200 if healthy["now"] else 503, body=b"")

    app: HttpBackend = registry.backend("app")
    app.handler = health
    proc = sidecar(
        spawn, registry, "--port", str(app.port), "--id", "s1",
        "--health-url", f"{app.url}/health", "--interval", "100ms",
    )  # fmt: skip

    def status() -> str | None:
        found = registry.instances("users")
        return found[0].status if found else None

    # registered as critical until the first check passes: no traffic to a starting process
    wait_until(
        lambda: status() == "critical" and len(app.requests) >= 2, "critical at first", START
    )
    healthy["now"] = True
    wait_until(lambda: status() == "passing", "passing once healthy")
    healthy["now"] = False
    wait_until(lambda: status() == "critical", "critical again")
    assert registry.ids("users") == ["s1"]  # kept, visible as critical
    proc.send_signal(signal.SIGINT)
    assert proc.wait(START) == 0
    assert registry.ids("users") == []


def test_bad_arguments_and_a_refused_token(
    registry: Harness, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    base = ["register", "--registry", registry.url, "--service", "users", "--port", "8001"]
    for bad in (["--interval", "0"], ["--ttl", "soon"]):
        with pytest.raises(SystemExit) as exited:
            main([*base, *bad])
        assert exited.value.code == 2
    assert main([*base, "--ttl", "1h", "--token", "wrong-token-0123456789"]) == 1
    assert "401" in capsys.readouterr().err
    assert main([*base, "--ttl", "48h"]) == 1  # the registry's range: 100ms to 24h
    assert "ttl" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--health-url", "localhost:8001/health"])
    # a command that cannot start: said plainly, the registration is removed again, and the
    # exit status is a shell's: 127 not found, 126 found but not executable
    assert main([*base, "--token", TOKEN, "--", "/nonexistent/app"]) == 127
    assert "/nonexistent/app: command not found" in capsys.readouterr().err
    assert registry.ids("users") == []
    plain = tmp_path / "not-executable"
    plain.write_text("#!/bin/sh\n")
    assert main([*base, "--token", TOKEN, "--", str(plain)]) == 126
    assert f"{plain}: cannot run" in capsys.readouterr().err
    assert registry.ids("users") == []


def test_starts_while_the_registry_is_down(
    registry: Harness, spawn: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    registry.stop()
    log = tmp_path / "stderr"
    with log.open("wb") as stderr:
        proc = sidecar(spawn, registry, "--port", "8001", "--id", "s1", stderr=stderr)
        wait_until(lambda: b"as soon as the registry answers" in log.read_bytes(), "waits", START)
        assert proc.poll() is None  # an absent registry does not end the sidecar
        registry.start()
        wait_until(lambda: registry.ids("users") == ["s1"], "registered once it answers")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(START) == 0
    assert registry.ids("users") == []
