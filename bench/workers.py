#!/usr/bin/env python3
"""poise --workers 2 vs --workers 1 (and nginx with 2 worker processes vs 1, for scale).

    python bench/workers.py [--scenario small] [--duration 8] [--warmup 2] [--rounds 3]

Reuses bench/run.py's machinery (nginx backends, wrk, CPU-µs per request over the whole
process tree: supervisor and workers). Nothing is pinned: two workers need both cores, which
the backends and wrk share with them, so on a 2-core box the rps cannot double; what the
workers target (docs/benchmarking.md) is in CPU terms: N workers >= 0.9 x N x one worker, i.e.
CPU-µs per request with N workers <= that of one worker / 0.9. Writes
bench/results/workers-<stamp>.json and workers-latest.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # bench/run.py

SYSTEMS = ("poise-w1", "poise-w2", "nginx-w1", "nginx-w2")


def start_system(env: run.Env, system: str, logname: str) -> subprocess.Popen[bytes]:
    kind, workers = system.split("-w")
    if kind == "poise":
        conf = run.poise_conf(env.tmp, env.front_port, env.backend_ports)
        penv = dict(os.environ)
        src = str(run.POISE_SRC)
        penv["PYTHONPATH"] = src + (os.pathsep + penv["PYTHONPATH"] if "PYTHONPATH" in penv else "")
        argv = [sys.executable, "-m", "poise", "run", "-c", str(conf), "--workers", workers]
        return env.procs.start(logname, argv, None, cwd=run.REPO, env=penv)
    conf = run.nginx_proxy_conf(env.tmp, env.front_port, env.backend_ports)
    text = conf.read_text().replace("worker_processes 1;", f"worker_processes {workers};")
    if workers != "1":
        text = text.replace(" backlog=4096;", " reuseport backlog=4096;", 1)
    conf.write_text(text)
    return env.procs.start(logname, run.nginx_argv(env.tmp, conf, "nginx"), None)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", default="small", choices=sorted(run.SCENARIOS))
    p.add_argument("--duration", type=float, default=8)
    p.add_argument("--warmup", type=float, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(run.BENCH_DIR / "results"))
    args = p.parse_args()
    run.start_system = start_system  # measure() starts systems through this
    scenario = run.SCENARIOS[args.scenario]
    started = dt.datetime.now(dt.UTC)
    info = run.machine_info()
    rounds: list[run.Measurement] = []
    with run.workspace() as (tmp, procs):
        procs.pin = False
        env = run.Env(tmp, procs, run.free_port(), [run.free_port() for _ in range(3)])
        run.POISE_SRC = run.build_compiled(tmp)
        info["poise_build"] = "compiled"
        info["backend"] = run.start_backends(env, "nginx")
        order = list(SYSTEMS)
        for rnd in range(args.rounds):
            run.log(f"round {rnd + 1}/{args.rounds}")
            for system in order:
                m = run.measure(env, system, scenario, args.duration, args.warmup)
                m.round = rnd + 1
                rounds.append(m)
            order = order[1:] + order[:1]
    info["loadavg_end"] = run.loadavg()
    rows = {s: run.median_of([m for m in rounds if m.system == s]) for s in SYSTEMS}

    def ratio(a: str, b: str, key: str) -> str:
        x, y = getattr(rows[a], key), getattr(rows[b], key)
        return f"{x / y:.2f}" if x and y else "—"

    lines = [
        f"# poise workers — {started:%Y-%m-%d %H:%M:%S} UTC",
        "",
        f"{info['nproc']} CPUs ({info['cpu_model']}), Python {info['python']}; {info['nginx']}; "
        f"commit {info['git_commit']}; load average {info['loadavg_start']} at start, "
        f"{info['loadavg_end']} at end; {scenario.name} scenario (GET {scenario.path}, "
        f"wrk -t1 -c{scenario.connections}); nothing pinned (backends, wrk and the proxy share "
        f"both cores); warm-up {args.warmup:g}s, measured {args.duration:g}s, {args.rounds} "
        "rounds in rotating order, medians shown. CPU-µs/req covers every process of the "
        "system (poise: supervisor + workers).",
        "",
        "| system | rps | p50 | p99 | CPU-µs/req | CPU used (cores) | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in SYSTEMS:
        r = rows[s]
        if not r.ok:
            lines.append(f"| {s} | FAILED: {(r.error or '').splitlines()[0][:120]} |||||")
            continue
        util = [m.cpu_utilisation for m in rounds if m.system == s and m.cpu_utilisation]
        cores = sorted(util)[len(util) // 2] if util else None
        lines.append(
            f"| {s} | {r.rps:,.0f} | {run._ms_fmt(r.latency_ms.get('50'))} "
            f"| {run._ms_fmt(r.latency_ms.get('99'))} | {run._fmt(r.cpu_us_per_req, '.1f')} "
            f"| {run._fmt(cores, '.2f')} | {r.errors} |"
        )
    lines += [
        "",
        f"- poise: 2 workers / 1 worker: rps x{ratio('poise-w2', 'poise-w1', 'rps')}, "
        f"CPU-µs per request x{ratio('poise-w2', 'poise-w1', 'cpu_us_per_req')} "
        "(target <= 1.11, i.e. 2 workers >= 0.9 x 2 x one worker per CPU-µs)",
        f"- nginx: 2 workers / 1 worker: rps x{ratio('nginx-w2', 'nginx-w1', 'rps')}, "
        f"CPU-µs per request x{ratio('nginx-w2', 'nginx-w1', 'cpu_us_per_req')}",
        "",
    ]
    markdown = "\n".join(lines)
    print(markdown)
    payload = {
        "started_utc": started.isoformat(),
        "args": vars(args),
        "machine": info,
        "results": {s: asdict(r) for s, r in rows.items()},
        "rounds": [asdict(m) for m in rounds],
    }
    name = f"workers-{started:%Y%m%dT%H%M%SZ}.json"
    run.save_results(args.out, name, payload, "workers-latest.md", markdown)
    return 0 if all(r.ok for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
