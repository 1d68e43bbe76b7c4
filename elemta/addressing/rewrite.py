"""Address rewriting before queueing: canonical maps and masquerading (Postfix's cleanup
with canonical_maps, sender_canonical_maps, recipient_canonical_maps, masquerade_domains).

Owned by no process: the smtpd rewrites the envelope (sender at MAIL, each recipient at
RCPT, before its virtual alias expansion and existence check) and, for a client on this
host, the headers at the end of DATA; pickup rewrites the envelope and the headers of
sendmail's mail. Both before the plugins see the content (so a DKIM signature covers
what is queued; elemta.addressing.headers). Postfix's order, per address:

    sender      sender_canonical_maps, canonical_maps, then masquerading
                (envelope_sender, header_sender in rewrite.masquerade_classes)
    recipient   recipient_canonical_maps, canonical_maps, then masquerading only when
                asked (envelope_recipient, header_recipient); virtual aliases come after

A canonical lookup goes in canonical(5)'s order (elemta.maps.search): user+ext@domain,
user@domain, user (local domains only), @domain. The value is an address; "@domain"
keeps the local part ("@old.example @new.example" moves a domain). An entry matched
without the extension gets it back, with the delimiter the address used
(propagate_unmatched_extensions; "a b+x" quoted is found as "a b" quoted: the extension
rule of elemta.addressing.normal.split_extension), before the result is checked. The
result is looked up again, up to NESTING_LIMIT times, until it maps to itself or to
nothing.
A value that is not an address is refused (RewriteError): a table may be written by
others, and only an address may reach the envelope or a header; the smtpd answers 451
4.3.0 while the admin fixes the table. A result too long to be an address anywhere (a
local part over 64 octets, the whole over 254, often the client's own extension put onto
a long name) is a RewriteError with permanent set: 550 5.1.3 for a recipient, 550 5.1.7
for a sender, as every next hop would refuse it for good.

Masquerading (masquerade_domains, in order, the first that applies wins): an address in
a subdomain of a listed domain takes the listed domain (user@host.example.org ->
user@example.org); "!host.example.org" keeps that domain (and its subdomains) as it is;
the listed domain itself is never changed. Users in masquerade_exceptions (root,
mailer-daemon...) keep their host part. The null sender is never rewritten.
A table that cannot answer raises TableUnavailable (451 at SMTP, a retry in pickup).
See also: canonical(5), postconf(5) masquerade_domains, elemta.addressing.headers.
"""

import logging
from typing import Optional

from elemta.addressing.normal import (normal_domain, normal_local_part, split_address,
                                      too_long, with_extension)
from elemta.config.schema import ENVELOPE_RECIPIENT, ENVELOPE_SENDER
from elemta.maps import lookup_address, values
from elemta.maps.spec import LazyTable
from elemta.smtp.address import AddressError, validate_mailbox

log = logging.getLogger("elemta.rewrite")

# Postfix's cleanup stops rewriting an address after this many rounds (a -> b -> a).
NESTING_LIMIT = 10


class RewriteError(Exception):
    """A canonical table gave something that is not an address; permanent when it is
    one, but too long (elemta.addressing.normal.too_long), which retrying cannot
    mend."""

    def __init__(self, message, permanent=False):
        super().__init__(message)
        self.permanent = permanent


def _table(spec):
    return LazyTable(spec) if spec is not None else None


class AddressRewriter:
    """The canonical tables and masquerading of one configuration."""

    def __init__(self, settings, addressing):
        self.addressing = addressing
        self.common = _table(settings.canonical_maps)
        self.sender_maps = [t for t in (_table(settings.sender_canonical_maps), self.common)
                            if t is not None]
        self.recipient_maps = [t for t in (_table(settings.recipient_canonical_maps),
                                           self.common) if t is not None]
        self.masquerade_domains = tuple(
            ("!" if d.startswith("!") else "") + normal_domain(d.lstrip("!"))
            for d in settings.masquerade_domains)
        self.exceptions = {u.lower() for u in settings.masquerade_exceptions}
        self.classes = frozenset(settings.masquerade_classes)

    @classmethod
    def from_config(cls, config, addressing):
        """The rewriter of config.rewrite, or None when it rewrites nothing."""
        r = config.rewrite
        if (r.canonical_maps is None and r.sender_canonical_maps is None
                and r.recipient_canonical_maps is None and not r.masquerade_domains):
            return None
        return cls(r, addressing)

    def sender(self, address, where=ENVELOPE_SENDER):
        """The envelope (or header) sender address rewritten."""
        if not address:
            return address
        for table in self.sender_maps:
            address = self._map(table, address)
        if where in self.classes:
            address = self.masquerade(address)
        return address

    def recipient(self, address, where=ENVELOPE_RECIPIENT):
        """A recipient address rewritten (before virtual alias expansion)."""
        if not address:
            return address
        for table in self.recipient_maps:
            address = self._map(table, address)
        if where in self.classes:
            address = self.masquerade(address)
        return address

    def masquerade(self, address):
        """address with its host part stripped as masquerade_domains says."""
        local, domain = split_address(address)
        if not domain or not self.masquerade_domains or domain.startswith("["):
            return address
        if normal_local_part(local).lower() in self.exceptions:
            return address
        domain = normal_domain(domain)
        for entry in self.masquerade_domains:
            keep = entry.startswith("!")
            name = entry.lstrip("!")
            if domain == name:
                return address
            if domain.endswith("." + name):
                return address if keep else "%s@%s" % (local, name)
        return address

    def _map(self, table, address):
        """address through one canonical table, again and again (NESTING_LIMIT)."""
        for _ in range(NESTING_LIMIT):
            result = self._lookup(table, address)
            if result is None or result == address:
                return address
            address = result
        log.warning("<%s>: unreasonable canonical map nesting in %s: stopped there",
                    address, table.spec)
        return address

    def _lookup(self, table, address) -> Optional[str]:
        delimiter = self.addressing.delimiter
        match = lookup_address(table, address, delimiter,
                               local_part=self.addressing.is_local(address))
        if match is None:
            return None
        found = values(match.value)
        if len(found) != 1:
            raise RewriteError("%s gives %d addresses for <%s>, not one"
                               % (table.spec, len(found), address))
        result = found[0]
        if result.startswith("@"):
            result = split_address(address)[0] + result     # @domain keeps the local part
        else:
            result = self.addressing.qualify(result)
            extension = self.addressing.unmatched_extension(address, match.key)
            if extension is not None:
                # Matched without the extension: it goes back on the result, with the
                # delimiter the address used (checked below, as it will be queued).
                result = with_extension(result, *extension)
        problem = too_long(result)
        if problem is not None:
            raise RewriteError("%s gives %s for <%s>: %s" % (
                table.spec, ascii(result), address, problem), permanent=True)
        try:
            validate_mailbox(result, utf8=True)
        except AddressError as error:
            raise RewriteError("%s gives %s for <%s>, not an address: %s"
                               % (table.spec, ascii(found[0]), address, error))
        return result
