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

Several tables make one map when listed, as Postfix lists them: a string
"hash:/etc/elemta/virtual, pgsql:/etc/elemta/virtual.cf" (commas or spaces between
them), or a YAML/TOML list whose every item is a table (a type:name string, or a
table of entries); a list of "key value" strings stays one inline table. Each key is
asked of the tables in order, the first that has it answers (elemta.maps.tablelist).
File names must be absolute (the daemon's working directory is not the admin's). A spec
is checked for its form when read; the file it names is read when the table is opened
(open_table), whose TableError names that file and line.
See also: elemta.maps.base, man/elemta-tables.5.
"""

import re
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

from elemta.maps.base import LookupTable, Result, TableError, TableUnavailable
from elemta.maps.inline import InlineTable, parse_braces
from elemta.maps.source import parse_entries

FILE_TYPES = ("lmdb", "hash", "regexp", "sqlite", "pgsql")
# Tables of patterns, asked for whole search strings only (LookupTable.partial_keys).
PATTERN_TYPES = ("regexp",)
TYPES = ("inline",) + FILE_TYPES
# A list of tables ("hash:/a, pgsql:/b"): its entries are their TableSpecs.
LIST = "list"
_SPEC_START = re.compile(r"(%s):" % "|".join(TYPES))


@dataclass(frozen=True)
class TableSpec:
    """A checked table spec: its type, the file it names ("" for inline) and, for inline
    tables, the entries ((key, value or tuple of values), ...). str() is the spec as
    Postfix would write it."""
    type: str
    name: str = ""
    entries: Tuple[Any, ...] = ()

    # How the config loader and the man page call this type (elemta.config.loader).
    type_words = ("a lookup table (type:name, or a table or list of entries), or several "
                  "(\"type:name, type:name\" or a list of them: the first that has a key "
                  "answers)", "lookup tables")

    def __str__(self):
        if self.type == LIST:
            return ", ".join(str(member) for member in self.entries)
        if self.type != "inline":
            return "%s:%s" % (self.type, self.name)
        return "inline:{ %s }" % ", ".join(
            "{ %s = %s }" % (key, ", ".join(value) if isinstance(value, tuple) else value)
            for key, value in self.entries)

    @property
    def worker_files(self) -> Tuple[str, ...]:
        """The files the processes that look up read (none for inline): the config
        check opens them as master.user (elemta.config.loader.table_files)."""
        if self.type == LIST:
            return tuple(name for member in self.entries for name in member.worker_files)
        return (self.worker_file,) if self.worker_file else ()

    @property
    def worker_file(self) -> str:
        """The file a single table reads ("" for inline and for a list)."""
        if self.type == LIST:
            return ""
        if self.type in ("lmdb", "hash"):
            return self.name + ".lmdb"
        return self.name

    def check(self) -> Optional[str]:
        """What is wrong with the file this spec names (file:line), or None; read when
        the config loads (elemta.config.loader.check_tables). A compiled table is not
        read: a missing one only makes lookups wait (TableUnavailable)."""
        if self.type == LIST:
            return next((problem for problem in (type(self)(*member.fields()).check()
                                                 for member in self.entries) if problem),
                        None)
        if self.type in ("inline", "lmdb", "hash"):
            return None
        try:
            open_table(self).close()
        except TableError as error:
            return str(error)
        return None

    def fields(self) -> Tuple[str, str, Tuple[Any, ...]]:
        """(type, name, entries): what a subclass is made of (ActionTableSpec)."""
        return self.type, self.name, self.entries

    @property
    def partial_keys(self) -> bool:
        """False for a pattern table (LookupTable.partial_keys), known before it is
        opened; a list has partial keys if any of its tables has."""
        if self.type == LIST:
            return any(member.partial_keys for member in self.entries)
        return self.type not in PATTERN_TYPES

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
    if isinstance(value, list) and value and all(
            isinstance(item, dict) or (isinstance(item, str) and _SPEC_START.match(item.strip()))
            for item in value):
        return _spec_list([parse_spec(item) for item in value])
    if isinstance(value, list):
        if not all(isinstance(item, str) for item in value):
            raise TableError("each entry of a table list must be a string \"key value\"")
        entries = parse_entries(value, "table list entry")
        return TableSpec("inline", "", tuple(entries))
    if not isinstance(value, str):
        raise TableError("a lookup table is written type:name, a table or a list")
    members = _split_list(value.strip())
    if len(members) > 1:
        return _spec_list([parse_spec(member) for member in members])
    kind, colon, name = value.strip().partition(":")
    if not colon or kind not in TYPES:
        raise TableError("%r is not a table spec: write type:name with type one of %s"
                         % (value, ", ".join(TYPES)))
    if kind == "inline":
        return TableSpec("inline", "", tuple(parse_braces(name)))
    if not name.startswith("/"):
        raise TableError("%s: the file name must be absolute (/etc/elemta/...)" % value)
    return TableSpec(kind, name)


def _split_list(text: str) -> List[str]:
    """The table specs of "hash:/a, pgsql:/b" (commas or white space between them; an
    inline table's braces kept whole); [text] for one spec."""
    members, depth, current = [], 0, ""
    for char in text:
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0 and (char == "," or char.isspace()):
            if current:
                members.append(current)
            current = ""
        else:
            current += char
    if current:
        members.append(current)
    # Only a list when each piece is a spec: "inline:{ a=b }" or a file name with a
    # space stays one, to be judged as one.
    if len(members) > 1 and all(_SPEC_START.match(member) for member in members):
        return members
    return [text]


def _spec_list(members: List[TableSpec]) -> TableSpec:
    """One spec for several tables; one table alone is itself."""
    if len(members) == 1:
        return members[0]
    if any(member.type == LIST for member in members):
        raise TableError("a list of tables cannot hold another list")
    return TableSpec(LIST, "", tuple(members))


def open_table(spec: Any) -> LookupTable:
    """The LookupTable a spec names (a TableSpec, a string, a dict or a list). Raises
    TableError when the spec or the file it names is wrong (file:line); a table that
    exists but cannot answer now (database down) opens fine and raises TableUnavailable
    on lookup."""
    spec = parse_spec(spec)
    text = str(spec)
    if spec.type == LIST:
        from elemta.maps.tablelist import TableList
        tables: List[LookupTable] = []
        try:
            for member in spec.entries:
                tables.append(open_table(member))
        except TableError:
            for table in tables:
                table.close()
            raise
        return TableList(tables, text)
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
        self.partial_keys = self._spec.partial_keys

    def lookup(self, key: str) -> Result:
        return self._opened().lookup(key)

    def lookup_key(self, key: str, whole: bool) -> Result:
        return self._opened().lookup_key(key, whole)

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
