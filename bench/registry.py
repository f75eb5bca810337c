#!/usr/bin/env python3
"""Registry benchmark: how fast registrations reach routing, and heartbeat throughput.

    python bench/registry.py [--rounds 200] [--instances 10000] [--duration 5] [--store sqlite]

poise runs as its own process (`python -m poise run`, pinned to cpu1) with the embedded
registry (SQLite in a temp dir by default) and one upstream naming service ``bench``; the
backends and the load generators run on cpu0.

* register -> routed: the service has no instance (poise answers 503); PUT an instance, then
  GET through poise in a tight loop until a 200 comes back. Time from sending the PUT to
  that 200. Then DELETE it and time until poise answers 503 again (deregister -> no new
  requests). ``--rounds`` of each; p50/p99/max.
* heartbeats: ``--instances`` instances registered, then wrk (Lua script, keep-alive,
  ``-c 32``) sends PUT .../heartbeat for random instances for ``--duration`` s: requests/s
  and errors. Also the store alone (in this process, no HTTP) for scale.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import http.client
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path[:0] = [str(REPO / "src"), str(BENCH_DIR)]

from run import (  # noqa: E402
    CLK_TCK,
    CPU_LOAD,
    CPU_PROXY,
    LOOPBACK,
    START_DEADLINE,
    BenchError,
    cpu_ticks,
    free_port,
    log,
    machine_info,
    parse_wrk,
    save_results,
    wait_accepting,
    workspace,
)

from poise.registry import Instance, MemoryStore, SQLiteStore  # noqa: E402
from poise.testing.procs import BackendProcess  # noqa: E402

TOKEN = "bench-token-0123456789abcdef"
POLL_DEADLINE = 5.0  # seconds a registration may take to be routed before we call it failed


def poise_config(
    tmp: Path, port: int, api_port: int, store: str, etcd_url: str | None = None
) -> Path:
    conf = tmp / "poise.json"
    registry: dict[str, Any] = {"store": store, "listen": f"{LOOPBACK}:{api_port}", "token": TOKEN}
    if store == "sqlite":
        registry["path"] = str(tmp / "registry.db")
    if store == "etcd":
        registry["endpoints"] = [etcd_url]
    doc = {
        "listeners": [{"name": "web", "listen": f"{LOOPBACK}:{port}", "upstream": "app"}],
        "upstreams": {
            "app": {"service": "bench", "health_check": {"interval": "2s", "timeout": "1s"}}
        },
        "registry": registry,
        "log": {"level": "warning"},
    }
    conf.write_text(json.dumps(doc, indent=2))
    return conf


class Api:
    """Keep-alive HTTP/1.1 connections: one to the registry API, one to the balancer."""

    def __init__(self, api_port: int, port: int) -> None:
        self.api = http.client.HTTPConnection(LOOPBACK, api_port, timeout=10)
        self.lb = http.client.HTTPConnection(LOOPBACK, port, timeout=10)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> int:
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        data = None if body is None else json.dumps(body).encode()
        self.api.request(method, path, body=data, headers=headers)
        resp = self.api.getresponse()
        resp.read()
        return resp.status

    def get(self) -> int:
        self.lb.request("GET", "/")
        resp = self.lb.getresponse()
        resp.read()
        if resp.getheader("connection", "").lower() == "close":
            self.lb.close()
        return resp.status

    def until(self, status: int, t0: float) -> float:
        while (got := self.get()) != status:
            if time.perf_counter() - t0 > POLL_DEADLINE:
                raise BenchError(f"poise still answered {got}, not {status}, after 5 s")
        return time.perf_counter() - t0


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def summary(ms: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(statistics.median(ms), 3),
        "p99_ms": round(pct(ms, 99), 3),
        "max_ms": round(max(ms), 3),
        "n": len(ms),
    }


def routing_latency(api: Api, backends: list[BackendProcess], rounds: int) -> dict[str, Any]:
    reg: list[float] = []
    dereg: list[float] = []
    if api.get() != 503:
        raise BenchError("the service should start with no instance (503)")
    for i in range(rounds):
        b = backends[i % len(backends)]
        path = f"/v1/services/bench/instances/i{i}"
        t0 = time.perf_counter()
        if api.call("PUT", path, {"host": LOOPBACK, "port": b.port}) != 200:
            raise BenchError("register failed")
        reg.append(api.until(200, t0) * 1e3)
        t0 = time.perf_counter()
        if api.call("DELETE", path) != 200:
            raise BenchError("deregister failed")
        dereg.append(api.until(503, t0) * 1e3)
    return {"register_to_routed": summary(reg), "deregister_to_gone": summary(dereg)}


WRK_SCRIPT = """
wrk.method = "PUT"
wrk.headers["Authorization"] = "Bearer %s"
local n = %d
request = function()
  local i = math.random(0, n - 1)
  return wrk.format(nil, "/v1/services/load/instances/h" .. i .. "/heartbeat")
