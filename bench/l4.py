#!/usr/bin/env python3
"""L4 benchmark: poise's TCP listener vs HAProxy ``mode tcp`` (and nginx ``stream`` when the
installed nginx has the module), same run, same machine, same backends.

    python bench/l4.py [--scenarios small,large] [--duration 8] [--warmup 2] [--rounds 3]

HTTP requests over wrk's keep-alive connections pass through each L4 proxy untouched: the
proxy only relays bytes, one backend connection per client connection, round robin over the
3 nginx backends of bench/run.py. ``small``: GET / (16-byte body), wrk -t1 -c64; ``large``:
GET /1m (1 MiB body), wrk -t1 -c16, reported also as MB/s (bulk throughput). Figures per
system: requests/s, p50/p99, proxy CPU-µs per request, peak RSS; medians of the rounds.
Every helper (process pinning, wrk parsing, CPU accounting, machine info) is run.py's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path[:0] = [str(REPO / "src"), str(BENCH_DIR)]  # this poise, and run.py's helpers

import run  # noqa: E402
from run import (  # noqa: E402
    CPU_LOAD,
    CPU_PROXY,
    LOOPBACK,
    SCENARIOS,
    BenchError,
    Env,
    Measurement,
    _fmt,
    _ms_fmt,
    _nginx_parts,
    _raise_interrupt,
    free_port,
    loadavg,
    log,
    machine_info,
    measure,
    median_of,
    nginx_argv,
    start_backends,
    workspace,
)

SYSTEMS = ("poise", "haproxy", "nginx", "poise-base")
LABELS = {
    "poise": "poise (L4)",
    "haproxy": "HAProxy mode tcp",
    "nginx": "nginx stream",
    "poise-base": "poise (L4), --base-src tree",
}
BASE_SRC: list[str] = []  # --base-src: another poise source tree, measured as "poise-base"
STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")


def nginx_stream() -> str | None:
    """How to get nginx's stream module: "" (built in), a load_module line, or None."""
    if not shutil.which("nginx"):
        return None
    done = subprocess.run(["nginx", "-V"], capture_output=True, text=True, check=False)
    flags = (done.stdout + done.stderr).split()
    if "--with-stream" in flags:
        return ""
    if "--with-stream=dynamic" in flags and STREAM_MODULE.exists():
        return f"load_module {STREAM_MODULE};\n"
    return None


def haproxy_tcp_conf(tmp: Path, port: int, backends: Sequence[int]) -> Path:
    servers = "".join(
        f"    server s{i} {LOOPBACK}:{b} check inter 2s\n" for i, b in enumerate(backends, 1)
    )
    conf = tmp / "haproxy-tcp.cfg"
    conf.write_text(
        "global\n    nbthread 1\n    maxconn 4096\n\n"
        "defaults\n    mode tcp\n    timeout connect 3s\n"
        "    timeout client 60s\n    timeout server 60s\n\n"
        f"frontend fe\n    bind {LOOPBACK}:{port}\n    default_backend be\n\n"
        "backend be\n    balance roundrobin\n" + servers
    )
    return conf


def nginx_stream_conf(tmp: Path, port: int, backends: Sequence[int], load: str) -> Path:
    main, _ = _nginx_parts(tmp, "nginx-stream")
    servers = "".join(f"        server {LOOPBACK}:{b};\n" for b in backends)
    conf = tmp / "nginx-stream.conf"
    conf.write_text(
        load + main + "stream {\n    upstream u {\n" + servers + "    }\n"
        f"    server {{\n        listen {LOOPBACK}:{port} backlog=4096;\n"
        "        proxy_pass u;\n    }\n}\n"
    )
    return conf


def poise_tcp_conf(tmp: Path, port: int, backends: Sequence[int]) -> Path:
    conf = tmp / "poise-l4.json"
    doc = {
        "listeners": [
            {"name": "bench", "listen": f"{LOOPBACK}:{port}", "protocol": "tcp",
             "upstream": "bench"}
        ],
        "upstreams": {
            "bench": {
                "backends": [f"tcp://{LOOPBACK}:{b}" for b in backends],
                "health_check": {"type": "tcp", "interval": "2s"},
            }
        },
        "log": {"level": "warning"},
    }  # fmt: skip
    conf.write_text(json.dumps(doc, indent=2))
    return conf


def start_system(env: Env, system: str, logname: str) -> subprocess.Popen[bytes]:
    port, backends, tmp = env.front_port, env.backend_ports, env.tmp
    if system in ("poise", "poise-base"):
        conf = poise_tcp_conf(tmp, port, backends)
        penv = dict(os.environ)
        penv["PYTHONPATH"] = BASE_SRC[0] if system == "poise-base" else str(REPO / "src")
        argv = [sys.executable, "-m", "poise", "run", "-c", str(conf)]
        return env.procs.start(logname, argv, CPU_PROXY, cwd=REPO, env=penv)
    if system == "haproxy":
        if not shutil.which("haproxy"):
            raise BenchError("haproxy is not installed (apt-get install -y haproxy)")
        conf = haproxy_tcp_conf(tmp, port, backends)
        return env.procs.start(logname, ["haproxy", "-db", "-f", str(conf)], CPU_PROXY)
    if system == "nginx":
        load = nginx_stream()
        if load is None:
            raise BenchError("the installed nginx has no stream module")
        conf = nginx_stream_conf(tmp, port, backends, load)
        return env.procs.start(logname, nginx_argv(tmp, conf, "nginx-stream"), CPU_PROXY)
    raise BenchError(f"unknown system {system!r}")


# run.measure() looks start_system up in its module at call time: ours starts the L4 systems.
run.start_system = start_system


