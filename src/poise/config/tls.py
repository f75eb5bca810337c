"""The TLS parts of the configuration: ``listeners[].tls``, ``listeners[].redirect_https`` and
``upstreams.X.tls``.

Certificate files are read here, once, so that a config that cannot serve is refused before
anything starts: an unreadable file, a file that is not PEM, a key that does not belong to
its certificate, a CA bundle without a certificate, a cipher string OpenSSL rejects. An
expired certificate is a warning (``Config.warnings``) unless the listener says ``strict``.
Paths are used as written (relative ones from the working directory).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from pathlib import Path

from poise.config.checks import (
    Checker,
    check_bool,
    check_str,
    choice,
    key_path,
)
from poise.config.model import (
    BackendConfig,
    CertificateConfig,
    ListenerTlsConfig,
    RedirectConfig,
    UpstreamTlsConfig,
)
from poise.config.values import describe_type, parse_duration
from poise.tls.certs import CertInfo, read_pem_certificate
from poise.tls.checks import check_ca_bundle, check_ciphers, check_pair
from poise.tls.tickets import lib_error, read_key_files

__all__ = ["check_sni_names", "listener_tls", "redirect_https", "upstream_tls"]

LISTENER_TLS_KEYS = (
    "cert",
    "key",
    "names",
    "certificates",
    "min_version",
    "max_version",
    "ciphers",
    "client_ca",
    "client_auth",
    "client_subject_header",
    "strict",
    "reload_interval",
    "session_resumption",
    "session_ticket_rotation",
    "session_ticket_keys",
)
_CERT_KEYS = ("cert", "key", "names")
UPSTREAM_TLS_KEYS = ("ca", "verify", "server_name", "cert", "key", "min_version", "ciphers")
_REDIRECT_KEYS = ("status", "port")

_VERSION = choice("1.2", "1.3")
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_SNI_NAME_RE = re.compile(rf"(?:\*\.)?{_LABEL}(?:\.{_LABEL})*")
_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# fields poise itself writes or frames by: a subject header must not be one of them
_OWN_FIELDS = frozenset(
    {
        "host", "content-length", "transfer-encoding", "connection", "upgrade", "te",
        "trailer", "keep-alive", "proxy-connection", "x-forwarded-for", "x-forwarded-proto",
        "x-forwarded-host", "forwarded", "via",
    }
)  # fmt: skip


def _when(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _readable(c: Checker, path: str, file: str) -> bool:
    try:
        Path(file).read_bytes()
    except OSError as exc:
        c.error(path, f"cannot read {file}: {exc.strerror or exc}")
        return False
    return True


def _pair(
    c: Checker, obj: Mapping[str, object], path: str, *, strict: bool, what: str
) -> tuple[str, str, CertInfo] | None:
    """``cert`` and ``key`` of ``obj``: both readable, PEM, matching; expiry checked."""
    cert = c.required(obj, "cert", path, check_str)
    key = c.required(obj, "key", path, check_str)
    if cert is None or key is None:
        return None
    cpath, kpath = key_path(path, "cert"), key_path(path, "key")
    if not (_readable(c, cpath, cert) & _readable(c, kpath, key)):
        return None
    try:
        info = read_pem_certificate(Path(cert).read_bytes())
    except ValueError as exc:
        c.error(cpath, f"{exc}: {cert}")
        return None
    try:
        check_pair(cert, key)
    except ValueError as exc:
        c.error(kpath, f"{exc} ({key} for {cert})")
        return None
    now = dt.datetime.now(dt.UTC)
    if info.expired(now):
        message = f"{what} {cert} expired on {_when(info.not_after)}"
        if strict:
            c.error(cpath, message + " (strict: refused)")
        else:
            c.warn(cpath, message)
    elif now < info.not_before:
        c.warn(cpath, f"{what} {cert} is not valid before {_when(info.not_before)}")
    return cert, key, info


def check_sni_names(value: object) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ValueError("expected a host name or a non-empty list of them")
    out = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"expected host names, got {describe_type(item)}")
        name = item.lower().rstrip(".")
        if len(name) > 253 or not _SNI_NAME_RE.fullmatch(name):
            raise ValueError(f"not a host name or '*.' wildcard: {item!r}")
        out.append(name)
    return tuple(dict.fromkeys(out))


def _subject_header(value: object) -> str:
    text = check_str(value)
    if not _TOKEN_RE.fullmatch(text):
        raise ValueError(f"not a header field name: {text!r}")
    if text.lower() in _OWN_FIELDS:
        raise ValueError(f"{text!r} is a field poise writes itself; choose another name")
    return text


def _certificate(
    c: Checker, obj: Mapping[str, object], path: str, strict: bool
) -> CertificateConfig | None:
    names: tuple[str, ...] = c.field(obj, "names", path, check_sni_names, ())
    pair = _pair(c, obj, path, strict=strict, what="certificate")
    if pair is None:
        return None
    cert, key, info = pair
    if not names and not info.names:
        c.warn(path, f"certificate {cert} names no host: it can only serve as the default")
    return CertificateConfig(cert, key, names)


def listener_tls(c: Checker, value: object, path: str) -> ListenerTlsConfig | None:
    obj = c.mapping(value, path, LISTENER_TLS_KEYS)
    if obj is None:
        return None
    strict = c.field(obj, "strict", path, check_bool, False)
    certs: list[CertificateConfig] = []
    ok = True
    if "cert" in obj or "key" in obj:
        first = _certificate(c, obj, path, strict)
        ok = first is not None
        if first is not None:
            certs.append(first)
    elif "names" in obj:
        c.error(key_path(path, "names"), "applies to 'cert'; there is none here")
    if "certificates" in obj:
        lpath = key_path(path, "certificates")
        for i, item in enumerate(c.items(obj["certificates"], lpath)):
            entry = c.mapping(item, f"{lpath}[{i}]", _CERT_KEYS)
            cert = _certificate(c, entry, f"{lpath}[{i}]", strict) if entry is not None else None
            ok = ok and cert is not None
            if cert is not None:
                certs.append(cert)
    elif "cert" not in obj and "key" not in obj:
        c.error(path, "needs a certificate: 'cert' and 'key', or 'certificates'")
        ok = False
    min_version = c.field(obj, "min_version", path, _VERSION, "1.2")
    max_version = c.field(obj, "max_version", path, _VERSION, "1.3")
    if min_version > max_version:
        c.error(key_path(path, "max_version"), f"is below min_version ({min_version})")
    ciphers = c.field(obj, "ciphers", path, lambda v: check_ciphers(check_str(v)), None)
    client_ca = c.field(obj, "client_ca", path, check_str, None)
    if client_ca is not None:
        try:
            check_ca_bundle(client_ca)
        except ValueError as exc:
            c.error(key_path(path, "client_ca"), str(exc))
    client_auth = c.field(obj, "client_auth", path, choice("required", "optional"), "required")
    header = c.field(obj, "client_subject_header", path, _subject_header, None)
    for key in ("client_auth", "client_subject_header"):
        if key in obj and "client_ca" not in obj:
            c.error(
                key_path(path, key), "needs 'client_ca' (client certificates are not asked for)"
            )
    interval = c.field(obj, "reload_interval", path, parse_duration, 10.0)
    resumption, rotation, ticket_keys = _sessions(c, obj, path)
    if not ok or not certs:
        return None
    return ListenerTlsConfig(
        certificates=tuple(certs),
        min_version=min_version,
        max_version=max_version,
        ciphers=ciphers,
        client_ca=client_ca,
        client_auth=client_auth,
        client_subject_header=header,
        strict=strict,
        reload_interval=interval,
        session_resumption=resumption,
        session_ticket_rotation=rotation,
        session_ticket_keys=ticket_keys,
    )


def _sessions(
    c: Checker, obj: Mapping[str, object], path: str
) -> tuple[bool, float, tuple[str, ...]]:
    """``session_resumption``, ``session_ticket_rotation`` and ``session_ticket_keys``
    (tls/tickets.py); key files are read here, so a wrong one stops the load."""
    resumption = c.field(obj, "session_resumption", path, check_bool, True)

    def rotation_period(v: object) -> float:
        seconds = parse_duration(v)
        if seconds < 1:
            raise ValueError(f"must be at least 1s, got {v!r}")
        return seconds

    rotation = c.field(obj, "session_ticket_rotation", path, rotation_period, 3600.0)
    files: tuple[str, ...] = ()
    if "session_ticket_keys" in obj:
        kpath = key_path(path, "session_ticket_keys")
        raw = obj["session_ticket_keys"]
        items = [raw] if isinstance(raw, str) else list(c.items(raw, kpath))
        names = []
        for i, item in enumerate(items):
            ipath = kpath if isinstance(raw, str) else f"{kpath}[{i}]"
            if not isinstance(item, str) or not item:
                c.error(ipath, f"expected a file name, got {describe_type(item)}")
                continue
            try:
                read_key_files([item])
            except ValueError as exc:
                c.error(ipath, str(exc))
                continue
            names.append(item)
        files = tuple(names)
        if files and (error := lib_error()) is not None:
            c.error(kpath, f"this Python's ssl module cannot be given ticket keys ({error})")
    for key in ("session_ticket_rotation", "session_ticket_keys"):
        if key in obj and not resumption:
            c.error(key_path(path, key), "has no effect with session_resumption: false")
    if "session_ticket_rotation" in obj and "session_ticket_keys" in obj:
        c.error(
            key_path(path, "session_ticket_rotation"),
            "not with session_ticket_keys: the files are the keys (rotate them by replacing "
            "the files)",
        )
    return resumption, rotation, files


def redirect_https(c: Checker, value: object, path: str) -> RedirectConfig | None:
    """``true``, or ``{"status": 308, "port": 8443}``."""
    if value is True:
        return RedirectConfig()
    if not isinstance(value, Mapping):
        c.error(path, f"expected true or an object with 'status' and 'port', got {value!r}")
        return None
    obj = c.mapping(value, path, _REDIRECT_KEYS)
    if obj is None:
        return None

    def status(v: object) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v not in (301, 302, 307, 308):
            raise ValueError(f"must be 301, 302, 307 or 308, got {v!r}")
        return v

    def port(v: object) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65535:
            raise ValueError(f"expected a port number (1-65535), got {v!r}")
        return v

    return RedirectConfig(
        status=c.field(obj, "status", path, status, 301),
        port=c.field(obj, "port", path, port, 443),
    )


def _server_name(value: object) -> str:
    text = check_str(value).lower().rstrip(".")
    if "*" in text or not _SNI_NAME_RE.fullmatch(text):
        raise ValueError(f"not a host name: {value!r}")
    return text


def upstream_tls(
    c: Checker, value: object, path: str, backends: tuple[BackendConfig, ...]
) -> UpstreamTlsConfig | None:
    obj = c.mapping(value, path, UPSTREAM_TLS_KEYS)
    if obj is None:
        return None
    if backends and not any(b.scheme == "https" for b in backends):
        c.error(path, "applies to https:// backends; this upstream has none")
    cert = key = None
    if "cert" in obj or "key" in obj:
        pair = _pair(c, obj, path, strict=False, what="client certificate")
        if pair is not None:
            cert, key, _ = pair
    ca = c.field(obj, "ca", path, check_str, None)
    if ca is not None:
        try:
            check_ca_bundle(ca)
        except ValueError as exc:
            c.error(key_path(path, "ca"), str(exc))
    verify = c.field(obj, "verify", path, check_bool, True)
    if not verify and ca is not None:
        c.error(key_path(path, "ca"), "is not used with verify: false")
    return UpstreamTlsConfig(
        ca=ca,
        verify=verify,
        server_name=c.field(obj, "server_name", path, _server_name, None),
        cert=cert,
        key=key,
        min_version=c.field(obj, "min_version", path, _VERSION, "1.2"),
        ciphers=c.field(obj, "ciphers", path, lambda v: check_ciphers(check_str(v)), None),
    )
