"""Domain lists: a config value naming domains, written inline or kept in a lookup table.

Postfix's relay_domains, virtual_alias_domains and virtual_mailbox_domains take either
a list of names or type:table; so do relay.relay_domains, virtual.alias_domains and
virtual.mailbox_domains (elemta.config.schema), whose type this is. Read by the
addressing layer (elemta.addressing.classes) in every process.

    [example.org, .example.net]      inline: example.org itself; ".example.net" every
                                     subdomain of example.net (not example.net itself)
    lmdb:/etc/elemta/domains         a table keyed by domain (its value is not read),
    pgsql:/etc/elemta/domains.cf     searched as transport(5) is: domain, then .parent

A subdomain matches only through a ".domain" entry (as Postfix does when
parent_domain_matches_subdomains does not name the parameter): a relay domain never
silently takes in every name below it. A table that cannot answer raises
TableUnavailable (the smtpd answers 451 4.3.0).
See also: elemta.maps.spec, elemta.maps.search.
"""

from typing import Any, FrozenSet, Optional, Tuple

from elemta.addressing.normal import normal_domain
from elemta.maps.base import TableError
from elemta.maps.search import domain_keys, lookup_domain
from elemta.maps.spec import LazyTable, TableSpec, parse_spec


def _domain_problem(name: str) -> Optional[str]:
    """What is wrong with one inline entry, or None."""
    from elemta.config.options import domains
    if not isinstance(name, str):
        return "each entry must be a domain name (a string), not %r" % (name,)
    return domains([name[1:] if name.startswith(".") else name])


class DomainList:
    """Domains given inline (normal form, a leading dot kept) or a table spec."""

    type_words = ("a list of domains or a lookup table (type:name)",
                  "lists of domains or lookup tables")

    def __init__(self, domains: Tuple[str, ...] = (), table: Optional[TableSpec] = None):
        self.domains = tuple(normal_domain(d) for d in domains)
        self.table = table

    @classmethod
    def from_config(cls, value: Any) -> "DomainList":
        """A list of domain names, or a table spec (type:name, or an inline table);
        ValueError says what is wrong."""
        if isinstance(value, DomainList):
            return value
        if isinstance(value, (list, tuple)):
            for name in value:
                problem = _domain_problem(name)
                if problem:
                    raise ValueError(problem)
            return cls(tuple(value))
        if isinstance(value, str) and ":" not in value:
            raise ValueError("%r: write a list of domains ([%s]) or a lookup table "
                             "(type:name, such as lmdb:/etc/elemta/domains)"
                             % (value, value))
        try:
            return cls((), parse_spec(value))
        except TableError as error:
            raise ValueError(str(error))

    # -- what the config tools and the loader ask of a type of their own

    def plain(self) -> Any:
        """The value as a config file writes it: the list, or the table spec."""
        return str(self.table) if self.table is not None else self.domains

    def check(self) -> Optional[str]:
        return self.table.check() if self.table is not None else None

    @property
    def worker_file(self) -> str:
        return self.table.worker_file if self.table is not None else ""

    @property
    def worker_files(self) -> Tuple[str, ...]:
        return self.table.worker_files if self.table is not None else ()

    def __bool__(self) -> bool:
        return bool(self.domains) or self.table is not None

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, DomainList) and (self.domains, self.table) == (
            other.domains, other.table)

    def __hash__(self) -> int:
        return hash((self.domains, self.table))

    def __repr__(self) -> str:
        return "DomainList(%r)" % (self.plain(),)


class DomainMatcher:
    """Answers "is this domain in the list?" for one DomainList, opening its table once."""

    def __init__(self, domain_list: DomainList) -> None:
        self.inline: FrozenSet[str] = frozenset(domain_list.domains)
        # Opened at the first lookup: sendmail builds one without reading any file.
        self.table = LazyTable(domain_list.table) if domain_list.table is not None \
            else None

    def __contains__(self, domain: str) -> bool:
        """True when domain (any spelling) is listed, or a ".parent" of it is; raises
        TableUnavailable when the table cannot say."""
        if self.inline and any(key in self.inline for key in domain_keys(domain)):
            return True
        return self.table is not None and lookup_domain(self.table, domain) is not None
