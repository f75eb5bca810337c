"""The data plane's numbers as plain data: what ``/metrics``, the admin API and the dashboard
show about traffic.

One process reads them from its own objects (``snapshot``). With ``--workers N`` the traffic
is in the workers: each sends its snapshot to the supervisor once a second, and the
supervisor shows their sum (``merge``). A snapshot is nested dicts and lists of numbers, so
summing is the same walk everywhere: numbers add, dicts merge by key, lists add by position.

Counters (requests, responses, bytes) only grow; gauges (open connections, in flight) are
the state now. When a worker exits, its counters are kept (``counters_only``) so the sums
never go backwards, and its gauges are dropped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Mapping

    from poise.l4 import L4
    from poise.membership import Membership
    from poise.tls.contexts import ListenerTls

# keys whose values are the state now, not running totals
GAUGES = frozenset(
    {"active", "clients", "http2_clients", "tunnels", "idle", "open", "in_flight", "ejected"}
)

Snapshot = dict[str, Any]


def snapshot(membership: Membership, l4: L4, tls: Mapping[str, ListenerTls]) -> Snapshot:
    """This process's data-plane numbers: its upstreams' (``membership``, with the HTTP data
    plane's counters once it runs), its TCP listeners' and its HTTPS listeners'."""
    ctx = membership.ctx
    table = membership.table
    backends: dict[str, dict[str, dict[str, Any]]] = {}
    for name, group in table.groups.items():
        status = membership.board.statuses.get(name)
        entries: dict[str, dict[str, Any]] = {}
        for b in group.backends:
            pool = group.pools[b.index]
            ejected = status is not None and b.index < status.n and status.outliers.ejected[b.index]
            entries[b.authority] = {
                "responses": list(pool.responses),
                "in_flight": group.load.active[b.index] if group.load is not None else 0,
                "idle": len(pool.idle),
                "open": pool.open,
                "ejected": int(bool(ejected)),
            }
        backends[name] = entries
    if ctx is None:
        stats: dict[str, int] = {}
        latency: dict[str, Any] = {"counts": [], "sum": 0.0, "count": 0}
        clients = tunnels = http2 = 0
    else:
        stats = ctx.stats.as_dict()
        h = ctx.latency
        latency = {"counts": list(h.counts), "sum": h.sum, "count": h.count}
        # (an HTTP/2 connection is a client connection too: its streams are not)
        http2 = len(ctx.sessions)
        clients, tunnels = len(ctx.clients) + http2, len(ctx.tunnels)
    return {
        "stats": stats,
        "latency": latency,
        "clients": clients,
        "http2_clients": http2,
        "tunnels": tunnels,
        "backends": backends,
        "l4": l4.statistics(),
        "tls": {name: listener.counters() for name, listener in tls.items()},
    }


def merge(a: Any, b: Any) -> Any:
    """The sum of two snapshots (or parts of them). Where the shapes differ (a backend one
    process knows and the other not yet), what one side has is kept."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = dict(a)
        for key, value in b.items():
            out[key] = merge(out[key], value) if key in out else value
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) < len(b):
            a, b = b, a
        return [x + y for x, y in zip(a, b, strict=False)] + a[len(b) :]
    if isinstance(a, bool) or isinstance(b, bool):
        return a or b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a + b
    return a


def counters_only(snap: Any) -> Any:
    """``snap`` with its gauges at zero: what is kept of a worker that has exited."""
    if isinstance(snap, dict):
        return {k: (_zero(v) if k in GAUGES else counters_only(v)) for k, v in snap.items()}
    if isinstance(snap, list):
        return [counters_only(v) for v in snap]
    return snap


def _zero(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _zero(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_zero(v) for v in value]
    return 0 if isinstance(value, int | float) else value
