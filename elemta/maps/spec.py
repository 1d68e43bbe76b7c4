"""Table specs: how a config option or a command names a lookup table, and open_table().

Used by the config loader (a schema field of type TableSpec is checked when the config
loads: a bad spec is an error naming file:line:key) and by elemtactl map query. The
spelling is Postfix's type:name:

    inline:{ a=b, c=d }                  the table itself (elemta.maps.inline); in YAML or
    {a: b, c: d} / ["a b", "c d"]        TOML also a table or a list of "key value" lines
    lmdb:/etc/elemta/virtual             FILE.lmdb compiled by elemtactl map compile
    hash:/etc/elemta/virtual             the same (Postfix's name for its default type)
    regexp:/etc/elemta/header_checks     regexp_table(5) patterns
    sqlite:/etc/elemta/virtual-sqlite.cf an SQL query, sqlite_table(5) settings
    pgsql:/etc/elemta/virtual-pgsql.cf   an SQL query, pgsql_table(5) settings

File names must be absolute (the daemon's working directory is not the admin's). A spec
is checked for its form when read; the file it names is read when the table is opened
(open_table), whose TableError names that file and line.
See also: elemta.maps.base, man/elemta-tables.5.
"""

from dataclasses import dataclass
from typing import Any, Optional, Tuple

from elemta.maps.base import LookupTable, Result, TableError, TableUnavailable
from elemta.maps.inline import InlineTable, parse_braces
from elemta.maps.source import parse_entries

FILE_TYPES = ("lmdb", "hash", "regexp", "sqlite", "pgsql")
# Tables of patterns, asked for whole search strings only (LookupTable.partial_keys).
PATTERN_TYPES = ("regexp",)
TYPES = ("inline",) + FILE_TYPES


@dataclass(frozen=True)
class TableSpec:
    """A checked table spec: its type, the file it names ("" for inline) and, for inline
    tables, the entries ((key, value or tuple of values), ...). str() is the spec as
    Postfix would write it."""
    type: str
    name: str = ""
    entries: Tuple[Tuple[str, Any], ...] = ()

    # How the config loader and the man page call this type (elemta.config.loader).
    type_words = ("a lookup table (type:name, or a table or list of entries)",
                  "lookup tables")

    def __str__(self):
        if self.type != "inline":
            return "%s:%s" % (self.type, self.name)
        return "inline:{ %s }" % ", ".join(
            "{ %s = %s }" % (key, ", ".join(value) if isinstance(value, tuple) else value)
            for key, value in self.entries)

    @property
    def worker_file(self) -> str:
        """The file the processes that look up read ("" for inline): the config check
        opens it as master.user (elemta.config.loader.table_files)."""
        if self.type in ("lmdb", "hash"):
            return self.name + ".lmdb"
        return self.name

    def check(self) -> Optional[str]:
        """What is wrong with the file this spec names (file:line), or None; read when
        the config loads (elemta.config.loader.check_tables). A compiled table is not
        read: a missing one only makes lookups wait (TableUnavailable)."""
        if self.type in ("inline", "lmdb", "hash"):
            return None
        try:
            open_table(self).close()
        except TableError as error:
            return str(error)
        return None

    @classmethod
    def from_config(cls, value: Any) -> "TableSpec":
        """A spec from a config value (a string, a table or a list); ValueError says
        what is wrong with it."""
        try:
            return parse_spec(value)
        except TableError as error:
            raise ValueError(str(error))


def parse_spec(value: Any) -> TableSpec:
    """The TableSpec of a string, a dict or a list; raises TableError."""
    if isinstance(value, TableSpec):
        return value
    if isinstance(value, dict):
        entries = []
        for key, item in value.items():
            if isinstance(item, list) and all(isinstance(v, str) for v in item) and item:
                entries.append((str(key), tuple(item)))
            elif isinstance(item, (str, int)) and not isinstance(item, bool):
                entries.append((str(key), str(item)))
            else:
                raise TableError("the value of %s must be a string or a list of strings"
                                 % key)
        return TableSpec("inline", "", tuple(entries))
    if isinstance(value, list):
        if not all(isinstance(item, str) for item in value):
            raise TableError("each entry of a table list must be a string \"key value\"")
        entries = parse_entries(value, "table list entry")
        return TableSpec("inline", "", tuple(entries))
    if not isinstance(value, str):
        raise TableError("a lookup table is written type:name, a table or a list")
    kind, colon, name = value.strip().partition(":")
    if not colon or kind not in TYPES:
        raise TableError("%r is not a table spec: write type:name with type one of %s"
                         % (value, ", ".join(TYPES)))
    if kind == "inline":
        return TableSpec("inline", "", tuple(parse_braces(name)))
    if not name.startswith("/"):
        raise TableError("%s: the file name must be absolute (/etc/elemta/...)" % value)
    return TableSpec(kind, name)


def open_table(spec: Any) -> LookupTable:
    """The LookupTable a spec names (a TableSpec, a string, a dict or a list). Raises
    TableError when the spec or the file it names is wrong (file:line); a table that
    exists but cannot answer now (database down) opens fine and raises TableUnavailable
    on lookup."""
    spec = parse_spec(spec)
    text = str(spec)
    if spec.type == "inline":
        return InlineTable(spec.entries, text)
    if spec.type in ("lmdb", "hash"):
        from elemta.maps.lmdbtable import LmdbTable
        return LmdbTable(spec.name, text)
    if spec.type == "regexp":
        from elemta.maps.regexp import RegexpTable
        return RegexpTable(spec.name, text)
    if spec.type == "sqlite":
        from elemta.maps.sqlite import SQLiteTable
        return SQLiteTable(spec.name, text)
    from elemta.maps.pgsql import PgSQLTable
    return PgSQLTable(spec.name, text)


class LazyTable(LookupTable):
    """A table opened at its first lookup, by the process that looks up: a command
    every user runs (sendmail) builds what may need a table without reading files it
    has no right to, and a table whose file went wrong after the config was checked
    makes lookups fail for now (TableUnavailable: 451, a deferral) instead of
    stopping the process that opens it."""

    def __init__(self, spec: Any) -> None:
        self._spec = parse_spec(spec)
        self.spec = str(self._spec)
        self._table: Optional[LookupTable] = None
        # Known before the table is opened: the search orders ask before the lookup.
        self.partial_keys = self._spec.type not in PATTERN_TYPES

    def lookup(self, key: str) -> Result:
        return self._opened().lookup(key)

    def lookup_many(self, keys):
        return self._opened().lookup_many(keys)

    def _opened(self) -> LookupTable:
        if self._table is None:
            try:
                self._table = open_table(self._spec)
            except TableError as error:
                raise TableUnavailable("%s: cannot open: %s" % (self.spec, error))
        return self._table

    def close(self) -> None:
        if self._table is not None:
            self._table.close()
            self._table = None
