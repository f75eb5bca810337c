#!/usr/bin/env python3
"""HTTPS through poise vs nginx: keep-alive requests/s and new handshakes/s.

    python bench/tls.py [--duration 8] [--warmup 2] [--rounds 3] [--out bench/results]

Same layout as bench/run.py (whose helpers this reuses): 3 nginx backends and wrk on cpu0, the
TLS-terminating proxy on cpu1, one system at a time on the same front port, rounds in rotating
order, medians reported. Both proxies get the same certificate (ECDSA P-256, made here with the
openssl CLI) and their default TLS settings, which negotiate the same protocol and cipher (both
are recorded). Scenarios:

* ``keepalive``: ``wrk -t1 -c64`` over 64 long-lived TLS connections (bulk encryption + proxying).
* ``handshake``: the same with ``Connection: close``, so every request is a new TCP connection
  and a TLS handshake: requests/s = handshakes/s. wrk offers each new connection the session
  of its last one, so these are resumptions wherever the proxy issues tickets (all three do).
* ``full``: ``handshake`` with session resumption off in each proxy (poise
  ``session_resumption: false``; nginx ``ssl_session_tickets off`` and ``ssl_session_cache
  off``; HAProxy ``no-tls-tickets`` and ``tune.ssl.cachesize 0``): a full handshake per
  request, certificate signature included.
* ``h2``: HTTP/2 clients: ``h2load -c16 -m10`` (Debian's nghttp2-client) over TLS, ALPN
  ``h2``: 16 connections with 10 streams in flight each, HTTP/1.1 keep-alive backends
  (poise's HTTPS listeners offer h2 by default; nginx ``listen ... ssl http2``; HAProxy
  ``alpn h2,http/1.1``). h2load reports no percentiles: the latency column is its mean.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as base

SYSTEMS = ("poise", "nginx", "haproxy")
ALL_SYSTEMS = ("poise", "poise-base", "nginx", "haproxy")  # poise-base: --base-src's tree
SCENARIOS = {
    "keepalive": "64 keep-alive TLS connections",
    "handshake": "64 connections, Connection: close (a handshake per request, resumed)",
    "full": "64 connections, Connection: close, resumption off (a full handshake per request)",
    "h2": "HTTP/2: h2load -c16 -m10 (16 TLS connections, 10 streams in flight on each)",
}
NEW_CONNECTIONS = ("handshake", "full")


def make_certificate(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "bench.crt", tmp / "bench.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=bench.test",
         "-addext", "subjectAltName=DNS:bench.test,IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    key.chmod(0o644)  # nginx workers may read it as another user
    return cert, key


def poise_conf(
    tmp: Path, port: int, backends: list[int], cert: Path, key: Path, *, resume: bool
) -> Path:
    conf = tmp / "poise-tls.json"
    conf.write_text(json.dumps({
        "listeners": [{"name": "bench", "listen": f"{base.LOOPBACK}:{port}", "upstream": "bench",
                       "tls": {"cert": str(cert), "key": str(key),
                               "session_resumption": resume}}],
        "upstreams": {"bench": {
            "backends": [f"http://{base.LOOPBACK}:{b}" for b in backends],
            "health_check": {"interval": "2s"},
        }},
        "proxy": {"x_forwarded": True},
        "log": {"level": "warning"},
    }, indent=2))  # fmt: skip
    return conf


def nginx_conf(
    tmp: Path, port: int, backends: list[int], cert: Path, key: Path, *, resume: bool
) -> Path:
    main, http_common = base._nginx_parts(tmp, "nginx")
    servers = "".join(f"        server {base.LOOPBACK}:{b};\n" for b in backends)
    conf = tmp / "nginx-tls.conf"
    conf.write_text(
        main + "http {\n" + http_common + "    upstream u {\n" + servers + "        keepalive 64;\n"
        "        keepalive_requests 100000;\n"
        "    }\n"
        "    server {\n"
        f"        listen {base.LOOPBACK}:{port} ssl http2 backlog=4096;\n"
        f"        ssl_certificate {cert};\n"
        f"        ssl_certificate_key {key};\n"
        "        ssl_protocols TLSv1.2 TLSv1.3;\n"
        + ("" if resume else "        ssl_session_tickets off;\n        ssl_session_cache off;\n")
        + "        location / {\n"
        "            proxy_pass http://u;\n"
        "            proxy_http_version 1.1;\n"
        '            proxy_set_header Connection "";\n'
        "            proxy_set_header X-Forwarded-For $remote_addr;\n"
        "            proxy_set_header X-Forwarded-Proto https;\n"
        "        }\n"
        "    }\n"
        "}\n"
    )
    return conf


def haproxy_conf(
    tmp: Path, port: int, backends: list[int], cert: Path, key: Path, *, resume: bool
) -> Path:
    pem = tmp / "bench.pem"  # HAProxy takes the certificate and its key in one file
    pem.write_text(cert.read_text() + key.read_text())
    servers = "".join(
        f"    server s{i} {base.LOOPBACK}:{b} check inter 2s\n" for i, b in enumerate(backends, 1)
    )
    conf = tmp / "haproxy-tls.cfg"
    conf.write_text(
        "global\n    nbthread 1\n    maxconn 4096\n"
        + ("" if resume else "    tune.ssl.cachesize 0\n")
        + "\n"
        "defaults\n    mode http\n    timeout connect 3s\n"
        "    timeout client 60s\n    timeout server 60s\n    option forwardfor\n"
        "    http-reuse always\n\n"
        f"frontend fe\n    bind {base.LOOPBACK}:{port} ssl crt {pem} alpn h2,http/1.1"
        + ("" if resume else " no-tls-tickets")
        + "\n"
        "    default_backend be\n\n"
        "backend be\n    balance roundrobin\n    option httpchk HEAD /\n" + servers
    )
    return conf


def start(env: base.Env, system: str, cert: Path, key: Path, logname: str, *, resume: bool) -> Any:
    port, backends, tmp = env.front_port, env.backend_ports, env.tmp
    if system in ("poise", "poise-base"):
        conf = poise_conf(tmp, port, backends, cert, key, resume=resume)
        penv = dict(os.environ)
        src = base.BASE_SRC[0] if system == "poise-base" else str(base.REPO / "src")
        penv["PYTHONPATH"] = src + (os.pathsep + penv["PYTHONPATH"] if "PYTHONPATH" in penv else "")
        argv = [sys.executable, "-m", "poise", "run", "-c", str(conf)]
        return env.procs.start(logname, argv, base.CPU_PROXY, cwd=base.REPO, env=penv)
    if system == "haproxy":
        conf = haproxy_conf(tmp, port, backends, cert, key, resume=resume)
        return env.procs.start(logname, ["haproxy", "-db", "-f", str(conf)], base.CPU_PROXY)
    conf = nginx_conf(tmp, port, backends, cert, key, resume=resume)
    return env.procs.start(logname, base.nginx_argv(tmp, conf, "nginx"), base.CPU_PROXY)


def https_probe(port: int) -> dict[str, Any] | None:
    """One HTTPS GET /: the status and what was negotiated (None while not serving)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((base.LOOPBACK, port), timeout=2) as raw,
            ctx.wrap_socket(raw, server_hostname="bench.test") as s,
        ):
            s.sendall(b"GET / HTTP/1.1\r\nHost: bench.test\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            cipher = s.cipher()
            version = s.version()
    except (OSError, ssl.SSLError):
        return None
    ok = data.startswith(b"HTTP/1.1 200") and data.endswith(base.SMALL_BODY)
    return {"ok": ok, "version": version, "cipher": cipher[0] if cipher else None}


def run_h2load(env: base.Env, seconds: float) -> tuple[base.WrkResult, str]:
    argv = ["h2load", "-c16", "-m10", "-t1", "-D", str(max(1, round(seconds))),
            f"https://{base.LOOPBACK}:{env.front_port}/"]  # fmt: skip
    if env.procs.pin:
        argv = ["taskset", "-c", base.CPU_LOAD, *argv]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    out = done.stdout
    fin = re.search(r"finished in ([\d.]+)s, ([\d.]+) req/s", out)
    req = re.search(r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, "
                    r"(\d+) failed, (\d+) errored, (\d+) timeout", out)  # fmt: skip
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)", out)
    if done.returncode != 0 or not fin or not req or not codes:
        raise base.BenchError(f"h2load exited {done.returncode}: {(done.stderr or out)[-800:]}")
    if "Application protocol: h2" not in out:
        raise base.BenchError("h2load did not negotiate h2:\n" + out[-800:])
    result = base.WrkResult(
        rps=float(fin.group(2)),
        requests=int(req.group(2)),
        duration_s=float(fin.group(1)),
        latency_ms={},
        latency_avg_ms=base._ms(mean.group(1), mean.group(2)) if mean else None,
        socket_errors={
            "failed": int(req.group(3)),
            "errored": int(req.group(4)),
            "timeout": int(req.group(5)),
        },
        non_2xx_3xx=int(codes.group(3)) + int(codes.group(4)),
    )
    return result, out


