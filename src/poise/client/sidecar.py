"""``poise register``: register and heartbeat on behalf of a process that cannot do it itself.

Theory of operation
-------------------
The sidecar is an :class:`~poise.client.aio.AsyncRegistration` plus two optional duties:

* ``--health-url``: the URL is fetched every ``--interval``; the instance is ``passing`` while
  it answers 2xx and ``critical`` while it does not (refused, timed out, any other status).
  *Critical, not deregistered*: the instance stays visible in the registry with its status,
  so an operator sees a sick instance rather than a missing one; the proxy and the SDK
  resolver both skip critical instances, and recovery is one heartbeat, not a re-registration.
  Until the first check passes the instance is registered as ``critical``: no traffic reaches
  a process that is still starting.
* a command after ``--``: it is started once the registration is in place, with this
  process's stdin, stdout and stderr. When it exits the instance is deregistered and its
  exit status becomes the sidecar's (128 + N for a process killed by signal N, as shells do).
  A command that cannot be started is deregistered at once with a shell's status: 127 when
  it is not found, 126 when it cannot be run (not executable, a directory).

SIGTERM or SIGINT deregisters first (traffic stops before the process does), then passes
SIGTERM on to the command, waits up to ``GRACE`` seconds for it (then SIGKILL) and exits 0.
Registry outages never end the sidecar: the registration retries with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass

import httpx

from poise.client.aio import AsyncRegistration, AsyncRegistry
from poise.client.core import RegistrationSpec
from poise.registry.model import CRITICAL, PASSING

log = logging.getLogger("poise.sidecar")

GRACE = 10.0  # seconds the command gets to exit after SIGTERM before SIGKILL


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    registry: str
    service: str
    port: int
    host: str = "127.0.0.1"
    id: str | None = None
    ttl: float = 10.0
    token: str | None = None
    health_url: str | None = None
    interval: float = 2.0  # seconds between health checks
    command: tuple[str, ...] = ()


def exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


async def _health_loop(cfg: SidecarConfig, reg: AsyncRegistration) -> None:
    assert cfg.health_url is not None
    timeout = max(min(cfg.interval, 5.0), 0.5)
    async with httpx.AsyncClient(timeout=timeout, trust_env=False) as http:
        while True:
            try:
                reply = await http.get(cfg.health_url)
                ok, why = reply.is_success, f"HTTP {reply.status_code}"
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                ok, why = False, repr(exc)
            status = PASSING if ok else CRITICAL
            if status != reg.status:
                log.info("%s: %s (%s)", cfg.health_url, status, why)
                reg.set_status(status)
            await asyncio.sleep(cfg.interval)


async def _stop_command(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), GRACE)
    except TimeoutError:
        log.warning("command (pid %d) still running %gs after SIGTERM: killing it", proc.pid,
                    GRACE)  # fmt: skip
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


async def _until_done(
    cfg: SidecarConfig,
    reg: AsyncRegistration,
    stop: asyncio.Event,
    proc: asyncio.subprocess.Process | None,
) -> None:
    """Run the health loop until a stop signal or the command's exit; a crash of the health
    loop is raised, not swallowed."""
    tasks: list[asyncio.Task[object]] = [asyncio.create_task(stop.wait(), name="stop")]
    if proc is not None:
        tasks.append(asyncio.create_task(proc.wait(), name="command"))
    if cfg.health_url:
        tasks.append(asyncio.create_task(_health_loop(cfg, reg), name="health"))
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        task.result()


async def run_sidecar(cfg: SidecarConfig, stop: asyncio.Event | None = None) -> int:
    """Register, keep registered, and deregister when told to stop or the command exits."""
    spec = RegistrationSpec.make(cfg.service, cfg.port, host=cfg.host, ttl=cfg.ttl, id=cfg.id)
    stop = stop if stop is not None else asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with AsyncRegistry(cfg.registry, cfg.token) as registry:
            first = CRITICAL if cfg.health_url else PASSING
            reg = AsyncRegistration(registry, spec, status=first)
            await reg.start()
            if reg.registered:
                log.info("registered %s/%s at %s:%d", cfg.service, spec.id, cfg.host, cfg.port)
            else:
                log.warning("%s/%s: registering as soon as the registry answers", cfg.service,
                            spec.id)  # fmt: skip
            proc = None
            try:
                if cfg.command:  # spawned after registering: its first request may come soon
                    try:
                        proc = await asyncio.create_subprocess_exec(*cfg.command)
                    except OSError as exc:  # deregistered below; the status a shell gives
                        found = not isinstance(exc, FileNotFoundError)
                        what = "cannot run" if found else "command not found"
                        log.error("%s: %s (%s)", cfg.command[0], what, exc.strerror or exc)
                        return 126 if found else 127
                await _until_done(cfg, reg, stop, proc)
            finally:
                await reg.stop()  # deregister before the command is told to stop
                log.info("deregistered %s/%s", cfg.service, spec.id)
                if proc is not None:  # stopped by a signal, or the health loop failed
                    await _stop_command(proc)
            if proc is not None and not stop.is_set():
                assert proc.returncode is not None
                return exit_status(proc.returncode)
            return 0
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def sidecar(cfg: SidecarConfig) -> int:
    """Run :func:`run_sidecar` on a new event loop (the ``poise register`` entry point)."""
    return asyncio.run(run_sidecar(cfg))
