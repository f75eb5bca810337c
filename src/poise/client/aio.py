"""The async SDK: register and heartbeat, list and watch, resolve with the proxy's policies.

Theory of operation
-------------------
``AsyncRegistry.register(...)`` returns an :class:`AsyncRegistration`, an async context
manager. Entering registers once (a malformed registration or a refused token raises there,
at the call site); then one task, owned by the registration and cancelled and awaited on
exit, heartbeats every ``ttl / 3``:

* a heartbeat answered ``404`` means the registry no longer knows the instance (it restarted
  with an empty store, or the instance expired while the process was paused): register again;
* a registry that does not answer is retried with a capped backoff, logged once per outage,
  and never raised into the application: the service keeps serving, and registers again as
  soon as the registry is back (its instance may have expired meanwhile);
* ``set_status`` wakes the task so the new status is sent at once, not at the next beat.

Leaving deregisters, best effort and within ``DEREGISTER_TIMEOUT`` seconds: a registry that
is down must not hold up a shutdown, and the TTL removes the instance anyway. It deregisters
whenever a register call was sent, answered or not: a call that timed out may still be
applied (a paused registry serves its queued requests when it resumes), and without a TTL
nothing else would ever remove it.

``AsyncResolver`` keeps, per service asked about, a :class:`~poise.client.core.ServiceView`
current with a loop of blocking queries (``?index=N&wait=30s``); the first question about a
service lists it before answering. While the registry is unreachable the last known view
stays in force (like the proxy), and the loop retries with the same capped backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import Any, Self, Unpack

import httpx

from poise.client.core import (
    DEFAULT_WAIT,
    EJECT,
    RegistrationSpec,
    ServiceView,
    SpecFields,
    WatchState,
    backoff,
    blocking_query,
    decode,
    headers,
    parse_instances,
    parse_policy,
    parse_services,
)
from poise.config.model import PolicyConfig
from poise.errors import NoHealthyBackend, NotRegistered, RegistryError, RegistryUnreachable
from poise.models import Backend
from poise.registry.model import PASSING, Instance, check_status

log = logging.getLogger("poise.client")

DEREGISTER_TIMEOUT = 2.0  # seconds: leaving never waits longer on the registry
REQUEST_TIMEOUT = 5.0  # seconds for a registry call that is not a blocking query


class AsyncRegistry:
    """A client of the registry API at ``url`` (``http://127.0.0.1:8500``)."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float = REQUEST_TIMEOUT):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._http = httpx.AsyncClient(
            base_url=self.url, headers=headers(token), timeout=timeout, trust_env=False
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def call(
        self,
        method: str,
        path: str,
        what: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        timeout: float | None = None,
        reg: RegistrationSpec | None = None,
    ) -> Any:
        """One API call: the decoded reply, or a :class:`RegistryError`."""
        try:
            reply = await self._http.request(
                method, path, json=body, params=params,
                timeout=timeout if timeout is not None else self.timeout,
            )  # fmt: skip
        except httpx.TransportError as exc:
            raise RegistryUnreachable(f"{what}: registry at {self.url}: {exc!r}") from exc
        return decode(reply.status_code, reply.content, what, self.url, reg)

    def register(
        self,
        service: str,
        port: int,
        *,
        status: str = PASSING,
        interval: float | None = None,
        **fields: Unpack[SpecFields],
    ) -> AsyncRegistration:
        """``async with registry.register("users", port=8001):`` — see the module doc.
        ``fields``: host, ttl, id, weight, tags, meta, zone, scheme (``SpecFields``; the
        defaults are ``RegistrationSpec.make``'s)."""
        reg = RegistrationSpec.make(service, port, **fields)
        return AsyncRegistration(self, reg, status=status, interval=interval)

    async def services(self) -> dict[str, int]:
        return parse_services(await self.call("GET", "/v1/services", "list services"))

    async def instances(self, service: str) -> tuple[Instance, ...]:
        return (await self.query(service))[0]

    async def query(
        self, service: str, index: int | None = None, wait: float = DEFAULT_WAIT
    ) -> tuple[tuple[Instance, ...], int]:
        """List ``service``; with ``index``, a blocking query that returns once the service
        changed after that revision, or after ``wait`` seconds."""
        params, timeout = blocking_query(index, wait, self.timeout)
        data = await self.call(
            "GET", f"/v1/services/{service}", f"list {service}", params=params, timeout=timeout
        )
        return parse_instances(data)

    async def watch(
        self, service: str, wait: float = DEFAULT_WAIT
    ) -> AsyncIterator[tuple[Instance, ...]]:
        """The instances of ``service`` now, then after every change (blocking queries). An
        unreachable registry is retried with backoff; the iterator only ends when closed."""
        state = WatchState()
        while True:
            try:
                found, index = await self.query(service, state.index, wait)
            except RegistryUnreachable as exc:
                if not state.failures:
                    log.warning("watch %s: %s; retrying", service, exc)
                await asyncio.sleep(state.failed())
                continue
            if state.answered(found, index):
                yield found

    def __repr__(self) -> str:
        return f"AsyncRegistry({self.url})"


class AsyncRegistration:
    """One registered instance, kept alive by heartbeats while the context is open."""

    def __init__(
        self,
        registry: AsyncRegistry,
        reg: RegistrationSpec,
        *,
        status: str = PASSING,
        interval: float | None = None,
    ) -> None:
        self.registry = registry
        self.registration = reg
        self.interval = interval if interval is not None else reg.interval
        self.status = check_status(status)
        self.registered = False
        self.heartbeats = 0
        self.registrations = 0  # successful registers: 1 + re-registrations
        self.failures = 0  # calls that failed (registry unreachable or refusing)
        self.last_error = ""
        self.sent = False  # a register call went out: it may have been applied, acked or not
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None

    @property
    def id(self) -> str:
        return self.registration.id

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Register (errors other than an unreachable registry raise), start heartbeating."""
        if self._task is not None:
            raise RuntimeError(f"{self!r} is already started")
        self._wake = asyncio.Event()
        try:
            await self._register()
        except RegistryUnreachable as exc:
            self._failed(exc)  # the heartbeat task registers as soon as it can
        self._task = asyncio.create_task(self._run(), name=f"heartbeat {self.id}")

    async def stop(self, deregister: bool = True) -> None:
        """Stop heartbeating; then deregister within ``DEREGISTER_TIMEOUT`` (best effort)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        # a register call that timed out or was cut short by the cancel above may still be
        # applied (a paused registry serves it when it resumes): deregister after any sent
        if not deregister or not (self.registered or self.sent):
            return
        self.registered = self.sent = False
        try:
            await self.registry.call(
                "DELETE", self.registration.path, f"deregister {self.id}",
                timeout=DEREGISTER_TIMEOUT,
            )  # fmt: skip
        except RegistryError as exc:
            if self.registration.ttl is None:
                log.error("deregister %s failed (%s); it has no TTL: it stays registered "
                          "until deregistered", self.id, exc)  # fmt: skip
            else:
                log.warning("deregister %s failed (%s); its TTL will expire it", self.id, exc)

    def set_status(self, status: str) -> None:
        """``passing``, ``warning`` or ``critical`` (keeps traffic away); sent at once."""
        self.status = check_status(status)
        if self._wake is not None:
            self._wake.set()

    async def _register(self) -> None:
        reg = self.registration
        self.sent = True
        await self.registry.call("PUT", reg.path, f"register {reg.id}", body=reg.body(self.status))
        self.registered = True
        self.registrations += 1
        if self.last_error:
            log.info("%s registered again after: %s", reg.id, self.last_error)
            self.last_error = ""

    async def _heartbeat(self) -> None:
        reg = self.registration
        await self.registry.call(
            "PUT", reg.path + "/heartbeat", f"heartbeat {reg.id}",
            body={"status": self.status}, reg=reg,
        )  # fmt: skip
        self.heartbeats += 1
        self.last_error = ""

    def _failed(self, exc: RegistryError) -> None:
        self.failures += 1
        if not self.last_error:  # once per outage, not once per try
            log.warning("%s: %s; retrying with backoff", self.id, exc)
        self.last_error = str(exc)

    async def _run(self) -> None:
        assert self._wake is not None
        failures = 0
        delay = self.interval if self.registered else backoff(1)
        while True:
            with contextlib.suppress(TimeoutError):  # woken early by set_status
                await asyncio.wait_for(self._wake.wait(), delay)
            self._wake.clear()
            try:
                if self.registered:
                    try:
                        await self._heartbeat()
                    except NotRegistered:
                        log.info("%s unknown to the registry (restarted or expired): "
                                 "registering again", self.id)  # fmt: skip
                        self.registered = False
                        await self._register()
                else:
                    await self._register()
                failures, delay = 0, self.interval
            except RegistryError as exc:
                # unreachable, or refusing (a token rotated): keep the app alive and retry
                self._failed(exc)
                failures += 1
                delay = min(backoff(failures), self.interval)

    def statistics(self) -> dict[str, object]:
        return {
            "id": self.id, "service": self.registration.service, "status": self.status,
            "registered": self.registered, "registrations": self.registrations,
            "heartbeats": self.heartbeats, "failures": self.failures,
            "last_error": self.last_error,
        }  # fmt: skip

    def __repr__(self) -> str:
        state = "registered" if self.registered else "not registered"
        return f"AsyncRegistration({self.registration.service}/{self.id}, {state})"


class AsyncResolver:
    """Current instances of the services asked about, and picks among them by policy."""

    def __init__(
        self,
        registry: AsyncRegistry | str,
        policy: str | Mapping[str, Any] | PolicyConfig = "round_robin",
        *,
        token: str | None = None,
        wait: float = DEFAULT_WAIT,
        rng: random.Random | None = None,
    ) -> None:
        self._owns = isinstance(registry, str)
        self.registry = AsyncRegistry(registry, token) if isinstance(registry, str) else registry
        self.policy = parse_policy(policy)
        self.wait = wait
        self.rng = rng or random.Random()
        self.views: dict[str, ServiceView] = {}
        self.ejected: dict[str, float] = {}  # backend id -> monotonic time it is tried again
        self.reachable = True
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._listing: dict[str, asyncio.Task[ServiceView]] = {}

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        tasks = [*self._tasks.values(), *self._listing.values()]
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._owns:
            await self.registry.aclose()

    async def view(self, service: str) -> ServiceView:
        """The current view of ``service``; the first call lists it and starts following."""
        found = self.views.get(service)
        if found is not None:
            return found
        pending = self._listing.get(service)
        if pending is None:  # one listing however many callers ask at once
            pending = asyncio.create_task(self._first(service), name=f"list {service}")
            self._listing[service] = pending
            pending.add_done_callback(lambda _: self._listing.pop(service, None))
        return await asyncio.shield(pending)

    async def _first(self, service: str) -> ServiceView:
        instances, rev = await self.registry.query(service)
        view = self._replace(service, instances, rev)
        self._tasks[service] = asyncio.create_task(self._follow(service), name=f"resolve {service}")
        return view

    def _replace(self, service: str, instances: tuple[Instance, ...], rev: int) -> ServiceView:
        view = ServiceView(service, instances, rev, policy=self.policy, rng=self.rng)
        self.views[service] = view
        return view

    async def _follow(self, service: str) -> None:
        failures = 0
        while True:
            # after a failure, list at once: a registry that restarted empty counts revisions
            # from 1 again, and a blocking query on the old revision would sit out its wait
            index = self.views[service].revision if failures == 0 else None
            try:
                instances, rev = await self.registry.query(service, index, self.wait)
            except RegistryError as exc:
                failures += 1
                if self.reachable:
                    log.warning("resolver: %s; keeping the last known instances", exc)
                self.reachable = False
                await asyncio.sleep(backoff(failures))
                continue
            failures, self.reachable = 0, True
            if instances != self.views[service].instances:
                self._replace(service, instances, rev)
            elif rev != index:
                self.views[service].revision = rev

    async def instances(self, service: str) -> tuple[Instance, ...]:
        return (await self.view(service)).instances

    async def candidates(self, service: str, key: bytes | None = None) -> list[Backend]:
        """Usable instances of ``service`` in the policy's preference order."""
        return (await self.view(service)).candidates(key, self.ejected, time.monotonic())

    async def pick(self, service: str, key: bytes | None = None) -> Backend:
        """The instance to use now: ``backend.url`` is ``http://host:port``."""
        found = await self.candidates(service, key)
        if not found:
            raise NoHealthyBackend(f"service {service!r}: no usable instance")
        return found[0]

    def report_failure(self, backend: Backend) -> None:
        """``backend`` refused a connection: try it only as a last resort for a while."""
        now = time.monotonic()
        for stale in [b for b, until in list(self.ejected.items()) if until <= now]:
            self.ejected.pop(stale, None)
        self.ejected[backend.id] = now + EJECT

    def statistics(self) -> dict[str, object]:
        return {
            "services": {s: sum(v.usable) for s, v in self.views.items()},
            "reachable": self.reachable,
            "ejected": sum(1 for t in list(self.ejected.values()) if t > time.monotonic()),
        }

    def __repr__(self) -> str:
        return f"AsyncResolver({self.registry.url}, {self.policy.name}, {len(self.views)} services)"
