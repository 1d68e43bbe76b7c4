"""Virtual alias expansion: one recipient -> the addresses virtual.alias_maps sends it to
(Postfix's cleanup_map1n with virtual_alias_maps).

Expanded before the message is queued, as Postfix's cleanup does, so each queue record
holds real recipients and delivery never looks aliases up: the smtpd expands at RCPT
(where the lookup also validates the address, and a table that cannot answer is a 451
for that recipient alone) and keeps the result for the end of DATA; pickup expands each
maildrop file before it queues it (elemta.pickup.worker). sendmail -bv shows the
expansion. The original address becomes the DSN original recipient (ORCPT) of each
address it expands to, unless the client gave one.

The rules, Postfix's:
  - keys, most specific first (elemta.maps.search): user+ext@domain, user@domain,
    user+ext and user (local domains only), @domain (the catch-all)
  - a value is one or more addresses (commas); each is expanded again; a bare name is
    qualified with the host name (myorigin)
  - a value "@otherdomain" renames the domain: user@domain becomes user@otherdomain (the
    whole local part, extension and all), which is expanded again like any result
    (virtual(5); how a domain alias is written: "@alias.example @example.org")
  - when the entry matched without the address extension (user@domain for
    user+ext@domain, "a b"@domain for "a b+ext"@domain), the extension goes onto each
    result with the delimiter the address used (propagate_unmatched_extensions; the
    extension rule of elemta.addressing.normal.split_extension)
  - each result is put in normal form (elemta.addressing.normal.canonical: domain in
    lower case, without the final dot, in A-labels; no needless quotes), the form the
    smtpd queues a hosted recipient in (elemta.addressing.resolve.queued_address) and
    Postfix's trivial-rewrite gives every address: "Alice@VIRT.test." in a table is
    queued as Alice@virt.test, which Dovecot's LMTP takes, and bücher.example as
    xn--bcher-kva.example, which needs no SMTPUTF8
  - a value that is not an address (a control character, no domain...) is an
    AliasExpansionError, 451 4.6.0: a table may be filled by others, and nothing but an
    address may reach the envelope; the admin fixes the table while the sender retries
  - a result too long to be an address anywhere (a local part over 64 octets, an
    address over 254, often the client's extension put onto a long name) is a
    permanent error, 550 5.1.3: every next hop would refuse it, and it is the client's
    address that makes it so
  - a final address that is not ASCII (a UTF-8 local part) in a message sent without
    SMTPUTF8 is refused with 553 5.6.7 (RFC 6531 3.7.4.1): it cannot be passed on in
    that message, and one such address would make the next hop's whole transaction
    fail, its other recipients with it. pickup asks with smtputf8 true: sendmail's
    mail gets SMTPUTF8 when an address needs it (Postfix's
    smtputf8_autodetect_classes)
  - an address in its own expansion is kept as it is (a -> a, b delivers to a and b)
  - a real loop (a -> b -> a) and more than RECURSION_LIMIT levels or EXPANSION_LIMIT
    addresses raise AliasExpansionError: the recipient is refused with 451 4.6.0, as
    Postfix defers the message ("unreasonable virtual_alias_maps map nesting"), so the
    sender retries while the admin fixes the table; the reply says which of these it
    is, the log also names the addresses (where an alias leads is not the client's
    business)
  - an address an expansion reaches twice, or that is already a recipient of the
    message, is kept once; so is an address the client names twice, or names after an
    alias that reached it (Postfix's cleanup drops such duplicates too, though it keeps
    one per original recipient: X-Original-To may differ)
A table that cannot answer raises TableUnavailable.
See also: virtual(5), elemta.addressing.hosted (which recipients exist).
"""

from typing import List, Optional

from elemta.addressing.normal import (canonical, normal_local_part, split_address, too_long,
                                      with_extension)
from elemta.maps import lookup_address, values
from elemta.maps.spec import LazyTable
from elemta.queue.model import Recipient
from elemta.smtp.address import AddressError, validate_mailbox

# Postfix's virtual_alias_recursion_limit and virtual_alias_expansion_limit.
RECURSION_LIMIT = 1000
EXPANSION_LIMIT = 1000


class AliasExpansionError(Exception):
    """A loop, a limit or a bad value met while expanding: str() says which, naming the
    addresses (for the log); `summary` says which without them (for the client, who
    must not learn where an alias leads); code and status are the reply's (451 4.6.0,
    the admin's to fix, unless the error is for good)."""

    def __init__(self, summary, detail, code=451, status="4.6.0"):
        super().__init__(detail)
        self.summary = summary
        self.code = code
        self.status = status

    @property
    def permanent(self):
        return self.code >= 500


def _same(address):
    """The form two addresses are compared in (Postfix compares without case)."""
    return canonical(address).lower()


def same_address(one, other):
    """True when one and other are the same address however spelled (without case)."""
    return _same(one) == _same(other)


