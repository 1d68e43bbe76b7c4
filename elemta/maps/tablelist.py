"""A list of tables used as one map: Postfix's "virtual_alias_maps = hash:a, pgsql:b".

Opened by elemta.maps.spec.open_table for a spec of type "list", in whichever process
looks up. Each key is asked of the tables in the order given, and the first that holds
it answers, as Postfix's maps_find() does; the search orders (elemta.maps.search) ask
key by key, so a more specific key in a later table wins over a less specific one in
an earlier table (user@domain in b before @domain in a), as in Postfix. A pattern table
in the list is asked for the whole search string only (LookupTable.partial_keys). A
table that cannot answer ends the lookup (TableUnavailable): a later table must not
answer for one that could not be asked.
See also: elemta.maps.base, elemta.maps.search.
"""

from typing import List

from elemta.maps.base import LookupTable, Result


class TableList(LookupTable):
    def __init__(self, tables: List[LookupTable], spec: str) -> None:
        self.tables = list(tables)
        self.spec = spec
        self.partial_keys = any(table.partial_keys for table in self.tables)

    def lookup(self, key: str) -> Result:
        return self.lookup_key(key, True)

    def lookup_key(self, key: str, whole: bool) -> Result:
        for table in self.tables:
            value = table.lookup_key(key, whole)
            if value is not None:
                return value
        return None

    def close(self) -> None:
        for table in self.tables:
            table.close()
