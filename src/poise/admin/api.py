"""The admin API: what poise is doing and why, and the operator's levers. Its own listener
(``admin.listen``, 127.0.0.1:9901 by default), never the data plane's: no Host header or path
encoding on a proxy listener can reach it. Every call needs ``Authorization: Bearer <token>``.

::

    GET    /v1/status                                     version, uptime, listeners, registry,
                                                          file/DNS sources and their errors
    GET    /v1/routes                                     routes per listener
    GET    /v1/upstreams                                  every upstream, backends summarised
    GET    /v1/upstreams/{upstream}                       backends: state, health and why,
                                                          ejection, in flight, last checks;
                                                          source_error (file/DNS, "" if good)
    PUT    /v1/upstreams/{upstream}/backends/{backend}/state   {"state": "drain"}
    PUT    /v1/upstreams/{upstream}/backends/{backend}/weight  {"weight": 3}
    POST   /v1/upstreams/{upstream}/backends                   {"url": ..., "weight": 1}
    DELETE /v1/upstreams/{upstream}/backends/{backend}
    GET    /v1/registry                                   the registry as poise sees it (503
                                                          with the reason and the last known
                                                          view, "stale", while the store is down)
    GET    /v1/config                                     the config in force (secrets hidden)
    POST   /v1/reload                                     reload the config file
    GET    /v1/workers                                    worker processes (--workers N)
    POST   /v1/workers/restart                            rolling restart of the workers
    GET    /metrics                                       Prometheus text format
    GET    /openapi.json
    GET    /  (or /dashboard)                             the live dashboard page (no token:
                                                          it holds no data; open it as
                                                          /#token=... and its calls send it)

``{backend}`` is ``host:port`` (or the URL, percent-encoded). Writes take JSON, are validated
before anything changes, and change nothing when they fail.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from importlib import resources
from typing import TYPE_CHECKING, Any

from poise import __version__
from poise.admin import metrics
from poise.config.checks import check_weight
from poise.errors import RegistryError
from poise.health.status import STATES
from poise.httpd import HttpError, HttpServer, Reply, Request, Router, require_bearer

if TYPE_CHECKING:
    # (a type-only cycle: the server builds the admin API, which reads the whole process
    # through it; tests/test_layers.py lists it with the reason)
    from poise.server import Server

SECRET_FIELDS = ("token", "secret")
PUBLIC = ("/", "/dashboard")
# the page loads nothing from elsewhere (works offline, no CDN) and may only call its origin
CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; form-action 'none'; frame-ancestors 'none'"
)


class AdminApi:
    def __init__(self, server: Server, token: str) -> None:
        self.server = server
        self.token = token
        self.started = time.time()
        r = Router()
        r.add("GET", "/v1/status", self.status)
        r.add("GET", "/v1/routes", self.routes)
        r.add("GET", "/v1/upstreams", self.upstreams)
        r.add("GET", "/v1/upstreams/{upstream}", self.upstream)
        r.add("POST", "/v1/upstreams/{upstream}/backends", self.add_backend)
        r.add("DELETE", "/v1/upstreams/{upstream}/backends/{backend}", self.remove_backend)
        r.add("PUT", "/v1/upstreams/{upstream}/backends/{backend}/state", self.set_state)
        r.add("PUT", "/v1/upstreams/{upstream}/backends/{backend}/weight", self.set_weight)
        r.add("GET", "/v1/registry", self.registry)
        r.add("GET", "/v1/config", self.config)
        r.add("POST", "/v1/reload", self.reload)
        r.add("GET", "/v1/workers", self.workers)
        r.add("POST", "/v1/workers/restart", self.restart_workers)
        r.add("GET", "/metrics", self.metrics)
        r.add("GET", "/openapi.json", self.openapi)
        r.add("GET", "/", self.dashboard)
        r.add("GET", "/dashboard", self.dashboard)
        self.http = HttpServer(r, name="admin", guard=self.check_token)

    async def start(self, host: str, port: int) -> tuple[str, int]:
        return await self.http.start(host, port)

    async def close(self) -> None:
        await self.http.close()

    def check_token(self, request: Request) -> None:
        if request.path in PUBLIC and request.method in ("GET", "HEAD"):
            return  # the dashboard page itself holds no data; its calls carry the token
        require_bearer(request, self.token)

    # -- reads -----------------------------------------------------------------------------

    async def status(self, request: Request) -> Reply:
        s = self.server
        dp = s.dataplane()
        return Reply(
            data={
                "version": __version__,
                "uptime_s": round(time.time() - self.started, 3),
                "config": s.config.source,
                "listeners": {k: f"{h}:{p}" for k, (h, p) in s.addresses.items()},
                "upstreams": len(s.table.groups),
                "clients": dp["clients"],
                "requests": dp["stats"].get("requests", 0),
                "workers": s.workers() if s.workers is not None else None,
                # file and DNS sources: their backend count and error ("" when good)
                "sources": {name: src.statistics() for name, src in s.membership.sources.items()},
                "registry": None
                if s.registry is None
                else {
                    "store": s.registry.store.name,
                    "reachable": s.registry.reachable,
                    "api": None
                    if s.registry_address is None
                    else f"{s.registry_address[0]}:{s.registry_address[1]}",
                },
            }
        )

    async def routes(self, request: Request) -> Reply:
        return Reply(
            data={
                lc.name: [
                    {"hosts": list(r.hosts), "path": r.path_prefix, "upstream": r.upstream}
                    for r in lc.routes
                ]
                for lc in self.server.config.listeners
            }
        )

    async def upstreams(self, request: Request) -> Reply:
        return Reply(
            data={
                name: self._upstream(name, detail=True, dp=dp)
                for dp in (self.server.dataplane(),)  # summed over workers once, not per upstream
                for name in self.server.table.groups
            }
        )

    async def upstream(self, request: Request, upstream: str) -> Reply:
        if upstream not in self.server.table.groups:
            raise HttpError(404, f"no upstream named {upstream!r}")
        return Reply(data=self._upstream(upstream, detail=True))

    async def registry(self, request: Request) -> Reply:
        reg = self.server.registry
        if reg is None:
            raise HttpError(404, "no registry is configured")
        try:
            services, rev = await reg.store.services()
        except RegistryError as exc:
            # the store is down (etcd): say so, with the last known view, marked stale
            return Reply(
                503,
                {
                    **reg.statistics(),
                    "status": "unavailable",
                    "stale": True,
                    "error": f"registry store unavailable: {exc}",
                    "services": None,
                    "store_revision": None,
                },
            )
        return Reply(
            data={
                **reg.statistics(),
                "status": "ok",
                "stale": False,
                "services": services,
                "store_revision": rev,
            }
        )

    async def config(self, request: Request) -> Reply:
        return Reply(data=_redact(_plain(self.server.config)))

    async def metrics(self, request: Request) -> Reply:
        body = metrics.render(self.server).encode()
        return Reply(body=body, content_type="text/plain; version=0.0.4; charset=utf-8")

    async def openapi(self, request: Request) -> Reply:
        return Reply(data=openapi_document())

    async def dashboard(self, request: Request) -> Reply:
        page = resources.files("poise.admin").joinpath("dashboard.html").read_bytes()
        return Reply(
            body=page,
            content_type="text/html; charset=utf-8",
            headers=[("Content-Security-Policy", CSP)],
        )

    # -- writes ----------------------------------------------------------------------------

    async def set_state(self, request: Request, upstream: str, backend: str) -> Reply:
        state = _field(request, "state")
        if state not in STATES:
            raise HttpError(400, f"state: {state!r} is not one of {', '.join(STATES)}")
        self._do(self.server.membership.set_backend_state, upstream, backend, state)
        return Reply(data=self._upstream(upstream, detail=True))

    async def set_weight(self, request: Request, upstream: str, backend: str) -> Reply:
        weight = _checked(check_weight, _field(request, "weight"), "weight")
        self._do(self.server.membership.set_backend_weight, upstream, backend, weight)
        return Reply(data=self._upstream(upstream, detail=True))

    async def add_backend(self, request: Request, upstream: str) -> Reply:
        body = request.json()
        if not isinstance(body, dict) or "url" not in body or set(body) - {"url", "weight"}:
            raise HttpError(400, 'body: expected {"url": ..., "weight": n}')
        weight = _checked(check_weight, body.get("weight", 1), "weight")
        self._do(self.server.membership.add_backend, upstream, body["url"], weight)
        return Reply(201, self._upstream(upstream, detail=True))

    async def reload(self, request: Request) -> Reply:
        """Reload the config file (validated first; refused with every reason, or applied)."""
        from poise.errors import ConfigError

        try:
            changed = await self.server.reload()
        except ConfigError as exc:
            raise HttpError(
                400, "reload refused; the running configuration stays", problems=exc.problems
            ) from exc
        except OSError as exc:
            raise HttpError(400, f"reload failed: {exc}") from exc
        return Reply(data={"reloaded": True, **changed})

    async def workers(self, request: Request) -> Reply:
        if self.server.workers is None:
            raise HttpError(404, "poise runs as one process (no --workers)")
        return Reply(data={"workers": self.server.workers()})

    async def restart_workers(self, request: Request) -> Reply:
        """Replace the workers one at a time; answers when the last new one serves."""
        if self.server.restart_workers is None:
            raise HttpError(404, "poise runs as one process (no --workers)")
        try:
            done = await self.server.restart_workers()
        except (RuntimeError, OSError) as exc:
            raise HttpError(500, f"rolling restart stopped: {exc}") from exc
        return Reply(data=done)

    async def remove_backend(self, request: Request, upstream: str, backend: str) -> Reply:
        self._do(self.server.membership.remove_backend, upstream, backend)
        return Reply(data=self._upstream(upstream, detail=True))

    # -- helpers ---------------------------------------------------------------------------

    def _do(self, action: Any, *args: Any) -> None:
        from poise.errors import ConfigError

        try:
            action(*args)
        except KeyError as exc:
            raise HttpError(404, str(exc.args[0])) from exc
        except ConfigError as exc:
            raise HttpError(400, "; ".join(exc.problems), problems=exc.problems) from exc
        except ValueError as exc:
            raise HttpError(409, str(exc)) from exc

    def _upstream(
        self, name: str, *, detail: bool = False, dp: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        s = self.server
        group = self.server.table.groups[name]
        ucfg = group.config
        board = s.membership.board.statistics().get(name, {})
        facts = board.get("backends", {}) if isinstance(board, dict) else {}
        checker = next((c for c in s.membership.checkers if c.group == name), None)
        checks: dict[str, Any] = {}
        if checker is not None:
            for b, st in zip(checker.backends, checker.states, strict=True):
                checks[b.url] = {
                    "health": st.health.value,
                    "reason": st.reason,
                    "history": st.history_dicts() if detail else None,
                }
        source = (
            {"service": ucfg.service}
            if ucfg.service
            else {"file": ucfg.file}
            if ucfg.file
            else {"dns": f"{ucfg.dns.type} {ucfg.dns.name}"}
            if ucfg.dns
            else {"static": True}
        )
        feed = s.membership.sources.get(name)  # a file or DNS source: its last error, "" when good
        source_error = feed.error if feed is not None else None
        traffic: dict[str, Any] = (dp or s.dataplane())["backends"].get(name, {})
        backends = []
        for b in group.backends:
            seen = traffic.get(b.authority, metrics.NO_TRAFFIC)
            entry: dict[str, Any] = {
                "url": b.url,
                "weight": b.weight,
                "up": group.up[b.index],
                **facts.get(b.url, {}),
                "in_flight": seen["in_flight"],
                "connections": {"idle": seen["idle"], "open": seen["open"]},
                "responses": {f"{c}xx": seen["responses"][c] for c in range(1, 6)},
            }
            if seen["ejected"] and s.workers is not None:
                entry["ejected_in_workers"] = seen["ejected"]
            if b.url in checks:
                entry["check"] = {k: v for k, v in checks[b.url].items() if v is not None}
            backends.append(entry)
        return {
            "policy": ucfg.policy.name,
            "source": source,
            "source_error": source_error,
            "panic": bool(board.get("panic", False)) if isinstance(board, dict) else False,
            "backends": backends,
        }


def _field(request: Request, name: str) -> Any:
    body = request.json()
    if not isinstance(body, dict) or set(body) != {name}:
        raise HttpError(400, f'body: expected {{"{name}": ...}}')
    return body[name]


def _checked(check: Any, value: object, name: str) -> Any:
    try:
        return check(value)
    except ValueError as exc:
        raise HttpError(400, f"{name}: {exc}") from exc


def _plain(value: Any) -> Any:
    """A frozen config as JSON-ready data (``dataclasses.asdict`` cannot copy mapping
    proxies)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _redact(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {
            k: ("<hidden>" if k in SECRET_FIELDS and v is not None else _redact(v))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_redact(v) for v in value]
    return value


def openapi_document() -> dict[str, Any]:
    ok = {"description": "ok"}
    err = {"description": "error (JSON: error, problems)"}
    upstream_param = {
        "name": "upstream",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
    }
    be = {
        "name": "backend",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
        "description": "host:port",
    }

    def op(
        summary: str, params: list[dict[str, Any]] | None = None, body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        out: dict[str, Any] = {
            "summary": summary,
            "security": [{"bearer": []}],
            "responses": {"200": ok, "400": err, "401": err, "404": err},
        }
        if params:
            out["parameters"] = params
        if body:
            out["requestBody"] = {"content": {"application/json": {"schema": body}}}
        return out

    return {
        "openapi": "3.1.0",
        "info": {"title": "poise admin API", "version": __version__},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": {
            "/v1/status": {"get": op("version, uptime, listeners, registry")},
            "/v1/routes": {"get": op("routes per listener")},
            "/v1/upstreams": {"get": op("every upstream")},
            "/v1/upstreams/{upstream}": {"get": op("one upstream's backends", [upstream_param])},
            "/v1/upstreams/{upstream}/backends": {
                "post": op(
                    "add a backend (static upstreams)",
                    [upstream_param],
                    {
                        "type": "object",
                        "required": ["url"],
                        "properties": {"url": {"type": "string"}, "weight": {"type": "integer"}},
                    },
                )
            },
            "/v1/upstreams/{upstream}/backends/{backend}": {
                "delete": op("remove a backend (in-flight requests finish)", [upstream_param, be])
            },
            "/v1/upstreams/{upstream}/backends/{backend}/state": {
                "put": op(
                    "operator state",
                    [upstream_param, be],
                    {"type": "object", "properties": {"state": {"enum": list(STATES)}}},
                )
            },
            "/v1/upstreams/{upstream}/backends/{backend}/weight": {
                "put": op(
                    "weight",
                    [upstream_param, be],
                    {"type": "object", "properties": {"weight": {"type": "integer"}}},
                )
            },
            "/v1/registry": {"get": op("the service registry as poise sees it")},
            "/v1/config": {"get": op("the config in force, secrets hidden")},
            "/v1/reload": {"post": op("reload the config file (refused with every reason)")},
            "/v1/workers": {"get": op("worker processes (with --workers N)")},
            "/v1/workers/restart": {
                "post": op("rolling restart: each new worker serves before the old one drains")
            },
            "/metrics": {"get": op("Prometheus text format")},
        },
    }
