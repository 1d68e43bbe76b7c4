"""Lookup tables: one abstraction for every map (Postfix's dict(3)): virtual aliases and
mailboxes, relay domains, transport, sender login and canonical maps, access tables.

Below the process packages, like elemta.addressing: any process and elemtactl import it;
it imports only elemta.addressing.normal, elemta.util and the standard library (and
lmdb, psycopg).

    base        LookupTable.lookup(key) -> None | str | list; TableError (configured
                wrongly) and TableUnavailable (cannot answer now: 451 4.3.0, defer)
    spec        TableSpec ("type:name", a config table or list, several tables), open_table() and
                LazyTable (opened at its first lookup)
    domains     DomainList: a config value of domains, inline or a table
    search      Postfix's search orders: lookup_address (user@domain, user, @domain),
                lookup_domain (domain, .parent...)
    source      the text format postmap reads (key value, continuation lines)
    inline      tables written in the config
    lmdbtable   FILE.lmdb compiled atomically from FILE, reopened when replaced
    regexp      regexp_table(5) files
    sqlconf     the .cf files of SQL tables; % expansions as bound parameters
    sqlite      sqlite_table(5)
    pgsql       pgsql_table(5), over psycopg 3
    tablelist   several tables as one map ("lmdb:/a, pgsql:/b"), the first that has a
                key answers
    offthread   blocking lookups in the thread pool, bounded in time

See also: man/elemta-tables.5, elemta.cli.mapcmd (elemtactl map compile/query).
"""

from elemta.maps.base import LookupTable, TableError, TableUnavailable, as_text, values
from elemta.maps.search import Match, address_keys, domain_keys, lookup_address, lookup_domain
from elemta.maps.spec import TableSpec, open_table, parse_spec

__all__ = ["LookupTable", "TableError", "TableUnavailable", "as_text", "values", "Match",
           "address_keys", "domain_keys", "lookup_address", "lookup_domain", "TableSpec",
           "open_table", "parse_spec"]
