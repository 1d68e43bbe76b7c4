"""DANE for SMTP (RFC 7672): TLSA records, what they demand of an MX host, and the check.

Owned by the delivery worker (`elemta: delivery`): elemta.delivery.smtp_transport asks
`DANELookup.tls_for(name, secure, port, mode)` for each MX host before it connects, and
elemta.delivery.smtp_client calls `verify()` right after the TLS handshake of a session
with level "dane". RFC 7672 section 2.2, host by host:

    MX or address lookup not DNSSEC-secure     no DANE: the destination's usual TLS
    TLSA lookup fails (SERVFAIL: bogus)        defer this host (4.7.5)
    secure, no TLSA records                    no DANE: the destination's usual TLS
    secure, usable TLSA records                TLS required, a record must match, else
                                               this host is given up (4.7.5)
    secure, only unusable records (PKIX-TA/EE  TLS required, certificate not checked
    usages 0 and 1, unknown values)            ("mandatory encryption", 2.2)

Mode "dane-only" (delivery.tls_policy) defers wherever DANE cannot authenticate the host.
"Secure" is the AD bit of the configured resolver (elemta.util.dnswire): as with Postfix's
smtp_dns_support_level = dnssec, that resolver must be a local validating one.

Usable records (RFC 7672 3.1): DANE-EE(3), the server's certificate (selector 0) or public
key (selector 1), exactly or by SHA-256/SHA-512, no name or expiry check; DANE-TA(2), a
certificate of the chain the server presents, which OpenSSL (through pyOpenSSL) then
checks the server's certificate against, expiry included, and whose name must be the MX
host's (RFC 7672 3.2.2). DANE-TA needs the server's chain, which Python's ssl gives from
3.10 on; on 3.9 such records count as unusable.

See also: elemta.delivery.mx (the lookups), tests/test_dane.py.
"""

import _ssl
import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from OpenSSL import crypto

from elemta.delivery.mtasts import mx_matches
from elemta.delivery.mx import RouteError
from elemta.tlsrpt import results

# RFC 7218 names of the usages, selectors and matching types.
PKIX_TA, PKIX_EE, DANE_TA, DANE_EE = 0, 1, 2, 3
USAGE_NAMES = {PKIX_TA: "PKIX-TA", PKIX_EE: "PKIX-EE", DANE_TA: "DANE-TA", DANE_EE: "DANE-EE"}
CERT, SPKI = 0, 1
DIGESTS = {0: None, 1: hashlib.sha256, 2: hashlib.sha512}
# Python's ssl shows the chain the server sent only from 3.10 on (a private method until
# 3.13): without it DANE-TA cannot be checked.
PEER_CHAIN = hasattr(_ssl._SSLSocket, "get_unverified_chain")

# The tls_policy levels (and the delivery.dane switch's mode).
DANE_MODE = "dane"
DANE_ONLY = "dane-only"
MODES = (DANE_MODE, DANE_ONLY)


def wanted(delivery):
    """Whether the delivery settings (config.delivery) ask for DANE anywhere: then every
    lookup needs the DO bit."""
    return delivery.dane or any(entry.level in MODES for entry in delivery.tls_policy)


class DANEError(Exception):
    """The server's certificate matches none of its host's usable TLSA records."""


@dataclass(frozen=True)
class TLSA:
    """One TLSA record (RFC 6698 2.1)."""
    usage: int
    selector: int
    mtype: int
    data: bytes

    @classmethod
    def from_rdata(cls, rdata):
        return cls(rdata.usage, rdata.selector, rdata.mtype, bytes(rdata.cert))

    @property
    def usable(self):
        """RFC 7672 3.1: only DANE-EE and DANE-TA, with known selectors and digests."""
        if self.selector not in (CERT, SPKI) or self.mtype not in DIGESTS:
            return False
        return self.usage == DANE_EE or (self.usage == DANE_TA and PEER_CHAIN)

    def matches(self, der):
        """True when this record names the certificate der (by its selector and digest)."""
        if self.selector == SPKI:
            der = x509.load_der_x509_certificate(der).public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        digest = DIGESTS[self.mtype]
        return (digest(der).digest() if digest else der) == self.data

    def __str__(self):
        return "%s %d %d %d" % (USAGE_NAMES.get(self.usage, str(self.usage)), self.usage,
                                self.selector, self.mtype)

    def presentation(self):
        """As a zone file writes it (RFC 6698 2.2), as TLS-RPT's policy-string wants."""
        return "%d %d %d %s" % (self.usage, self.selector, self.mtype, self.data.hex())


def reported_policy(name, records=()):
    """The DANE policy of MX host name as a TLS-RPT report names it (RFC 8460 4.4: the
    policy domain is the TLSA base domain, the host itself)."""
    return results.ReportedPolicy(results.TLSA, name,
                                  tuple(r.presentation() for r in records), (name,))


