"""DNS lookups for plugins (SPF, DKIM keys, DMARC policies) that never block the event loop.

Owned by whichever process runs plugins (the smtpd worker above all): one Resolver per
process, handed to plugins as ctx.resolver. dnspython builds and parses the messages; the
bytes travel over gevent sockets (UDP, then TCP when the answer is truncated), as
elemta.delivery.mx does for routing. So a lookup only waits in gevent's hub and a slow
nameserver stalls one session, never the worker. Process packages may not import each
other (design rule 9), hence this small sibling of the delivery resolver rather than a
shared import; both could move to elemta.util one day.

    resolver = Resolver(nameservers=["127.0.0.1"], port=5353, timeout=2)
    resolver.txt("_dmarc.example.com")    # [b"v=DMARC1; p=reject"]; [] for none
    resolver.query("example.com", "MX")   # Answer(records=[...], nxdomain=False)

TemporaryDNSError (timeout, SERVFAIL, REFUSED, garbage) is the only exception; a name that
does not exist, or cannot exist (an empty or over-long label), or sits in a CNAME loop, is
an empty Answer.

See also: elemta.plugins.spf, elemta.plugins.dkim, elemta.plugins.dmarc, tests/peers/nsd.py.
"""

import struct
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.resolver
import gevent
from gevent import socket

# RFC 6891: an EDNS buffer that avoids IP fragmentation (the DNS flag day 2020 figure).
EDNS_PAYLOAD = 1232
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
    """The records of one type at a name, CNAMEs followed. Empty for NODATA/NXDOMAIN."""
    records: List[object] = field(default_factory=list)
    nxdomain: bool = False
    canonical_name: Optional[str] = None


class Resolver:
    """Cooperative stub resolver. nameservers None reads /etc/resolv.conf.

    timeout: seconds for one try at one nameserver; attempts: rounds over them all.
    """

    def __init__(self, nameservers=None, port=53, timeout=3.0, attempts=2):
        # type: (Optional[Sequence[str]], int, float, int) -> None
        if nameservers is None:
            nameservers = dns.resolver.Resolver(configure=True).nameservers
        self.nameservers = [str(ns) for ns in nameservers]
        if not self.nameservers:
            raise ValueError("no nameservers to ask")
        self.port = port
        self.timeout = timeout
        self.attempts = max(1, attempts)

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
            if chain.answer is not None:
                return Answer(list(chain.answer), canonical_name=canonical)
            if response.rcode() == dns.rcode.NXDOMAIN:
                return Answer(nxdomain=True, canonical_name=canonical)
            if chain.canonical_name == qname:
                return Answer(canonical_name=canonical)
            qname = chain.canonical_name      # a CNAME into another zone: follow it
        return Answer()                       # a loop across zones, or absurdly long

    # -- the wire --------------------------------------------------------------------

    def _ask(self, qname, rdtype):
        query = dns.message.make_query(qname, rdtype, use_edns=0, payload=EDNS_PAYLOAD)
        query.flags |= dns.flags.RD
        wire = query.to_wire()
        problems = []
        for _ in range(self.attempts):
            for nameserver in self.nameservers:
                try:
                    response = self._exchange(query, wire, nameserver)
                except (OSError, EOFError, dns.exception.DNSException) as error:
                    problems.append("%s: %s" % (nameserver, _describe(error)))
                    continue
                if response.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                    return response
                problems.append("%s: %s" % (nameserver, dns.rcode.to_text(response.rcode())))
        raise TemporaryDNSError(qname.to_text(omit_final_dot=True),
                                "%s lookup failed (%s)" % (dns.rdatatype.to_text(rdtype),
                                                           "; ".join(problems[-3:])))

    def _exchange(self, query, wire, nameserver):
        family = socket.AF_INET6 if ":" in nameserver else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as udp:
            udp.connect((nameserver, self.port))
            udp.send(wire)
            with gevent.Timeout(self.timeout, socket.timeout("timed out")):
                while True:
                    data = udp.recv(65535)
                    try:
                        response = dns.message.from_wire(data)
                    except dns.exception.DNSException:
                        continue   # not a DNS reply; the real one may still come
                    if query.is_response(response):
                        break
        if response.flags & dns.flags.TC:
            return self._exchange_tcp(query, wire, nameserver, family)
        return response

    def _exchange_tcp(self, query, wire, nameserver, family):
        with socket.socket(family, socket.SOCK_STREAM) as tcp:
            with gevent.Timeout(self.timeout, socket.timeout("timed out")):
                tcp.connect((nameserver, self.port))
                tcp.sendall(struct.pack("!H", len(wire)) + wire)
                (length,) = struct.unpack("!H", _recv_exactly(tcp, 2))
                response = dns.message.from_wire(_recv_exactly(tcp, length))
        if not query.is_response(response):
            raise dns.exception.FormError("TCP answer does not match the query")
        return response


def _recv_exactly(sock, count):
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise EOFError("connection closed")
        data += chunk
    return data


def _describe(error):
    if isinstance(error, socket.timeout):
        return "timed out"
    return str(error) or type(error).__name__
