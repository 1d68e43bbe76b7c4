"""Routing: which destination takes mail for a recipient, and which hosts serve it.

Owned by the delivery worker (`elemta: delivery`). In Postfix's order of precedence:

    1. local addresses (relay.local_domains and the host name, in any spelling: the
       addressing layer's answer, elemta.addressing.resolve, the one the smtpd's relay
       check, pickup and sendmail -bv give too): local delivery;
    1a. virtual alias domains (virtual.alias_domains): an address no alias expanded
       bounces (the ERROR destination, see below), whatever the transport map says;
    2. the transport map (delivery.transport): "example.org" matches the domain itself,
       ".example.org" every subdomain; the next hop is smtp:[host]:port, smtp:host:port,
       lmtp:[host]:port, lmtp:unix:/path or local (it wins over the class's transport,
       as Postfix's transport_maps do);
    2a. virtual mailbox domains (virtual.mailbox_domains): virtual.transport, LMTP to
       Dovecot usually (Postfix's virtual_transport);
    2b. relay domains (relay.relay_domains): relay.relay_transport when set (Postfix's
       relay_transport), else on as below;
    3. for a remote address, delivery.default_transport = error (Postfix's error(8), set
       by Debian's "Local only" type): the ERROR destination, whose transport
       (elemta.delivery.error_transport) bounces it at once with its host's text;
    4. the relay host (delivery.relayhost), [host]:port or host:port;
    5. the MX hosts of the recipient's domain (elemta.delivery.mx), on delivery.mx_port.

An address of a virtual alias domain is expanded before it is queued
(elemta.addressing.virtual); one that reaches delivery unexpanded has no alias (one that
sendmail queued, one whose entry maps it to itself, one whose entry was removed since):
it goes to the ERROR destination and bounces with "550 5.1.1 User unknown in virtual
alias table", as Postfix's trivial-rewrite sends such an address to error(8); its MX
is never looked up, and the transport map does not override that (Postfix's neither).
A domain table that cannot answer raises TableUnavailable: the worker defers the
message.

Each recipient also gets a domain class for the delivery metrics (route()): the name of
the delivery.domain_classes entry whose domains match (as the transport map matches:
the domain, else a ".parent" entry), else where its domain belongs: local, virtual
(alias or mailbox domains), relay, relayhost (remote mail sent to delivery.relayhost),
remote. A bounded set: never the domain itself.

A bracketed next hop is connected to as it is (its A/AAAA records if it is a name); an
unbracketed one is looked up as a domain, MX first, as Postfix does.
See also: elemta.delivery.worker, elemta.delivery.mx, elemta.config.schema (Delivery).
"""

import ipaddress
from dataclasses import dataclass
from typing import List

from elemta.addressing.normal import normal_domain, split_address
from elemta.addressing.resolve import LOCAL as LOCAL_CLASS
from elemta.addressing.resolve import (ALIAS, REMOTE, RELAY, VIRTUAL, Addressing,
                                       domain_entry)
from elemta.config.schema import parse_default_transport, parse_nexthop, parse_transport
from elemta.delivery.mx import Host, MXResolver, NoMailHost

LOCAL = "local"
SMTP = "smtp"
LMTP = "lmtp"
ERROR = "error"
LMTP_PORT = 24
# What an address of a virtual alias domain that no alias expanded bounces with.
NO_ALIAS = "550 5.1.1 User unknown in virtual alias table"


@dataclass(frozen=True)
class Destination:
    """Where a group of recipients goes. `key` names it for concurrency limits and logs."""
    kind: str            # LOCAL, SMTP, LMTP or ERROR
    host: str            # the domain, next-hop host, LMTP socket path ("" for LOCAL),
                         # or for ERROR the reply that bounces the recipient
    port: int            # 0 for LOCAL and for an LMTP unix socket
    mx_lookup: bool      # look host up as a mail domain (MX), or connect to it as it is

    @property
    def unix_socket(self):
        """True for lmtp:unix:/path (host is the path)."""
        return self.kind == LMTP and self.host.startswith("/")

    @property
    def key(self):
        if self.kind == LOCAL:
            return LOCAL
        if self.kind == ERROR:
            return ERROR
        if self.unix_socket:
            return "lmtp:unix:%s" % self.host
        return "%s:%s:%d" % (self.kind, self.host if self.mx_lookup else "[%s]" % self.host,
                             self.port)


LOCAL_DESTINATION = Destination(LOCAL, "", 0, False)

