"""The routing table: one immutable value the hot path reads, rebuilt and swapped whole.

Built by pure functions from Config (membership) and health facts. A health change makes a
new table that shares the old pickers, so round-robin positions survive it.

Route matching, per listener: routes naming hosts are tried before catch-all routes; within
each, the longest path prefix wins; a prefix matches on segment boundaries ("/api" matches
"/api" and "/api/x", not "/apix"; a prefix ending in "/" matches anything below it).
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from poise.balancing import KeySource, Load, Picker, StickyPick, build, new_load
from poise.config.model import Config, UpstreamConfig
from poise.health.passive import Outliers
from poise.health.status import GroupStatus, View
from poise.models import Backend, authority_of
from poise.upstream.limits import Admission
from poise.upstream.pool import Pool


@dataclass(frozen=True, slots=True)
class Group:
    name: str
    config: UpstreamConfig
    backends: tuple[Backend, ...]
    picker: Picker
    up: tuple[bool, ...]  # health by backend index
    load: Load | None = None  # in flight / latency, for the policies that read it
    key: KeySource | None = None  # where hashing policies find their key
    sticky: StickyPick | None = None  # the picker again, when responses must set its cookie
    # passive health: the proxy reports outcomes here (None when passive checks are off)
    outliers: Outliers | None = None
    admission: Admission | None = None  # request limits and queue (None: no limits)
    # the rest of the view (health/status.py): draining backends sticky clients may still
    # reach, slow-start shares, panic mode
    sticky_ok: tuple[bool, ...] | None = None
    ramp: tuple[float, ...] | None = None
    panic: bool = False
    healthy: tuple[bool, ...] | None = None  # in panic mode: the truly usable ones
    # dispatch must look beyond ``up`` (drain, slow start, limits): the slow path
    special: bool = False
    retry_statuses: frozenset[int] = frozenset()
    retry_timeout: float = 0.0  # retry.timeout, 0 = timeouts.upstream_response
    # keep-alive pool per backend (by index). Pools live in the group, so a backend and its
    # pool always come from the same table, however often membership changes.
    pools: tuple[Pool[Any], ...] = ()
    # HTTP/2 to the backends (upstream protocol h2 or grpc): dispatch goes to h2/upstream.py
    mux: bool = False

    def with_view(self, view: View) -> Group:
        special = view.sticky_ok is not None or view.ramp is not None or self.admission is not None
        return dataclasses.replace(
            self, up=view.up, sticky_ok=view.sticky_ok, ramp=view.ramp, panic=view.panic,
            healthy=view.healthy, special=special,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Route:
    hosts: frozenset[bytes]  # empty = any host
    prefix: bytes
    group: str

    def matches(self, host: bytes, path: bytes) -> bool:
        if self.hosts and host not in self.hosts:
            return False
        p = self.prefix
        if p in (b"/", path):
            return True
        if not path.startswith(p):
            return False
        return p.endswith(b"/") or path[len(p) : len(p) + 1] in (b"/", b"?")


@dataclass(frozen=True, slots=True)
class RoutingTable:
    groups: Mapping[str, Group]
    routes: Mapping[str, tuple[Route, ...]]  # by listener name
    # listener name -> group name, for listeners whose only route takes everything: the hot
    # path then skips host normalisation and matching.
    catch_all: Mapping[str, str]

    def route(self, listener: str, host: bytes, path: bytes) -> Group | None:
        for r in self.routes[listener]:
            if r.matches(host, path):
                return self.groups[r.group]
        return None

    def with_group(self, group: Group) -> RoutingTable:
        groups = dict(self.groups)
        groups[group.name] = group
        return RoutingTable(MappingProxyType(groups), self.routes, self.catch_all)


def make_backends(upstream: UpstreamConfig) -> tuple[Backend, ...]:
    return tuple(
        Backend(
            id=authority_of(b.host, b.port),
            scheme=b.scheme,
            host=b.host,
            port=b.port,
            weight=b.weight,
            index=i,
            authority=authority_of(b.host, b.port),
        )
        for i, b in enumerate(upstream.backends)
    )


def _limited(ucfg: UpstreamConfig) -> bool:
    return bool(ucfg.limits.max_requests_per_backend or ucfg.limits.max_requests)


def new_pool(group: str, ucfg: UpstreamConfig, backend: Backend) -> Pool[Any]:
    return Pool(f"{group}/{backend.authority}", ucfg.pool.max_idle, ucfg.pool.idle_timeout)


def build_group(
    ucfg: UpstreamConfig,
    rng: random.Random,
    status: GroupStatus,
    *,
    pools: tuple[Pool[Any], ...] | None = None,
    admission: Admission | None = None,
) -> Group:
    """One group for ``ucfg`` (its backends as configured, or as discovered), viewed through
    ``status``. ``pools`` / ``admission`` carry state over from the group it replaces."""
    backends = make_backends(ucfg)
    # the policy's own load figures (None: it reads none; a consistent hash reads them only
    # for bounded load, so it must not be handed the group's plain counts)
    policy_load = new_load(ucfg.policy, len(backends))
    # every group counts its requests in flight (one integer per request): limits need
    # them, and the admin API and metrics show them whatever the policy
    load = policy_load if policy_load is not None else Load(len(backends), latency=False)
    picker = build(ucfg.policy, backends, rng, policy_load, time.monotonic)
    key = KeySource.parse(ucfg.policy.key) if ucfg.policy.key else None
    sticky = picker if isinstance(picker, StickyPick) else None
    if _limited(ucfg) and (admission is None or admission.cfg != ucfg.limits):
        admission = Admission(ucfg.name, ucfg.limits)
    elif not _limited(ucfg):
        admission = None
    if pools is None:
        pools = tuple(new_pool(ucfg.name, ucfg, b) for b in backends)
    group = Group(
        ucfg.name, ucfg, backends, picker, (True,) * len(backends), load, key, sticky,
        outliers=status.outliers if ucfg.passive.enabled else None,
        admission=admission,
        retry_statuses=frozenset(ucfg.retry.statuses),
        retry_timeout=ucfg.retry.timeout or 0.0,
        pools=pools,
        mux=ucfg.protocol != "http1",
    )  # fmt: skip
    return group.with_view(status.view(time.monotonic()))


def regroup(
    old: Group, ucfg: UpstreamConfig, rng: random.Random, status: GroupStatus
) -> tuple[Group, list[Pool[Any]]]:
    """``old`` with new membership (``ucfg.backends``): backends that stay keep their pools
    (and idle connections), new ones get fresh pools. Returns the group and the pools of the
    backends that left, for the caller to retire. In-flight requests keep the old group
    (and its load counters) until they end; new requests see the new one."""
    kept = {b.id: old.pools[b.index] for b in old.backends if b.index < len(old.pools)}
    pools = []
    for b in make_backends(ucfg):
        pool = kept.pop(b.id, None)
        pools.append(pool if pool is not None else new_pool(ucfg.name, ucfg, b))
    group = build_group(ucfg, rng, status, pools=tuple(pools), admission=old.admission)
    return group, list(kept.values())


def build_table(
    config: Config,
    rng: random.Random,
    statuses: Mapping[str, GroupStatus] | None = None,
) -> RoutingTable:
    """The table for ``config``; each group's view comes from ``statuses`` (its facts), or
    everything is up."""
    groups: dict[str, Group] = {}
    for name, ucfg in config.upstreams.items():
        status = statuses[name] if statuses is not None else GroupStatus(ucfg)
        groups[name] = build_group(ucfg, rng, status)
    return build_routes(config, groups)


def build_routes(config: Config, groups: Mapping[str, Group]) -> RoutingTable:
    """The table with ``groups`` and the routes of ``config``'s listeners."""
    routes: dict[str, tuple[Route, ...]] = {}
    catch_all: dict[str, str] = {}
    for listener in config.listeners:
        rs = [
            Route(
                frozenset(h.encode() for h in r.hosts),
                r.path_prefix.encode("utf-8"),
                r.upstream,
            )
            for r in listener.routes
        ]
        rs.sort(key=lambda r: (not r.hosts, -len(r.prefix)))
        routes[listener.name] = tuple(rs)
        if len(rs) == 1 and not rs[0].hosts and rs[0].prefix == b"/":
            catch_all[listener.name] = rs[0].group
    return RoutingTable(
        MappingProxyType(dict(groups)), MappingProxyType(routes), MappingProxyType(catch_all)
    )
