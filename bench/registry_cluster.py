"""The registry at scale on etcd: 3 poise nodes on a 3-member etcd cluster, all on loopback.
Run through ``python bench/registry.py --store etcd`` (see bench/README.md).

1. register on node A -> the first request routed by node B (and deregister on A -> node B
   answers 503), ``--rounds`` of each, A and B taking turns among the three nodes;
2. ``--instances`` instances with a 10 s TTL, each registered through one node (service
   ``load{k}`` for node k), then wrk against every node at once for ``--duration`` s, each
   sending heartbeats for its own node's instances: heartbeats/s summed, etcd's own put and
   delete counts (its ``/metrics``) before and after, and every instance still listed by every
   node afterwards; then the same with every heartbeat sent to a random node (forwarded);
3. under that load, ``kill -9`` of node 2: how long until node 0 no longer lists node 2's
   instances (bound: the node TTL), while node 0's and node 1's own stay listed throughout;
4. under load again, kill the etcd leader: failed heartbeats, failed registrations (a
   registration loop on node 0), failed requests through node 1's listener, and whether every
   registration made is listed afterwards.

Proxies' registry APIs and listeners on 127.0.0.1; poise nodes pinned to cpu1 when taskset
is there, wrk and the backends to cpu0; etcd members unpinned (they are the shared store).
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import re
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from run import (
    CPU_LOAD,
    CPU_PROXY,
    LOOPBACK,
    START_DEADLINE,
    BenchError,
    Processes,
    free_port,
    log,
    parse_wrk,
    wait_accepting,
)

from poise.testing.etcd import EtcdCluster
from poise.testing.procs import BackendProcess

NODES = 3
NODE_TTL = 5.0  # seconds: each node's etcd lease (shorter than the default 10 s: a short run)
INSTANCE_TTL = "10s"
POLL_DEADLINE = 5.0


class Node:
    """One poise process: its registry API and its listener, on keep-alive connections."""

    def __init__(self, k: int, token: str) -> None:
        self.k = k
        self.name = f"n{k}"
        self.port, self.api_port = free_port(), free_port()
        self.token = token
        self.proc: subprocess.Popen[bytes] | None = None
        self._local = threading.local()

    def config(self, tmp: Path, endpoints: list[str]) -> Path:
        # each node talks to a different member first
        ordered = endpoints[self.k % len(endpoints) :] + endpoints[: self.k % len(endpoints)]
        doc = {
            "listeners": [{"name": "web", "listen": f"{LOOPBACK}:{self.port}", "upstream": "app"}],
            "upstreams": {"app": {"service": "bench"}},
            "registry": {
                "store": "etcd", "endpoints": ordered, "prefix": "/bench",
                "listen": f"{LOOPBACK}:{self.api_port}", "token": self.token,
                "node": self.name, "node_ttl": f"{NODE_TTL:g}s",
            },
            "log": {"level": "warning"},
        }  # fmt: skip
        path = tmp / f"poise-{self.name}.json"
        path.write_text(json.dumps(doc, indent=2))
        return path

    def _conn(self, which: str) -> http.client.HTTPConnection:
        conn = getattr(self._local, which, None)
        if conn is None:
            port = self.api_port if which == "api" else self.port
            conn = http.client.HTTPConnection(LOOPBACK, port, timeout=10)
            setattr(self._local, which, conn)
        return conn

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        data = None if body is None else json.dumps(body).encode()
        conn = self._conn("api")
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
        except (OSError, http.client.HTTPException):
            conn.close()
            self._local.api = None
            raise
        return resp.status, (json.loads(payload) if payload else None)

    def get(self) -> int:
        conn = self._conn("lb")
        try:
            conn.request("GET", "/")
            resp = conn.getresponse()
            resp.read()
        except (OSError, http.client.HTTPException):
            conn.close()
            self._local.lb = None
            raise
        if resp.getheader("connection", "").lower() == "close":
            conn.close()
            self._local.lb = None
        return resp.status

    def counts(self) -> dict[str, int]:
        status, data = self.call("GET", "/v1/services")
        if status != 200:
            raise BenchError(f"node {self.name}: GET /v1/services -> {status}")
        return dict(data["services"])

    def until(self, status: int, t0: float) -> float:
        while (got := self.get()) != status:
            if time.perf_counter() - t0 > POLL_DEADLINE:
                raise BenchError(f"node {self.name} still answered {got}, not {status}")
        return time.perf_counter() - t0


def etcd_counts(url: str) -> dict[str, float]:
    """etcd's own counters of writes (``/metrics`` of one member: every member applies all)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for name in ("etcd_mvcc_put_total", "etcd_mvcc_delete_total", "etcd_mvcc_txn_total",
                 "etcd_server_proposals_committed_total"):  # fmt: skip
        m = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
        out[name] = float(m.group(1)) if m else float("nan")
    return out


