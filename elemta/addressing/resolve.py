"""Which address class is this address in? Postfix's resolve step (trivial-rewrite and
resolve_local): one answer for every process.

The classes, tried in Postfix's order on the domain in normal form
(elemta.addressing.normal):

    LOCAL     a bare name (postmaster), the host name, the mail name (smtpd.origin;
              unless a hosted class lists it) or relay.local_domains (mydestination):
              Unix users and /etc/aliases, the local agent
    ALIAS     virtual.alias_domains: every address is a virtual alias (no mailboxes)
    VIRTUAL   virtual.mailbox_domains: mailboxes behind virtual.transport (Dovecot)
    RELAY     relay.relay_domains: relayed, from anyone (a backup MX, a gateway)
    REMOTE    everything else (Postfix's default class): only for trusted clients

The first four are accepted from anyone; REMOTE only from mynetworks or an
authenticated client (elemta.smtpd.policy). An address literal is always REMOTE:
local_domains takes domain names only, so user@[127.0.0.1] is relayed for trusted
clients and refused to others, even when it names this host (Postfix's resolve_local
would take the addresses of inet_interfaces as local; tests/security/test_open_relay.py
pins ours). The hosted domain lists may be lookup tables (elemta.maps.domains):
classify() then raises TableUnavailable when one cannot answer (451 at RCPT, a deferral
at delivery); is_local() reads no table and never raises.

Who asks: the smtpd's relay check (elemta.smtpd.policy), the router
(elemta.delivery.routing), pickup (ctx.outbound for the plugins), sendmail -bv, and the
local agent (delivered_here: may an alias member be expanded here, or must it be
forwarded?). The same object knows the extension rule (local.recipient_delimiter, each
of its characters a delimiter: elemta.addressing.normal.split_extension, the one rule
every lookup, local delivery and extension propagation follows) and qualifies bare
names with the mail name (myorigin).
See also: elemta.addressing.recipients (which local recipients exist),
elemta.addressing.hosted (which hosted ones exist), elemta.addressing.virtual (aliases).
"""

from typing import Iterable, Optional

from elemta.addressing.normal import (canonical, normal_domain, normal_local_part,
                                      split_address, split_extension)
from elemta.config.schema import parse_transport
from elemta.maps.domains import DomainList, DomainMatcher

LOCAL = "local"
ALIAS = "virtual alias"      # virtual.alias_domains
VIRTUAL = "virtual"          # virtual.mailbox_domains
RELAY = "relay"              # relay.relay_domains
REMOTE = "remote"
# The classes mail is accepted for from any client.
OURS = (LOCAL, ALIAS, VIRTUAL, RELAY)
# The classes whose recipients are queued in their normal form (queued_address).
NORMAL_IN_QUEUE = (VIRTUAL, RELAY)


def queued_address(address, kind):
    """The spelling a recipient of class kind is queued in. A virtual mailbox or relay
    recipient is queued in its normal form (elemta.addressing.normal.canonical: domain in
    lower case without the final dot, in A-labels, no needless quotes; the local part's
    case kept), the form its recipient table was asked with: the next hop (Dovecot's
    LMTP, the primary MX) knows it by that spelling, and might refuse another after the
    client was told 250, bouncing to a sender who may be forged (backscatter). The
    client's spelling stays the recipient's ORCPT (elemta.addressing.virtual
    .expanded_recipients). Others are queued as written: the local agent reads any
    spelling, and a remote address is the client's business."""
    return canonical(address) if kind in NORMAL_IN_QUEUE else address


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
                 origin: Optional[str] = None,
                 alias_domains: Optional[DomainList] = None,
                 mailbox_domains: Optional[DomainList] = None,
                 relay_domains: Optional[DomainList] = None) -> None:
        self.hostname = normal_domain(hostname)
        # The mail name bare names get (Postfix's myorigin); local, as Debian's
        # mydestination lists both $myhostname and /etc/mailname, unless a hosted class
        # lists it: /etc/mailname often names the organisation's main domain, whose
        # mailboxes are in Dovecot (a domain in a table cannot be seen here: list such a
        # domain inline, or set smtpd.origin).
        self.origin = normal_domain(origin) if origin else self.hostname
        hosted_inline = {d for domains in (alias_domains, mailbox_domains, relay_domains)
                         if domains for d in domains.domains}
        explicit = frozenset(normal_domain(d) for d in local_domains) | {self.hostname}
        self.domains = explicit if self.origin in hosted_inline else explicit | {self.origin}
        # Transport map keys whose next hop is "local" (delivered here, not ours to relay).
        self.transport_local = {normal_domain(d): True for d in transport_local}
        self.delimiter = delimiter
        # The hosted classes in Postfix's order; an empty list is left out.
        self.hosted = [(name, DomainMatcher(domains)) for name, domains in (
            (ALIAS, alias_domains), (VIRTUAL, mailbox_domains), (RELAY, relay_domains))
            if domains]

    @classmethod
    def from_config(cls, config):
        return cls(config.hostname, config.relay.local_domains,
                   [entry.domain for entry in config.delivery.transport
                    if parse_transport(entry.nexthop)[0] == LOCAL],
                   config.local.recipient_delimiter, config.origin,
                   config.virtual.alias_domains, config.virtual.mailbox_domains,
                   config.relay.relay_domains)

    def classify(self, address):
        """LOCAL, ALIAS, VIRTUAL, RELAY or REMOTE (see the module docstring); raises
        TableUnavailable when a domain table cannot answer."""
        domain = split_address(address)[1]
        if not domain:
            return LOCAL
        domain = normal_domain(domain)
        if domain in self.domains:
            return LOCAL
        if domain.startswith("["):
            return REMOTE
        for name, matcher in self.hosted:
            if domain in matcher:
                return name
        return REMOTE

    def is_local(self, address):
        """True for a bare name and an address in a local domain (no table is read)."""
        domain = split_address(address)[1]
        return not domain or normal_domain(domain) in self.domains

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

    def split_local(self, local):
        """(user, delimiter, extension) of a local part by the extension rule, or
        (local, None, None) (elemta.addressing.normal.split_extension: each character
        of local.recipient_delimiter is a delimiter)."""
        return split_extension(local, self.delimiter)

    def unmatched_extension(self, address, key):
        """(delimiter, extension) of address when a table entry found it by key without
        its extension (user@domain or user for user+ext@domain, never @domain), to be put
        back onto the entry's result (Postfix's propagate_unmatched_extensions); None
        otherwise. key is one of elemta.maps.search.address_keys(address)."""
        local = normal_local_part(split_address(address)[0])
        _, delimiter, extension = self.split_local(local)
        if delimiter is None or key.startswith("@") or \
                split_address(key)[0].lower() == local.lower():
            return None
        return delimiter, extension

    def user_and_extension(self, local):
        """("user", "ext") for "User+ext" with delimiter "+" (or "User-ext" with "+-"),
        in lower case; ("user", None) otherwise."""
        user, _, extension = split_extension(local.lower(), self.delimiter)
        return user, extension
