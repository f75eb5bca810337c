"""``ssl.SSLContext``s built from the TLS config: listeners (certificates chosen by SNI,
reloaded on change) and connections to backends.

Theory of operation
-------------------
A listener's socket is given one *front* context, which has the default certificate. With
several certificates (or once certificates were reloaded) its ``sni_callback`` runs during
every ClientHello (RFC 6066 §3), with or without a server name, and switches the connection
to the context of the matching certificate (``ssl_object.context = ...``; OpenSSL's
``SSL_set_SSL_CTX``), unless that is the default one the front context has already.
Matching: the exact name first, then a wildcard for the name minus its first label
(``*.example.com`` covers ``a.example.com``, not ``example.com`` nor ``a.b.example.com``:
RFC 6125 §6.4.3), else the default certificate.

The certificates live in a ``CertSet``: an immutable value, rebuilt from the files and
swapped by one assignment on reload. Connections already established keep the context they
were handshaken with, so a reload drops nothing; the next handshake sees the new set.

Every context of a listener gets the same settings (versions, ciphers, ALPN, client
verification), because after the switch OpenSSL verifies the client's certificate with the
*new* context's trust store. Protocol versions and ciphers are fixed when the connection is
created from the front context, so they are not reloadable (a restart changes them).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from poise.config.model import (
    CertificateConfig,
    ListenerTlsConfig,
    UpstreamConfig,
    UpstreamTlsConfig,
)
from poise.tls import tickets
from poise.tls.certs import CertInfo
from poise.tls.checks import check_ca_bundle, check_ciphers, check_pair, reason_of
from poise.tls.sslobject import DirectObject

__all__ = [
    "ALPN",
    "CertSet",
    "ClientTls",
    "ListenerTls",
    "build_cert_set",
    "check_ca_bundle",
    "check_ciphers",
    "check_pair",
    "client_context",
    "format_subject",
    "group_tls",
    "reloadable",
    "upstream_tls",
]

log = logging.getLogger("poise.tls")

ALPN = ["http/1.1"]
VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


# -- listeners ---------------------------------------------------------------------------


def server_context(cfg: ListenerTlsConfig, cert: CertificateConfig | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.sslobject_class = DirectObject  # records straight to _ssl (tls/sslobject.py)
    ctx.minimum_version = VERSIONS[cfg.min_version]
    ctx.maximum_version = VERSIONS[cfg.max_version]
    if cfg.ciphers:
        ctx.set_ciphers(cfg.ciphers)
    ctx.set_alpn_protocols(list(cfg.alpn))
    if cert is not None:
        ctx.load_cert_chain(cert.cert, cert.key)
    if cfg.client_ca:
        ctx.load_verify_locations(cafile=cfg.client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED if cfg.client_auth == "required" else ssl.CERT_OPTIONAL
    return ctx


@dataclass(frozen=True, slots=True)
class CertSet:
    """A listener's certificates at one moment: replaced whole on reload."""

    default: ssl.SSLContext
    exact: dict[str, ssl.SSLContext]
    wildcard: dict[str, ssl.SSLContext]  # "example.com" for a certificate of "*.example.com"
    infos: tuple[CertInfo, ...]  # by certificate index ([0] the default)

    def select(self, server_name: str | None) -> ssl.SSLContext:
        if server_name:
            name = server_name.lower().rstrip(".")
            ctx = self.exact.get(name)
            if ctx is not None:
                return ctx
            dot = name.find(".")
            if dot > 0:
                ctx = self.wildcard.get(name[dot + 1 :])
                if ctx is not None:
                    return ctx
        return self.default


def build_cert_set(cfg: ListenerTlsConfig) -> CertSet:
    """Load every certificate of ``cfg``; raises ValueError (with the file's reason)."""
    exact: dict[str, ssl.SSLContext] = {}
    wildcard: dict[str, ssl.SSLContext] = {}
    infos = []
    contexts = []
    for cert in cfg.certificates:
        info = check_pair(cert.cert, cert.key)
        infos.append(info)
        ctx = server_context(cfg, cert)
        contexts.append(ctx)
        for name in cert.names or info.names:
            if name.startswith("*."):
                wildcard.setdefault(name[2:], ctx)
            else:
                exact.setdefault(name, ctx)
    return CertSet(contexts[0], exact, wildcard, tuple(infos))


