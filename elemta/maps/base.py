"""The LookupTable interface, its two errors and what a lookup returns.

Owned by no process: every table type in elemta.maps implements it, and every consumer
(virtual aliases, relay domains, access tables...) calls only lookup(). Postfix's dict(3)
idea: one small interface, many backends.

    table.lookup(key) -> None | str | list of str

None is "not found". A str is the value as the table holds it ("a@x, b@y" from a flat
file stays one string, as Postfix's value is); a list is several values the backend
returned apart (SQL rows, a YAML list in the config). values() flattens either into the
list of items a consumer of address lists wants, split at commas as Postfix splits them.

Two errors, told apart by who must act:
  TableError        the table cannot be opened as written (bad spec, unknown .cf key, a
                    regexp syntax error): a configuration error, reported at load or by
                    elemtactl, with file:line where there is one.
  TableUnavailable  the table exists but cannot answer now (database down, timeout,
                    authentication refused, a file half edited): temporary. Consumers in
                    the SMTP layer answer 451 4.3.0 and the delivery side defers; nothing
                    is ever refused for good because a lookup failed.
A table says whether it may be asked for partial keys (partial_keys). A table of exact
keys (lmdb, inline, SQL) may: the search orders try user@domain, then user, then
@domain. A pattern table (regexp) may not: it is asked for the whole search string
only, as Postfix asks its regexp and pcre tables (regexp_table(5); maps_find() with
DICT_FLAG_FIXED skips pattern tables for the partial keys). Otherwise a negated rule
(!/^blocked@/ OK) would match the partial key "@example.org" and let through the very
address it was written to refuse.
See also: elemta.maps.spec (open_table), elemta.maps.search (Postfix's search orders).
"""

from typing import List, Optional, Union

Result = Optional[Union[str, List[str]]]


class TableError(Exception):
    """A table that cannot be used as configured; str() names the file (and line)."""


class TableUnavailable(Exception):
    """A lookup that cannot be answered now (temporary); str() is the reason an admin
    reads in the log: which table, and what went wrong."""


class LookupTable:
    """One lookup table. Subclasses set `spec` (how it was named, for messages) and
    implement lookup(); close() releases what they hold."""

    spec = ""
    # False for pattern tables: asked for the whole search string only (see above).
    partial_keys = True

    def lookup(self, key: str) -> Result:
        """The value for key, or None; raises TableUnavailable when it cannot say."""
        raise NotImplementedError

    def lookup_key(self, key: str, whole: bool) -> Result:
        """lookup(key) for the search orders (elemta.maps.search): whole is False for a
        partial key (user, @domain, .parent), which a pattern table is not asked."""
        if whole or self.partial_keys:
            return self.lookup(key)
        return None

    def lookup_many(self, keys: List[str]) -> List[Result]:
        """lookup() of each key, in order. Tables whose lookups cost a round trip
        (elemta.maps.regexp: one call to its helper) answer them all in one."""
        return [self.lookup(key) for key in keys]

    def close(self) -> None:
        """Release files and connections; the table may not be used afterwards."""

    def __repr__(self):
        return "<%s %s>" % (type(self).__name__, self.spec)


def values(result: Result) -> List[str]:
    """A lookup result as a list of items: a list as it is, a str split at commas
    (Postfix's list form "a@x, b@y"); [] for None."""
    if result is None:
        return []
    if isinstance(result, list):
        return list(result)
    return [item.strip() for item in result.split(",") if item.strip()]


def as_text(result: Result) -> str:
    """A result as postmap -q prints it: several values joined by commas."""
    if isinstance(result, list):
        return ",".join(result)
    return result or ""
