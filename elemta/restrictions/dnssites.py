"""DNS list entries as Postfix writes them: domain[=filter][*weight].

Owned by no process: the config loader checks the entries with parse_site (through
elemta.plugins.settings) and the DNS list restrictions (elemta.restrictions.dnsbl,
elemta.restrictions.rhsbl) match answers with it. Light on purpose: no DNS, no gevent.

The filter is Postfix's (postscreen_dnsbl_sites, reject_rbl_client): four octets, each a
number or a bracketed list of numbers and ranges separated by ';', e.g.
127.0.0.[2..11], 127.0.[2..15].[0;1], 127.0.0.[1;3..5]. Without a filter any A record
counts. The weight (default 1) is what a listing adds to the client's score; a negative
weight makes an allow list.

    site = parse_site("zen.example=127.0.0.[2..11]*3")
    site.domain, site.weight          # "zen.example", 3
    site.matches(["127.0.0.4"])       # True

See also: elemta.restrictions.dnslists (the lookups), tests/test_dnsbl.py.
"""

import re
from dataclasses import dataclass
from typing import Optional, Tuple

_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")
_WEIGHT = re.compile(r"^-?\d{1,6}$")
_NUMBER = re.compile(r"^\d{1,3}$")

Ranges = Tuple[Tuple[int, int], ...]


@dataclass(frozen=True)
class Site:
    """One list entry. octets: per octet, the (low, high) ranges it may take; None when
    the entry has no filter."""
    text: str
    domain: str
    octets: Optional[Tuple[Ranges, ...]] = None
    weight: int = 1

    def matches(self, addresses):
        """True when one of the list's answers (A record addresses) passes the filter."""
        for address in addresses:
            if self.octets is None:
                return True
            parts = address.split(".")
            if len(parts) != 4 or not all(part.isdigit() for part in parts):
                continue
            if all(any(low <= int(part) <= high for low, high in ranges)
                   for part, ranges in zip(parts, self.octets)):
                return True
        return False


def parse_site(text):
    # type: (str) -> Site
    """The Site an entry describes; ValueError naming what is wrong."""
    rest, weight = text.strip(), 1
    if "*" in rest:
        rest, _, weight_text = rest.rpartition("*")
        if not _WEIGHT.match(weight_text):
            raise ValueError("%r: the weight after * must be a whole number" % (text,))
        weight = int(weight_text)
    domain, _, pattern = rest.partition("=")
    domain = domain.rstrip(".")
    if not domain or len(domain) > 253 or not all(
            _LABEL.match(label) for label in domain.split(".")):
        raise ValueError("%r: %r is not a domain name" % (text, domain))
    octets = _parse_filter(text, pattern) if pattern else None
    return Site(text, domain.lower(), octets, weight)


def _parse_filter(text, pattern):
    parts = _split_octets(pattern)
    if len(parts) != 4:
        raise ValueError("%r: the filter %r must have four octets, as 127.0.0.[2..11]"
                         % (text, pattern))
    octets = []
    for part in parts:
        if part.startswith("[") and part.endswith("]"):
            items = part[1:-1].split(";")
        else:
            items = [part]
        ranges = []
        for item in items:
            low, dots, high = item.partition("..")
            if not dots:
                high = low
            if not (_NUMBER.match(low) and _NUMBER.match(high)) \
                    or not int(low) <= int(high) <= 255:
                raise ValueError("%r: %r is not an octet, a range a..b or a list [a;b..c] "
                                 "of values from 0 to 255" % (text, part))
            ranges.append((int(low), int(high)))
        octets.append(tuple(ranges))
    return tuple(octets)


def _split_octets(pattern):
    """Split at the dots outside brackets (a range's '..' is inside them)."""
    parts, depth, current = [], 0, ""
    for char in pattern:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if char == "." and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return parts
