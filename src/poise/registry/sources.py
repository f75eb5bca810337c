"""Backends from outside the registry: a watched file, and DNS (A/AAAA or SRV records).

Theory of operation
-------------------
Both are polled (a file's identity every ``FILE_POLL`` s, DNS every ``refresh``) and report
a new backend list only when it differs from the last one. A source that fails (a file with a
syntax error, a DNS timeout) keeps the last good list in force: poise goes on routing to what
it knew, logs the problem once, and says when the source is good again. A half-written file
is never applied: it fails validation, and the complete one a moment later succeeds. That
needs a format whose every prefix is invalid: an empty file is refused (write ``[]`` for "no
backends"), a JSON list is only complete with its closing ``]``, and plain text only when it
ends with a newline.

File format: a JSON list like ``backends`` in the config (URL strings or objects with
``url``/``weight``/``state``), or plain text with one URL per line (``#`` starts a comment),
ending with a newline.

DNS: type ``A`` looks the name up (A and AAAA) and uses every address on ``port``; type
``SRV`` uses the records of the lowest priority, each target on its own port with its weight
(0 becomes 1), targets resolved through the same resolver. With ``nameserver`` the lookups
go to that server (dnspython); without it, A lookups use the system resolver (getaddrinfo).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import Callable

from poise.config.load import parse_backends
from poise.config.model import BackendConfig, DnsConfig
from poise.errors import ConfigError
from poise.models import authority_of

log = logging.getLogger("poise.sources")

FILE_POLL = 1.0  # seconds between checks of a backends file
OnBackends = Callable[[tuple[BackendConfig, ...]], None]


class SourceError(Exception):
    pass


def parse_backend_file(text: str, path: str) -> tuple[BackendConfig, ...]:
    """Parse a backends file; raise SourceError unless it is complete.

    A file being written is caught at any point of the write: an empty (or blank) file is
    refused (``[]`` is how a JSON file says "no backends"), a JSON list must parse, and plain
    text must end with a newline (a last line without one may be cut short) and name at
    least one backend.
    """
    stripped = text.strip()
    if not stripped:
        raise SourceError(f"{path}: empty file (write [] to mean no backends)")
    if stripped.startswith("["):
        try:
            value = json.loads(stripped)
        except ValueError as exc:
            raise SourceError(f"{path}: not valid JSON: {exc}") from exc
        if value == []:
            return ()  # said explicitly
    else:
        if not text.endswith("\n"):
            raise SourceError(
                f"{path}: the last line does not end with a newline (incomplete file?)"
            )
        value = [
            line.split("#", 1)[0].strip()
            for line in text.splitlines()
            if line.split("#", 1)[0].strip()
        ]
        if not value:
            raise SourceError(f"{path}: no backends, only comments (write [] to mean no backends)")
    try:
        return parse_backends(value, path)
    except ConfigError as exc:
        raise SourceError("; ".join(exc.problems)) from exc


class FileSource:
    def __init__(self, path: str, poll: float = FILE_POLL) -> None:
        self.path = path
        self.poll = poll
        self.backends: tuple[BackendConfig, ...] = ()
        self.error = ""
        self._seen: tuple[int, int, int] | None = None

    def _identity(self) -> tuple[int, int, int]:
        st = os.stat(self.path)
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def read(self) -> tuple[BackendConfig, ...]:
        """Read and parse the file now (raises SourceError)."""
        try:
            seen = self._identity()
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise SourceError(f"{self.path}: {exc.strerror or exc}") from exc
        backends = parse_backend_file(text, self.path)
        self._seen = seen
        self.backends = backends
        self.error = ""
        return backends

    async def follow(self, on_change: OnBackends) -> None:
        while True:
            await asyncio.sleep(self.poll)
            try:
                if self._identity() == self._seen:
                    continue
            except OSError:
                pass  # gone for now (being replaced): read() reports it if it stays gone
            before = self.backends
            try:
                backends = self.read()
            except SourceError as exc:
                if str(exc) != self.error:
                    log.error("backends file %s: %s (keeping the last good list)",
                              self.path, exc)  # fmt: skip
                self.error = str(exc)
                continue
            if backends != before:
                log.info("backends file %s changed: %d backends", self.path, len(backends))
                on_change(backends)

    def statistics(self) -> dict[str, object]:
        return {"file": self.path, "backends": len(self.backends), "error": self.error}


class DnsSource:
    def __init__(self, cfg: DnsConfig) -> None:
        self.cfg = cfg
        self.backends: tuple[BackendConfig, ...] = ()
        self.error = ""
        self.lookups = 0

    async def resolve(self) -> tuple[BackendConfig, ...]:
        """Look the name up now (raises SourceError)."""
        cfg = self.cfg
        self.lookups += 1
        try:
            if cfg.type == "SRV":
                found = await self._srv()
            elif cfg.nameserver is None:
                found = [(ip, cfg.port, 1) for ip in await _getaddrinfo(cfg.name, cfg.port)]
            else:
                found = [(ip, cfg.port, 1) for ip in await self._addresses(cfg.name)]
        except SourceError:
            raise
        except Exception as exc:  # dnspython's many exception types, OSError
            raise SourceError(f"DNS {cfg.type} {cfg.name}: {exc or type(exc).__name__}") from exc
        seen: dict[tuple[str, int], int] = {}
        for ip, port, weight in found:
            seen[(ip, port)] = max(seen.get((ip, port), 0), weight)
        backends = tuple(
            BackendConfig(f"{cfg.scheme}://{authority_of(ip, port)}", cfg.scheme, ip, port, w)
            for (ip, port), w in sorted(seen.items())
        )
        self.backends = backends
        self.error = ""
        return backends

    def _resolver(self) -> object:
        import dns.asyncresolver

        resolver = dns.asyncresolver.Resolver(configure=self.cfg.nameserver is None)
        if self.cfg.nameserver is not None:
            host, port = self.cfg.nameserver
            resolver.nameservers = [host]
            resolver.port = port
        resolver.lifetime = min(5.0, self.cfg.refresh)
        return resolver

    async def _addresses(self, name: str) -> list[str]:
        import dns.resolver

        resolver = self._resolver()
        ips: list[str] = []
        for rdtype in ("A", "AAAA"):
            try:
                answer = await resolver.resolve(name, rdtype)  # type: ignore[attr-defined]
            except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
                continue
            ips += [r.address for r in answer]
        if not ips:
            raise SourceError(f"DNS {name}: no A or AAAA records")
        return ips

    async def _srv(self) -> list[tuple[str, int, int]]:
        resolver = self._resolver()
        answer = await resolver.resolve(self.cfg.name, "SRV")  # type: ignore[attr-defined]
        records = list(answer)
        if not records:
            raise SourceError(f"DNS SRV {self.cfg.name}: no records")
        best = min(r.priority for r in records)
        found = []
        for r in records:
            if r.priority != best:
                continue
            target = r.target.to_text().rstrip(".")
            try:
                socket.inet_pton(socket.AF_INET6 if ":" in target else socket.AF_INET, target)
                ips = [target]
            except OSError:
                ips = await self._addresses(target)
            found += [(ip, int(r.port), max(int(r.weight), 1)) for ip in ips]
        return found

    async def follow(self, on_change: OnBackends) -> None:
        while True:
            await asyncio.sleep(self.cfg.refresh)
            before = self.backends
            try:
                backends = await self.resolve()
            except SourceError as exc:
                if str(exc) != self.error:
                    log.error("%s (keeping the last good list)", exc)
                self.error = str(exc)
                continue
            if backends != before:
                log.info("DNS %s %s: %d backends", self.cfg.type, self.cfg.name, len(backends))
                on_change(backends)

    def statistics(self) -> dict[str, object]:
        return {
            "dns": f"{self.cfg.type} {self.cfg.name}",
            "backends": len(self.backends),
            "lookups": self.lookups,
            "error": self.error,
        }


async def _getaddrinfo(name: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(name, port, type=socket.SOCK_STREAM)
    ips = []
    for _, _, _, _, addr in infos:
        ip = str(addr[0])
        if ip not in ips:
            ips.append(ip)
    return ips
