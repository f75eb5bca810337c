"""What poise needs to know about a PEM certificate without a crypto library: its validity
period, its subject common name and its DNS names (subjectAltName).

Theory of operation
-------------------
A certificate is DER (X.690) inside PEM armour (RFC 7468). RFC 5280 §4.1::

    Certificate  ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue }
    TBSCertificate ::= SEQUENCE { version [0] EXPLICIT OPTIONAL, serialNumber INTEGER,
        signature AlgorithmIdentifier, issuer Name, validity Validity, subject Name,
        subjectPublicKeyInfo, ..., extensions [3] EXPLICIT OPTIONAL }
    Validity ::= SEQUENCE { notBefore Time, notAfter Time }   -- UTCTime or GeneralizedTime

Only the first certificate of a file (the leaf) is read. Nothing here verifies anything:
OpenSSL does that when the context loads the chain; this only reads dates and names for
messages, expiry warnings and the default SNI names of a certificate.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
from dataclasses import dataclass

__all__ = ["CertInfo", "read_pem_certificate"]

_PEM_RE = re.compile(rb"-----BEGIN CERTIFICATE-----\s*(.+?)\s*-----END CERTIFICATE-----", re.DOTALL)
_OID_CN = bytes.fromhex("550403")  # 2.5.4.3 commonName
_OID_SAN = bytes.fromhex("551d11")  # 2.5.29.17 subjectAltName
_SEQUENCE = 0x30
_SET = 0x31
_OID = 0x06
_OCTET_STRING = 0x04
_BOOLEAN = 0x01
_UTC_TIME = 0x17
_GENERALIZED_TIME = 0x18
_DNS_NAME = 0x82  # [2] IMPLICIT IA5String inside GeneralNames


@dataclass(frozen=True, slots=True)
class CertInfo:
    not_before: dt.datetime  # UTC
    not_after: dt.datetime  # UTC
    common_name: str | None
    dns_names: tuple[str, ...]  # subjectAltName dNSName entries, lower-case

    @property
    def names(self) -> tuple[str, ...]:
        """Names a client may ask for: the SAN DNS names, else the common name (as clients
        did before RFC 6125)."""
        if self.dns_names:
            return self.dns_names
        return (self.common_name.lower(),) if self.common_name else ()

    def expired(self, now: dt.datetime) -> bool:
        return now > self.not_after


def _tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of contents, end of contents) of the element at ``pos``."""
    if pos + 2 > len(data):
        raise ValueError("truncated DER")
    tag = data[pos]
    first = data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        if n == 0 or n > 4 or pos + n > len(data):
            raise ValueError("bad DER length")
        length = int.from_bytes(data[pos : pos + n], "big")
        pos += n
    end = pos + length
    if end > len(data):
        raise ValueError("truncated DER")
    return tag, pos, end


def _children(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    out = []
    pos = start
    while pos < end:
        tag, s, e = _tlv(data, pos)
        out.append((tag, s, e))
        pos = e
    return out


def _time(tag: int, raw: bytes) -> dt.datetime:
    text = raw.decode("ascii")
    if tag == _UTC_TIME:  # YYMMDDHHMMSSZ; RFC 5280 §4.1.2.5.1: YY < 50 is 20YY
        year = int(text[:2])
        text = f"{2000 + year if year < 50 else 1900 + year}{text[2:]}"
    elif tag != _GENERALIZED_TIME:
        raise ValueError("validity is not a time")
    return dt.datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=dt.UTC)


def _common_name(der: bytes, start: int, end: int) -> str | None:
    for _, rs, re_ in _children(der, start, end):  # RDNs (SETs)
        for _, as_, ae in _children(der, rs, re_):  # AttributeTypeAndValue
            parts = _children(der, as_, ae)
            if len(parts) == 2 and der[parts[0][1] : parts[0][2]] == _OID_CN:
                return der[parts[1][1] : parts[1][2]].decode("utf-8", "replace")
    return None


def _dns_names(der: bytes, start: int, end: int) -> tuple[str, ...]:
    """subjectAltName dNSName entries from the [3] extensions element's contents."""
    tag, s, e = _tlv(der, start)
    if tag != _SEQUENCE:
        return ()
    for _, xs, xe in _children(der, s, e):
        parts = _children(der, xs, xe)
        if not parts or parts[0][0] != _OID or der[parts[0][1] : parts[0][2]] != _OID_SAN:
            continue
        _, vs, _ = parts[-1]  # extnValue OCTET STRING (after an optional critical BOOLEAN)
        _, gs, ge = _tlv(der, vs)  # GeneralNames SEQUENCE
        return tuple(
            der[ns:ne].decode("ascii", "replace").lower()
            for tag, ns, ne in _children(der, gs, ge)
            if tag == _DNS_NAME
        )
    return ()


def parse_der_certificate(der: bytes) -> CertInfo:
    _, cs, _ = _tlv(der, 0)
    _, ts, te = _tlv(der, cs)  # tbsCertificate
    fields = _children(der, ts, te)
    if fields and fields[0][0] == 0xA0:  # [0] version
        fields = fields[1:]
    if len(fields) < 6:
        raise ValueError("not an X.509 certificate")
    _, vs, ve = fields[3]  # validity
    times = _children(der, vs, ve)
    if len(times) != 2:
        raise ValueError("bad validity")
    not_before = _time(times[0][0], der[times[0][1] : times[0][2]])
    not_after = _time(times[1][0], der[times[1][1] : times[1][2]])
    _, ss, se = fields[4]
    names: tuple[str, ...] = ()
    for tag, s, e in fields[6:]:
        if tag == 0xA3:  # [3] extensions
            names = _dns_names(der, s, e)
    return CertInfo(not_before, not_after, _common_name(der, ss, se), names)


def read_pem_certificate(pem: bytes) -> CertInfo:
    """The first certificate of a PEM file; ``ValueError`` when there is none or it is
    not readable."""
    m = _PEM_RE.search(pem)
    if m is None:
        raise ValueError("no PEM certificate found (expected '-----BEGIN CERTIFICATE-----')")
    try:
        der = base64.b64decode(b"".join(m[1].split()), validate=True)
    except binascii.Error:
        raise ValueError("the PEM certificate is not valid base64") from None
    try:
        return parse_der_certificate(der)
    except (ValueError, IndexError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the certificate: {exc}") from None
