#!/usr/bin/env python3
"""Pick cost of every policy at 3, 100 and 1000 backends (pure, no sockets).

A pick is what the proxy does per request: ``candidates(key)`` and taking the first.
Best of 5 rounds; prints a table and writes bench/results/policies-latest.md.

    python bench/policies.py [--picks 20000]
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from poise.balancing import build, new_load
from poise.config.model import PolicyConfig
from poise.models import Backend

POLICIES = [
    PolicyConfig("round_robin"),
    PolicyConfig("weighted_round_robin"),
    PolicyConfig("random"),
    PolicyConfig("weighted_random"),
    PolicyConfig("least_conn"),
    PolicyConfig("p2c"),
    PolicyConfig("peak_ewma"),
    PolicyConfig("hash", key="header:x-user"),
    PolicyConfig("consistent_hash", key="header:x-user", algorithm="ring"),
    PolicyConfig("consistent_hash", key="header:x-user", algorithm="maglev"),
    PolicyConfig("consistent_hash", key="header:x-user", algorithm="rendezvous"),
    PolicyConfig("consistent_hash", key="header:x-user", balance_factor=1.25),
    PolicyConfig("first"),
]


def label(p: PolicyConfig) -> str:
    if p.name == "consistent_hash":
        return f"consistent_hash/{p.algorithm}" + ("+bounded" if p.balance_factor else "")
    return p.name


def pick_cost(policy: PolicyConfig, n: int, picks: int) -> float:
    backends = [
        Backend(id=f"10.0.{i // 250}.{i % 250}:80", scheme="http", host="10.0.0.1", port=80,
                weight=1 + i % 3, index=i, authority=f"10.0.{i // 250}.{i % 250}:80")
        for i in range(n)
    ]  # fmt: skip
    rng = random.Random(1)
    load = new_load(policy, n)
    picker = build(policy, backends, rng, load, time.monotonic)
    keys = [f"user-{i}".encode() for i in range(1024)]
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for i in range(picks):
            next(iter(picker.candidates(keys[i & 1023])))
        best = min(best, time.perf_counter() - t0)
    return best / picks * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--picks", type=int, default=20000)
    args = ap.parse_args()
    sizes = (3, 100, 1000)
    rows = ["| policy | " + " | ".join(f"µs/pick @{n}" for n in sizes) + " |",
            "|---|" + "---:|" * len(sizes)]  # fmt: skip
    for p in POLICIES:
        costs = [pick_cost(p, n, args.picks if n < 1000 else args.picks // 4) for n in sizes]
        rows.append(f"| {label(p)} | " + " | ".join(f"{c:.2f}" for c in costs) + " |")
        print(rows[-1], flush=True)
    out = Path(__file__).parent / "results" / "policies-latest.md"
    out.write_text("# Policy pick cost (best of 5, this machine)\n\n" + "\n".join(rows) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
