#!/usr/bin/env python3
"""Chaos benchmark: poise in front of 3 backends that are killed with SIGKILL under load.

    python bench/chaos.py [--duration 10] [--connections 32] [--interval 2] [--out bench/results]

Three phases, each one `wrk -t1 -cN -dDs --latency` run against the same poise:

* steady  - nothing happens (the reference);
* chaos   - every --interval seconds one backend (round robin over the 3) is killed with
            SIGKILL and restarted --interval/2 seconds later;
* rolling - a rolling restart: each backend in turn is killed, restarted at once, and the next
            one waits until it accepts connections plus one health-check interval.

Backends are `poise.testing.procs.BackendProcess` (real processes that log every request they
read), pinned with wrk to cpu0; poise (`python -m poise run -c poise.json`) on cpu1. Figures
are as measured, errors included: nothing here retries or tunes anything. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path[:0] = [str(REPO / "src"), str(BENCH_DIR)]  # this poise, and run.py's helpers

from run import (  # noqa: E402
    CPU_LOAD,
    CPU_PROXY,
    LOOPBACK,
    START_DEADLINE,
    BenchError,
    Processes,
    _raise_interrupt,
    free_port,
    log,
    machine_info,
    parse_wrk,
    save_results,
    wait_accepting,
    wait_port_free,
    workspace,
)

from poise.testing.procs import BackendProcess  # noqa: E402

HEALTH_INTERVAL = 1.0  # seconds; poise's active health check in this benchmark
SETTLE_DEADLINE = 45.0  # a backend ejected by passive health may take a while to come back
PHASES = ("steady", "chaos", "rolling")

_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_DUR = r"([\d.]+)(us|ms|s|m|h)"
# "Latency   1.23ms  456.00us  12.34ms   90.00%": avg, stdev, max (run.parse_wrk skips max)
_LATENCY_LINE = re.compile(rf"^\s+Latency\s+{_DUR}\s+{_DUR}\s+{_DUR}", re.MULTILINE)

Events = list[dict[str, Any]]
Disruptor = Callable[[list[BackendProcess], threading.Event, Events, float], None]


def max_latency_ms(out: str) -> float | None:
    m = _LATENCY_LINE.search(out)
    return None if m is None else round(float(m.group(5)) * _UNITS_MS[m.group(6)], 6)


ADMIN_TOKEN = "chaos-bench-token-0123456789"


def poise_config(tmp: Path, port: int, backends: Sequence[BackendProcess], admin_port: int) -> Path:
    conf = tmp / "poise.json"
    doc = {
        "listeners": [{"name": "web", "listen": f"{LOOPBACK}:{port}", "upstream": "app"}],
        "upstreams": {
            "app": {
                "backends": [b.url for b in backends],
                "health_check": {"interval": f"{HEALTH_INTERVAL:g}s", "timeout": "500ms"},
            }
        },
        "log": {"level": "warning"},
        # read at the end of each phase: what poise itself counted (retries, errors by kind)
        "admin": {"listen": f"{LOOPBACK}:{admin_port}", "token": ADMIN_TOKEN},
    }
    conf.write_text(json.dumps(doc, indent=2))
    return conf


_COUNTER = re.compile(
    r"^(poise_retries_total|poise_retries_over_budget_total"
    r'|poise_errors_total\{kind="([^"]+)",status="\d+"\}'
    r'|poise_upstream_attempt_failures_total\{outcome="([^"]+)"\}) '
    r"(\d+)",
    re.M,
)


def poise_counters(admin_port: int) -> dict[str, int]:
    """poise's own retry and error counters, from its /metrics."""
    conn = http.client.HTTPConnection(LOOPBACK, admin_port, timeout=5)
    try:
        conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    out: dict[str, int] = {}
    name = {"poise_retries_total": "retries", "poise_retries_over_budget_total": "over_budget"}
    for m in _COUNTER.finditer(text):
        if m.group(2):  # answered errors, summed over statuses
            key = f"error:{m.group(2)}"
            out[key] = out.get(key, 0) + int(m.group(4))
        elif m.group(3):  # failed attempts (retried or not)
            out[f"attempt:{m.group(3)}"] = int(m.group(4))
        else:
            out[name[m.group(1)]] = int(m.group(4))
    return out


