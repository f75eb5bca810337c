"""The routing table: one immutable value the hot path reads, rebuilt and swapped whole.

Built by pure functions from Config (membership) and health facts. A health change makes a
new table that shares the old pickers, so round-robin positions survive it.

Route matching, per listener: routes naming hosts are tried before catch-all routes; within
each, the longest path prefix wins; a prefix matches on segment boundaries ("/api" matches
"/api" and "/api/x", not "/apix"; a prefix ending in "/" matches anything below it).
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from poise.balancing import KeySource, Load, Picker, StickyPick, build, new_load
from poise.config.model import Config, UpstreamConfig
from poise.models import Backend, authority_of


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

    def with_health(self, up: tuple[bool, ...]) -> Group:
        return Group(
            self.name, self.config, self.backends, self.picker, up, self.load, self.key,
            self.sticky,
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


def build_table(config: Config, rng: random.Random) -> RoutingTable:
    groups: dict[str, Group] = {}
    for name, up in config.upstreams.items():
        backends = make_backends(up)
        load = new_load(up.policy, len(backends))
        picker = build(up.policy, backends, rng, load, time.monotonic)
        key = KeySource.parse(up.policy.key) if up.policy.key else None
        sticky = picker if isinstance(picker, StickyPick) else None
        groups[name] = Group(name, up, backends, picker, (True,) * len(backends), load, key, sticky)
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
        MappingProxyType(groups), MappingProxyType(routes), MappingProxyType(catch_all)
    )
