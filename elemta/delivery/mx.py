"""MX routing: which hosts, in which order, take mail for a domain (RFC 5321 section 5.1).

Owned by the delivery worker (`elemta: delivery`), which asks `MXResolver.route(domain)` before
it connects with elemta.delivery.smtp_client. The result is the ordered list of Hosts to try,
or one of the exceptions below:

    NullMX              the domain accepts no mail (RFC 7505 "MX 0 ."): bounce at once,
                        556 5.1.10
    NoSuchDomain        NXDOMAIN for the domain: bounce, 5.1.2
    NoMailHost          the domain exists but neither MX nor A/AAAA gives an address:
                        bounce, 5.4.4
    TemporaryRouteError SERVFAIL, REFUSED, timeout, garbage: defer, 4.4.3

All are RouteError; `permanent` tells a bounce from a deferral and `code`/`status` are what a
DSN or the log should show.

Cooperating with gevent: dnspython builds and parses the DNS messages, and
elemta.util.dnswire moves the bytes over gevent's sockets (UDP, then TCP when the answer is
truncated), as it does for the plugins' resolver. So a lookup
only ever waits in gevent's hub: it never blocks the worker's other greenlets, whether or not
the process is monkey-patched, and needs no thread pool. Per lookup, each nameserver is tried
in turn, `attempts` rounds at most, each try bounded by `timeout` seconds.

DNSSEC (for DANE, RFC 7672, elemta.delivery.dane): with dnssec=True every query sets the DO
bit, and each Host says whether its MX records and addresses were all validated by the
resolver (the AD bit); tlsa() gives a host's TLSA records and whether they were.

See also: elemta.delivery.smtp_client (talks to the hosts found here), tests/test_mx.py,
tests/peers/nsd.py (the authoritative server the tests query).
"""

import ipaddress
import random
from dataclasses import dataclass
from typing import List, Optional, Sequence

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import gevent
from gevent import socket

from elemta.util.dnswire import DNSUnavailable, Transport

# A CNAME chain longer than this is a loop or an abuse (dnspython stops at 16 within a reply).
MAX_CNAME_REQUERIES = 8
# Postfix's smtp_address_preference values.
ADDRESS_PREFERENCES = ("any", "ipv4", "ipv6")


class RouteError(Exception):
    """No host to try for a domain. `permanent`: bounce now; otherwise try again later."""
    permanent = False
    code = 451
    status = "4.4.3"

    def __init__(self, domain, reason):
        super().__init__("%s: %s" % (domain, reason))
        self.domain = domain
        self.reason = reason


class TemporaryRouteError(RouteError):
    """SERVFAIL, REFUSED, no answer in time, or a reply that does not parse: defer."""


class NoSuchDomain(RouteError):
    """NXDOMAIN: the domain does not exist (RFC 3463 5.1.2, bad destination system)."""
    permanent = True
    code = 550
    status = "5.1.2"


class NoMailHost(RouteError):
    """The domain exists but no MX host or implicit MX has an address (5.4.4, unroutable)."""
    permanent = True
    code = 550
    status = "5.4.4"


class NullMX(RouteError):
    """The domain publishes a null MX (RFC 7505): it accepts no mail. Bounce at once."""
    permanent = True
    code = 556
    status = "5.1.10"

    def __init__(self, domain):
        super().__init__(domain, "domain does not accept mail (null MX, RFC 7505)")


@dataclass(frozen=True)
class Host:
    """One address to connect to. `name` is the MX host name (the name TLS verifies);
    `preference` is None for an implicit MX (the domain's own address) or an address literal;
    `secure`: the MX lookup and the host's address lookup were both DNSSEC-validated;
    `mx_secure`: the MX lookup (or the validated absence of MX records, for an implicit MX)
    was, so the name itself can be trusted (what REQUIRETLS asks, RFC 8689 4.2.1)."""
    name: str
    address: str
    preference: Optional[int] = None
    secure: bool = False
    mx_secure: bool = False


class Records(list):
    """The records of one lookup, and `secure`: every answer on the way (CNAMEs included)
    was DNSSEC-validated by the resolver."""

    def __init__(self, records=(), secure=False):
        super().__init__(records)
        self.secure = secure

    @property
    def family(self):
        return socket.AF_INET6 if ":" in self.address else socket.AF_INET


class _NXDomain(Exception):
    secure = False


class _NoData(Exception):
    secure = False