def _signature(paths: tuple[str, ...]) -> tuple[tuple[int, int, int], ...] | None:
    """What changes when a file is replaced or rewritten; None while one is missing."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            return None
        out.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


def _paths(cfg: ListenerTlsConfig) -> tuple[str, ...]:
    files = [p for c in cfg.certificates for p in (c.cert, c.key)]
    files += [cfg.client_ca] if cfg.client_ca else []
    return tuple(dict.fromkeys(files + list(cfg.session_ticket_keys)))


def reloadable(old: ListenerTlsConfig, new: ListenerTlsConfig) -> bool:
    """Whether a config reload can take ``new`` in place: certificates, their names,
    ``strict`` and ``reload_interval`` may change; versions, ciphers and client verification
    live in the front context each connection starts from (a restart changes them)."""
    a = dataclasses.replace(old, certificates=(), strict=False, reload_interval=0.0)
    return a == dataclasses.replace(new, certificates=(), strict=False, reload_interval=0.0)


class ListenerTls:
    """One HTTPS listener's TLS: the front context handed to ``create_server`` and the
    current certificates, reloaded when their files change (``watch``) or on demand."""

    def __init__(
        self,
        name: str,
        cfg: ListenerTlsConfig,
        *,
        subject_header: bytes = b"",
        secrets: tickets.TicketSecrets | None = None,
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.certs = build_cert_set(cfg)
        self.context = server_context(cfg, cfg.certificates[0])
        # The front context has the default certificate until a reload: a connection for it
        # needs no switch (SSL_set_SSL_CTX copies the certificate's state: ~4 µs), and with
        # a single certificate no callback at all until a reload may change it.
        self.front_default: ssl.SSLContext | None = self.certs.default
        if len(cfg.certificates) > 1:
            self.context.sni_callback = self._sni
        # session resumption (tls/tickets.py): the front context's tickets and cache are the
        # ones OpenSSL uses, also after the SNI callback switched a connection's context
        self.secrets: tickets.TicketSecrets | None = None
        self.tickets: tickets.TicketKeys | None = None
        self.ticket_mode = self._sessions(cfg, secrets)
        self.full_handshakes = 0  # completed without resuming a session
        self.resumed = 0  # completed resuming one (ticket or session id)
        self.subject_header = subject_header  # b"X-Client-Subject" or b"" (none)
        self.paths = _paths(cfg)
        self._seen = _signature(self.paths)
        self.reloads = 0
        self.reload_failures = 0
        self.handshakes = 0  # connections handed to TLS (``gate``): handshakes begun
        self.plain_http = 0  # plain HTTP requests answered 400 (``gate``)
        self.version_alerts = 0  # ClientHellos without an accepted version (``gate``)
        self.last_error: str | None = None

    def _sessions(self, cfg: ListenerTlsConfig, secrets: tickets.TicketSecrets | None) -> str:
        """Set up resumption; returns how tickets are keyed: "shared" (``secrets``, rotated),
        "files" (``session_ticket_keys``), "process" (OpenSSL's own keys: libssl could not
        be reached) or "off"."""
        ctx = self.context
        if not cfg.session_resumption:
            ctx.options |= ssl.OP_NO_TICKET
            ctx.num_tickets = 0  # TLS 1.3: with OP_NO_TICKET tickets would be cache entries
            if not tickets.disable_session_cache(ctx):
                log.warning(
                    "listener %s: session_resumption is off, but TLS 1.2 session ids stay "
                    "cached in this process (%s)", self.name, tickets.lib_error(),
                )  # fmt: skip
            return "off"
        ca = Path(cfg.client_ca).read_bytes() if cfg.client_ca else None
        ident = tickets.identity(ca, cfg.client_auth)
        files = tickets.read_key_files(cfg.session_ticket_keys)
        if not files:
            self.secrets = secrets or tickets.TicketSecrets(cfg.session_ticket_rotation)
        keys = tickets.TicketKeys(ident, self.secrets, files)
        self._ticket_callback = tickets.install(ctx, keys)  # kept alive with the context
        if self._ticket_callback is None:
            if files:
                raise ValueError(
                    f"session_ticket_keys: this Python's ssl module cannot be given ticket "
                    f"keys ({tickets.lib_error()})"
                )
            log.warning(
                "listener %s: TLS session tickets use per-process keys (%s): with --workers "
                "a client resumes only on the worker that issued its ticket",
                self.name, tickets.lib_error(),
            )  # fmt: skip
            self.secrets = None
            return "process"
        self.tickets = keys
        return "files" if files else "shared"

    @property
    def ticket_callback(self) -> str | None:
        """Which ticket key callback the listener has: "C" (``tls/_tickets.c``), "ctypes"
        (its pure-Python twin), or None (OpenSSL's own keys, or no tickets)."""
        if self.tickets is None:
            return None
        return "C" if self._ticket_callback == "C" else "ctypes"

    def count_session(self, transport: asyncio.BaseTransport) -> None:
        """Count a completed handshake as full or resumed (once per connection)."""
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None and ssl_object.session_reused:
            self.resumed += 1
        else:
            self.full_handshakes += 1

    def _sni(self, ssl_object: Any, server_name: str | None, _front: ssl.SSLContext) -> None:
        ctx = self.certs.select(server_name)
        if ctx is not self.front_default:
            ssl_object.context = ctx

    def _front_outdated(self) -> None:
        """New certificates: the front context's may be the old default, so every
        connection is switched to its certificate's context from now on."""
        self.front_default = None
        self.context.sni_callback = self._sni

    def reload(self, *, force: bool = False) -> str:
        """Load the certificate files again when they changed (always with ``force``).
        Returns "reloaded", "unchanged" or "failed: <reason>"; on failure the previous
        certificates stay in service."""
        sig = _signature(self.paths)
        if not force and (sig is None or sig == self._seen):
            return "unchanged"
        self._seen = sig  # a broken new file is reported once, not on every poll
        try:
            certs = build_cert_set(self.cfg)
            keys = tickets.read_key_files(self.cfg.session_ticket_keys)
            now = dt.datetime.now(dt.UTC)
            for cert, info in zip(self.cfg.certificates, certs.infos, strict=True):
                if info.expired(now):
                    when = info.not_after.strftime("%Y-%m-%d %H:%M UTC")
                    if self.cfg.strict:
                        raise ValueError(f"{cert.cert}: certificate expired on {when}")
                    log.warning("listener %s: %s expired on %s", self.name, cert.cert, when)
        except (ValueError, OSError) as exc:
            self.reload_failures += 1
            self.last_error = reason_of(exc)
            log.error(
                "listener %s: certificate reload failed (%s); still serving the previous "
                "certificates",
                self.name,
                self.last_error,
            )
            return f"failed: {self.last_error}"
        self.certs = certs  # one assignment: the next handshake sees the new set
        self._front_outdated()
        if self.tickets is not None and keys:
            self.tickets.set_files(keys)
        self.reloads += 1
        self.last_error = None
        log.info("listener %s: certificates reloaded", self.name)
        return "reloaded"

    async def watch(self) -> None:
        """Poll the files' modification times every ``reload_interval`` until cancelled
        (0: not at all, but a config reload may set an interval later)."""
        while True:
            interval = self.cfg.reload_interval
            await asyncio.sleep(interval or 1.0)
            if interval:
                self.reload()

    def install(self, cfg: ListenerTlsConfig, certs: CertSet) -> None:
        """Take a reloaded config's certificates (``build_cert_set(cfg)``, made beforehand
        so a failure changes nothing). Only what ``reloadable`` allows may differ."""
        self.cfg = cfg
        self.certs = certs
        self._front_outdated()
        self.paths = _paths(cfg)
        self._seen = _signature(self.paths)

    def subject_field(self, transport: asyncio.BaseTransport) -> bytes:
        """The ``<header>: <subject>\\r\\n`` line for a verified client certificate, or b""."""
        if not self.subject_header:
            return b""
        peer = transport.get_extra_info("peercert")
        if not peer:
            return b""
        return self.subject_header + b": " + format_subject(peer.get("subject", ())) + b"\r\n"

    def statistics(self) -> dict[str, object]:
        return {
            "certificates": [
                {
                    "cert": c.cert,
                    "names": list(c.names or i.names),
                    "not_after": i.not_after.isoformat(),
                }
                for c, i in zip(self.cfg.certificates, self.certs.infos, strict=True)
            ],
            "handshakes": self.handshakes,
            "sessions": {
                "full": self.full_handshakes,
                "resumed": self.resumed,
                "tickets": self.ticket_mode,
                "ticket_callback": self.ticket_callback,
                "tickets_issued": self.tickets.issued if self.tickets is not None else 0,
                "tickets_unknown": self.tickets.unknown if self.tickets is not None else 0,
            },
            "plain_http": self.plain_http,
            "version_alerts": self.version_alerts,
            "reloads": self.reloads,
            "reload_failures": self.reload_failures,
            "last_error": self.last_error,
        }

    def counters(self) -> dict[str, int]:
        """The traffic counters, for ``poise.dataplane`` (summed over workers)."""
        return {
            "handshakes": self.handshakes,
            "full": self.full_handshakes,
            "resumed": self.resumed,
            "plain_http": self.plain_http,
            "version_alerts": self.version_alerts,
        }

    def __repr__(self) -> str:
        return f"ListenerTls({self.name}, {len(self.cfg.certificates)} certificates)"


_SHORT = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
}