@dataclass(frozen=True)
class HostTLS:
    """What DANE makes of one MX host: `records` (usable TLSA: authenticate with them),
    `encrypt` (only unusable ones: TLS without authentication), `refusal` (a reply that
    gives the host up, with `result`, its RFC 8460 result type), or nothing of these
    (DANE does not apply). `why` for the log."""
    records: Tuple[TLSA, ...] = ()
    encrypt: bool = False
    refusal: Optional[str] = None
    why: str = ""
    result: Optional[str] = None


class DANELookup:
    """TLSA lookups through an elemta.delivery.mx.MXResolver made with dnssec=True."""

    def __init__(self, resolver):
        self.resolver = resolver

    def tls_for(self, name, secure, port, mode):
        # type: (str, bool, int, str) -> HostTLS
        """The HostTLS of MX host name (secure: its MX and address lookups were
        validated) for a session on port, in mode dane or dane-only."""
        if not secure:
            return self._unless_only(mode, "the MX or address records of %s are not "
                                           "DNSSEC-signed" % name)
        try:
            found = self.resolver.tlsa(name, port)
        except RouteError as error:
            return HostTLS(refusal="TLSA lookup for _%d._tcp.%s failed: %s"
                           % (port, name, error.reason), result=results.DNSSEC_INVALID)
        if not found.secure:
            return self._unless_only(mode, "the TLSA records of %s are not DNSSEC-signed"
                                     % name)
        records = tuple(TLSA.from_rdata(rdata) for rdata in found)
        usable = tuple(record for record in records if record.usable)
        if usable:
            return HostTLS(records=usable)
        if records:
            why = "only unusable TLSA records for %s (%s)" % (
                name, ", ".join(str(record) for record in records))
            if mode == DANE_ONLY:
                return self._unless_only(mode, why)
            return HostTLS(encrypt=True, why=why)
        return self._unless_only(mode, "no TLSA records for _%d._tcp.%s" % (port, name))

    @staticmethod
    def _unless_only(mode, why):
        """No DANE for a host (why): opportunistic, or in dane-only a refusal."""
        if mode == DANE_ONLY:
            return HostTLS(refusal="%s (delivery.tls_policy dane-only)" % why,
                           result=results.DANE_REQUIRED)
        return HostTLS(why=why)


def peer_chain(sock):
    """The certificates the server sent (DER, its own first); only its own before 3.10."""
    if PEER_CHAIN:
        chain = sock._sslobj.get_unverified_chain() or []
        return [cert.public_bytes(_ssl.ENCODING_DER) for cert in chain]
    leaf = sock.getpeercert(binary_form=True)
    return [leaf] if leaf else []


def verify(chain, name, records):
    # type: (Sequence[bytes], str, Sequence[TLSA]) -> TLSA
    """The record that authenticates the server whose chain (DER, leaf first) was
    presented as MX host name; raises DANEError saying why none does."""
    if not chain:
        raise DANEError("no certificate from the server")
    try:
        return _verify(chain, name, records)
    except (ValueError, UnsupportedAlgorithm, crypto.Error) as error:
        # A certificate the libraries cannot read authenticates nothing.
        raise DANEError("unreadable certificate: %s" % (error or type(error).__name__))


def _verify(chain, name, records):
    leaf, rest = chain[0], chain[1:]
    for record in records:
        if record.usage == DANE_EE and record.matches(leaf):
            return record
    problems = []
    for record in records:
        if record.usage != DANE_TA:
            continue
        for anchor in rest:
            if not record.matches(anchor):
                continue
            problem = _chain_problem(leaf, rest, anchor) or _name_problem(leaf, name)
            if problem is None:
                return record
            problems.append("%s: %s" % (record, problem))
    if problems:
        raise DANEError("; ".join(problems))
    raise DANEError("no TLSA record matches the certificate chain (%s)"
                    % ", ".join(str(record) for record in records))


def _chain_problem(leaf, intermediates, anchor):
    """Why OpenSSL finds no valid path from leaf to anchor (signatures, validity dates,
    CA constraints), or None. The anchor need not be self-signed (PARTIAL_CHAIN)."""
    store = crypto.X509Store()
    store.add_cert(_openssl(anchor))
    store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)
    context = crypto.X509StoreContext(store, _openssl(leaf),
                                      [_openssl(der) for der in intermediates])
    try:
        context.verify_certificate()
    except crypto.X509StoreContextError as error:
        return "the chain does not verify: %s" % error
    return None


def _openssl(der):
    return crypto.load_certificate(crypto.FILETYPE_ASN1, der)


def _name_problem(der, name):
    """Why certificate der does not name MX host name (RFC 7672 3.2.3: its DNS
    subjectAltNames, else its common name; "*" as a whole first label matches one
    label), or None."""
    cert = x509.load_der_x509_certificate(der)
    try:
        names = cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = [attribute.value for attribute in
                 cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if any(mx_matches(pattern, name) for pattern in names):
        return None
    return "the certificate names %s, not %s" % (", ".join(names) or "nothing", name)

