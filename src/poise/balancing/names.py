"""Policy names and their aliases: config vocabulary, importable without the policies."""

from __future__ import annotations

# canonical name -> accepted aliases
POLICIES: dict[str, tuple[str, ...]] = {
    "round_robin": ("rr", "roundrobin"),
    "weighted_round_robin": ("wrr", "swrr", "weighted_rr"),
    "random": (),
    "weighted_random": (),
    "least_conn": ("leastconn", "least_connections"),
    "p2c": ("power_of_two", "power_of_two_choices", "least_request"),
    "peak_ewma": ("ewma", "latency"),
    "hash": ("ip_hash",),
    "consistent_hash": ("ring_hash", "maglev", "rendezvous"),
    "first": ("failover", "first_available"),
    "sticky": ("sticky_cookie", "cookie"),
}
KEYED = frozenset({"hash", "consistent_hash"})  # take key / default_key
WITH_FALLBACK = frozenset({"hash", "consistent_hash", "sticky"})
LOAD_AWARE = frozenset({"least_conn", "p2c", "peak_ewma"})
ALGORITHM_NAMES = ("ring", "maglev", "rendezvous")
# an alias that also chooses an option
ALIAS_OPTIONS: dict[str, dict[str, str]] = {
    "ip_hash": {"key": "ip"},
    "maglev": {"algorithm": "maglev"},
    "rendezvous": {"algorithm": "rendezvous"},
    "ring_hash": {"algorithm": "ring"},
}
CANONICAL: dict[str, str] = {
    **{name: name for name in POLICIES},
    **{alias: name for name, aliases in POLICIES.items() for alias in aliases},
}
