#!/usr/bin/env python3
"""Bulk transfer through an L4 (TCP) proxy: 1 GiB down and 1 GiB up, byte-exact, MB/s.

    python bench/l4bulk.py [--size-mib 1024] [--rounds 3] [--systems poise,haproxy]
                           [--src poise=src,before=/tmp/old/src]

A backend (this script with ``--serve``, pinned to cpu0 with the client) sends ``size`` bytes
of a fixed pseudo-random pattern on ``D`` requests and on ``U`` requests reads ``size`` bytes
and answers their SHA-256. The client (cpu0) checks every byte it gets (SHA-256 of the whole
stream against the pattern's) and the backend's digest of what it sent. The proxy (cpu1) is
poise's TCP listener (one per ``--src`` entry: a label and a source tree, to compare two
trees in one run) or HAProxy ``mode tcp``, started fresh per transfer, one at a time in
rotating order. Per system: MB/s (medians of the rounds) and the proxy's CPU seconds per GiB.
The client and the backend share cpu0 and hash what they move, so MB/s may be bound by cpu0;
proxy CPU per GiB is the figure that tells proxies apart then.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path[:0] = [str(BENCH_DIR)]

import run  # noqa: E402

import l4  # noqa: E402

BLOCK = 1 << 20
_HEAD = struct.Struct("!cQ")


def pattern() -> bytes:
    return hashlib.shake_256(b"poise l4bulk").digest(BLOCK)


def expected_digest(size: int) -> bytes:
    block, h = pattern(), hashlib.sha256()
    for _ in range(size // BLOCK):
        h.update(block)
    h.update(block[: size % BLOCK])
    return h.digest()


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed early")
        data += chunk
    return data


def send_pattern(sock: socket.socket, size: int) -> None:
    view = memoryview(pattern())
    while size > 0:
        n = min(size, BLOCK)
        sock.sendall(view[:n])
        size -= n


def hash_stream(sock: socket.socket, size: int) -> bytes:
    h, buf = hashlib.sha256(), bytearray(BLOCK)
    view, got = memoryview(buf), 0
    while got < size:
        n = sock.recv_into(view, min(BLOCK, size - got))
        if not n:
            raise ConnectionError(f"closed after {got} of {size} bytes")
        h.update(view[:n])
        got += n
    return h.digest()


def serve(port: int) -> None:
    srv = socket.create_server((run.LOOPBACK, port), backlog=64)
    while True:
        conn, _ = srv.accept()
        with conn:
            try:
                what, size = _HEAD.unpack(recv_exact(conn, _HEAD.size))
            except ConnectionError:
                continue  # a TCP health check
            if what == b"D":
                send_pattern(conn, size)
            else:
                conn.sendall(hash_stream(conn, size))


def transfer(port: int, what: bytes, size: int) -> float:
    """One transfer through the proxy; its seconds. Raises unless byte-exact."""
    want = expected_digest(size)
    t0 = time.monotonic()
    with socket.create_connection((run.LOOPBACK, port)) as s:
        s.sendall(_HEAD.pack(what, size))
        if what == b"D":
            got = hash_stream(s, size)
        else:
            send_pattern(s, size)
            s.shutdown(socket.SHUT_WR)
            got = recv_exact(s, 32)
    wall = time.monotonic() - t0
    if got != want:
        raise run.BenchError(f"{what.decode()}: the bytes differ (sha256 {got.hex()[:16]}...)")
    return wall


def start_proxy(env: run.Env, system: str, src: str | None) -> subprocess.Popen[bytes]:
    if system == "haproxy":
        conf = l4.haproxy_tcp_conf(env.tmp, env.front_port, env.backend_ports)
        return env.procs.start("haproxy", ["haproxy", "-db", "-f", str(conf)], run.CPU_PROXY)
    conf = l4.poise_tcp_conf(env.tmp, env.front_port, env.backend_ports)
    penv = dict(os.environ)
    penv["PYTHONPATH"] = src or str(REPO / "src")
    argv = [sys.executable, "-m", "poise", "run", "-c", str(conf)]
    return env.procs.start(system, argv, run.CPU_PROXY, cwd=REPO, env=penv)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="1 GiB through an L4 proxy, byte-exact")
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--systems", default="poise,haproxy")
    p.add_argument("--src", default="", help="label=source tree, comma-separated (poise)")
    p.add_argument("--out", default=str(BENCH_DIR / "results"))
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0
    size = args.size_mib * BLOCK
    trees = dict(item.split("=", 1) for item in args.src.split(",") if item)
    systems: list[tuple[str, str | None]] = []
    for name in args.systems.split(","):
        if name == "poise" and trees:
            systems += [(f"poise:{label}", tree) for label, tree in trees.items()]
        else:
            systems.append((name, None))
    if run.can_pin():
        os.sched_setaffinity(0, {int(run.CPU_LOAD)})
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    info = run.machine_info()
    with run.workspace() as (tmp, procs):
        env = run.Env(tmp, procs, run.free_port(), [run.free_port()])
        backend = [sys.executable, __file__, "--serve", str(env.backend_ports[0])]
        procs.start("backend", backend, run.CPU_LOAD)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((run.LOOPBACK, env.backend_ports[0]), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        order = list(systems)
        for rnd in range(args.rounds):
            for label, tree in order:
                for what in (b"D", b"U"):
                    run.wait_port_free(env.front_port)
                    proxy = start_proxy(env, label.split(":")[0], tree)
                    try:
                        run.wait_accepting(env.front_port, proxy, time.monotonic() + 10)
                        time.sleep(0.5)  # a first health check
                        before = run.cpu_ticks(run.process_tree(proxy.pid))
                        wall = transfer(env.front_port, what, size)
                        after = run.cpu_ticks(run.process_tree(proxy.pid))
                    finally:
                        procs.stop(proxy)
                    cpu = sum(t - before.get(pid, 0) for pid, t in after.items()) / run.CLK_TCK
                    mbs = size / wall / 1e6
                    gib = size / (1 << 30)
                    results.setdefault((label, what.decode()), []).append((mbs, cpu / gib))
                    run.log(
                        f"round {rnd + 1} {label} {'down' if what == b'D' else 'up'}: "
                        f"{mbs:,.0f} MB/s, proxy {cpu / gib:.2f} CPU-s/GiB, byte-exact"
                    )
            order = order[1:] + order[:1]
    info["loadavg_end"] = run.loadavg()
    lines = [
        f"# L4 bulk transfer: {args.size_mib} MiB each way, byte-exact (SHA-256 checked)",
        "",
        f"{info['nproc']} CPUs, load average {info['loadavg_start']} at start, "
        f"{info['loadavg_end']} at end; commit {info['git_commit']}; proxy on cpu1, client and "
        f"backend on cpu0; medians of {args.rounds} rounds, every transfer byte-exact.",
        "",
        "| system | down MB/s | down proxy CPU-s/GiB | up MB/s | up proxy CPU-s/GiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, _ in systems:
        cells = []
        for what in ("D", "U"):
            rows = results[(label, what)]
            cells.append(f"{statistics.median(r[0] for r in rows):,.0f}")
            cells.append(f"{statistics.median(r[1] for r in rows):.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    md = "\n".join(lines) + "\n"
    print(md)
    payload = {
        "args": vars(args),
        "machine": info,
        "rounds": {f"{k[0]} {k[1]}": v for k, v in results.items()},
    }
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    run.save_results(args.out, f"l4bulk-{stamp}.json", payload, "l4bulk-latest.md", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