# The domain classes Elemta names itself (beside delivery.domain_classes' names);
# UNKNOWN_CLASS is the worker's, for a recipient whose tables could not answer.
LOCAL_DOMAINS, VIRTUAL_DOMAINS, RELAY_DOMAINS, RELAYHOST, REMOTE_DOMAINS, UNKNOWN_CLASS = (
    "local", "virtual", "relay", "relayhost", "remote", "unknown")
_CLASS_OF = {LOCAL_CLASS: LOCAL_DOMAINS, ALIAS: VIRTUAL_DOMAINS, VIRTUAL: VIRTUAL_DOMAINS,
             RELAY: RELAY_DOMAINS, REMOTE: REMOTE_DOMAINS}
NO_ALIAS_DESTINATION = Destination(ERROR, NO_ALIAS, 0, False)


class Router:
    """Routes recipient addresses by one Config."""

    def __init__(self, config):
        delivery = config.delivery
        self.mx_port = delivery.mx_port
        # The smtpd's own answer: a domain it accepted as local is delivered locally,
        # however the client wrote it.
        self.addressing = Addressing.from_config(config)
        self.transport = {normal_domain(entry.domain): self.nexthop(entry.nexthop)
                          for entry in delivery.transport}
        # By address class: virtual mailboxes always have their transport.
        self.by_class = {VIRTUAL: self.nexthop(config.virtual.transport)}
        if config.relay.relay_transport:
            self.by_class[RELAY] = self.nexthop(config.relay.relay_transport)
        # default_transport = error: remote mail bounces at once (None: smtp).
        bounce = parse_default_transport(delivery.default_transport)
        self.remote_error = None if bounce is None else Destination(ERROR, bounce, 0, False)
        self.domain_classes = {}
        for entry in delivery.domain_classes:
            for domain in entry.domains:
                self.domain_classes.setdefault(normal_domain(domain), entry.name)
        self.relay = None
        if delivery.relayhost:
            host, port, mx_lookup = parse_nexthop(delivery.relayhost)
            self.relay = Destination(SMTP, host, port or self.mx_port, mx_lookup)

    def nexthop(self, text):
        """The Destination of a transport next hop (smtp:..., lmtp:..., local)."""
        kind, host, port, mx_lookup = parse_transport(text)
        if kind == LOCAL:
            return LOCAL_DESTINATION
        if kind == LMTP:
            return Destination(LMTP, host, 0 if host.startswith("/")
                               else port or LMTP_PORT, False)
        return Destination(SMTP, host, port or self.mx_port, mx_lookup)

    def destination(self, address):
        # type: (str) -> Destination
        """Where address goes; raises TableUnavailable (see the module docstring)."""
        return self.route(address)[0]

    def route(self, address):
        """(Destination, domain class) of address: where it goes, and the class it is
        counted under (see the module docstring). Raises TableUnavailable."""
        kind = self.addressing.classify(address)
        destination = self._destination(address, kind)
        domain = split_address(address)[1]
        named = domain_entry(self.domain_classes, normal_domain(domain)) if domain else None
        if named is not None:
            return destination, named
        if kind == REMOTE and destination is self.relay:
            return destination, RELAYHOST
        return destination, _CLASS_OF.get(kind, REMOTE_DOMAINS)

    def _destination(self, address, kind):
        if kind == LOCAL_CLASS:
            return LOCAL_DESTINATION
        if kind == ALIAS:
            return NO_ALIAS_DESTINATION
        domain = normal_domain(split_address(address)[1])
        found = self._transport_entry(domain)
        if found is not None:
            return found
        if kind in self.by_class:
            return self.by_class[kind]
        if kind == REMOTE and self.remote_error is not None:
            return self.remote_error
        if self.relay is not None:
            return self.relay
        return Destination(SMTP, domain, self.mx_port, True)

    def _transport_entry(self, domain):
        return domain_entry(self.transport, domain)


def hosts_for(destination, resolver):
    # type: (Destination, MXResolver) -> List[Host]
    """The hosts to try for an SMTP destination, in order; raises a RouteError."""
    if destination.mx_lookup:
        return resolver.route(destination.host)
    literal = destination.host
    if literal.lower().startswith("ipv6:"):
        literal = literal[5:]
    if _is_address(literal):
        return [Host(destination.host, literal)]
    addresses, error = resolver._host_addresses(destination.host)
    if error is not None:
        raise error
    if not addresses:
        raise NoMailHost(destination.host, "no address record")
    return [Host(destination.host, address) for address in addresses]


def _is_address(text):
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