def run_wrk(env: base.Env, scenario: str, seconds: float) -> tuple[base.WrkResult, str]:
    if scenario == "h2":
        return run_h2load(env, seconds)
    argv = ["wrk", "-t1", "-c64", f"-d{max(1, round(seconds))}s", "--latency"]
    if scenario in NEW_CONNECTIONS:
        argv += ["-H", "Connection: close"]
    argv.append(f"https://{base.LOOPBACK}:{env.front_port}/")
    if env.procs.pin:
        argv = ["taskset", "-c", base.CPU_LOAD, *argv]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout)[-800:]
        raise base.BenchError(f"wrk exited {done.returncode}: {tail}")
    return base.parse_wrk(done.stdout), done.stdout


def measure(
    env: base.Env, system: str, scenario: str, files: tuple[Path, Path], args: argparse.Namespace
) -> tuple[base.Measurement, dict[str, Any] | None]:
    cert, key = files
    m = base.Measurement(system=system, scenario=scenario)
    logname = f"{system}-{scenario}"
    proc = None
    negotiated = None
    try:
        base.wait_port_free(env.front_port)
        proc = start(env, system, cert, key, logname, resume=scenario != "full")
        deadline = time.monotonic() + base.START_DEADLINE
        base.wait_accepting(env.front_port, proc, deadline)
        while (negotiated := https_probe(env.front_port)) is None or not negotiated["ok"]:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise base.BenchError(f"not serving HTTPS ({negotiated})")
            time.sleep(0.1)
        m.rss_before_kib = base.status_kib(base.process_tree(proc.pid), "VmRSS")
        if args.warmup > 0:
            run_wrk(env, scenario, args.warmup)
        pids = base.process_tree(proc.pid)
        before = base.cpu_ticks(pids)
        w, raw = run_wrk(env, scenario, args.duration)
        after = base.cpu_ticks(base.process_tree(proc.pid))
        ticks = sum(t - before.get(pid, 0) for pid, t in after.items())
        m.cpu_s = ticks / base.CLK_TCK
        m.cpu_us_per_req = m.cpu_s * 1e6 / w.requests if w.requests else None
        m.cpu_utilisation = m.cpu_s / w.duration_s if w.duration_s else None
        m.peak_rss_kib = base.status_kib(list(after), "VmHWM")
        m.rss_growth_kib = m.peak_rss_kib - m.rss_before_kib
        m.rps, m.requests, m.duration_s = w.rps, w.requests, w.duration_s
        m.latency_ms, m.latency_avg_ms = w.latency_ms, w.latency_avg_ms
        m.socket_errors, m.non_2xx_3xx, m.errors = w.socket_errors, w.non_2xx_3xx, w.errors
        m.wrk_output = raw
        if proc.poll() is not None:
            raise base.BenchError(f"exited with status {proc.returncode} during the run")
        m.ok = True
    except (base.BenchError, OSError) as exc:
        m.error = str(exc)
        tail = env.procs.log_tail(logname) if proc is not None else ""
        if tail:
            m.error += f"\n--- {system} output (tail) ---\n{tail}"
        base.log(f"  {system}: FAILED: {m.error}")
    finally:
        if proc is not None:
            env.procs.stop(proc)
    return m, negotiated


