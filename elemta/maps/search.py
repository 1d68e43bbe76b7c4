"""Postfix's search orders, written once: which keys an address or a domain is looked up
by, most specific first, and the first that a table holds.

Used by every consumer of lookup tables (virtual aliases and mailboxes, relay domains,
transport, sender login and canonical maps, access tables), so none writes its own.
Addresses are spelled by elemta.addressing.normal first (local part without needless
quotes, domain lower case and in A-labels), so every table sees one form.

    address_keys("user+ext@Example.ORG", delimiter="+")
        user+ext@example.org, user@example.org,     virtual(5), canonical(5): the whole
        user+ext, user,                             address, the bare local part (only
        @example.org                                when local_part is True: Postfix asks
                                                    for it only in its own domains), then
                                                    the domain as a catch-all
    domain_keys("mail.Example.ORG")
        mail.example.org, .example.org, .org        transport(5), relay domains: the domain,
                                                    then each parent with a leading dot
                                                    (a key for all its subdomains)

The user key is the local part cut at its extension by the one rule every place uses
(elemta.addressing.normal.split_extension: each character of the delimiter splits,
"a b+x" quoted is found as "a b" quoted, postmaster is never split).
A pattern table (regexp: partial_keys is False) is asked for the first key only, the
whole address or domain, as Postfix asks its regexp tables: a negated rule must not
match a partial key the whole address did not match (elemta.maps.base); in a list of
tables (elemta.maps.tablelist), each key is asked of every table before the next key.
A TableUnavailable from any key's lookup ends the search (raised to the caller): a
later, less specific key must not answer for one that could not be asked.
See also: virtual(5), transport(5), elemta.maps.base.
"""

from typing import Iterator, NamedTuple, Optional

from elemta.addressing.normal import (normal_domain, normal_local_part, split_address,
                                      split_extension)
from elemta.maps.base import LookupTable, Result


class Match(NamedTuple):
    """The key that was found and its value."""
    key: str
    value: Result


def address_keys(address: str, delimiter: str = "", local_part: bool = True) -> Iterator[str]:
    """The keys of virtual(5)'s search order for address (see the module docstring)."""
    local, domain = split_address(address)
    local = normal_local_part(local)
    domain = normal_domain(domain) if domain else ""
    bases = [local]
    user, found, _ = split_extension(local, delimiter)
    if found is not None:
        bases.append(user)
    seen = set()
    for key in ([base + "@" + domain for base in bases] if domain else []) + (
            bases if local_part or not domain else []) + (["@" + domain] if domain else []):
        if key not in seen:
            seen.add(key)
            yield key


def domain_keys(domain: str, subdomains: bool = True) -> Iterator[str]:
    """The domain, then (subdomains) each parent with a leading dot."""
    domain = normal_domain(domain)
    yield domain
    if not subdomains or domain.startswith("["):
        return
    labels = domain.split(".")
    for index in range(1, len(labels)):
        yield "." + ".".join(labels[index:])


def first(table: LookupTable, keys) -> Optional[Match]:
    """The first of keys that table holds, with its value; None when it holds none.
    A pattern table is asked for the first key only."""
    for index, key in enumerate(keys):
        value = table.lookup_key(key, index == 0)
        if value is not None:
            return Match(key, value)
        if not table.partial_keys:
            break
    return None


def lookup_address(table: LookupTable, address: str, delimiter: str = "",
                   local_part: bool = True) -> Optional[Match]:
    """The first of address_keys(address) in table."""
    return first(table, address_keys(address, delimiter, local_part))


def lookup_domain(table: LookupTable, domain: str, subdomains: bool = True) -> Optional[Match]:
    """The first of domain_keys(domain) in table."""
    return first(table, domain_keys(domain, subdomains))
