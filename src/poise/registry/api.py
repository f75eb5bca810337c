"""The registry's HTTP JSON API (``registry.listen``, 127.0.0.1:8500 by default).

::

    GET    /v1/services                                   services and instance counts
    GET    /v1/services/{service}[?index=N&wait=30s]      instances (blocking query)
    PUT    /v1/services/{service}/instances/{id}          register (body: the instance)
    PUT    /v1/services/{service}/instances/{id}/heartbeat  renew the TTL [{"status": ...}];
                                                   answers service, id, status, ttl, revision
    DELETE /v1/services/{service}/instances/{id}          deregister
    GET    /v1/watch?after=N                              NDJSON event stream from revision N
    GET    /v1/health                                     is the store reachable
    GET    /openapi.json                                  this, as OpenAPI 3.1

Blocking queries work as Consul's do: with ``index`` the call returns as soon as the service
changed after revision ``index``, or after ``wait`` (default 30 s, at most 10 min) with the
same data; ``X-Poise-Index`` carries the revision to pass next. The watch stream sends one JSON
event per line, and a ``{"type": "ping"}`` line every 15 s of silence so dead connections
are noticed; a resume from a revision older than the kept history answers 410 (list again).

Writes need ``Authorization: Bearer <token>`` when ``registry.token`` is set (reads too with
``read_token``); the comparison is constant-time. Every validation error names its field.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncGenerator, Callable
from json.encoder import encode_basestring_ascii as _q
from typing import Any
from urllib.parse import unquote

from poise.config.model import RegistryConfig
from poise.config.values import parse_duration
from poise.errors import Compacted, InvalidInstance, NotRegistered, RegistryError
from poise.httpd import (
    HttpError,
    HttpServer,
    Reply,
    Request,
    Router,
    Stream,
    json_head,
    require_bearer,
)
from poise.registry.memory import MemoryStore
from poise.registry.model import (
    STATUSES,
    Instance,
    check_instance_id,
    check_service,
    check_status,
    parse_instance,
)
from poise.registry.store import Store

MAX_WAIT = 600.0
DEFAULT_WAIT = 30.0
PING = 15.0  # seconds of silence on a watch before a ping line


class RegistryApi:
    def __init__(self, store: Store, cfg: RegistryConfig) -> None:
        self.store = store
        self.cfg = cfg
        self._bearer = None if cfg.token is None else f"Bearer {cfg.token}"
        router = Router()
        router.add("GET", "/v1/services", self.list_services)
        router.add("GET", "/v1/services/{service}", self.get_service)
        router.add("PUT", "/v1/services/{service}/instances/{instance}", self.register)
        router.add("DELETE", "/v1/services/{service}/instances/{instance}", self.deregister)
        router.add("PUT", "/v1/services/{service}/instances/{instance}/heartbeat", self.heartbeat)
        router.add("GET", "/v1/watch", self.watch)
        if hasattr(store, "receive_beats"):  # a store shared by nodes: heartbeats forwarded
            router.add("POST", "/v1/internal/heartbeats", self.forwarded_heartbeats)
        router.add("GET", "/v1/health", self.health)
        router.add("GET", "/openapi.json", self.openapi)
        # the local stores never need a current task: their calls may start eagerly, and
        # their plain heartbeats take a synchronous shortcut (no router, no coroutine)
        local = isinstance(store, MemoryStore)
        # stores that can answer a plain heartbeat synchronously (memory, SQLite, etcd's
        # TTLs held in this node) take it before routing
        beat = getattr(store, "beat", None)
        self._beat: Callable[[str, str], Instance] | None = beat
        self.http = HttpServer(
            router,
            name="registry",
            eager=local,
            fast=self.fast_heartbeat if beat is not None else None,
        )

    async def start(self, host: str, port: int) -> tuple[str, int]:
        return await self.http.start(host, port)

    async def close(self) -> None:
        await self.http.close()

    # -- auth ----------------------------------------------------------------------------

    def _auth(self, request: Request, write: bool) -> None:
        token = self.cfg.token
        if token is not None and (write or self.cfg.read_token):
            require_bearer(request, token)

    def fast_heartbeat(
        self, method: bytes, target: bytes, headers: dict[str, str], keep: bool
    ) -> bytes | None:
        """``PUT /v1/services/{s}/instances/{i}/heartbeat`` without a body, authorised, of a
        registered instance: answered here at once. Anything else (an error included) returns
        None and takes the ordinary way, which answers it properly."""
        if method != b"PUT" or not target.endswith(b"/heartbeat"):
            return None
        if not target.startswith(b"/v1/services/"):
            return None
        service_b, sep, instance_b = target[13:-10].partition(b"/instances/")
        if not sep or b"/" in service_b or b"/" in instance_b:
            return None
        if self._bearer is not None and not hmac.compare_digest(
            headers.get("authorization", ""), self._bearer
        ):
            return None  # (also a "bearer" spelled otherwise: the ordinary way decides)
        service = service_b.decode("latin-1")
        instance = instance_b.decode("latin-1")
        if "%" in service or "%" in instance:
            service, instance = unquote(service), unquote(instance)
        assert self._beat is not None
        try:
            got = self._beat(service, instance)
        except NotRegistered:
            return None
        ttl = "null" if got.ttl is None else repr(got.ttl)
        body = (
            f'{{"service":{_q(service)},"id":{_q(instance)},"status":"{got.status}",'
            f'"ttl":{ttl},"revision":{got.revision}}}\n'
        ).encode()
        index = f"X-Poise-Index: {got.revision}\r\n"
        return json_head(len(body), index, close=not keep) + body

    # -- handlers ----------------------------------------------------------------------------

    async def list_services(self, request: Request) -> Reply:
        self._auth(request, write=False)
        services, rev = await _store(self.store.services())
        return Reply(data={"services": services, "revision": rev}, headers=_index(rev))

    async def get_service(self, request: Request, service: str) -> Reply:
        self._auth(request, write=False)
        _valid(check_service, service, "service")
        index = request.arg("index")
        if index is not None:
            after = _int_arg(index, "index")
            wait = _wait_arg(request.arg("wait"))
            await _store(self.store.wait(after, wait, service=service))
        instances, rev = await _store(self.store.instances(service))
        data = {"service": service, "instances": [i.to_json() for i in instances], "revision": rev}
        return Reply(data=data, headers=_index(rev))

    async def register(self, request: Request, service: str, instance: str) -> Reply:
        self._auth(request, write=True)
        try:
            parsed = parse_instance(service, instance, request.json())
        except InvalidInstance as exc:
            raise HttpError(400, str(exc), problems=exc.problems) from exc
        stored = await _store(self.store.register(parsed))
        return Reply(data={"instance": stored.to_json()}, headers=_index(stored.revision))

    async def heartbeat(self, request: Request, service: str, instance: str) -> Reply:
        self._auth(request, write=True)
        body = request.json()
        status = None
        if body is not None:
            if not isinstance(body, dict) or set(body) - {"status"}:
                raise HttpError(400, 'body: expected {"status": ...} or nothing')
            if "status" in body:
                status = _valid(check_status, body["status"], "status")
        try:
            stored = await _store(self.store.heartbeat(service, instance, status))
        except NotRegistered as exc:
            raise HttpError(404, str(exc), reregister=True) from exc
        # the short form: heartbeats are the registry's most frequent call
        data = {"service": service, "id": instance, "status": stored.status,
                "ttl": stored.ttl, "revision": stored.revision}  # fmt: skip
        return Reply(data=data, headers=_index(stored.revision))

    async def forwarded_heartbeats(self, request: Request) -> Reply:
        """Heartbeats another poise node received for instances whose TTL this node holds
        (``{"from": node, "beats": [[service, id], ...]}``): the ones not held here are
        answered back as refused."""
        self._auth(request, write=True)
        body = request.json()
        beats = body.get("beats") if isinstance(body, dict) else None
        if not isinstance(beats, list) or not all(
            isinstance(b, list) and len(b) == 2 and all(isinstance(x, str) for x in b)
            for b in beats
        ):
            raise HttpError(400, 'body: expected {"beats": [[service, id], ...]}')
        receive = self.store.receive_beats  # type: ignore[attr-defined]
        refused = receive((s, i) for s, i in beats)
        return Reply(data={"renewed": len(beats) - len(refused), "refused": refused})

    async def deregister(self, request: Request, service: str, instance: str) -> Reply:
        self._auth(request, write=True)
        _valid(check_service, service, "service")
        _valid(check_instance_id, instance, "id")
        gone = await _store(self.store.deregister(service, instance))
        return Reply(data={"deregistered": gone})

    async def watch(self, request: Request) -> Stream:
        self._auth(request, write=False)
        after_arg = request.arg("after")
        after = (
            _int_arg(after_arg, "after") if after_arg is not None else await self.store.revision()
        )
        return Stream(self._events(after))

    async def _events(self, after: int) -> AsyncGenerator[bytes, None]:
        events = self.store.watch(after)
        try:
            # the first event is awaited here, so a compacted revision fails as a 410 reply
            # only if it fails at once; later it ends the stream with an error line
            while True:
                try:
                    event = await asyncio.wait_for(anext(events), PING)
                except TimeoutError:
                    yield b'{"type":"ping"}\n'
                    continue
                except Compacted as exc:
                    err = {"type": "error", "status": 410, "error": str(exc)}
                    yield json.dumps(err).encode() + b"\n"
                    return
                yield json.dumps(event.to_json(), separators=(",", ":")).encode() + b"\n"
        finally:
            await events.aclose()

    async def health(self, request: Request) -> Reply:
        try:
            rev = await self.store.revision()
        except RegistryError as exc:
            return Reply(
                503, {"status": "unavailable", "store": self.store.name, "error": str(exc)}
            )
        return Reply(data={"status": "ok", "store": self.store.name, "revision": rev})

    async def openapi(self, request: Request) -> Reply:
        return Reply(data=openapi_document())


async def _store(awaitable: Any) -> Any:
    """Await a store call, translating its failures to HTTP errors."""
    try:
        return await awaitable
    except NotRegistered:
        raise
    except Compacted as exc:
        raise HttpError(410, str(exc), oldest=exc.oldest) from exc
    except RegistryError as exc:
        raise HttpError(503, f"registry store unavailable: {exc}") from exc


def _valid(check: Any, value: object, where: str) -> Any:
    try:
        return check(value, where)
    except InvalidInstance as exc:
        raise HttpError(400, str(exc), problems=exc.problems) from exc


def _int_arg(text: str, name: str) -> int:
    if not text.isdigit():
        raise HttpError(400, f"{name}: expected a revision number, got {text!r}")
    return int(text)


def _wait_arg(text: str | None) -> float:
    if text is None:
        return DEFAULT_WAIT
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise HttpError(400, f"wait: {exc}") from exc
    if not 0 <= seconds <= MAX_WAIT:
        raise HttpError(400, f"wait: must be between 0s and {MAX_WAIT:g}s, got {text!r}")
    return seconds


def _index(rev: int) -> list[tuple[str, str]]:
    return [("X-Poise-Index", str(rev))]


def openapi_document() -> dict[str, Any]:
    instance = {
        "type": "object",
        "required": ["host", "port"],
        "properties": {
            "host": {
                "type": "string",
                "description": "DNS name, IPv4 or IPv6 address (alias: address)",
            },
            "port": {"type": "integer", "minimum": 1, "maximum": 65535},
            "scheme": {"enum": ["http", "https", "tcp"], "default": "http"},
            "weight": {"type": "integer", "minimum": 0, "maximum": 1000, "default": 1},
            "tags": {"type": "array", "items": {"type": "string"}},
            "meta": {"type": "object", "additionalProperties": {"type": "string"}},
            "zone": {"type": "string"},
            "ttl": {"description": "seconds or a duration like '10s'; none = no expiry"},
            "status": {"enum": list(STATUSES), "default": "passing"},
        },
    }
    error = {"description": "error", "content": {"application/json": {"schema": {
        "type": "object", "properties": {"error": {"type": "string"},
                                         "problems": {"type": "array"}}}}}}  # fmt: skip
    path_params = [
        {"name": "service", "in": "path", "required": True, "schema": {"type": "string"}},
        {"name": "instance", "in": "path", "required": True, "schema": {"type": "string"}},
    ]
    ok = {"description": "ok"}
    return {
        "openapi": "3.1.0",
        "info": {"title": "poise service registry", "version": "1"},
        "components": {
            "schemas": {"Instance": instance},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "paths": {
            "/v1/services": {
                "get": {"summary": "services and instance counts", "responses": {"200": ok}}
            },
            "/v1/services/{service}": {
                "get": {
                    "summary": "instances of a service; blocking with index and wait",
                    "parameters": [
                        path_params[0],
                        {"name": "index", "in": "query", "schema": {"type": "integer"}},
                        {"name": "wait", "in": "query", "schema": {"type": "string"}},
                    ],
                    "responses": {"200": ok, "400": error},
                }
            },
            "/v1/services/{service}/instances/{instance}": {
                "put": {
                    "summary": "register (or replace) an instance",
                    "parameters": path_params,
                    "security": [{"bearer": []}],
                    "requestBody": {
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/Instance"}
                            }
                        }
                    },
                    "responses": {"200": ok, "400": error, "401": error},
                },
                "delete": {
                    "summary": "deregister",
                    "parameters": path_params,
                    "security": [{"bearer": []}],
                    "responses": {"200": ok, "401": error},
                },
            },
            "/v1/services/{service}/instances/{instance}/heartbeat": {
                "put": {
                    "summary": "renew the TTL, optionally set the status",
                    "parameters": path_params,
                    "security": [{"bearer": []}],
                    "responses": {"200": ok, "404": error, "401": error},
                }
            },
            "/v1/watch": {
                "get": {
                    "summary": "NDJSON stream of events after a revision",
                    "parameters": [{"name": "after", "in": "query", "schema": {"type": "integer"}}],
                    "responses": {"200": ok, "410": error},
                }
            },
            "/v1/health": {"get": {"summary": "store reachability", "responses": {"200": ok}}},
        },
    }
