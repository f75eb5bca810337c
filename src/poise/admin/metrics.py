"""Prometheus text exposition (format 0.0.4) of a running Server, built on scrape.

The hot path only bumps plain integers (``Stats``, each pool's ``responses`` by status
class); everything is read and formatted here, when ``/metrics`` is asked for.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from poise import failures
from poise.l7.context import BUCKETS

if TYPE_CHECKING:
    # (a type-only cycle: the server builds the admin API, which reads the whole process
    # through it; tests/test_layers.py lists it with the reason)
    from poise.registry.service import RegistryService
    from poise.server import Server

# Requests poise answered with an error status: Stats key -> (kind, status). Each such
# answer counts once, under the one reason it was given for (the table: failures.py).
_ERRORS = {a.counter: (a.kind, str(a.status)) for a in failures.ANSWERS}
BAD_REQUEST_STATUSES = ("400", "413", "414", "431", "500", "501", "505")

# Attempts at a backend that failed, retried or not: Stats key -> outcome (failures.py)
_ATTEMPTS = {f.counter: f.outcome for f in failures.ATTEMPT_FAILURES}


# a backend no process has reported on yet
NO_TRAFFIC: dict[str, Any] = {
    "responses": [0] * 6, "in_flight": 0, "idle": 0, "open": 0, "ejected": 0
}  # fmt: skip


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: str) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


class _Out:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, **labels: str) -> None:
        text = repr(float(value)) if isinstance(value, float) else str(value)
        self.lines.append(f"{name}{_labels(**labels)} {text}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def render(server: Server) -> str:
    out = _Out()
    # traffic numbers: this process's, or the sum of the workers' (``poise.dataplane``)
    dp = server.dataplane()
    stats: dict[str, int] = dp["stats"]
    out.family("poise_requests_total", "counter", "Requests received on HTTP listeners.")
    out.sample("poise_requests_total", stats.get("requests", 0))
    out.family("poise_connections_total", "counter", "Client connections accepted.")
    out.sample("poise_connections_total", stats.get("connections_accepted", 0))
    out.family("poise_client_connections", "gauge", "Client connections open now.")
    out.sample("poise_client_connections", dp["clients"])
    out.family("poise_http2_connections", "gauge", "Client connections speaking HTTP/2 open now.")
    out.sample("poise_http2_connections", dp.get("http2_clients", 0))
    out.family("poise_http2_requests_total", "counter", "Requests received on HTTP/2 streams.")
    out.sample("poise_http2_requests_total", stats.get("http2_requests", 0))
    out.family(
        "poise_errors_total",
        "counter",
        "Requests poise answered with an error status, each once, by reason and status.",
    )
    for status in BAD_REQUEST_STATUSES:
        n = stats.get(f"bad_request_{status}", 0)
        out.sample("poise_errors_total", n, kind="bad_request", status=status)
    for key, (kind, status) in _ERRORS.items():
        out.sample("poise_errors_total", stats.get(key, 0), kind=kind, status=status)
    out.family(
        "poise_upstream_attempt_failures_total",
        "counter",
        "Attempts at a backend that failed, whether the request was then retried or not.",
    )
    for key, outcome in _ATTEMPTS.items():
        out.sample("poise_upstream_attempt_failures_total", stats.get(key, 0), outcome=outcome)
    out.family(
        "poise_client_timeouts_total",
        "counter",
        "Client connections closed by a timeout (idle, header, body, slow read).",
    )
    out.sample("poise_client_timeouts_total", stats.get("client_timeouts", 0))
    name = "poise_request_duration_seconds"
    out.family(name, "histogram", "From a request's first byte to its response's last.")
    latency = dp["latency"]
    counts = latency["counts"] or [0] * (len(BUCKETS) + 1)
    total = 0
    for bound, n in zip((*BUCKETS, float("inf")), counts, strict=True):
        total += n
        out.sample(f"{name}_bucket", total, le="+Inf" if bound == float("inf") else repr(bound))
    out.sample(f"{name}_sum", float(latency["sum"]))
    out.sample(f"{name}_count", latency["count"])
    out.family("poise_retries_total", "counter", "Requests sent again to another backend.")
    out.sample("poise_retries_total", stats.get("retries", 0))
    out.family("poise_retries_over_budget_total", "counter", "Retries the budget refused.")
    out.sample("poise_retries_over_budget_total", stats.get("retries_over_budget", 0))
    out.family("poise_ejections_total", "counter", "Backends ejected by passive health.")
    out.sample("poise_ejections_total", stats.get("ejections", 0))

    _backends(out, server, dp)

    out.family("poise_health_checks_total", "counter", "Active health probes by result.")
    for checker in server.membership.checkers:
        for b, n, failed in zip(checker.backends, checker.probes, checker.failed, strict=True):
            labels = {"upstream": checker.group, "backend": b.authority}
            out.sample("poise_health_checks_total", n - failed, result="ok", **labels)
            out.sample("poise_health_checks_total", failed, result="fail", **labels)

    if server.tls:
        _tls(out, server, dp)

    if server.l4.listeners:
        _l4(out, dp["l4"])

    if server.workers is not None:
        workers = server.workers()
        out.family("poise_workers", "gauge", "Worker processes serving (--workers N).")
        out.sample("poise_workers", sum(1 for w in workers if w["state"] == "serving"))

    if server.registry is not None:
        _registry(out, server.registry)
    return out.text()


def _backends(out: _Out, server: Server, dp: dict[str, Any]) -> None:
    """Per backend: responses by status class, and its state and connection gauges."""
    table = server.table
    board: dict[str, Any] = server.membership.board.statistics()
    responses = _Out()
    responses.family(
        "poise_backend_responses_total", "counter", "Responses from backends by status class."
    )
    gauges = {
        "poise_backend_up": "1 when the backend takes new requests.",
        "poise_backend_healthy": "1 when the active checks pass.",
        "poise_backend_ejected": "1 while ejected by passive health (in any worker).",
        "poise_backend_in_flight": "Requests in flight now, whatever the policy.",
        "poise_backend_connections_idle": "Idle keep-alive connections in the pool.",
        "poise_backend_connections_open": "Open connections to the backend.",
        "poise_backend_weight": "Configured weight.",
    }
    samples: dict[str, list[tuple[float, dict[str, str]]]] = {k: [] for k in gauges}
    for name, group in table.groups.items():
        facts: dict[str, Any] = board.get(name, {}).get("backends", {})
        traffic: dict[str, Any] = dp["backends"].get(name, {})
        for b in group.backends:
            labels = {"upstream": name, "backend": b.authority}
            seen = traffic.get(b.authority, NO_TRAFFIC)
            for cls in range(1, 6):
                responses.sample(
                    "poise_backend_responses_total", seen["responses"][cls], code=f"{cls}xx",
                    **labels,
                )  # fmt: skip
            fact = facts.get(b.url, {})
            values: dict[str, float] = {
                "poise_backend_up": int(group.up[b.index]),
                "poise_backend_healthy": int(bool(fact.get("healthy", True))),
                "poise_backend_ejected": int(bool(fact.get("ejected", False) or seen["ejected"])),
                "poise_backend_in_flight": seen["in_flight"],
                "poise_backend_connections_idle": seen["idle"],
                "poise_backend_connections_open": seen["open"],
                "poise_backend_weight": b.weight,
            }
            for key, value in values.items():
                samples[key].append((value, labels))
    out.lines += responses.lines
    for key, help_text in gauges.items():
        out.family(key, "gauge", help_text)
        for value, labels in samples[key]:
            out.sample(key, value, **labels)


def _tls(out: _Out, server: Server, dp: dict[str, Any]) -> None:
    """TLS listeners: handshakes, reloads, certificate expiry."""
    counted: dict[str, dict[str, int]] = dp.get("tls", {})  # summed over the workers
    out.family(
        "poise_tls_handshakes_total", "counter", "TLS handshakes begun (connections handed to TLS)."
    )
    for name, tls in server.tls.items():
        c = counted.get(name, tls.counters())
        out.sample("poise_tls_handshakes_total", c["handshakes"], listener=name)
    done = "poise_tls_handshakes_completed_total"
    out.family(done, "counter", "TLS handshakes completed: full, or resuming a session.")
    for name, tls in server.tls.items():
        c = counted.get(name, tls.counters())
        out.sample(done, c["full"], listener=name, type="full")
        out.sample(done, c["resumed"], listener=name, type="resumed")
    refused = "poise_tls_refused_total"
    out.family(refused, "counter", "Connections refused before a TLS handshake, by reason.")
    for name, tls in server.tls.items():
        c = counted.get(name, tls.counters())
        # plain HTTP to the HTTPS port (answered 400), a ClientHello without an accepted
        # version (answered with a protocol_version alert): see tls/gate.py
        out.sample(refused, c["plain_http"], listener=name, reason="plain_http")
        out.sample(refused, c["version_alerts"], listener=name, reason="tls_version")
    out.family("poise_tls_reloads_total", "counter", "Certificate reloads by result.")
    for name, tls in server.tls.items():
        out.sample("poise_tls_reloads_total", tls.reloads, listener=name, result="ok")
        out.sample("poise_tls_reloads_total", tls.reload_failures, listener=name, result="fail")
    expiry = "poise_tls_certificate_not_after_seconds"
    out.family(expiry, "gauge", "When each served certificate expires (Unix time).")
    for name, tls in server.tls.items():
        for cert, info in zip(tls.cfg.certificates, tls.certs.infos, strict=True):
            out.sample(expiry, info.not_after.timestamp(), listener=name, cert=cert.cert)


def _registry(out: _Out, reg: RegistryService) -> None:
    """The registry this process follows."""
    out.family("poise_registry_instances", "gauge", "Instances of the followed services.")
    for service, instances in sorted(reg.reported.items()):
        out.sample("poise_registry_instances", len(instances), service=service)
    out.family("poise_registry_reachable", "gauge", "1 when the registry store answers.")
    out.sample("poise_registry_reachable", int(reg.reachable), store=reg.store.name)
    out.family("poise_registry_revision", "gauge", "The registry revision last listed.")
    out.sample("poise_registry_revision", reg.revision)
    stats = reg.store.statistics()
    out.family("poise_registry_heartbeats_total", "counter", "Heartbeats this node answered.")
    out.sample("poise_registry_heartbeats_total", _num(stats.get("heartbeats")),
               store=reg.store.name)  # fmt: skip
    if "owned" in stats:  # a store shared by nodes (etcd)
        out.family("poise_registry_held_instances", "gauge",
                   "Instances whose TTL this node holds.")  # fmt: skip
        out.sample("poise_registry_held_instances", _num(stats.get("owned")))
        out.family("poise_registry_forwarded_heartbeats_total", "counter",
                   "Heartbeats forwarded to the node holding the TTL (sent), or from others "
                   "(received).")  # fmt: skip
        for direction, key in (("sent", "forwarded"), ("received", "received")):
            out.sample("poise_registry_forwarded_heartbeats_total", _num(stats.get(key)),
                       direction=direction)  # fmt: skip
        out.family("poise_registry_takeovers_total", "counter",
                   "Instances taken over from a node that could not be reached.")  # fmt: skip
        out.sample("poise_registry_takeovers_total", _num(stats.get("takeovers")))
        out.family("poise_registry_store_writes_total", "counter",
                   "Changes this node wrote to the shared store.")  # fmt: skip
        out.sample("poise_registry_store_writes_total", _num(stats.get("writes")))


def _num(value: object) -> float:
    return value if isinstance(value, int | float) else 0


_L4_ERRORS = {
    "refused": "refused",
    "connect_errors": "connect",
    "connect_timeouts": "connect_timeout",
    "no_backend": "no_backend",
    "idle_timeouts": "idle_timeout",
    "proxy_errors": "proxy_header",
    "backend_resets": "backend_reset",
    "sni_timeouts": "sni_timeout",
}


def _l4(out: _Out, l4: dict[str, Any]) -> None:
    """TCP listeners and their backends (``L4.statistics()``)."""
    listeners: dict[str, dict[str, Any]] = l4["listeners"]
    out.family("poise_tcp_connections_total", "counter", "TCP connections accepted.")
    for name, st in listeners.items():
        out.sample("poise_tcp_connections_total", st["accepted"], listener=name)
    out.family("poise_tcp_connections", "gauge", "TCP connections open now.")
    for name, st in listeners.items():
        out.sample("poise_tcp_connections", st["active"], listener=name)
    out.family("poise_tcp_bytes_total", "counter", "Bytes relayed (in: client to backend).")
    for name, st in listeners.items():
        out.sample("poise_tcp_bytes_total", st["bytes_in"], listener=name, direction="in")
        out.sample("poise_tcp_bytes_total", st["bytes_out"], listener=name, direction="out")
    out.family("poise_tcp_errors_total", "counter", "TCP connection problems, by kind.")
    for name, st in listeners.items():
        for key, kind in _L4_ERRORS.items():
            out.sample("poise_tcp_errors_total", st[key], listener=name, kind=kind)
    routed = {name: st["sni_routes"] for name, st in listeners.items() if "sni_routes" in st}
    if routed:
        out.family(
            "poise_tcp_sni_routes_total", "counter", "TLS connections by the upstream SNI chose."
        )
        for name, by_upstream in routed.items():
            for upstream, n in sorted(by_upstream.items()):
                out.sample("poise_tcp_sni_routes_total", n, listener=name, upstream=upstream)
    backends: dict[str, dict[str, dict[str, int]]] = l4["backends"]
    out.family("poise_tcp_backend_connections_total", "counter", "TCP relays per backend.")
    for upstream, by_url in backends.items():
        for url, st in by_url.items():
            labels = {"upstream": upstream, "backend": url.split("://", 1)[-1]}
            out.sample("poise_tcp_backend_connections_total", st["connections"], **labels)
    out.family("poise_tcp_backend_bytes_total", "counter", "Bytes relayed per backend.")
    for upstream, by_url in backends.items():
        for url, st in by_url.items():
            labels = {"upstream": upstream, "backend": url.split("://", 1)[-1]}
            out.sample("poise_tcp_backend_bytes_total", st["bytes_in"], direction="in", **labels)
            out.sample("poise_tcp_backend_bytes_total", st["bytes_out"], direction="out", **labels)


def names(text: str) -> Iterable[str]:
    """The metric family names in an exposition (for tests and docs)."""
    return [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
