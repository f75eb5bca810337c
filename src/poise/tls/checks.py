"""Checks of TLS files and settings for the config loader: a certificate and its key, a CA
bundle, a cipher string. Each loads what it checks as a server or client would and raises
``ValueError`` with a plain reason.

Apart from tls/contexts.py (which builds the contexts and imports the config model) so that
the config package can use them without an import cycle between the two packages.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from poise.tls.certs import CertInfo, read_pem_certificate


def reason_of(exc: BaseException) -> str:
    """A short reason from an OSError or ssl.SSLError, for config problems and logs."""
    if isinstance(exc, ssl.SSLError):
        # set_ciphers raises an SSLError without the reason attribute
        reason = getattr(exc, "reason", None) or ""
        text = str(exc)
        if reason == "KEY_VALUES_MISMATCH":
            return "the certificate and the key do not match"
        if reason in ("PEM_LIB", "NO_START_LINE", "BAD_BASE64_DECODE") or "PEM lib" in text:
            return "not a PEM certificate and key"
        if reason == "NO_CIPHER_MATCH" or "No cipher can be selected" in text:
            return "no cipher matches"
        return reason.lower().replace("_", " ") if reason else text
    if isinstance(exc, OSError) and exc.strerror:
        name = f" {exc.filename}" if exc.filename else ""
        return f"cannot read{name}: {exc.strerror}"
    return str(exc)


def check_pair(cert: str, key: str) -> CertInfo:
    """Load a certificate chain and its key as a server would; ``ValueError`` with a plain
    reason when a file is unreadable, not PEM, or the key does not belong to the cert."""
    try:
        pem = Path(cert).read_bytes()
    except OSError as exc:
        raise ValueError(reason_of(exc)) from None
    info = read_pem_certificate(pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ValueError) as exc:
        if isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError) and not exc.filename:
            exc.filename = key  # load_cert_chain does not say which file it could not read
        raise ValueError(reason_of(exc)) from None
    return info


def check_ca_bundle(path: str) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.load_verify_locations(cafile=path)
    except OSError as exc:
        if not isinstance(exc, ssl.SSLError) and not exc.filename:
            exc.filename = path
        raise ValueError(reason_of(exc)) from None
    if not ctx.get_ca_certs():
        raise ValueError(f"no CA certificate in {path}")


def check_ciphers(ciphers: str) -> str:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(ciphers)
    except ssl.SSLError as exc:
        raise ValueError(f"{reason_of(exc)}: {ciphers!r}") from None
    return ciphers