def gets(backends: Sequence[BackendProcess]) -> int:
    """GET requests the backends have read so far (health checks are HEAD)."""
    return sum(1 for b in backends for line in b.deliveries() if line.startswith("GET "))


def settle(port: int, backends: Sequence[BackendProcess], poise: subprocess.Popen[bytes]) -> float:
    """Restart any dead backend, then wait until poise spreads GETs over all of them again.

    Round robin over 3 up backends names all 3 within a few requests; until then one is
    still marked down (or ejected). Returns the seconds it took."""
    t0 = time.monotonic()
    for b in backends:
        if not b.alive:
            b.start()
    want = {f"backend {b.name}\n".encode() for b in backends}
    deadline = t0 + SETTLE_DEADLINE
    while True:
        if poise.poll() is not None:
            raise BenchError(f"poise exited with status {poise.returncode}")
        seen: set[bytes] = set()
        with contextlib.suppress(OSError, http.client.HTTPException):
            conn = http.client.HTTPConnection(LOOPBACK, port, timeout=3)
            try:
                for _ in range(3 * len(backends)):
                    conn.request("GET", "/")
                    resp = conn.getresponse()
                    seen.add(resp.read())
            finally:
                conn.close()
        if want <= seen:
            return time.monotonic() - t0
        if time.monotonic() > deadline:
            raise BenchError(f"poise did not route to all backends within {SETTLE_DEADLINE:g}s")
        time.sleep(0.1)


def _event(events: Events, t0: float, backend: BackendProcess, action: str) -> None:
    events.append({"t": round(time.monotonic() - t0, 3), "backend": backend.name, "do": action})


def chaos(interval: float) -> Disruptor:
    """Kill one backend every ``interval`` s (round robin), restart it ``interval / 2`` s later."""

    def run(backends: list[BackendProcess], stop: threading.Event, ev: Events, t0: float) -> None:
        i = 0
        next_kill = t0 + interval
        while not stop.wait(max(0.0, next_kill - time.monotonic())):
            victim = backends[i % len(backends)]
            victim.kill()
            _event(ev, t0, victim, "kill -9")
            stop.wait(interval / 2)  # restart even when wrk has just finished
            victim.start()
            _event(ev, t0, victim, "restarted (accepting)")
            i += 1
            next_kill += interval

    return run


def rolling(backends: list[BackendProcess], stop: threading.Event, ev: Events, t0: float) -> None:
    """Each backend in turn: kill -9, restart at once, then one health interval for poise to
    see it up before the next goes. Starts after 1 s of traffic; completes even if wrk ends."""
    if stop.wait(1.0):
        return
    for b in backends:
        b.kill()
        _event(ev, t0, b, "kill -9")
        b.start()
        _event(ev, t0, b, "restarted (accepting)")
        time.sleep(HEALTH_INTERVAL)  # the documented pause of a rolling restart, not a guess
    _event(ev, t0, backends[-1], "rolling restart done")


def run_wrk(
    port: int,
    connections: int,
    seconds: float,
    pin: bool,
    backends: list[BackendProcess],
    *,
    disrupt: Disruptor | None,
) -> dict[str, Any]:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency"]
    argv.append(f"http://{LOOPBACK}:{port}/")
    if pin:
        argv = ["taskset", "-c", CPU_LOAD, *argv]
    before = gets(backends)
    stop = threading.Event()
    events: Events = []
    t0 = time.monotonic()
    wrk = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    thread = None
    if disrupt is not None:

        def guarded() -> None:  # a failed restart must show up in the results, not vanish
            try:
                disrupt(backends, stop, events, t0)
            except Exception as exc:
                events.append({"t": round(time.monotonic() - t0, 3), "error": repr(exc)})

        thread = threading.Thread(target=guarded, daemon=True)
        thread.start()
    try:
        out, err = wrk.communicate(timeout=seconds + 60)
    except subprocess.TimeoutExpired as exc:
        wrk.kill()
        wrk.wait()
        raise BenchError(f"wrk did not finish within {seconds + 60:.0f}s") from exc
    finally:
        stop.set()
        if thread is not None:
            thread.join(60)
    if wrk.returncode != 0:
        raise BenchError(f"wrk exited {wrk.returncode}: {(err or out)[-1000:]}")
    w = parse_wrk(out)
    return {
        "requests": w.requests,
        "rps": w.rps,
        "duration_s": w.duration_s,
        "latency_ms": w.latency_ms,
        "latency_avg_ms": w.latency_avg_ms,
        "latency_max_ms": max_latency_ms(out),
        "socket_errors": w.socket_errors,
        "non_2xx_3xx": w.non_2xx_3xx,
        "errors": w.errors,
        "backend_gets": gets(backends) - before,
        "events": events,
        "wrk_output": out,
    }