def _diff(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after}


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def summary(ms: list[float]) -> dict[str, float]:
    import statistics

    return {"p50_ms": round(statistics.median(ms), 3), "p99_ms": round(pct(ms, 99), 3),
            "max_ms": round(max(ms), 3), "n": len(ms)}  # fmt: skip


WRK_SCRIPT = """
wrk.method = "PUT"
wrk.headers["Authorization"] = "Bearer %s"
local nodes = %d
local n = %d
local mine = %d
request = function()
  local i = math.random(0, n - 1)
  local k = mine
  if k < 0 then k = i %% nodes end
  if (i %% nodes) ~= k then i = i - (i %% nodes) + k end
  if i >= n then i = k end
  return wrk.format(nil, "/v1/services/load" .. k .. "/instances/h" .. i .. "/heartbeat")
end
"""


def start_wrk(tmp: Path, node: Node, n: int, seconds: float, pin: bool, *, mine: bool) -> Any:
    """wrk sending heartbeats to ``node``: for its own instances (``mine``), or for any."""
    script = tmp / f"hb-{node.name}-{int(mine)}.lua"
    script.write_text(WRK_SCRIPT % (node.token, NODES, n, node.k if mine else -1))
    argv = ["wrk", "-t1", "-c16", f"-d{max(1, round(seconds))}s", "-s", str(script),
            f"http://{LOOPBACK}:{node.api_port}"]  # fmt: skip
    if pin:
        argv = ["taskset", "-c", CPU_LOAD, *argv]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_wrk(procs: list[Any]) -> dict[str, Any]:
    total = {"rps": 0.0, "requests": 0, "errors": 0, "non_2xx_3xx": 0, "per_node_rps": []}
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        if proc.returncode != 0:
            raise BenchError(f"wrk failed: {err[-500:]}")
        w = parse_wrk(out)
        total["rps"] += w.rps
        total["requests"] += w.requests
        total["errors"] += w.errors
        total["non_2xx_3xx"] += w.non_2xx_3xx
        total["per_node_rps"].append(round(w.rps))
    total["rps"] = round(total["rps"])
    return total


def register_all(nodes: list[Node], n: int) -> float:
    """Register ``n`` instances, instance i through node i % 3 (service load{k}); seconds."""

    def one(i: int) -> None:
        node = nodes[i % NODES]
        body = {"host": LOOPBACK, "port": 10000 + i % 50000, "ttl": INSTANCE_TTL}
        status, _ = node.call("PUT", f"/v1/services/load{node.k}/instances/h{i}", body)
        if status != 200:
            raise BenchError(f"registering h{i} through {node.name} -> {status}")

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        list(pool.map(one, range(n)))
    return time.perf_counter() - t0


def expected(n: int) -> dict[str, int]:
    return {f"load{k}": len(range(k, n, NODES)) for k in range(NODES)}


def routing(nodes: list[Node], backends: list[BackendProcess], rounds: int) -> dict[str, Any]:
    reg: list[float] = []
    dereg: list[float] = []
    calls: list[float] = []  # the PUT itself, answered once etcd has it
    for node in nodes:
        if node.get() != 503:
            raise BenchError(f"node {node.name}: the service should start empty (503)")
    for i in range(rounds):
        a, b = nodes[i % NODES], nodes[(i + 1) % NODES]
        path = f"/v1/services/bench/instances/r{i}"
        t0 = time.perf_counter()
        status, _ = a.call("PUT", path, {"host": LOOPBACK, "port": backends[i % 4].port})
        if status != 200:
            raise BenchError(f"register through {a.name} -> {status}")
        calls.append((time.perf_counter() - t0) * 1e3)
        reg.append(b.until(200, t0) * 1e3)
        t0 = time.perf_counter()
        if a.call("DELETE", path)[0] != 200:
            raise BenchError("deregister failed")
        dereg.append(b.until(503, t0) * 1e3)
    return {"register_to_routed_elsewhere": summary(reg), "deregister_to_gone_elsewhere":
            summary(dereg), "register_call": summary(calls)}  # fmt: skip