def _escape(value: str) -> str:
    """RFC 4514 §2.4 escaping; every byte outside printable ASCII becomes \\XX, so the
    result is always a safe header value (no CR, LF or NUL can get through)."""
    out = []
    for i, ch in enumerate(value):
        if ch in ',+"\\<>;=' or (ch == "#" and i == 0) or (ch == " " and i in (0, len(value) - 1)):
            out.append("\\" + ch)
        elif " " <= ch <= "~":
            out.append(ch)
        else:
            out.extend(f"\\{b:02X}" for b in ch.encode("utf-8"))
    return "".join(out)


def format_subject(subject: Any) -> bytes:
    """``getpeercert()["subject"]`` as an RFC 4514 string, most specific first, as nginx's
    ``$ssl_client_s_dn``: ``CN=alice,OU=eng,O=Example``."""
    rdns = []
    for rdn in reversed(tuple(subject)):
        rdns.append("+".join(f"{_SHORT.get(k, k)}={_escape(str(v))}" for k, v in rdn))
    return ",".join(rdns).encode("ascii")


# -- backends ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientTls:
    """How a group speaks TLS to its https:// backends: one context for all of them, and
    the name to send (SNI) and verify, unless each backend's own host is meant."""

    context: ssl.SSLContext
    server_name: str | None = None

    def name_for(self, backend_host: str) -> str:
        return self.server_name or backend_host