def _ms(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value * 1e3:.0f} µs" if value < 1 else f"{value:,.2f} ms"


def markdown(
    started: dt.datetime,
    args: argparse.Namespace,
    info: dict[str, Any],
    phases: dict[str, dict[str, Any]],
    pinned: bool,
) -> str:
    out = [
        f"# poise chaos benchmark — {started:%Y-%m-%d %H:%M:%S} UTC",
        "",
        f"{info['nproc']} CPUs ({info['cpu_model']}), kernel {info['kernel']}, Python "
        f"{info['python']}, {info['wrk']}; commit {info['git_commit'] or 'none'}; load average "
        f"{info['loadavg_start']} at start, {info.get('loadavg_end')} at end. 3 backends "
        f"(`poise.testing.procs`) and wrk on cpu{CPU_LOAD}, poise on cpu{CPU_PROXY}"
        + ("" if pinned else " (NOT pinned)")
        + f"; `wrk -t1 -c{args.connections} -d{args.duration:g}s --latency`; health check "
        f"`HEAD /` every {HEALTH_INTERVAL:g}s (timeout 500ms); chaos: one backend killed -9 "
        f"every {args.interval:g}s, restarted {args.interval / 2:g}s later; rolling: kill -9, "
        f"restart at once, next after accepting + {HEALTH_INTERVAL:g}s.",
        "",
        "| phase | requests | rps | p50 | p99 | max | socket errors (connect/read/write/timeout) "
        "| non-2xx/3xx | backend GETs |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    notes = []
    for name in PHASES:
        r = phases.get(name)
        if r is None:
            continue
        if "error" in r:
            out.append(f"| {name} | FAILED | — | — | — | — | — | — | — |")
            notes.append(f"- **{name}** failed: `{r['error'].splitlines()[0][:300]}`")
            continue
        se = r["socket_errors"]
        out.append(
            f"| {name} | {r['requests']:,} | {r['rps']:,.0f} | {_ms(r['latency_ms'].get('50'))} "
            f"| {_ms(r['latency_ms'].get('99'))} | {_ms(r['latency_max_ms'])} "
            f"| {sum(se.values())} ({se['connect']}/{se['read']}/{se['write']}/{se['timeout']}) "
            f"| {r['non_2xx_3xx']:,} | {r['backend_gets']:,} |"
        )
        if r["events"]:
            ev = ", ".join(
                f"{e['t']:.1f}s " + (f"{e['backend']} {e['do']}" if "do" in e else e["error"])
                for e in r["events"]
            )
            notes.append(f"- {name}: {ev}")
        counters = r.get("poise_counters")
        if counters:
            errors = ", ".join(
                f"{k[6:]} {v:,}" for k, v in counters.items() if k.startswith("error:") and v
            )
            attempts = ", ".join(
                f"{k[8:]} {v:,}" for k, v in counters.items() if k.startswith("attempt:") and v
            )
            notes.append(
                f"- {name}, poise's counters (warm-up included): {counters.get('retries', 0):,} "
                f"retries, {counters.get('over_budget', 0):,} refused by the retry budget; "
                f"failed attempts: {attempts or 'none'}; errors answered: {errors or 'none'}"
            )
    return "\n".join([*out, "", *notes]) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="poise under backend kill -9 (see bench/README.md)")
    p.add_argument("--duration", type=float, default=10, help="seconds per phase (default 10)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    p.add_argument(
        "--interval", type=float, default=2, help="chaos: seconds between kills (default 2)"
    )
    p.add_argument("--out", default=str(BENCH_DIR / "results"), help="results directory")
    args = p.parse_args(argv)
    if args.duration < 1 or args.connections < 1 or args.interval <= 0:
        p.error("--duration >= 1, --connections >= 1 and --interval > 0 please")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not shutil.which("wrk"):
        print("wrk is not installed: apt-get install -y wrk", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    started = dt.datetime.now(dt.UTC)
    info = machine_info()
    phases: dict[str, dict[str, Any]] = {}
    try:
        with workspace() as (tmp, procs):
            pinned = procs.pin
            ok = _run(args, tmp, procs, phases)
    except KeyboardInterrupt:
        log("interrupted; all processes stopped")
        return 130
    info["loadavg_end"] = machine_info()["loadavg_start"]
    md = markdown(started, args, info, phases, pinned)
    print(md)
    payload = {
        "started_utc": started.isoformat(),
        "args": {k: getattr(args, k) for k in ("duration", "connections", "interval")},
        "health_interval_s": HEALTH_INTERVAL,
        "pinned": pinned,
        "machine": info,
        "phases": phases,
    }
    save_results(args.out, f"chaos-{started:%Y%m%dT%H%M%SZ}.json", payload, "chaos-latest.md", md)
    return 0 if ok else 1


def _run(
    args: argparse.Namespace, tmp: Path, procs: Processes, phases: dict[str, dict[str, Any]]
) -> bool:
    cpu = int(CPU_LOAD) if procs.pin else None
    backends = [BackendProcess(free_port(), tmp / f"b{i}.log", f"b{i}", cpu=cpu) for i in (1, 2, 3)]
    disruptors: dict[str, Disruptor | None] = {
        "steady": None,
        "chaos": chaos(args.interval),
        "rolling": rolling,
    }
    port, admin_port = free_port(), free_port()
    conf = poise_config(tmp, port, backends, admin_port)
    ok = True
    try:
        for b in backends:
            b.start()
        for name in PHASES:
            # A fresh poise per phase (as run.py does per scenario): passive ejection after
            # the chaos phase lasts 30-60 s and would otherwise leak into the next phase.
            logname = f"poise-{name}"
            argv = [sys.executable, "-m", "poise", "run", "-c", str(conf)]
            poise = None
            try:
                wait_port_free(port)
                poise = procs.start(logname, argv, CPU_PROXY, cwd=REPO)
                wait_accepting(port, poise, time.monotonic() + START_DEADLINE)
                settled = settle(port, backends, poise)
                log(f"{name}: warm-up 2s (settled in {settled:.1f}s), then {args.duration:g}s")
                warm = run_wrk(port, args.connections, 2, procs.pin, backends, disrupt=None)
                disrupt = disruptors[name]
                r = run_wrk(
                    port, args.connections, args.duration, procs.pin, backends, disrupt=disrupt
                )
                r["settle_s"] = round(settled, 3)
                r["warmup"] = {k: warm[k] for k in ("requests", "rps", "errors")}
                if poise.poll() is not None:
                    raise BenchError(f"poise exited with status {poise.returncode}")
                r["poise_counters"] = poise_counters(admin_port)  # warm-up included
                phases[name] = r
                log(f"{name}: {r['rps']:,.0f} rps, {r['errors']} errors")
            except BenchError as exc:
                ok = False
                phases[name] = {"error": f"{exc}\n{procs.log_tail(logname)}"}
                log(f"{name}: FAILED: {exc}")
            finally:
                if poise is not None:
                    procs.stop(poise)
                    _poise_log(tmp / f"{logname}.log", phases.setdefault(name, {}))
        return ok
    finally:
        for b in backends:
            b.stop()


def _poise_log(path: Path, into: dict[str, Any]) -> None:
    """What poise said during a phase: how often it ejected / marked down a backend."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return
    into["poise_ejections"] = sum(" ejected for " in ln for ln in lines)
    into["poise_down"] = sum(ln.endswith(("is DOWN", "DOWN")) or " is DOWN" in ln for ln in lines)
    into["poise_log_tail"] = lines[-60:]


if __name__ == "__main__":
    sys.exit(main())
