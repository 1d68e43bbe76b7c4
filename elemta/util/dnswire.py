"""Asking nameservers over gevent sockets: the DNS transport both resolvers share.

dnspython builds and parses the messages; the bytes travel over gevent sockets (UDP, then
TCP when the answer is truncated), so a lookup only waits in gevent's hub and a slow
nameserver stalls one greenlet, never a worker. Used by elemta.delivery.mx (routing) and
elemta.plugins.resolver (SPF, DKIM, DMARC): each keeps its own view of the answers.
"""

import struct

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.resolver
import gevent
from gevent import socket

# RFC 6891: an EDNS buffer that avoids IP fragmentation (the DNS flag day 2020 figure).
EDNS_PAYLOAD = 1232


class DNSUnavailable(Exception):
    """No nameserver gave a usable answer (timeouts, SERVFAIL, REFUSED, garbage)."""

    def __init__(self, name, reason):
        super().__init__("%s: %s" % (name, reason))
        self.name = name
        self.reason = reason


class Transport:
    """Sends one query to the nameservers in turn until one answers NOERROR or NXDOMAIN.

    nameservers None reads /etc/resolv.conf; timeout is for one try at one nameserver;
    attempts is the number of rounds over them all. dnssec sets the DO bit (RFC 3225), so a
    validating resolver says with the AD bit which answers it validated (validated() reads
    it); without it no answer counts as validated.
    """

    def __init__(self, nameservers=None, port=53, timeout=5.0, attempts=2, dnssec=False):
        if nameservers is None:
            nameservers = dns.resolver.Resolver(configure=True).nameservers
        self.nameservers = [str(ns) for ns in nameservers]
        if not self.nameservers:
            raise ValueError("no nameservers to ask")
        self.port = port
        self.timeout = timeout
        self.attempts = max(1, attempts)
        self.dnssec = dnssec

    def validated(self, response):
        """True when the resolver vouches for response with the AD bit (RFC 4035 3.2.3)
        and we asked it to (dnssec). Only as good as the resolver and the path to it:
        a local validating one, as Postfix's smtp_dns_support_level = dnssec assumes."""
        return self.dnssec and bool(response.flags & dns.flags.AD)

    def ask(self, qname, rdtype):
        """The first response with a usable rcode; raises DNSUnavailable."""
        query = dns.message.make_query(qname, rdtype, use_edns=0, payload=EDNS_PAYLOAD,
                                       want_dnssec=self.dnssec)
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
                rcode = response.rcode()
                if rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                    return response
                problems.append("%s: %s" % (nameserver, dns.rcode.to_text(rcode)))
        raise DNSUnavailable(qname.to_text(omit_final_dot=True),
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
                        continue    # not a DNS reply; the real one may still come
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