def client_context(cfg: UpstreamTlsConfig, alpn: list[str] | None = None) -> ssl.SSLContext:
    # create_default_context: CERT_REQUIRED, check_hostname, the system store unless a CA
    # bundle is given (then only that bundle is trusted).
    ctx = ssl.create_default_context(cafile=cfg.ca)
    ctx.sslobject_class = DirectObject
    if not cfg.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = VERSIONS[cfg.min_version]
    if cfg.ciphers:
        ctx.set_ciphers(cfg.ciphers)
    ctx.set_alpn_protocols(ALPN if alpn is None else alpn)
    if cfg.cert and cfg.key:
        ctx.load_cert_chain(cfg.cert, cfg.key)
    return ctx


def group_tls(ucfg: UpstreamConfig) -> ClientTls:
    cfg = ucfg.tls or UpstreamTlsConfig()
    # HTTP/2 backends (protocol h2 or grpc) are asked for h2 by ALPN (h2/upstream.py)
    alpn = None if ucfg.protocol == "http1" else ["h2"]
    return ClientTls(client_context(cfg, alpn), cfg.server_name)


def upstream_tls(upstreams: Mapping[str, UpstreamConfig]) -> dict[str, ClientTls]:
    """TLS for each group that is known to reach https:// backends (listed ones, a ``tls``
    section, or DNS discovery with scheme https). Groups whose https backends appear only
    later (from the registry) get theirs when first needed (``Context.tls_for``)."""
    return {
        name: group_tls(ucfg)
        for name, ucfg in upstreams.items()
        if ucfg.tls is not None
        or any(b.scheme == "https" for b in ucfg.backends)
        or (ucfg.dns is not None and ucfg.dns.scheme == "https")
    }