def run(tmp: Path, procs: Processes, args: Any) -> dict[str, Any]:
    import sys

    result: dict[str, Any] = {"nodes": NODES, "node_ttl_s": NODE_TTL, "etcd_members": 3}
    cpu = int(CPU_LOAD) if procs.pin else None
    backends = [BackendProcess(free_port(), tmp / f"b{i}.log", f"b{i}", cpu=cpu) for i in range(4)]
    token = "bench-cluster-token-0123456789"
    nodes = [Node(k, token) for k in range(NODES)]
    with EtcdCluster(3) as cluster:
        try:
            for b in backends:
                b.start()
            for node in nodes:
                argv = [sys.executable, "-m", "poise", "run", "-c",
                        str(node.config(tmp, cluster.endpoints))]  # fmt: skip
                node.proc = procs.start(f"poise-{node.name}", argv, CPU_PROXY)
            for node in nodes:
                assert node.proc is not None
                wait_accepting(node.port, node.proc, time.monotonic() + START_DEADLINE)
                wait_accepting(node.api_port, node.proc, time.monotonic() + START_DEADLINE)
            log(f"register on one node -> routed by another, {args.rounds} rounds")
            result.update(routing(nodes, backends, args.rounds))

            n = args.instances
            log(f"registering {n} instances with a {INSTANCE_TTL} TTL through {NODES} nodes")
            result["register_seconds"] = round(register_all(nodes, n), 2)
            want = expected(n)
            seconds = args.duration
            for mode, mine in (("own_node", True), ("any_node", False)):
                log(f"heartbeats ({mode}) for {seconds:g}s")
                before = etcd_counts(cluster.endpoints[0])
                rev0 = nodes[0].call("GET", "/v1/services")[1]["revision"]
                ws = [start_wrk(tmp, node, n, seconds, procs.pin, mine=mine) for node in nodes]
                hb = finish_wrk(ws)
                hb["etcd_writes"] = _diff(etcd_counts(cluster.endpoints[0]), before)
                listed = [node.counts() for node in nodes]
                hb["listed_by_each_node"] = [sum(c.get(s, 0) for s in want) for c in listed]
                hb["all_listed"] = all({s: c.get(s, 0) for s in want} == want for c in listed)
                rev1 = nodes[0].call("GET", "/v1/services")[1]["revision"]
                hb["registry_revision_moved_by"] = rev1 - rev0
                result[f"heartbeats_{mode}"] = hb

            log("kill -9 of node n2 under heartbeat load on n0 and n1")
            result["node_death"] = node_death(tmp, procs, nodes, n, want)
            log("killing the etcd leader under load")
            result["leader_kill"] = leader_kill(tmp, procs, cluster, nodes[:2], n)
        finally:
            for b in backends:
                b.stop()
    return result


def node_death(tmp: Path, procs: Processes, nodes: list[Node], n: int, want: dict[str, int]) -> Any:
    survivors, victim = nodes[:2], nodes[2]
    ws = [start_wrk(tmp, node, n, 4 + NODE_TTL + 6, procs.pin, mine=True) for node in survivors]
    time.sleep(2.0)
    assert victim.proc is not None
    victim.proc.kill()
    killed = time.perf_counter()
    gone_after = None
    dips = 0
    samples = 0
    while time.perf_counter() - killed < NODE_TTL + 6:
        counts = survivors[0].counts()
        samples += 1
        if any(counts.get(f"load{k}", 0) != want[f"load{k}"] for k in (0, 1)):
            dips += 1
        if gone_after is None and counts.get("load2", 0) == 0:
            gone_after = time.perf_counter() - killed
        time.sleep(0.05)
    hb = finish_wrk(ws)
    return {
        "victim_instances": want["load2"],
        "gone_from_survivor_after_s": None if gone_after is None else round(gone_after, 2),
        "bound_s": NODE_TTL + 1,
        "survivor_samples": samples,
        "samples_with_survivors_instances_missing": dips,
        "heartbeats_during": hb,
    }


def leader_kill(tmp: Path, procs: Processes, cluster: Any, nodes: list[Node], n: int) -> Any:
    ws = [start_wrk(tmp, node, n, 12, procs.pin, mine=True) for node in nodes]
    failures = {"register": 0, "proxied": 0}
    made: list[str] = []
    stop = threading.Event()

    def registrations() -> None:
        i = 0
        while not stop.is_set():
            path = f"/v1/services/during/instances/d{i}"
            try:
                status, _ = nodes[0].call("PUT", path, {"host": LOOPBACK, "port": 20000 + i})
            except (OSError, http.client.HTTPException):
                status = 0
            if status == 200:
                made.append(f"d{i}")
            else:
                failures["register"] += 1
            i += 1
            time.sleep(0.02)

    def proxied() -> None:
        while not stop.is_set():
            try:
                ok = nodes[1].get() in (200, 503)  # 503: no "bench" instance is registered
            except (OSError, http.client.HTTPException):
                ok = False
            failures["proxied"] += not ok
            time.sleep(0.005)

    threads = [threading.Thread(target=registrations), threading.Thread(target=proxied)]
    for t in threads:
        t.start()
    time.sleep(3.0)
    leader = cluster.leader()
    leader.kill()
    t0 = time.perf_counter()
    new_leader = cluster.leader()
    elected = time.perf_counter() - t0
    time.sleep(6.0)
    stop.set()
    for t in threads:
        t.join()
    hb = finish_wrk(ws)
    listed = []
    for node in nodes:
        status, data = node.call("GET", "/v1/services/during")
        listed.append(sorted(i["id"] for i in data["instances"]) if status == 200 else None)
    return {
        "killed": leader.name,
        "new_leader": new_leader.name,
        "elected_after_s": round(elected, 2),
        "registrations": len(made),
        "failed_registrations": failures["register"],
        "lost_registrations": [len(set(made) - set(x or [])) for x in listed],
        "failed_proxied_requests": failures["proxied"],
        "heartbeats": hb,
    }