end
"""


def heartbeats(
    tmp: Path, api: Api, api_port: int, n: int, *, seconds: float, pin: bool, poise_pid: int
) -> Any:
    log(f"registering {n} instances")
    for i in range(n):
        body = {"host": LOOPBACK, "port": 10000 + i % 50000, "ttl": "300s"}
        if api.call("PUT", f"/v1/services/load/instances/h{i}", body) != 200:
            raise BenchError("register failed")
    script = tmp / "heartbeat.lua"
    script.write_text(WRK_SCRIPT % (TOKEN, n))
    argv = ["wrk", "-t1", "-c32", f"-d{max(1, round(seconds))}s", "-s", str(script)]
    argv.append(f"http://{LOOPBACK}:{api_port}")
    if pin:
        argv = ["taskset", "-c", CPU_LOAD, *argv]
    before = sum(cpu_ticks([poise_pid]).values())
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    cpu_s = (sum(cpu_ticks([poise_pid]).values()) - before) / CLK_TCK
    if out.returncode != 0:
        raise BenchError(f"wrk failed: {out.stderr[-500:]}")
    w = parse_wrk(out.stdout)
    return {
        "poise_cpu_share": round(cpu_s / max(w.duration_s, 1e-9), 3),
        "cpu_us_per_heartbeat": round(cpu_s / max(w.requests, 1) * 1e6, 1),
        "rps": w.rps,
        "requests": w.requests,
        "errors": w.errors,
        "non_2xx_3xx": w.non_2xx_3xx,
        "latency_ms": w.latency_ms,
    }


def store_alone(n: int, tmp: Path) -> dict[str, float]:
    """Heartbeats per second on the store itself (no HTTP), for scale."""

    async def rate(store: MemoryStore) -> float:
        for i in range(n):
            await store.register(Instance("load", f"h{i}", LOOPBACK, 10000 + i % 50000, ttl=300))
        t0 = time.perf_counter()
        count = 200_000
        for k in range(count):
            await store.heartbeat("load", f"h{k % n}")
        return count / (time.perf_counter() - t0)

    sqlite = SQLiteStore(tmp / "alone.db")
    return {
        "memory_per_s": round(asyncio.run(rate(MemoryStore()))),
        "sqlite_per_s": round(asyncio.run(rate(sqlite))),
    }


def markdown(
    started: dt.datetime, args: argparse.Namespace, info: dict[str, Any], r: dict[str, Any]
) -> str:
    reg, dereg, hb = r["register_to_routed"], r["deregister_to_gone"], r["heartbeats"]
    alone = r.get("store_alone")
    return "\n".join(
        [
            f"# poise registry benchmark — {started:%Y-%m-%d %H:%M:%S} UTC",
            "",
            f"{info['nproc']} CPUs ({info['cpu_model']}), Python {info['python']}; commit "
            f"{info['git_commit'] or 'none'}; load average {info['loadavg_start']} at start. "
            f"poise on cpu{CPU_PROXY} (store: {args.store}), clients and backends on "
            f"cpu{CPU_LOAD}.",
            "",
            "| measure | p50 | p99 | max | target |",
            "|---|---:|---:|---:|---|",
            f"| register → first routed request ({reg['n']} rounds) | {reg['p50_ms']:.2f} ms "
            f"| {reg['p99_ms']:.2f} ms | {reg['max_ms']:.2f} ms | "
            f"{'< 250 ms' if args.store == 'etcd' else '< 50 ms'} |",
            f"| deregister → no new requests ({dereg['n']} rounds) | {dereg['p50_ms']:.2f} ms "
            f"| {dereg['p99_ms']:.2f} ms | {dereg['max_ms']:.2f} ms | |",
            "",
            f"Heartbeats over HTTP, {r['heartbeat_instances']:,} instances, wrk -c32 for "
            f"{args.duration:g}s: "
            f"**{hb['rps']:,.0f}/s** with poise at {hb['poise_cpu_share']:.0%} of a core, "
            f"{hb['cpu_us_per_heartbeat']:.1f} CPU-µs per heartbeat ({hb['errors']} errors, "
            f"{hb['non_2xx_3xx']} non-2xx; target ≥ 20,000/s embedded)."
            + (
                f" The store alone (no HTTP): memory {alone['memory_per_s']:,}/s, SQLite "
                f"{alone['sqlite_per_s']:,}/s."
                if alone
                else " (etcd: every heartbeat is a read and a lease keepalive on etcd.)"
            ),
            "",
        ]
    )


def main() -> int:
    p = argparse.ArgumentParser(description="poise registry benchmark (see bench/README.md)")
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--instances", type=int, default=10_000)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--store", choices=("sqlite", "memory", "etcd"), default="sqlite")
    p.add_argument("--out", default=str(BENCH_DIR / "results"))
    args = p.parse_args()
    if not shutil.which("wrk"):
        print("wrk is not installed: apt-get install -y wrk", file=sys.stderr)
        return 2
    started = dt.datetime.now(dt.UTC)
    info = machine_info()
    if args.store == "etcd":  # several poise nodes on an etcd cluster: registry_cluster.py
        import registry_cluster

        with workspace() as (tmp, procs):
            result = registry_cluster.run(tmp, procs, args)
        head = (
            f"# poise registry benchmark on etcd — {started:%Y-%m-%d %H:%M:%S} UTC\n\n"
            f"{info['nproc']} CPUs ({info['cpu_model']}), Python {info['python']}; commit "
            f"{info['git_commit'] or 'none'}; load average {info['loadavg_start']} at start. "
            f"poise nodes on cpu{CPU_PROXY}, wrk and backends on cpu{CPU_LOAD}, etcd unpinned."
        )
        md = registry_cluster.markdown(head, result)
        print(md)
        payload = {"started_utc": started.isoformat(), "args": vars(args), "machine": info,
                   "results": result}  # fmt: skip
        name = f"registry-etcd-{started:%Y%m%dT%H%M%SZ}.json"
        save_results(args.out, name, payload, "registry-etcd-latest.md", md)
        return 0
    result: dict[str, Any] = {}
    with workspace() as (tmp, procs), contextlib.ExitStack() as stack:
        cpu = int(CPU_LOAD) if procs.pin else None
        backends = [
            BackendProcess(free_port(), tmp / f"b{i}.log", f"b{i}", cpu=cpu) for i in range(4)
        ]
        try:
            for b in backends:
                b.start()
            port, api_port = free_port(), free_port()
            etcd_url = None
            if args.store == "etcd":
                from poise.testing.etcd import EtcdServer

                etcd = stack.enter_context(EtcdServer())
                etcd_url = etcd.url
            conf = poise_config(tmp, port, api_port, args.store, etcd_url)
            argv = [sys.executable, "-m", "poise", "run", "-c", str(conf)]
            poise = procs.start("poise", argv, CPU_PROXY, cwd=REPO)
            wait_accepting(port, poise, time.monotonic() + START_DEADLINE)
            api = Api(api_port, port)
            log(f"register/deregister -> routing, {args.rounds} rounds")
            result.update(routing_latency(api, backends, args.rounds))
            log("heartbeat throughput")
            # etcd: each registration is a lease and a transaction; 500 make the point
            n = min(args.instances, 500) if args.store == "etcd" else args.instances
            result["heartbeats"] = heartbeats(
                tmp, api, api_port, n, seconds=args.duration, pin=procs.pin, poise_pid=poise.pid
            )
            result["heartbeat_instances"] = n
            if args.store != "etcd":
                result["store_alone"] = store_alone(args.instances, tmp)
        finally:
            for b in backends:
                b.stop()
    md = markdown(started, args, info, result)
    print(md)
    payload = {
        "started_utc": started.isoformat(),
        "args": vars(args),
        "machine": info,
        "results": result,
    }
    name = f"registry-{started:%Y%m%dT%H%M%SZ}.json"
    save_results(args.out, name, payload, f"registry-{args.store}-latest.md", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
