"""LMTP delivery (RFC 2033) of one group of recipients, to lmtp:[host]:port or
lmtp:unix:/path next hops (Dovecot's LMTP, for instance), as Postfix's lmtp does.

Owned by the delivery worker (`elemta: delivery`); the same interface as
elemta.delivery.smtp_transport, whose host loop and connection cache it shares. The
protocol is elemta.delivery.smtp_client in LMTP mode: LHLO, and one reply per recipient
after the final dot, so each recipient is sent, deferred or bounced on its own (a mailbox
over quota defers only its owner).

lmtp:unix:/path connects to the socket, without TLS (there is no wire to protect); it is
logged as relay=<our host name>[/path], as Postfix does. lmtp:[host]:port connects to the
address, or to each address of the name in turn (the system resolver, /etc/hosts included,
as for "lmtp:[localhost]:24"), with STARTTLS when offered, or as a delivery.tls_policy
entry for the host says (delivery.tls_level's mandatory levels are for SMTP). A socket that is
missing or refuses defers the recipients with the reason ("connect to ...: No such file
or directory"), to be tried again after the backoff.
See also: elemta.delivery.routing (Destination), tests/test_lmtp.py, tests/peers/dovecot.py.
"""

import ipaddress

from gevent import socket

from elemta.delivery import deferrals
from elemta.delivery.smtp_client import TLS_MAY, TLS_NONE, SMTPClient, TLSPolicy
from elemta.delivery.smtp_transport import SMTPTransport
from elemta.queue.model import RCPT_DEFERRED


class LMTPTransport(SMTPTransport):
    """Delivers over LMTP for one worker; holds its own connection cache."""

    kind = "lmtp"

    def __init__(self, config, store):
        super().__init__(config, store, resolver=None)
        # Postfix's lmtp has no TLS unless asked: delivery.tls_level speaks for SMTP, and
        # a mandatory level reaches an LMTP host only through a tls_policy entry for it.
        if self.tls.mandatory:
            self.tls = TLSPolicy(TLS_MAY)
        self.sasl = None          # LMTP servers trust their clients; no AUTH.
        self.unix_tls = TLSPolicy(TLS_NONE)

    def deliver(self, record, destination, items):
        """Deliver recipients [(index, Recipient)] sharing an LMTP next hop.
        Returns {index: (status, reply, relay[, dsn_passed, reason])}."""
        if destination.unix_socket:
            targets = [(destination.host, 0, self.hostname)]
            tls = self.unix_tls
        else:
            try:
                targets = [(address, destination.port, destination.host)
                           for address in _addresses(destination.host, destination.port)]
            except OSError as error:
                reply = "451 4.4.4 cannot find the address of LMTP host %s: %s" % (
                    destination.host, getattr(error, "strerror", None) or error)
                return {index: (RCPT_DEFERRED, reply, "none", None, deferrals.DNS)
                        for index, _ in items}
            tls = self.tls_for(destination)
        return self.deliver_to(record, items, targets, lambda: SMTPClient(
            self.hostname, timeouts=self.timeouts, tls=tls, lmtp=True),
            profile=(tls.level, None))


def _addresses(host, port):
    """The addresses to try for an LMTP host: itself when it is an address literal."""
    literal = host[5:] if host.lower().startswith("ipv6:") else host
    try:
        ipaddress.ip_address(literal)
        return [literal]
    except ValueError:
        pass
    found = []
    for _, _, _, _, sockaddr in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
        if sockaddr[0] not in found:
            found.append(sockaddr[0])
    return found