def markdown(head: str, r: dict[str, Any]) -> str:
    reg, dereg = r["register_to_routed_elsewhere"], r["deregister_to_gone_elsewhere"]
    call = r["register_call"]
    own, anyn = r["heartbeats_own_node"], r["heartbeats_any_node"]
    death, lk = r["node_death"], r["leader_kill"]

    def writes(hb: dict[str, Any]) -> str:
        w = hb["etcd_writes"]
        puts, dels = w["etcd_mvcc_put_total"], w["etcd_mvcc_delete_total"]
        return f"etcd puts +{puts:.0f}, deletes +{dels:.0f}, txns +{w['etcd_mvcc_txn_total']:.0f}"

    return "\n".join([
        head,
        "",
        f"{r['etcd_members']}-member etcd cluster and {r['nodes']} poise nodes on loopback "
        f"(node lease {r['node_ttl_s']:g} s).",
        "",
        "| measure | p50 | p99 | max | target |",
        "|---|---:|---:|---:|---|",
        f"| register on node A → first request routed by node B ({reg['n']} rounds) | "
        f"{reg['p50_ms']:.2f} ms | {reg['p99_ms']:.2f} ms | {reg['max_ms']:.2f} ms | "
        "p50 < 5 ms, p99 < 20 ms |",
        f"| deregister on A → B answers 503 ({dereg['n']} rounds) | {dereg['p50_ms']:.2f} ms "
        f"| {dereg['p99_ms']:.2f} ms | {dereg['max_ms']:.2f} ms | |",
        f"| of which the register call on A (answered once etcd has it) | "
        f"{call['p50_ms']:.2f} ms | {call['p99_ms']:.2f} ms | {call['max_ms']:.2f} ms | |",
        "",
        f"Heartbeats, {sum(own['listed_by_each_node']) // r['nodes']:,} instances "
        f"(registered in {r['register_seconds']:g} s), a {INSTANCE_TTL} TTL, wrk -c16 on "
        f"each node:",
        "",
        "| heartbeats sent to | heartbeats/s summed (per node) | errors | etcd writes meanwhile "
        "| every instance listed by every node |",
        "|---|---:|---:|---|---|",
        f"| the instance's own node | **{own['rps']:,}** "
        f"({', '.join(map(str, own['per_node_rps']))}) "
        f"| {own['errors'] + own['non_2xx_3xx']} | {writes(own)} | {own['all_listed']} |",
        f"| any node (2 in 3 forwarded) | **{anyn['rps']:,}** "
        f"({', '.join(map(str, anyn['per_node_rps']))}) | {anyn['errors'] + anyn['non_2xx_3xx']} "
        f"| {writes(anyn)} | {anyn['all_listed']} |",
        "",
        f"kill -9 of node n2 ({death['victim_instances']:,} instances): gone from n0's listing "
        f"after **{death['gone_from_survivor_after_s']} s** (bound: node TTL + 1 s = "
        f"{death['bound_s']:g} s); n0's and n1's own instances missing in "
        f"{death['samples_with_survivors_instances_missing']} of {death['survivor_samples']} "
        f"samples; heartbeats meanwhile {death['heartbeats_during']['rps']:,}/s with "
        f"{death['heartbeats_during']['errors'] + death['heartbeats_during']['non_2xx_3xx']} "
        "errors.",
        "",
        f"etcd leader {lk['killed']} killed under load ({lk['new_leader']} led after "
        f"{lk['elected_after_s']} s): {lk['failed_registrations']} failed and "
        f"{max(lk['lost_registrations'])} lost of {lk['registrations']} registrations, "
        f"{lk['failed_proxied_requests']} failed requests through a listener, heartbeats "
        f"{lk['heartbeats']['rps']:,}/s with "
        f"{lk['heartbeats']['errors'] + lk['heartbeats']['non_2xx_3xx']} errors.",
        "",
    ])  # fmt: skip
