"""Hot reload: apply a new configuration to a running Server without dropping anything.

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
* then the new table is installed with one assignment, the worker takes the new timeouts,
  limits and proxy settings, and the health board the new statuses.

Afterwards the background work follows: health checkers restart for groups whose backends
or check settings changed (carrying each staying backend's probe history), file and DNS
sources and the registry follow loop restart if what they follow changed, and pools of
removed backends and groups are retired (busy connections finish their exchange, then
close). Open client connections, in-flight requests and WebSocket tunnels are untouched:
they live in the connections, not in the table.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from poise.config.model import BackendConfig, Config, ListenerTlsConfig, UpstreamConfig
from poise.errors import ConfigError
from poise.health.state import HealthState
from poise.health.status import GroupStatus
from poise.models import authority_of
from poise.registry.sources import DnsSource, FileSource, SourceError
from poise.routing import Group, build_group, build_routes, regroup
from poise.tls.contexts import CertSet, build_cert_set, reloadable

if TYPE_CHECKING:
    from poise.server import Server

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


def _source(up: UpstreamConfig) -> tuple[Any, ...]:
    return (up.service, up.file, up.dns)


def _dynamic(up: UpstreamConfig) -> bool:
    return bool(up.service or up.file or up.dns)


async def apply(server: Server, new: Config) -> dict[str, list[str]]:
    """Apply ``new`` to ``server`` (serving or not). Raises ConfigError, with nothing
    changed, when it cannot be applied. Returns what changed, for logs and the API."""
    old = server.config
    problems = check(old, new, server.addresses)
    if problems:
        raise ConfigError(problems, new.source)
    ctx = server.ctx
    table = server.current_table
    board = server.board
    # sources of new or changed file/DNS upstreams are read first: a bad file refuses it all
    sources: dict[str, FileSource | DnsSource] = {}
    found: dict[str, Any] = {}
    for name, up in new.upstreams.items():
        before = old.upstreams.get(name)
        if before is not None and _source(before) == _source(up):
            continue
        if not server.controls:
            # a worker: its control process has read the source and filled the backends in
            if _dynamic(up):
                found[name] = up.backends
            continue
        if up.file is not None:
            sources[name] = file_source = FileSource(up.file)
            try:
                found[name] = file_source.read()
            except SourceError as exc:
                problems.append(f"upstreams.{name}.file: {exc}")
        elif up.dns is not None:
            sources[name] = src = DnsSource(up.dns)
            try:
                found[name] = await src.resolve()
            except SourceError as exc:
                src.error = str(exc)
                found[name] = ()
    # new certificates are loaded before anything changes: a failure refuses the reload
    certs: dict[str, tuple[ListenerTlsConfig, CertSet]] = {}
    for lc in new.listeners:
        serving = server.tls.get(lc.name)
        if lc.tls is not None and serving is not None and lc.tls != serving.cfg:
            try:
                certs[lc.name] = (lc.tls, build_cert_set(lc.tls))
            except (ValueError, OSError) as exc:
                problems.append(f"listeners.{lc.name}.tls: {exc}")
    if problems:
        raise ConfigError(problems, new.source)

    groups: dict[str, Group] = {}
    statuses: dict[str, GroupStatus] = {}
    retired: list[Any] = []
    changed: dict[str, list[str]] = {"added": [], "changed": [], "removed": []}
    for name, declared in new.upstreams.items():
        up = declared
        current = table.groups.get(name)
        if current is None:
            backends = found.get(name, up.backends)
            up = dataclasses.replace(up, backends=backends)
            statuses[name] = status = GroupStatus(up)
            groups[name] = build_group(up, server.rng, status)
            changed["added"].append(name)
            continue
        prev = current.config
        old_status = board.statuses[name]
        before = old.upstreams.get(name)
        if server.controls and before is not None and not _dynamic(up) and not _dynamic(before):
            backends, kept, overridden = keep_runtime_changes(
                before.backends, prev.backends, up.backends
            )
            up = dataclasses.replace(up, backends=backends)
            for change in kept:
                log.info("reload: upstream %s keeps its admin API change %s", name, change)
            for change in overridden:
                log.warning(
                    "reload: upstream %s: the file changed a backend changed through the admin "
                    "API, the file wins: %s",
                    name,
                    change,
                )
        reported = [True] * len(up.backends)
        if name in found:
            up = dataclasses.replace(up, backends=found[name])
            reported = [True] * len(up.backends)
        elif _dynamic(up) and _source(up) == _source(prev):
            up = dataclasses.replace(up, backends=prev.backends)  # what was discovered
            reported = list(old_status.reported)
        if up == prev:
            groups[name] = current
            continue
        old_ids = [b.id for b in current.backends]
        new_ids = [authority_of(b.host, b.port) for b in up.backends]
        statuses[name] = status = old_status.successor(up, old_ids, new_ids, reported)
        groups[name], gone = regroup(current, up, server.rng, status)
        retired += gone
        changed["changed"].append(name)
    for name, current in table.groups.items():
        if name not in new.upstreams:
            retired += current.pools
            changed["removed"].append(name)

    # the switch: one table, the worker's settings, the board
    new_table = build_routes(new, groups)
    for name in changed["removed"]:
        board.remove(name)
    for name, status in statuses.items():
        board.replace(name, status, groups[name].backends)
    server.config = new
    server.table = new_table
    if ctx is not None:
        ctx.configure(new)
        ctx.table = new_table
        for group in groups.values():
            if group.admission is not None:
                group.admission.set_scheduler(ctx.loop.call_soon)
    for name, (cfg, cert_set) in certs.items():
        server.tls[name].install(cfg, cert_set)
    for name in statuses:
        board.refresh(name)
    for pool in retired:
        pool.max_idle = 0
        pool.close_all()

    _restart_background(server, old, new, table.groups, sources)
    log.info(
        "configuration reloaded%s: upstreams added %s, changed %s, removed %s",
        f" from {new.source}" if new.source else "",
        ", ".join(changed["added"]) or "none",
        ", ".join(changed["changed"]) or "none",
        ", ".join(changed["removed"]) or "none",
    )
    return changed


def _restart_background(
    server: Server,
    old: Config,
    new: Config,
    old_groups: Any,
    sources: dict[str, FileSource | DnsSource],
) -> None:
    tg = server._tg
    # health checkers
    for name in list(server._checker_tasks):
        group = server.table.groups.get(name)
        before = old_groups.get(name)
        same = (
            group is not None
            and before is not None
            and group.backends == before.backends
            and group.config.health_check == before.config.health_check
        )
        if same:
            continue
        checker = next(c for c in server.checkers if c.group == name)
        server._checker_tasks.pop(name).cancel()
        server.checkers.remove(checker)
        if group is None or not group.config.health_check.enabled or tg is None:
            continue
        states: list[HealthState] | None = None
        if group.config.health_check == checker.hc:
            by_id = {b.id: st for b, st in zip(checker.backends, checker.states, strict=True)}
            hc = checker.hc
            states = [
                by_id.get(b.id) or HealthState(rise=hc.rise, fall=hc.fall, history_size=hc.history)
                for b in group.backends
            ]
        server._start_checker(tg, name, states)
    if tg is not None and server.controls:
        for name, group in server.table.groups.items():
            if name not in server._checker_tasks and group.config.health_check.enabled:
                server._start_checker(tg, name)
    # file and DNS sources
    for name in list(server.sources):
        up = new.upstreams.get(name)
        if up is None or name in sources or not (up.file or up.dns):
            server.stop_source(name)
    for name, source in sources.items():
        server.stop_source(name)
        server.start_source(name, source)
    # the registry follow loop follows the services upstreams name now
    before = {u.service for u in old.upstreams.values() if u.service}
    after = {u.service for u in new.upstreams.values() if u.service}
    if before != after:
        server.restart_registry_follow()


async def reload_file(server: Server) -> dict[str, list[str]]:
    """Reload from the file the running config came from."""
    from poise.config import load_config

    path = server.config.source
    if path is None or path in ("command line", "poise demo"):
        raise ConfigError(["this configuration did not come from a file: nothing to reload"])
    new = await asyncio.to_thread(load_config, path)
    return await apply(server, new)