class MXResolver:
    """DNS lookups for delivery, cooperative under gevent.

    nameservers: IP addresses to ask; None reads /etc/resolv.conf (as dnspython does).
    port:        their port (tests point it at their own server).
    timeout:     seconds one try at one nameserver may take.
    attempts:    rounds over the nameservers before a lookup is a temporary failure.
    families:    ("ipv4", "ipv6") or one of them, as Postfix's inet_protocols.
    address_preference: "any" (shuffled), "ipv4" or "ipv6" first, among one host's addresses.
    dnssec:      ask with the DO bit and tell validated answers (see the module docstring).
    """

    def __init__(self, nameservers=None, port=53, timeout=5.0, attempts=2,
                 families=("ipv4", "ipv6"), address_preference="any", dnssec=False):
        # type: (Optional[Sequence[str]], int, float, int, Sequence[str], str, bool) -> None
        self.transport = Transport(nameservers, port, timeout, attempts, dnssec)
        unknown = set(families) - {"ipv4", "ipv6"}
        if unknown or not families:
            raise ValueError("families must be ipv4 and/or ipv6, not %r" % (families,))
        self.families = tuple(families)
        if address_preference not in ADDRESS_PREFERENCES:
            raise ValueError("address_preference must be one of %s" % ", ".join(
                ADDRESS_PREFERENCES))
        self.address_preference = address_preference

    # -- routing ------------------------------------------------------------------------

    def route(self, domain):
        # type: (str) -> List[Host]
        """Hosts to try for `domain`, in order; raises a RouteError when there are none.

        RFC 5321 5.1: MX hosts by preference, random order among equal preferences, each
        host's addresses; no MX at all -> the domain's own addresses (implicit MX). An MX host
        without addresses is skipped. "[192.0.2.1]" and "[IPv6:...]" are taken as they are.
        """
        literal = _address_literal(domain)
        if literal:
            return [Host(domain, literal)]
        try:
            exchanges = self.mx(domain)
        except _NXDomain:
            raise NoSuchDomain(domain, "domain not found (NXDOMAIN)")
        except _NoData as nodata:
            return self._implicit_mx(domain, nodata.secure)
        names = [name for _, name in exchanges]
        lookups = [gevent.spawn(self._host_addresses, name) for name in names]
        gevent.joinall(lookups)
        hosts, failures, temporary = [], [], False
        for (preference, name), lookup in zip(exchanges, lookups):
            addresses, error = lookup.value
            if error is None:
                secure = exchanges.secure and addresses.secure
                hosts += [Host(name, address, preference, secure, exchanges.secure)
                          for address in addresses]
            else:
                temporary = temporary or isinstance(error, TemporaryRouteError)
                failures.append("%s: %s" % (name, getattr(error, "reason", error)))
        if hosts:
            return hosts
        if temporary:
            raise TemporaryRouteError(domain, "no MX host address found yet (%s)"
                                      % "; ".join(failures))
        raise NoMailHost(domain, "no MX host has an address (%s)" % "; ".join(failures))

    def _implicit_mx(self, domain, secure):
        """The domain's own addresses; secure: its lack of MX records was validated."""
        try:
            addresses = self.addresses(domain)
        except _NXDomain:
            raise NoSuchDomain(domain, "domain not found (NXDOMAIN)")
        if not addresses:
            raise NoMailHost(domain, "no MX and no address record")
        return [Host(domain.rstrip("."), address, None, secure and addresses.secure, secure)
                for address in addresses]

    def _host_addresses(self, name):
        """(addresses, None) or ([], the RouteError): returned, not raised, since gevent
        prints the traceback of every greenlet that dies of an exception."""
        try:
            addresses = self.addresses(name)
        except _NXDomain:
            return [], NoMailHost(name, "host not found")
        except RouteError as error:
            return [], error
        if not addresses:
            return [], NoMailHost(name, "no address record")
        return addresses, None

    def mx(self, domain):
        # type: (str) -> Records
        """(preference, host) pairs in the order to try them (Records: secure says they
        were validated); raises NullMX, or _NXDomain / _NoData for route() to decide (no
        MX means implicit MX)."""
        records = self._lookup(domain, "MX")
        if len(records) == 1 and records[0].exchange == dns.name.root:
            raise NullMX(domain)
        by_preference = {}
        for record in records:
            if record.exchange == dns.name.root:
                continue  # RFC 7505 forbids "." beside other MX; never connect to it.
            name = record.exchange.to_text(omit_final_dot=True)
            by_preference.setdefault(record.preference, []).append(name)
        ordered = []
        for preference in sorted(by_preference):
            names = sorted(set(by_preference[preference]))
            random.shuffle(names)   # RFC 5321 5.1: spread load among equal preferences
            ordered += [(preference, name) for name in names]
        if not ordered:
            raise NullMX(domain)
        return Records(ordered, records.secure)

    def addresses(self, name):
        # type: (str) -> Records
        """The A and/or AAAA addresses of `name` in the preferred order ([] if none;
        secure when every answer was validated). Raises _NXDomain if the name does not
        exist, TemporaryRouteError."""
        types = [{"ipv4": "A", "ipv6": "AAAA"}[family] for family in self.families]
        found = {}
        nxdomain = 0
        secure = True
        for rdtype in types:
            try:
                records = self._lookup(name, rdtype)
                found[rdtype] = [record.address for record in records]
                secure = secure and records.secure
            except _NoData as nodata:
                found[rdtype] = []
                secure = secure and nodata.secure
            except _NXDomain:
                nxdomain += 1
                secure = False
        if nxdomain == len(types):
            raise _NXDomain(name)
        v4, v6 = found.get("A", []), found.get("AAAA", [])
        random.shuffle(v4)
        random.shuffle(v6)
        if self.address_preference == "ipv6":
            return Records(v6 + v4, secure)
        if self.address_preference == "ipv4":
            return Records(v4 + v6, secure)
        both = v4 + v6
        random.shuffle(both)
        return Records(both, secure)

    def txt(self, name):
        # type: (str) -> List[str]
        """Each TXT record at name as one string (its character-strings joined, RFC 8461
        3.1), [] when there is none or the name does not exist; raises
        TemporaryRouteError (NoSuchDomain for a name that cannot be one)."""
        try:
            records = self._lookup(name, "TXT")
        except (_NXDomain, _NoData):
            return []
        return [b"".join(record.strings).decode("utf-8", "replace") for record in records]

    def tlsa(self, name, port=25):
        # type: (str, int) -> Records
        """The TLSA records at _<port>._tcp.<name> (RFC 6698, 7672 2.2.3): [] when there
        are none; secure when the answer (records or their absence) was validated. A
        failed lookup (SERVFAIL, as a validator answers for a bogus one) raises
        TemporaryRouteError."""
        try:
            return self._lookup("_%d._tcp.%s" % (port, name), "TLSA")
        except (_NXDomain, _NoData) as none:
            return Records([], none.secure)

    # -- one lookup ---------------------------------------------------------------------

    def _lookup(self, name, rdtype):
        """The Records of type rdtype at name, following CNAMEs; raises _NXDomain,
        _NoData (each with `secure`: the absence was validated) or TemporaryRouteError."""
        try:
            qname = dns.name.from_text(name)
        except (dns.exception.DNSException, UnicodeError, ValueError) as error:
            raise NoSuchDomain(name, "not a valid domain name (%s)" % error)
        rdtype = dns.rdatatype.from_text(rdtype)
        secure = True
        for _ in range(MAX_CNAME_REQUERIES):
            response = self._ask(qname, rdtype)
            secure = secure and self.transport.validated(response)
            try:
                chain = response.resolve_chaining()
            except dns.exception.DNSException as error:
                raise TemporaryRouteError(name, "unusable answer (%s)" % error)
            if chain.answer is not None:
                return Records(chain.answer, secure)
            if response.rcode() == dns.rcode.NXDOMAIN:
                missing = _NXDomain(name)
            elif chain.canonical_name == qname:
                missing = _NoData(name)
            else:
                # The server gave a CNAME but not its target (another zone): ask for it.
                qname = chain.canonical_name
                continue
            missing.secure = secure
            raise missing
        raise TemporaryRouteError(name, "CNAME chain too long")

    def _ask(self, qname, rdtype):
        """One response with a usable rcode (elemta.util.dnswire does the asking)."""
        try:
            return self.transport.ask(qname, rdtype)
        except DNSUnavailable as error:
            raise TemporaryRouteError(error.name, error.reason) from None



def _address_literal(domain):
    """The address in "[192.0.2.1]" or "[IPv6:2001:db8::1]" (RFC 5321 4.1.3), else None."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    text = domain[1:-1]
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None
