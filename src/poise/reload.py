"""Hot reload: apply a new configuration to a running process without dropping anything.

Theory of operation
-------------------
The new config has already been loaded and validated (a bad one is refused with every
problem listed, and the old one keeps running). ``check`` then refuses the changes a reload
cannot make in place (listener addresses, the registry store and the admin listener: those
need a restart), again listing each. Only then is anything touched, and everything is
prepared before the single switch:

* a static upstream keeps what the admin API changed (a weight, an added or a removed
  backend) unless the new file's entry for that backend differs from the old file's: then
  the file was edited for it and wins (``keep_runtime_changes``); both are logged;
* every upstream of the new config becomes a group: a new one starts fresh; one that stays
  is rebuilt like a membership change (``routing.regroup``): backends that stay keep their
  health, ejection, operator state and pooled connections; an upstream fed by the registry,
  a file or DNS keeps the backends it has discovered while its source is unchanged;
* the routes of the new listeners are built around those groups;
* then ``Membership.replace`` installs the new table with one assignment, gives the health
  board the new statuses and retires the pools of removed backends and groups (busy
  connections finish their exchange, then close); the data plane takes the new timeouts,
  limits and proxy settings.

Afterwards the background work follows (``Membership.restart_background``): health
checkers restart for groups whose backends or check settings changed (carrying each
staying backend's probe history), and file and DNS sources and the registry follow loop
restart if what they follow changed. Open client connections, in-flight requests and
WebSocket tunnels are untouched: they live in the connections, not in the table.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from poise.config.model import BackendConfig, Config, ListenerTlsConfig, UpstreamConfig
from poise.errors import ConfigError
from poise.health.status import GroupStatus
from poise.models import authority_of
from poise.registry.sources import DnsSource, FileSource, SourceError
from poise.routing import Group, build_group, build_routes, regroup
from poise.tls.contexts import CertSet, ListenerTls, build_cert_set, reloadable

if TYPE_CHECKING:
    from poise.membership import Membership

log = logging.getLogger("poise.reload")


def check(old: Config, new: Config, bound: dict[str, tuple[str, int]] | None = None) -> list[str]:
    """The changes a reload cannot apply in place (each needs a restart). ``bound``: the
    addresses listeners got (a port 0 in the config is the one it was given)."""
    problems = []
    old_listeners = {lc.name: lc for lc in old.listeners}
    new_listeners = {lc.name: lc for lc in new.listeners}
    for name in sorted(old_listeners.keys() - new_listeners.keys()):
        problems.append(f"listeners.{name}: removing a listener needs a restart")
    for name in sorted(new_listeners.keys() - old_listeners.keys()):
        problems.append(f"listeners.{name}: adding a listener needs a restart")
    for name in sorted(old_listeners.keys() & new_listeners.keys()):
        a, b = old_listeners[name], new_listeners[name]
        port = a.port or (bound or {}).get(name, ("", 0))[1]
        if a.host != b.host or (b.port not in (0, port)):
            problems.append(f"listeners.{name}: changing its address needs a restart")
        if a.redirect != b.redirect:
            problems.append(f"listeners.{name}: changing redirect_https needs a restart")
        if a.protocol != b.protocol or a.tcp != b.tcp:
            problems.append(f"listeners.{name}: changing a TCP listener needs a restart")
        if a.http2 != b.http2:
            problems.append(f"listeners.{name}.http2: changing HTTP/2 settings needs a restart")
        if (a.tls is None) != (b.tls is None):
            problems.append(f"listeners.{name}: turning TLS on or off needs a restart")
        elif a.tls is not None and b.tls is not None and not reloadable(a.tls, b.tls):
            problems.append(
                f"listeners.{name}.tls: changing versions, ciphers, client certificate or "
                "session settings needs a restart (certificates and their names reload in place)"
            )
    if old.registry != new.registry:
        problems.append("registry: changing the registry settings needs a restart")
    if old.admin != new.admin:
        problems.append("admin: changing the admin listener needs a restart")
    return problems


def _describe(b: BackendConfig | None) -> str:
    return "absent" if b is None else f"weight {b.weight}"


def keep_runtime_changes(
    old_file: tuple[BackendConfig, ...],
    running: tuple[BackendConfig, ...],
    new_file: tuple[BackendConfig, ...],
) -> tuple[tuple[BackendConfig, ...], list[str], list[str]]:
    """A static upstream's backends after a reload: ``new_file``'s, except where the admin
    API changed a backend (``running`` differs from ``old_file`` for it) and the new file
    did not (its entry is the old file's): that change stays. Backends are matched by
    host:port. Returns the backends (the file's order, then backends added through the API),
    the changes kept and the changes the file overrode, each as "host:port: what"."""
    before = {authority_of(b.host, b.port): b for b in old_file}
    now = {authority_of(b.host, b.port): b for b in running}
    listed = {authority_of(b.host, b.port) for b in new_file}
    out: list[BackendConfig] = []
    kept: list[str] = []
    overridden: list[str] = []
    for b in new_file:
        key = authority_of(b.host, b.port)
        was, current = before.get(key), now.get(key)
        if current in (was, b):
            out.append(b)  # no change through the API, or the file made the same one
        elif b == was:  # the API changed it, the file did not: the change stays
            if current is not None:
                out.append(current)
                kept.append(f"{key}: {_describe(current)}")
            else:
                kept.append(f"{key}: removed")
        else:  # the file was edited for this backend: it wins
            out.append(b)
            overridden.append(f"{key}: {_describe(current)} replaced by the file's {_describe(b)}")
    for key, b in now.items():
        if key in listed:
            continue
        if key not in before:
            out.append(b)  # added through the API; the file still does not list it
            kept.append(f"{key}: added ({_describe(b)})")
        elif b != before[key]:
            overridden.append(f"{key}: {_describe(b)} dropped, the file removes the backend")
    return tuple(out), kept, overridden


def _source(ucfg: UpstreamConfig) -> tuple[Any, ...]:
    return (ucfg.service, ucfg.file, ucfg.dns)


def _dynamic(ucfg: UpstreamConfig) -> bool:
    return bool(ucfg.service or ucfg.file or ucfg.dns)


@dataclasses.dataclass
class _Plan:
    """A reload's new groups, before anything is switched."""

    groups: dict[str, Group] = dataclasses.field(default_factory=dict)
    statuses: dict[str, GroupStatus] = dataclasses.field(default_factory=dict)
    retired: list[Any] = dataclasses.field(default_factory=list)
    changed: dict[str, list[str]] = dataclasses.field(
        default_factory=lambda: {"added": [], "changed": [], "removed": []}
    )


async def apply(
    membership: Membership,
    new: Config,
    *,
    addresses: dict[str, tuple[str, int]],
    tls: Mapping[str, ListenerTls],
) -> dict[str, list[str]]:
    """Apply ``new`` to a running (or not yet serving) process whose upstreams
    ``membership`` owns, with listeners bound at ``addresses`` and HTTPS listeners ``tls``.
    Raises ConfigError, with nothing changed, when it cannot be applied. Returns what
    changed, for logs and the API."""
    old = membership.config
    problems = check(old, new, addresses)
    if problems:
        raise ConfigError(problems, new.source)
    # sources of new or changed file/DNS upstreams are read first, and new certificates
    # loaded: a bad file or certificate refuses it all
    sources, found = await _read_sources(membership.controls, old, new, problems)
    certs = _load_certificates(tls, new, problems)
    if problems:
        raise ConfigError(problems, new.source)
    plan = _plan(membership, old, new, found)
    old_groups = membership.table.groups
    # the switch: one table, the worker's settings, the board
    table = build_routes(new, plan.groups)
    membership.replace(new, table, plan.statuses, plan.changed["removed"], plan.retired)
    if membership.ctx is not None:
        membership.ctx.configure(new)
    for name, (cfg, cert_set) in certs.items():
        tls[name].install(cfg, cert_set)
    membership.restart_background(old, old_groups, sources)
    changed = plan.changed
    log.info(
        "configuration reloaded%s: upstreams added %s, changed %s, removed %s",
        f" from {new.source}" if new.source else "",
        ", ".join(changed["added"]) or "none",
        ", ".join(changed["changed"]) or "none",
        ", ".join(changed["removed"]) or "none",
    )
    return changed


async def _read_sources(
    controls: bool, old: Config, new: Config, problems: list[str]
) -> tuple[dict[str, FileSource | DnsSource], dict[str, tuple[BackendConfig, ...]]]:
    """The file and DNS sources of new or changed upstreams, and the backends they list
    (a bad file is added to ``problems``). A worker reads none: its control process has
    read them and filled the backends in."""
    sources: dict[str, FileSource | DnsSource] = {}
    found: dict[str, tuple[BackendConfig, ...]] = {}
    for name, ucfg in new.upstreams.items():
        before = old.upstreams.get(name)
        if before is not None and _source(before) == _source(ucfg):
            continue
        if not controls:
            if _dynamic(ucfg):
                found[name] = ucfg.backends
            continue
        if ucfg.file is not None:
            sources[name] = file_source = FileSource(ucfg.file)
            try:
                found[name] = file_source.read()
            except SourceError as exc:
                problems.append(f"upstreams.{name}.file: {exc}")
        elif ucfg.dns is not None:
            sources[name] = src = DnsSource(ucfg.dns)
            try:
                found[name] = await src.resolve()
            except SourceError as exc:
                src.error = str(exc)
                found[name] = ()
    return sources, found


def _load_certificates(
    tls: Mapping[str, ListenerTls], new: Config, problems: list[str]
) -> dict[str, tuple[ListenerTlsConfig, CertSet]]:
    """The certificates of HTTPS listeners whose TLS settings changed, loaded (a failure
    is added to ``problems``)."""
    certs: dict[str, tuple[ListenerTlsConfig, CertSet]] = {}
    for lc in new.listeners:
        serving = tls.get(lc.name)
        if lc.tls is not None and serving is not None and lc.tls != serving.cfg:
            try:
                certs[lc.name] = (lc.tls, build_cert_set(lc.tls))
            except (ValueError, OSError) as exc:
                problems.append(f"listeners.{lc.name}.tls: {exc}")
    return certs


def _plan(
    membership: Membership,
    old: Config,
    new: Config,
    found: Mapping[str, tuple[BackendConfig, ...]],
) -> _Plan:
    """Every upstream of ``new`` as a group: a new one fresh, one that stays rebuilt like
    a membership change; the groups ``new`` no longer has, removed."""
    plan = _Plan()
    table = membership.table
    for name, declared in new.upstreams.items():
        current = table.groups.get(name)
        if current is None:
            ucfg = dataclasses.replace(declared, backends=found.get(name, declared.backends))
            plan.statuses[name] = status = GroupStatus(ucfg)
            plan.groups[name] = build_group(ucfg, membership.rng, status)
            plan.changed["added"].append(name)
            continue
        old_status = membership.board.statuses[name]
        ucfg, reported = _backends(
            membership, name, declared=declared, old=old, prev=current.config, found=found
        )
        if ucfg == current.config:
            plan.groups[name] = current
            continue
        old_ids = [b.id for b in current.backends]
        new_ids = [authority_of(b.host, b.port) for b in ucfg.backends]
        if reported is None:
            reported = list(old_status.reported)
        plan.statuses[name] = status = old_status.successor(ucfg, old_ids, new_ids, reported)
        plan.groups[name], gone = regroup(current, ucfg, membership.rng, status)
        plan.retired += gone
        plan.changed["changed"].append(name)
    for name, current in table.groups.items():
        if name not in new.upstreams:
            plan.retired += current.pools
            plan.changed["removed"].append(name)
    return plan


def _backends(
    membership: Membership,
    name: str,
    *,
    declared: UpstreamConfig,
    old: Config,
    prev: UpstreamConfig,
    found: Mapping[str, tuple[BackendConfig, ...]],
) -> tuple[UpstreamConfig, list[bool] | None]:
    """A staying upstream's new config with the backends it will have, and what the
    registry reported of them (None: keep what it reported)."""
    ucfg = declared
    before = old.upstreams.get(name)
    if membership.controls and before is not None and not _dynamic(ucfg) and not _dynamic(before):
        backends, kept, overridden = keep_runtime_changes(
            before.backends, prev.backends, ucfg.backends
        )
        ucfg = dataclasses.replace(ucfg, backends=backends)
        for change in kept:
            log.info("reload: upstream %s keeps its admin API change %s", name, change)
        for change in overridden:
            log.warning(
                "reload: upstream %s: the file changed a backend changed through the admin "
                "API, the file wins: %s",
                name,
                change,
            )
    if name in found:
        return dataclasses.replace(ucfg, backends=found[name]), [True] * len(found[name])
    if _dynamic(ucfg) and _source(ucfg) == _source(prev):
        return dataclasses.replace(ucfg, backends=prev.backends), None  # what was discovered
    return ucfg, [True] * len(ucfg.backends)
