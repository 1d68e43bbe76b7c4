"""Is this address ours? Postfix's resolve_local: one answer for every process.

An address is LOCAL when it is a bare name (postmaster) or its domain, in normal form
(elemta.addressing.normal), is the host name, the mail name (smtpd.origin) or one of
relay.local_domains (Postfix's mydestination); REMOTE otherwise. An address literal is always REMOTE: local_domains
takes domain names only, so user@[127.0.0.1] is relayed for trusted clients and refused
to others, even when it names this host (Postfix's resolve_local would take the
addresses of inet_interfaces as local; tests/security/test_open_relay.py pins ours).
VIRTUAL is the class hosted domains will have; no configuration makes one yet.

Who asks: the smtpd's relay check (elemta.smtpd.policy), the router
(elemta.delivery.routing: LOCAL goes to the local agent), pickup (ctx.outbound for the
plugins), sendmail -bv, and the local agent (delivered_here: may an alias member be
expanded here, or must it be forwarded?). The same object knows the extension rule
(local.recipient_delimiter) and qualifies bare names with the mail name (myorigin).
See also: elemta.addressing.recipients (which local recipients exist).
"""

from typing import Iterable, Optional

from elemta.addressing.normal import normal_domain, split_address
from elemta.config.schema import parse_transport

LOCAL = "local"
VIRTUAL = "virtual"          # hosted domains: coming, not produced yet
REMOTE = "remote"


def domain_entry(table, domain, default=None):
    """table's entry for domain, as the transport map matches: "example.org" the domain
    itself, ".example.org" any subdomain (the nearest parent wins); else default."""
    if domain in table:
        return table[domain]
    labels = domain.split(".")
    for start in range(1, len(labels)):
        parent = "." + ".".join(labels[start:])
        if parent in table:
            return table[parent]
    return default


class Addressing:
    """The local domains, the extension rule and the host name of one configuration."""

    def __init__(self, hostname: str, local_domains: Iterable[str],
                 transport_local: Iterable[str] = (), delimiter: str = "",
                 origin: Optional[str] = None) -> None:
        self.hostname = normal_domain(hostname)
        # The mail name bare names get (Postfix's myorigin); local, as Debian's
        # mydestination lists both $myhostname and /etc/mailname.
        self.origin = normal_domain(origin) if origin else self.hostname
        self.domains = frozenset(normal_domain(d) for d in local_domains) | {
            self.hostname, self.origin}
        # Transport map keys whose next hop is "local" (delivered here, not ours to relay).
        self.transport_local = {normal_domain(d): True for d in transport_local}
        self.delimiter = delimiter

    @classmethod
    def from_config(cls, config):
        return cls(config.hostname, config.relay.local_domains,
                   [entry.domain for entry in config.delivery.transport
                    if parse_transport(entry.nexthop)[0] == LOCAL],
                   config.local.recipient_delimiter, config.origin)

    def classify(self, address):
        """LOCAL or REMOTE (see the module docstring)."""
        domain = split_address(address)[1]
        if not domain or normal_domain(domain) in self.domains:
            return LOCAL
        return REMOTE

    def is_local(self, address):
        """True for a bare name and an address in a local domain."""
        return self.classify(address) == LOCAL

    def delivered_here(self, address):
        """True for a local address, and for one the transport map sends to local
        delivery (its domain, or a parent's ".domain" entry)."""
        if self.is_local(address):
            return True
        domain = normal_domain(split_address(address)[1])
        return domain_entry(self.transport_local, domain, False)

    def qualify(self, name):
        """A bare name as an address in the mail name's domain (origin)."""
        return name if "@" in name else "%s@%s" % (name, self.origin)

    def user_and_extension(self, local):
        """("user", "ext") for "User+ext" with delimiter "+"; ("user", None) otherwise."""
        local = local.lower()
        if self.delimiter and self.delimiter in local[1:]:
            user, _, extension = local.partition(self.delimiter)
            if user:
                return user, extension
        return local, None
