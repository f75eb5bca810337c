#!/usr/bin/env python3
"""Pick cost of every policy at 3, 100 and 1000 backends (pure, no sockets).

A pick is what the proxy does per request: ``pick(key, up, tried)``, the first candidate
that is up and not yet tried (all up, none tried here). The second table is the general
``candidates(key)`` with the first taken, which retries past the first, the L4 listener and
the client SDK use. Best of 5 rounds; prints the tables, writes
bench/results/policies-latest.md with a line about the host (``--note``).

    python bench/policies.py [--picks 20000] [--note "host state, date"]
"""

from __future__ import annotations

import argparse
import random
import time
import timeit
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


def pick_cost(policy: PolicyConfig, n: int, picks: int, how: str = "pick") -> float:
    backends = [
        Backend(id=f"10.0.{i // 250}.{i % 250}:80", scheme="http", host="10.0.0.1", port=80,
                weight=1 + i % 3, index=i, authority=f"10.0.{i // 250}.{i % 250}:80")
        for i in range(n)
    ]  # fmt: skip
    rng = random.Random(1)
    load = new_load(policy, n)
    picker = build(policy, backends, rng, load, time.monotonic)
    keys = [f"user-{i}".encode() for i in range(1024)]
    up = (True,) * n
    pick, candidates = picker.pick, picker.candidates
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        if how == "pick":
            for i in range(picks):
                pick(keys[i & 1023], up, ())
        else:
            for i in range(picks):
                next(iter(candidates(keys[i & 1023])))
        best = min(best, time.perf_counter() - t0)
    return best / picks * 1e6


def ref_cost() -> float:
    """``sum(range(1000))`` in µs, best of 5: a yardstick of this host's Python speed."""
    return min(timeit.repeat("sum(range(1000))", number=2000, repeat=5)) / 2000 * 1e6


def table(how: str, picks: int) -> list[str]:
    sizes = (3, 100, 1000)
    rows = ["| policy | " + " | ".join(f"µs/pick @{n}" for n in sizes) + " |",
            "|---|" + "---:|" * len(sizes)]  # fmt: skip
    for p in POLICIES:
        costs = [pick_cost(p, n, picks if n < 1000 else picks // 4, how) for n in sizes]
        rows.append(f"| {label(p)} | " + " | ".join(f"{c:.2f}" for c in costs) + " |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--picks", type=int, default=20000)
    ap.add_argument("--note", default="", help="host state and date, for the results file")
    args = ap.parse_args()
    ref = ref_cost()
    print(f"sum(range(1000)): {ref:.1f} µs (about 10 µs on a quiet host)", flush=True)
    pick_rows = table("pick", args.picks)
    ref = min(ref, ref_cost())
    print("candidates(key), first taken:", flush=True)
    cand_rows = table("candidates", args.picks)
    ref = min(ref, ref_cost())
    out = Path(__file__).parent / "results" / "policies-latest.md"
    note = f"{args.note}; " if args.note else ""
    out.write_text(
        "# Policy pick cost (best of 5, this machine)\n\n"
        f"{note}`sum(range(1000))` took {ref:.1f} µs during the run (about 10 µs on a quiet "
        "host): scale the figures by 10 / that to compare runs.\n\n"
        "## `pick(key, up, tried)`: what the proxy runs per request\n\n"
        + "\n".join(pick_rows)
        + "\n\n## `candidates(key)`, first taken: retries, L4, the client SDK\n\n"
        + "\n".join(cand_rows)
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