def l4_table(name: str, rows: list[Measurement]) -> str:
    scenario = SCENARIOS[name]
    ok = {r.system: r for r in rows if r.ok}
    ref = ok["haproxy"].rps if "haproxy" in ok else None
    ref_cpu = ok["haproxy"].cpu_us_per_req if "haproxy" in ok else None
    bulk = scenario.body_size >= 1 << 20
    out = [
        f"### {name}: GET {scenario.path} ({scenario.body_size} B body) over keep-alive "
        f"connections through the L4 proxy, wrk -t1 -c{scenario.connections}",
        "",
        "| system | rps | ×HAProxy | "  # noqa: RUF001
        + ("MB/s | " if bulk else "")
        + "p50 | p99 | CPU-µs/req | CPU ×HAProxy | peak RSS MiB | errors |",  # noqa: RUF001
        "|---|---:|---:|" + ("---:|" if bulk else "") + "---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        label = LABELS[r.system]
        if not r.ok:
            first = (r.error or "failed").splitlines()[0]
            out.append(f"| {label} | not measured: {first[:120]} |")
            continue
        assert r.rps is not None
        cpu = r.cpu_us_per_req
        cpu_ratio = _fmt(cpu / ref_cpu if cpu and ref_cpu else None, ".2f")
        mbs = f"{r.rps * scenario.body_size / 1e6:,.0f} | " if bulk else ""
        out.append(
            f"| {label} | {r.rps:,.0f} | {_fmt(r.rps / ref if ref else None, '.2f')} | {mbs}"
            f"{_ms_fmt(r.latency_ms.get('50'))} | {_ms_fmt(r.latency_ms.get('99'))} "
            f"| {_fmt(r.cpu_us_per_req, '.1f')} "
            f"| {cpu_ratio} "
            f"| {_fmt(None if r.peak_rss_kib is None else r.peak_rss_kib / 1024, '.1f')} "
            f"| {r.errors} |"
        )
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="poise L4 vs HAProxy mode tcp (and nginx stream)")
    p.add_argument("--scenarios", default="small,large")
    p.add_argument("--duration", type=float, default=8)
    p.add_argument("--warmup", type=float, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--systems", default="poise,haproxy,nginx")
    p.add_argument(
        "--base-src",
        help="another poise source tree (e.g. an older commit's src/), measured as poise-base "
        "in the same run to compare before/after",
    )
    p.add_argument("--out", default=str(BENCH_DIR / "results"))
    args = p.parse_args(argv)
    if args.base_src:
        BASE_SRC[:] = [str(Path(args.base_src).resolve())]
    scenarios = [s for s in args.scenarios.split(",") if s]
    systems = [s for s in args.systems.split(",") if s]
    if any(s not in SCENARIOS for s in scenarios) or any(s not in SYSTEMS for s in systems):
        p.error("unknown scenario or system")
    if "poise-base" in systems and not BASE_SRC:
        p.error("poise-base needs --base-src")
    if not shutil.which("wrk"):
        print("wrk is not installed: apt-get install -y nginx-light haproxy wrk", file=sys.stderr)
        return 2
    stream = nginx_stream()
    if "nginx" in systems and stream is None:
        log("nginx has no stream module (nginx-light builds it as a module it does not ship): "
            "nginx stream is left out")  # fmt: skip
        systems.remove("nginx")
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    started = dt.datetime.now(dt.UTC)
    info = machine_info()
    info["nginx_stream"] = stream is not None
    rounds: list[Measurement] = []
    results: list[Measurement] = []
    try:
        with workspace() as (tmp, procs):
            env = Env(tmp, procs, free_port(), [free_port() for _ in range(3)])
            info["backend"] = start_backends(env, "auto")
            for name in scenarios:
                order = list(systems)
                for rnd in range(args.rounds):
                    log(f"scenario {name}, round {rnd + 1}/{args.rounds}")
                    for system in order:
                        m = measure(env, system, SCENARIOS[name], args.duration, args.warmup)
                        m.round = rnd + 1
                        rounds.append(m)
                    order = order[1:] + order[:1]
                for system in systems:
                    results.append(
                        median_of([r for r in rounds if r.scenario == name and r.system == system])
                    )
    except KeyboardInterrupt:
        log("interrupted; all processes stopped")
        return 130
    info["loadavg_end"] = loadavg()
    parts = [
        f"# poise L4 benchmark — {started:%Y-%m-%d %H:%M:%S} UTC",
        "",
        f"{info['nproc']} CPUs ({info['cpu_model']}), kernel {info['kernel']}, "
        f"Python {info['python']}; {info['haproxy']}; {info['nginx']}; {info['wrk']}; "
        f"backends: {info['backend']}; commit {info['git_commit'] or 'none'}; "
        f"**load average {info['loadavg_start']} at start, {info['loadavg_end']} at end** "
        "(a shared machine: other engineers' work ran alongside); "
        f"warm-up {args.warmup:g}s, measured {args.duration:g}s, {args.rounds} rounds in "
        f"rotating order, medians shown; proxy on cpu{CPU_PROXY}, backends + wrk on "
        f"cpu{CPU_LOAD}. nginx stream: "
        + ("measured" if "nginx" in systems else "not available (no stream module installed)")
        + (f"; poise-base: poise from {BASE_SRC[0]}" if "poise-base" in systems else ""),
        "",
    ]
    for name in scenarios:
        parts.append(l4_table(name, [r for r in results if r.scenario == name]))
    markdown = "\n".join(parts)
    print(markdown)
    payload = {
        "started_utc": started.isoformat(),
        "args": vars(args),
        "machine": info,
        "results": [asdict(r) for r in results],
        "rounds": [asdict(r) for r in rounds],
    }
    name = f"l4-{started:%Y%m%dT%H%M%SZ}.json"
    run.save_results(args.out, name, payload, "l4-latest.md", markdown)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
