"""Summing the workers' data-plane numbers (``poise.dataplane``)."""

from __future__ import annotations

from poise.dataplane import counters_only, merge


def test_merge_adds_numbers_merges_dicts_and_adds_lists_by_position() -> None:
    a = {
        "stats": {"requests": 3, "retries": 1},
        "latency": {"counts": [1, 2, 0], "sum": 0.5, "count": 3},
        "clients": 2,
        "backends": {"app": {"h:1": {"responses": [0, 0, 3], "open": 1}}},
    }
    b = {
        "stats": {"requests": 4, "no_route": 2},
        "latency": {"counts": [0, 1, 5], "sum": 0.25, "count": 6},
        "clients": 1,
        "backends": {"app": {"h:1": {"responses": [0, 1, 4], "open": 2}, "h:2": {"open": 7}}},
    }
    assert merge(a, b) == {
        "stats": {"requests": 7, "retries": 1, "no_route": 2},
        "latency": {"counts": [1, 3, 5], "sum": 0.75, "count": 9},
        "clients": 3,
        "backends": {"app": {"h:1": {"responses": [0, 1, 7], "open": 3}, "h:2": {"open": 7}}},
    }
    assert a["stats"] == {"requests": 3, "retries": 1}  # inputs are not changed


def test_merge_of_lists_of_different_lengths_keeps_the_longer_tail() -> None:
    assert merge([], [1, 2]) == [1, 2]
    assert merge([1, 2, 3], [1]) == [2, 2, 3]


def test_an_exited_workers_counters_are_kept_and_its_gauges_dropped() -> None:
    report = {
        "stats": {"requests": 10},
        "clients": 4,
        "tunnels": 1,
        "backends": {"app": {"h:1": {"responses": [0, 0, 9], "in_flight": 2, "idle": 3}}},
        "l4": {"listeners": {"db": {"accepted": 5, "active": 2, "sni_routes": {"x": 1}}}},
    }
    kept = counters_only(report)
    assert kept == {
        "stats": {"requests": 10},
        "clients": 0,
        "tunnels": 0,
        "backends": {"app": {"h:1": {"responses": [0, 0, 9], "in_flight": 0, "idle": 0}}},
        "l4": {"listeners": {"db": {"accepted": 5, "active": 0, "sni_routes": {"x": 1}}}},
    }
    # summed with a live worker, the totals go on from the exited one's
    assert merge(kept, report)["stats"]["requests"] == 20
    assert merge(kept, report)["clients"] == 4