class VirtualAliases:
    """The virtual alias table of one configuration, and the Addressing that says which
    domains are local (for the bare-user keys) and how extensions are written."""

    def __init__(self, table, addressing):
        self.table = table
        self.addressing = addressing

    @classmethod
    def from_config(cls, config, addressing):
        """The aliases of config.virtual.alias_maps, or None when it is unset."""
        spec = config.virtual.alias_maps
        return cls(LazyTable(spec), addressing) if spec is not None else None

    def lookup(self, address: str) -> Optional[List[str]]:
        """The addresses one entry gives for address, in normal form, or None when it
        has none."""
        delimiter = self.addressing.delimiter
        match = lookup_address(self.table, address, delimiter,
                               local_part=self.addressing.is_local(address))
        if match is None:
            return None
        extension = self.addressing.unmatched_extension(address, match.key)
        targets = []
        for value in values(match.value):
            if value.startswith("@"):
                # "@otherdomain": the same local part in another domain (virtual(5)).
                target = normal_local_part(split_address(address)[0]) + value
            else:
                target = self.addressing.qualify(value)
                if extension is not None:
                    # Matched as user@domain or user: the extension goes on (Postfix's
                    # propagate_unmatched_extensions), with the delimiter the address
                    # used.
                    target = with_extension(target, *extension)
            targets.append(self._checked(address, value, target))
        return targets

    @staticmethod
    def _checked(address, value, target):
        """target in normal form, checked as it will be queued: a table may be written
        by others (a web panel's SQL rows), and only an address may reach the
        envelope."""
        normal = canonical(target)

        def shown():
            return ascii(value) + ("" if normal == value else " (as %s)" % ascii(normal))
        problem = too_long(normal)
        if problem is not None:
            raise AliasExpansionError(
                "virtual alias address too long (%s)" % problem,
                "the virtual alias table gives %s for <%s>: %s" % (shown(), address,
                                                                   problem),
                550, "5.1.3")
        try:
            validate_mailbox(normal, utf8=True)
        except AddressError as error:
            raise AliasExpansionError(
                "a virtual alias that is not an address",
                "the virtual alias table gives %s for <%s>, not an address: %s"
                % (shown(), address, error))
        target = normal
        return target

    def expand(self, address: str, smtputf8: bool = True) -> Optional[List[str]]:
        """The final addresses of address, or None when the table has no entry for it;
        raises AliasExpansionError (see the module docstring) or TableUnavailable.
        smtputf8 False: the message was sent without SMTPUTF8, so a final address must
        be ASCII."""
        first = self.lookup(address)
        if first is None:
            return None
        found: List[str] = []
        seen = set()
        done = set()        # expanded already (reached again by another way): skip

        def keep(target):
            key = _same(target)
            if not smtputf8 and not target.isascii():
                raise AliasExpansionError(
                    "its virtual alias needs SMTPUTF8",
                    "<%s>: its virtual alias %s is not ASCII, and the message was sent "
                    "without SMTPUTF8" % (address, ascii(target)), 553, "5.6.7")
            if key not in seen:
                seen.add(key)
                found.append(target)
                if len(found) > EXPANSION_LIMIT:
                    raise AliasExpansionError(
                        "too many addresses",
                        "<%s>: more than %d addresses in its virtual alias expansion"
                        % (address, EXPANSION_LIMIT))

        def walk(current, targets, path):
            if len(path) > RECURSION_LIMIT:
                raise AliasExpansionError("virtual aliases nested too deep",
                                          "<%s>: virtual aliases nested more than %d deep"
                                          % (address, RECURSION_LIMIT))
            here = _same(current)
            for target in targets:
                key = _same(target)
                if key == here:                 # in its own expansion: kept as it is
                    keep(target)
                    continue
                if key in (k for k, _ in path):
                    loop = [a for _, a in path[[k for k, _ in path].index(key):]]
                    raise AliasExpansionError("virtual alias loop", "virtual alias loop: %s"
                                              % " -> ".join("<%s>" % a
                                                            for a in loop + [target]))
                if key in done:
                    continue
                done.add(key)
                more = self.lookup(target)
                if more is None:
                    keep(target)
                else:
                    walk(target, more, path + [(key, target)])

        walk(address, first, [(_same(address), address)])
        return found


def expanded_recipients(recipients, targets_of):
    """The queue record's recipients: each Recipient replaced by those of its expansion
    (targets_of(address) -> list of addresses, or None to keep it), the original
    address kept as ORCPT, and an address met twice kept once (the first)."""
    out, seen, written = [], set(), set()
    for recipient in recipients:
        targets = targets_of(recipient.address)
        if targets is None:
            # Not an alias: kept as the client wrote it, unless that very address is
            # there already (named twice, or reached first by an alias): one copy, as
            # Postfix's cleanup keeps one. Other spellings of it stay apart, as ever.
            seen.add(canonical(recipient.address))
            if recipient.address not in written:
                written.add(recipient.address)
                out.append(recipient)
            continue
        orcpt = recipient.orcpt or original_recipient(recipient.address)
        for target in targets:
            key = canonical(target)      # the same mailbox, however spelled
            if key in seen:
                continue
            seen.add(key)
            written.add(target)
            out.append(Recipient(target, recipient.notify,
                                 recipient.orcpt if target == recipient.address else orcpt))
    return out


def original_recipient(address):
    """The ORCPT value naming address (RFC 3461 4.2; utf-8 type for a non-ASCII one,
    RFC 6533)."""
    try:
        address.encode("ascii")
        return "rfc822;" + address
    except UnicodeEncodeError:
        return "utf-8;" + address
