"""The sync SDK: the same API as :mod:`poise.client.aio`, for code without an event loop.

Theory of operation
-------------------
Heartbeats and resolver loops need to run while the application does something else, so the
sync classes run the async ones on an event loop in a daemon thread (:class:`LoopThread`) that
they own: one implementation of re-registering, backoff and blocking queries, not two. The
application's thread only hands work over (``run_coroutine_threadsafe``) and waits for it.
A daemon thread never keeps a process from exiting; ``close``/``__exit__`` stop it properly
(deregistering first). Plain calls (``services``, ``instances``, ``watch``) use a sync httpx
client directly.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine, Iterator, Mapping
from types import TracebackType
from typing import Any, Self, TypeVar, Unpack

import httpx

from poise.client.aio import (
    DEREGISTER_TIMEOUT,
    REQUEST_TIMEOUT,
    AsyncRegistration,
    AsyncRegistry,
    AsyncResolver,
)
from poise.client.core import (
    DEFAULT_WAIT,
    RegistrationSpec,
    ServiceView,
    SpecFields,
    WatchState,
    blocking_query,
    decode,
    headers,
    parse_instances,
    parse_policy,
    parse_services,
)
from poise.config.model import PolicyConfig
from poise.errors import NoHealthyBackend, RegistryUnreachable
from poise.models import Backend
from poise.registry.model import PASSING, Instance, check_status

T = TypeVar("T")
STOP_TIMEOUT = 5.0  # seconds to wait for a loop thread to finish


class LoopThread:
    """An asyncio event loop running in a daemon thread, owned by one sync object."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result (or exception)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call_soon(self, fn: Any, *args: Any) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(STOP_TIMEOUT)


class Registry:
    """The sync twin of :class:`~poise.client.aio.AsyncRegistry`."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float = REQUEST_TIMEOUT):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._http = httpx.Client(
            base_url=self.url, headers=headers(token), timeout=timeout, trust_env=False
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(
        self,
        method: str,
        path: str,
        what: str,
        *,
        params: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Any:
        try:
            reply = self._http.request(
                method, path, params=params,
                timeout=timeout if timeout is not None else self.timeout,
            )  # fmt: skip
        except httpx.TransportError as exc:
            raise RegistryUnreachable(f"{what}: registry at {self.url}: {exc!r}") from exc
        return decode(reply.status_code, reply.content, what, self.url)

    def register(
        self,
        service: str,
        port: int,
        *,
        status: str = PASSING,
        interval: float | None = None,
        **fields: Unpack[SpecFields],
    ) -> Registration:
        """``with registry.register("users", port=8001):`` — heartbeats in a daemon thread.
        ``fields``: as :meth:`AsyncRegistry.register`'s."""
        spec = RegistrationSpec.make(service, port, **fields)
        return Registration(self.url, self.token, spec, status=status, interval=interval)

    def services(self) -> dict[str, int]:
        return parse_services(self.call("GET", "/v1/services", "list services"))

    def instances(self, service: str) -> tuple[Instance, ...]:
        return self.query(service)[0]

    def query(
        self, service: str, index: int | None = None, wait: float = DEFAULT_WAIT
    ) -> tuple[tuple[Instance, ...], int]:
        params, timeout = blocking_query(index, wait, self.timeout)
        data = self.call(
            "GET", f"/v1/services/{service}", f"list {service}", params=params, timeout=timeout
        )
        return parse_instances(data)

    def watch(self, service: str, wait: float = DEFAULT_WAIT) -> Iterator[tuple[Instance, ...]]:
        """The instances now, then after every change; retries while the registry is down."""
        state = WatchState()
        while True:
            try:
                found, index = self.query(service, state.index, wait)
            except RegistryUnreachable:
                time.sleep(state.failed())
                continue
            if state.answered(found, index):
                yield found

    def __repr__(self) -> str:
        return f"Registry({self.url})"


class Registration:
    """A registered instance heartbeating from a daemon thread while the ``with`` lasts."""

    def __init__(
        self,
        url: str,
        token: str | None,
        spec: RegistrationSpec,
        *,
        status: str = PASSING,
        interval: float | None = None,
    ) -> None:
        self.url = url
        self.token = token
        self.registration = spec
        self._status = check_status(status)
        self._interval = interval
        self._thread: LoopThread | None = None
        self._async: AsyncRegistration | None = None

    @property
    def id(self) -> str:
        return self.registration.id

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"{self!r} is already started")
        thread = LoopThread(f"poise heartbeat {self.id}")

        async def begin() -> AsyncRegistration:
            registry = AsyncRegistry(self.url, self.token)
            reg = AsyncRegistration(
                registry, self.registration, status=self._status, interval=self._interval
            )
            try:
                await reg.start()
            except BaseException:
                await registry.aclose()
                raise
            return reg

        try:
            self._async = thread.run(begin())
        except BaseException:
            thread.stop()
            raise
        self._thread = thread

    def stop(self, deregister: bool = True) -> None:
        thread, reg = self._thread, self._async
        self._thread = self._async = None
        if thread is None or reg is None:
            return

        async def end() -> None:
            try:
                await reg.stop(deregister)
            finally:
                await reg.registry.aclose()

        try:
            thread.run(end(), DEREGISTER_TIMEOUT + STOP_TIMEOUT)
        finally:
            thread.stop()

    def set_status(self, status: str) -> None:
        self._status = check_status(status)
        if self._thread is not None and self._async is not None:
            self._thread.call_soon(self._async.set_status, status)

    @property
    def registered(self) -> bool:
        return self._async is not None and self._async.registered

    @property
    def heartbeats(self) -> int:
        return 0 if self._async is None else self._async.heartbeats

    def statistics(self) -> dict[str, object]:
        if self._async is None:
            return {"id": self.id, "registered": False}
        return self._async.statistics()

    def __repr__(self) -> str:
        return f"Registration({self.registration.service}/{self.id})"


class Resolver:
    """The sync twin of :class:`~poise.client.aio.AsyncResolver`, safe to use from many
    threads; its blocking queries run on a loop thread it owns."""

    def __init__(
        self,
        registry: str,
        policy: str | Mapping[str, Any] | PolicyConfig = "round_robin",
        *,
        token: str | None = None,
        wait: float = DEFAULT_WAIT,
    ) -> None:
        self.policy = parse_policy(policy)
        self._thread = LoopThread("poise resolver")

        async def make() -> AsyncResolver:
            return AsyncResolver(registry, self.policy, token=token, wait=wait)

        self._async = self._thread.run(make())
        self._closed = False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._thread.run(self._async.aclose(), STOP_TIMEOUT)
        finally:
            self._thread.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def view(self, service: str) -> ServiceView:
        found = self._async.views.get(service)
        if found is not None:
            return found
        if self._closed:
            raise RuntimeError("the resolver is closed")
        return self._thread.run(self._async.view(service))

    def instances(self, service: str) -> tuple[Instance, ...]:
        return self.view(service).instances

    def candidates(self, service: str, key: bytes | None = None) -> list[Backend]:
        return self.view(service).candidates(key, self._async.ejected, time.monotonic())

    def pick(self, service: str, key: bytes | None = None) -> Backend:
        found = self.candidates(service, key)
        if not found:
            raise NoHealthyBackend(f"service {service!r}: no usable instance")
        return found[0]

    def report_failure(self, backend: Backend) -> None:
        self._async.report_failure(backend)

    @property
    def ejected(self) -> dict[str, float]:
        return self._async.ejected

    def statistics(self) -> dict[str, object]:
        return self._async.statistics()

    def __repr__(self) -> str:
        return f"Resolver({self._async.registry.url}, {self.policy.name})"
