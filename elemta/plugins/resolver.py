"""DNS lookups for plugins (SPF, DKIM keys, DMARC policies) that never block the event loop.

Owned by whichever process runs plugins (the smtpd worker above all): one Resolver per
process, handed to plugins as ctx.resolver. The asking is elemta.util.dnswire's (gevent
sockets, UDP then TCP), shared with elemta.delivery.mx: a lookup only waits in gevent's
hub and a slow nameserver stalls one session, never the worker. This module follows
CNAMEs and shapes the answers the way SPF, DKIM and DMARC want them.

    resolver = Resolver(nameservers=["127.0.0.1"], port=5353, timeout=2)
    resolver.txt("_dmarc.example.com")    # [b"v=DMARC1; p=reject"]; [] for none
    resolver.query("example.com", "MX")   # Answer(records=[...], nxdomain=False)

TemporaryDNSError (timeout, SERVFAIL, REFUSED, garbage) is the only exception; a name that
does not exist, or cannot exist (an empty or over-long label), or sits in a CNAME loop, is
an empty Answer.

See also: elemta.plugins.spf, elemta.plugins.dkim, elemta.plugins.dmarc, tests/peers/nsd.py.
"""

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype

from elemta.util.dnswire import DNSUnavailable, Transport

# A CNAME chain longer than this is a loop or an abuse.
MAX_CNAME_REQUERIES = 8


class TemporaryDNSError(Exception):
    """No usable answer now (timeout, SERVFAIL, REFUSED, malformed): try again later."""

    def __init__(self, name, reason):
        super().__init__("%s: %s" % (name, reason))
        self.name = name
        self.reason = reason


@dataclass
class Answer:
    """The records of one type at a name, CNAMEs followed. Empty for NODATA/NXDOMAIN.

    ttl: seconds the answer may be cached (the smallest TTL along the chain; for an
    empty answer the SOA's negative-caching TTL, RFC 2308), 0 when unknown."""
    records: List[object] = field(default_factory=list)
    nxdomain: bool = False
    canonical_name: Optional[str] = None
    ttl: int = 0


class Resolver:
    """Cooperative stub resolver. nameservers None reads /etc/resolv.conf.

    timeout: seconds for one try at one nameserver; attempts: rounds over them all.
    """

    def __init__(self, nameservers=None, port=53, timeout=3.0, attempts=2):
        # type: (Optional[Sequence[str]], int, float, int) -> None
        self.transport = Transport(nameservers, port, timeout, attempts)

    def txt(self, name):
        # type: (str) -> List[bytes]
        """Each TXT record at name as one byte string (its character-strings joined,
        RFC 7208 3.3, RFC 6376 3.6.2.2)."""
        return [b"".join(record.strings) for record in self.query(name, "TXT").records]

    def query(self, name, rdtype):
        # type: (str, str) -> Answer
        try:
            qname = dns.name.from_text(name.rstrip(".") + ".") if name else None
        except (dns.exception.DNSException, UnicodeError, ValueError):
            qname = None
        if qname is None:
            return Answer(nxdomain=True)      # cannot exist: nothing is there
        rdtype_value = dns.rdatatype.from_text(rdtype)
        for _ in range(MAX_CNAME_REQUERIES):
            response = self._ask(qname, rdtype_value)
            try:
                chain = response.resolve_chaining()
            except dns.message.ChainTooLong:
                return Answer()     # a CNAME loop: nothing usable there (RFC 1034 3.6.2)
            except dns.exception.DNSException as error:
                raise TemporaryDNSError(name, "unusable answer (%s)" % error)
            canonical = chain.canonical_name.to_text(omit_final_dot=True)
            ttl = max(0, int(chain.minimum_ttl))
            if chain.answer is not None:
                return Answer(list(chain.answer), canonical_name=canonical, ttl=ttl)
            if response.rcode() == dns.rcode.NXDOMAIN:
                return Answer(nxdomain=True, canonical_name=canonical, ttl=ttl)
            if chain.canonical_name == qname:
                return Answer(canonical_name=canonical, ttl=ttl)
            qname = chain.canonical_name      # a CNAME into another zone: follow it
        return Answer()                       # a loop across zones, or absurdly long

    # -- the wire --------------------------------------------------------------------

    def _ask(self, qname, rdtype):
        """One response with a usable rcode (elemta.util.dnswire does the asking)."""
        try:
            return self.transport.ask(qname, rdtype)
        except DNSUnavailable as error:
            raise TemporaryDNSError(error.name, error.reason) from None