def table(rows: list[base.Measurement], negotiated: dict[str, Any]) -> str:
    out = []
    for scenario, title in SCENARIOS.items():
        if scenario not in {r.scenario for r in rows}:
            continue
        by = {r.system: r for r in rows if r.scenario == scenario and r.ok}
        ref = by["nginx"].rps if "nginx" in by else None
        ref_cpu = by["nginx"].cpu_us_per_req if "nginx" in by else None
        out += [f"### {scenario}: {title}", "",
                "| system | rps | ×nginx | p50 | p99 | CPU-µs/req | CPU ×nginx | core used "  # noqa: RUF001
                "| peak RSS MiB | errors |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for system in ALL_SYSTEMS:
            if system not in {r.system for r in rows}:
                continue
            r = by.get(system)
            if r is None or r.rps is None:
                out.append(f"| {system} | FAILED | — | — | — | — | — | — | — | — |")
                continue
            ratio = base._fmt(r.rps / ref if ref else None, ".2f")
            cpu = r.cpu_us_per_req
            cpu_ratio = base._fmt(cpu / ref_cpu if cpu and ref_cpu else None, ".2f")
            rss = base._fmt(None if r.peak_rss_kib is None else r.peak_rss_kib / 1024, ".1f")
            out.append(
                f"| {system} | {r.rps:,.0f} | {ratio} | {base._ms_fmt(r.latency_ms.get('50'))} "
                f"| {base._ms_fmt(r.latency_ms.get('99'))} | {base._fmt(r.cpu_us_per_req, '.1f')} "
                f"| {cpu_ratio} | {base._fmt(r.cpu_utilisation, '.2f')} | {rss} | {r.errors} |"
            )
        out.append("")
    out.append("Negotiated (one probe per system): " + "; ".join(
        f"{s}: {n.get('version')} {n.get('cipher')}" for s, n in negotiated.items()
    ))  # fmt: skip
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="HTTPS: poise vs nginx and HAProxy (see bench/README.md)"
    )
    p.add_argument("--duration", type=float, default=8)
    p.add_argument("--warmup", type=float, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--systems", default=",".join(SYSTEMS), help=", ".join(ALL_SYSTEMS))
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=", ".join(SCENARIOS))
    p.add_argument(
        "--base-src", help="another poise source tree, measured as poise-base (before/after)"
    )
    p.add_argument("--out", default=str(base.BENCH_DIR / "results"))
    args = p.parse_args(argv)
    chosen = [s for s in args.systems.split(",") if s]
    scenarios = [s for s in args.scenarios.split(",") if s]
    if any(s not in ALL_SYSTEMS for s in chosen) or any(s not in SCENARIOS for s in scenarios):
        p.error("unknown system or scenario")
    if "poise-base" in chosen:
        if not args.base_src:
            p.error("poise-base needs --base-src")
        base.BASE_SRC[:] = [str(Path(args.base_src).resolve())]
    tools = ["wrk", "nginx", "openssl", *(["haproxy"] if "haproxy" in chosen else [])]
    if "h2" in scenarios:
        tools.append("h2load")
    for tool in tools:
        if not shutil.which(tool):
            print(f"{tool} is missing: apt-get install -y nginx-light wrk openssl "
                  "nghttp2-client", file=sys.stderr)  # fmt: skip
            return 2
    started = dt.datetime.now(dt.UTC)
    info = base.machine_info()
    info["openssl_python"] = ssl.OPENSSL_VERSION
    rounds: list[base.Measurement] = []
    negotiated: dict[str, Any] = {}
    with base.workspace() as (tmp, procs):
        env = base.Env(tmp, procs, base.free_port(), [base.free_port() for _ in range(3)])
        cert, key = make_certificate(tmp)
        info["backend"] = base.start_backends(env, "nginx")
        for scenario in scenarios:
            systems = list(chosen)
            for rnd in range(args.rounds):
                base.log(f"{scenario}, round {rnd + 1}/{args.rounds}")
                for system in systems:
                    m, neg = measure(env, system, scenario, (cert, key), args)
                    m.round = rnd + 1
                    rounds.append(m)
                    if neg:
                        negotiated[system] = neg
                systems.reverse()
    info["loadavg_end"] = base.loadavg()
    results = [
        base.median_of([r for r in rounds if r.scenario == sc and r.system == sy])
        for sc in scenarios
        for sy in chosen
    ]
    md = "\n".join([
        f"# poise HTTPS benchmark — {started:%Y-%m-%d %H:%M:%S} UTC", "",
        f"{info['nproc']} CPUs ({info['cpu_model']}), kernel {info['kernel']}, Python "
        f"{info['python']} ({info['openssl_python']}); {info['nginx']}; {info['haproxy']}; "
        f"{info['wrk']}; "
        f"commit {info['git_commit']}; load average {info['loadavg_start']} at start, "
        f"{info['loadavg_end']} at end (a shared machine: other work ran meanwhile); warm-up "
        f"{args.warmup:g}s, measured {args.duration:g}s, {args.rounds} rounds, medians; "
        "the same ECDSA P-256 certificate for each; proxy on cpu1, nginx backends + wrk on cpu0"
        + ("" if procs.pin else " (NOT pinned)"), "",
        table(results, negotiated),
    ])  # fmt: skip
    print(md)
    payload = {
        "started_utc": started.isoformat(),
        "args": vars(args),
        "machine": info,
        "negotiated": negotiated,
        "results": [asdict(r) for r in results],
        "rounds": [asdict(r) for r in rounds],
    }
    base.save_results(args.out, f"{started:%Y%m%dT%H%M%SZ}-tls.json", payload, "tls-latest.md", md)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
