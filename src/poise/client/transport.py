"""httpx transports that balance on the client side: ``http://users/path`` goes to an instance
of the registered service ``users``, picked by the proxy's own policy code.

::

    client = httpx.AsyncClient(transport=AsyncBalancingTransport("http://127.0.0.1:8500"))
    await client.get("http://users/v1/me")

Theory of operation
-------------------
*Which hosts are services.* A URL whose host could be a service name — one lower-case label
(``users``, ``billing-api``), no explicit port, not ``localhost`` — is looked up in the
registry (the first request lists the service; after that a resolver loop keeps it current).
If the registry has instances of it, the request is balanced; if it has none, the request
passes through unchanged, so ``http://db/`` from /etc/hosts or a compose network still works.
Any other host (``example.com``, ``10.0.0.5``, ``users:8080``) passes through without asking.

*Rewriting.* The request is sent to the picked instance: its scheme, host and port replace the
URL's; path and query are kept. The ``Host`` header becomes the instance's authority
(``10.0.0.5:8001``), which is what a server addressed directly expects and what it would log;
``keep_host=True`` sends the service name instead (for backends that route virtual hosts by
it). httpx still sees the original URL on the response, so cookies and redirects stay with
``users``.

*Retries.* Only a connection that could not be opened (``ConnectError``, ``ConnectTimeout``:
nothing was sent) is retried, on the next candidate in the policy's order — a different
instance each time, up to ``attempts`` in all. The instance that refused is tried only as a
last resort for a few seconds (``EJECT``). Anything that fails after the request may have been
sent is raised as it is: replaying a non-idempotent request is the application's decision.

*Load.* For load-aware policies (least_conn, p2c, peak_ewma) a request counts as in flight from
sending until its response is closed, as in the proxy; the latency sample is the time to the
response head.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

import httpx

from poise.client.aio import AsyncResolver
from poise.client.core import ServiceView, request_key
from poise.client.sync import Resolver
from poise.config.model import PolicyConfig
from poise.errors import InvalidInstance, RegistryError
from poise.models import Backend
from poise.registry.model import check_service

RETRYABLE = (httpx.ConnectError, httpx.ConnectTimeout)
ATTEMPTS = 3


def service_of(url: httpx.URL) -> str | None:
    """The service a URL names, or None when its host cannot be one (see the module doc)."""
    host = url.host
    if url.port is not None or host == "localhost":
        return None
    try:
        return check_service(host)
    except InvalidInstance:
        return None


def rewrite(request: httpx.Request, backend: Backend, keep_host: bool) -> httpx.Request:
    url = request.url.copy_with(scheme=backend.scheme, host=backend.host, port=backend.port)
    fields = request.headers.copy()
    if not keep_host:
        fields["Host"] = backend.authority
    # a given stream keeps these headers as they are (no Host or Content-Length recomputed)
    return httpx.Request(
        request.method, url, headers=fields, stream=request.stream, extensions=request.extensions
    )


def _no_instance(request: httpx.Request, view: ServiceView) -> httpx.ConnectError:
    return httpx.ConnectError(
        f"service {view.service!r}: none of its {len(view.backends)} instance(s) is usable "
        "(critical or draining)",
        request=request,
    )


def _unresolved(request: httpx.Request, service: str, exc: RegistryError) -> httpx.ConnectError:
    return httpx.ConnectError(f"cannot resolve service {service!r}: {exc}", request=request)


class _Done:
    """Report a request's end to its view's load once, whenever the response is closed."""

    __slots__ = ("_backend", "_latency", "_ok", "_view", "done")

    def __init__(self, view: ServiceView, backend: Backend, latency: float, ok: bool) -> None:
        self._view, self._backend, self._latency, self._ok = view, backend, latency, ok
        self.done = False

    def __call__(self) -> None:
        if not self.done:
            self.done = True
            self._view.finished(self._backend, self._latency, self._ok, time.monotonic())


class _Tracked(httpx.SyncByteStream):
    def __init__(self, inner: httpx.SyncByteStream, done: Callable[[], None]) -> None:
        self._inner, self._done = inner, done

    def __iter__(self) -> Iterator[bytes]:
        yield from self._inner

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            self._done()


class _AsyncTracked(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, done: Callable[[], None]) -> None:
        self._inner, self._done = inner, done

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            self._done()


class _Counters:
    """What a transport did, for ``statistics()``: plain integers, bumped inline."""

    def __init__(self) -> None:
        self.balanced = 0  # requests sent to an instance of a service
        self.passed = 0  # requests passed through unchanged
        self.retries = 0  # connect failures retried on another instance
        self.failed = 0  # requests that ran out of instances to try

    def statistics(self) -> dict[str, int]:
        return {"balanced": self.balanced, "passed_through": self.passed,
                "retries": self.retries, "failed": self.failed}  # fmt: skip

    # the sans-I/O steps of one balanced request, the same for the sync and async transport

    def _candidates(
        self,
        request: httpx.Request,
        view: ServiceView,
        resolver: Resolver | AsyncResolver,
        attempts: int,
    ) -> list[Backend]:
        """The instances to try, in the policy's order (from this very view: a backend's
        index means something only in its own view)."""
        key = request_key(resolver.policy, request.url.raw_path, request.headers.raw)
        candidates = view.candidates(key, resolver.ejected, time.monotonic())[:attempts]
        if not candidates:
            self.failed += 1
            raise _no_instance(request, view)
        return candidates

    def _try_failed(
        self,
        view: ServiceView,
        backend: Backend,
        start: float,
        exc: BaseException,
        resolver: Resolver | AsyncResolver,
    ) -> bool:
        """A try raised ``exc``: its end is counted; True when the next instance may be
        tried (nothing was sent: the connection could not be opened)."""
        view.finished(backend, time.monotonic() - start, False, time.monotonic())
        if not isinstance(exc, RETRYABLE):
            return False
        resolver.report_failure(backend)
        return True

    def _answered(
        self, view: ServiceView, backend: Backend, start: float, status: int
    ) -> _Done | None:
        """A response head came: the request's end to report when its body is closed (None:
        the view keeps no load figures)."""
        self.balanced += 1
        if view.load is None:
            return None
        return _Done(view, backend, time.monotonic() - start, status < 500)

    def _exhausted(self, failure: BaseException | None) -> BaseException:
        self.failed += 1
        assert failure is not None
        return failure


class BalancingTransport(_Counters, httpx.BaseTransport):
    """Sync: ``httpx.Client(transport=BalancingTransport("http://127.0.0.1:8500"))``.

    ``registry`` is the registry's URL (the transport then owns a :class:`Resolver`) or a
    resolver to share. ``transport`` is the one that really sends (default: an
    ``httpx.HTTPTransport(**options)``)."""

    def __init__(
        self,
        registry: str | Resolver,
        policy: str | Mapping[str, Any] | PolicyConfig = "round_robin",
        *,
        token: str | None = None,
        attempts: int = ATTEMPTS,
        keep_host: bool = False,
        transport: httpx.BaseTransport | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        self._owns = isinstance(registry, str)
        self.resolver = (
            Resolver(registry, policy, token=token) if isinstance(registry, str) else registry
        )
        self.attempts = max(1, attempts)
        self.keep_host = keep_host
        self.inner = transport if transport is not None else httpx.HTTPTransport(**options)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        service = service_of(request.url)
        if service is None:
            self.passed += 1
            return self.inner.handle_request(request)
        try:
            view = self.resolver.view(service)
        except RegistryError as exc:
            raise _unresolved(request, service, exc) from exc
        if not view.backends:
            self.passed += 1
            return self.inner.handle_request(request)
        candidates = self._candidates(request, view, self.resolver, self.attempts)
        failure: BaseException | None = None
        for attempt, backend in enumerate(candidates):
            self.retries += attempt > 0
            view.started(backend)
            start = time.monotonic()
            try:
                response = self.inner.handle_request(rewrite(request, backend, self.keep_host))
            except BaseException as exc:
                if not self._try_failed(view, backend, start, exc, self.resolver):
                    raise
                failure = exc
                continue
            done = self._answered(view, backend, start, response.status_code)
            if done is None:
                return response
            assert isinstance(response.stream, httpx.SyncByteStream)
            return httpx.Response(
                response.status_code, headers=response.headers,
                stream=_Tracked(response.stream, done), extensions=response.extensions,
            )  # fmt: skip
        raise self._exhausted(failure)

    def close(self) -> None:
        self.inner.close()
        if self._owns:
            self.resolver.close()

    def __repr__(self) -> str:
        return f"BalancingTransport({self.resolver!r}, {self.statistics()})"


class AsyncBalancingTransport(_Counters, httpx.AsyncBaseTransport):
    """Async: ``httpx.AsyncClient(transport=AsyncBalancingTransport("http://127.0.0.1:8500"))``.

    As :class:`BalancingTransport`, with an :class:`AsyncResolver` and, by default, an
    ``httpx.AsyncHTTPTransport(**options)``."""

    def __init__(
        self,
        registry: str | AsyncResolver,
        policy: str | Mapping[str, Any] | PolicyConfig = "round_robin",
        *,
        token: str | None = None,
        attempts: int = ATTEMPTS,
        keep_host: bool = False,
        transport: httpx.AsyncBaseTransport | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        self._owns = isinstance(registry, str)
        self.resolver = (
            AsyncResolver(registry, policy, token=token) if isinstance(registry, str) else registry
        )
        self.attempts = max(1, attempts)
        self.keep_host = keep_host
        self.inner = transport if transport is not None else httpx.AsyncHTTPTransport(**options)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        service = service_of(request.url)
        if service is None:
            self.passed += 1
            return await self.inner.handle_async_request(request)
        try:
            view = await self.resolver.view(service)
        except RegistryError as exc:
            raise _unresolved(request, service, exc) from exc
        if not view.backends:
            self.passed += 1
            return await self.inner.handle_async_request(request)
        candidates = self._candidates(request, view, self.resolver, self.attempts)
        failure: BaseException | None = None
        for attempt, backend in enumerate(candidates):
            self.retries += attempt > 0
            view.started(backend)
            start = time.monotonic()
            try:
                response = await self.inner.handle_async_request(
                    rewrite(request, backend, self.keep_host)
                )
            except BaseException as exc:
                if not self._try_failed(view, backend, start, exc, self.resolver):
                    raise
                failure = exc
                continue
            done = self._answered(view, backend, start, response.status_code)
            if done is None:
                return response
            assert isinstance(response.stream, httpx.AsyncByteStream)
            return httpx.Response(
                response.status_code, headers=response.headers,
                stream=_AsyncTracked(response.stream, done), extensions=response.extensions,
            )  # fmt: skip
        raise self._exhausted(failure)

    async def aclose(self) -> None:
        await self.inner.aclose()
        if self._owns:
            await self.resolver.aclose()

    def __repr__(self) -> str:
        return f"AsyncBalancingTransport({self.resolver!r}, {self.statistics()})"
