"""The .cf files of SQL tables (Postfix's sqlite_table(5) and pgsql_table(5) format) and
their query templates, turned into SQL with bound parameters.

Used by elemta.maps.sqlite and elemta.maps.pgsql when a table is opened. The file is
"key = value" lines (comments, blank lines and continuation lines as in every Postfix
table). Each table type names the keys it knows; any other key is a TableError naming
file:line:key, so a typo is found at the config check, not at the first lookup.

The query is written as Postfix's, with its % expansions:
    %s  the whole key           %u  its local part (the whole key if it has no @)
    %d  its domain              %1..%9  the domain's labels, %1 the top-level one
    %S %U %D  as %s %u %d, not folded to lower case      %%  a percent sign
    SELECT goto FROM alias WHERE address = '%s' AND active = '1'
Postfix pastes the quoted value into the text; here every expansion becomes a bound
parameter and the SQL text never contains key data, so no key can change the query
(' OR '1'='1 is just a key that is not found). A quoted literal holding expansions,
'%u@example.org', becomes a concatenation ('' || ? || '@example.org') of bound and
literal parts, which SQLite and PostgreSQL both understand. As in Postfix, a query
that needs %d (or %1..%9) for a key without a domain (or with too few labels), or %u
for a key with an empty local part, is not run and the key is not found.

result_format (default %s) shapes each value with the same expansions of the *result*
(%s the value, %u and %d its parts); expansion_limit (0: none) bounds the number of
values, more being an error (TableUnavailable, as Postfix's lookup error); domain (a
list of domains) runs the query only for keys in those domains.
International domains: a key is asked for with its domain in A-labels, and when it has
any, then again in UTF-8 (key_spellings), so rows may hold either spelling. Postfix asks
for the address as the client wrote it, so its rows must match each client's spelling.
The UTF-8 spelling is ours, not the client's: when the database cannot hold it (a LATIN1
database and a domain in Chinese script: UnencodableKey), that spelling is not found,
and the lookup answers as the first spelling did. Only the first spelling's encoding
error, or a real failure (server down, SQL error), is TableUnavailable.
See also: sqlite_table(5), pgsql_table(5), elemta.maps.sqlite, elemta.maps.pgsql.
"""

import re
from typing import Dict, Iterable, List, Optional, Tuple

from elemta.addressing.normal import normal_domain, unicode_domain
from elemta.maps.base import LookupTable, Result, TableError, TableUnavailable
from elemta.maps.offthread import call_bounded
from elemta.maps.source import logical_lines

# Keys every SQL table reads; each type adds its own.
COMMON_KEYS = ("query", "result_format", "expansion_limit", "domain")
# Postfix's pre-2.2 way of building the query: refused with a pointer to query.
_LEGACY_KEYS = ("select_field", "table", "where_field", "additional_conditions")
_EXPANSION = re.compile(r"%(.)", re.S)
_NAMES = "sudSUD123456789%"


def read_cf(path: str, known: Iterable[str]) -> Dict[str, str]:
    """{key: value} of a .cf file; raises TableError naming path:line:key."""
    known = tuple(known)
    settings: Dict[str, str] = {}
    try:
        with open(path, encoding="utf-8") as lines:
            logical = list(logical_lines(lines, path))
    except OSError as error:
        raise TableError("%s: cannot read: %s" % (path, error.strerror))
    except UnicodeDecodeError as error:
        raise TableError("%s: not UTF-8 text: %s" % (path, error))
    for number, text in logical:
        key, equals, value = text.partition("=")
        key = key.strip()
        if not equals or not key or " " in key:
            raise TableError("%s:%d: expected \"key = value\", found %r"
                             % (path, number, text))
        if key in _LEGACY_KEYS:
            raise TableError("%s:%d: %s: the select_field/table/where_field form is not "
                             "supported: write the whole query" % (path, number, key))
        if key not in known:
            raise TableError("%s:%d: %s: unknown key; known keys here: %s"
                             % (path, number, key, ", ".join(sorted(known))))
        if key in settings:
            raise TableError("%s:%d: %s: set twice" % (path, number, key))
        settings[key] = value.strip()
    if not settings.get("query"):
        raise TableError("%s: query is missing" % path)
    return settings


def _check_expansions(text: str, where: str) -> None:
    for found in _EXPANSION.finditer(text):
        if found.group(1) not in _NAMES:
            raise TableError("%s: unknown expansion %%%s (known: %s)" % (
                where, found.group(1), " ".join("%" + n for n in _NAMES)))
    if text.endswith("%") and not text.endswith("%%"):
        raise TableError("%s: a lone %% at the end (write %%%% for a percent sign)" % where)


class Query:
    """A Postfix query template as SQL text with placeholders and a list of expansions.

    sql(marker, literal_percent) gives the text with each expansion as `marker` (? for
    sqlite3, %s for psycopg) and literal percent signs as literal_percent; parameters(key)
    the values to bind, or None when the query is not to be run for this key."""

    def __init__(self, template: str, where: str) -> None:
        _check_expansions(template, where)
        self.parts: List[Tuple[str, str]] = []      # (kind, text): sql, param or percent
        self.names: List[str] = []
        index = 0
        while index < len(template):
            char = template[index]
            if char == "'":
                end = index + 1
                while True:
                    end = template.find("'", end)
                    if end < 0:
                        raise TableError("%s: the query has an unclosed ' quote" % where)
                    if template.startswith("''", end):
                        end += 2
                        continue
                    break
                self._literal(template[index + 1:end])
                index = end + 1
            elif char == "%":
                self._expansion(template[index + 1])
                index += 2
            else:
                self.parts.append(("sql", char))
                index += 1

    def _expansion(self, name: str) -> None:
        if name == "%":
            self.parts.append(("percent", "%"))
        else:
            self.parts.append(("param", name))
            self.names.append(name)

    def _literal(self, body: str) -> None:
        """A quoted literal: as is when it holds no expansion, else a concatenation."""
        pieces = _EXPANSION.split(body)     # text, name, text, name, ..., text
        if len(pieces) == 3 and pieces[0] == pieces[2] == "" and pieces[1] != "%":
            # '%s' alone: the parameter itself, typed by the server as Postfix's quoted
            # literal is ('%s' compared with an integer column is an integer).
            self._expansion(pieces[1])
            return
        if len(pieces) == 1:
            self.parts.append(("sql", "'" + body.replace("%%", "%") + "'"))
            return
        self.parts.append(("sql", "(''"))
        for position, piece in enumerate(pieces):
            if position % 2:
                if piece == "%":
                    self.parts.append(("sql", " || '"))
                    self.parts.append(("percent", "%"))
                    self.parts.append(("sql", "'"))
                else:
                    self.parts.append(("sql", " || "))
                    self._expansion(piece)
            elif piece:
                self.parts.append(("sql", " || '%s'" % piece))
        self.parts.append(("sql", ")"))

    def sql(self, marker: str, literal_percent: str) -> str:
        out = []
        for kind, text in self.parts:
            if kind == "param":
                out.append(marker)
            elif kind == "percent":
                out.append(literal_percent)
            else:
                out.append(text.replace("%", literal_percent))
        return "".join(out)

    def parameters(self, key: str) -> Optional[List[str]]:
        """The values of the expansions for key, in order; None: do not query."""
        values = []
        for name in self.names:
            value = expand_one(name, key)
            if value is None:
                return None
            values.append(value)
        return values


def expand_one(name: str, key: str) -> Optional[str]:
    """One expansion of key (%s, %u, %d, %1..%9, upper case unfolded); None when the key
    lacks the part (no domain, too few labels, empty local part)."""
    folded = key if name.isupper() else key.lower()
    local, at, domain = folded.rpartition("@")
    if name in "sS":
        return folded
    if name in "uU":
        if not at:
            return folded
        return local or None
    if not at or not domain:
        return None
    if name in "dD":
        return domain
    labels = domain.split(".")
    index = int(name)
    return labels[-index] if index <= len(labels) else None


class ResultFormat:
    """result_format: each value through %s/%u/%d (of the value) and %%."""

    def __init__(self, template: str, where: str) -> None:
        _check_expansions(template, where)
        for found in _EXPANSION.finditer(template):
            if found.group(1) in "123456789":
                raise TableError("%s: result_format takes %%s, %%u, %%d and %%%%, not %%%s"
                                 % (where, found.group(1)))
        self.template = template

    def apply(self, value: str) -> Optional[str]:
        def one(found):
            name = found.group(1)
            if name == "%":
                return "%"
            part = expand_one(name.lower(), value) if name.lower() != "s" else value
            if part is None:
                raise _Skip()
            return part
        try:
            return _EXPANSION.sub(one, self.template)
        except _Skip:
            return None


class _Skip(Exception):
    """A result value without the part result_format asks for: left out, as Postfix does."""


class SQLSettings:
    """What every SQL table takes from its .cf file: the query, the result format, the
    expansion limit and the domain filter."""

    def __init__(self, path: str, settings: Dict[str, str]) -> None:
        self.path = path
        self.query = Query(settings["query"], "%s: query" % path)
        self.result_format = ResultFormat(settings.get("result_format", "%s"),
                                          "%s: result_format" % path)
        limit = settings.get("expansion_limit", "0")
        if not limit.isdigit():
            raise TableError("%s: expansion_limit: must be a whole number, not %r"
                             % (path, limit))
        self.expansion_limit = int(limit)
        self.domains = frozenset(normal_domain(d) for d in
                                 settings.get("domain", "").replace(",", " ").split())

    def parameters(self, key: str) -> Optional[List[str]]:
        """The bound values for key, or None when the query is not to be run."""
        if self.domains:
            local, at, domain = key.rpartition("@")
            if not at or normal_domain(domain) not in self.domains:
                return None
        return self.query.parameters(key)

    def results(self, spec: str, rows) -> Result:
        """The values of the rows (first column, NULLs skipped; bytes read as UTF-8)
        shaped by result_format: one str, a list for several, None for none. Too many,
        or bytes that are not UTF-8: TableUnavailable."""
        values = []
        for row in rows:
            if row and row[0] is not None:
                value = row[0]
                if isinstance(value, bytes):    # a BLOB; text of a SQL_ASCII client
                    try:
                        value = value.decode("utf-8")
                    except UnicodeDecodeError as error:
                        raise TableUnavailable("%s: a result is not UTF-8: %s"
                                               % (spec, error))
                shaped = self.result_format.apply(str(value))
                if shaped is not None:
                    values.append(shaped)
        if self.expansion_limit and len(values) > self.expansion_limit:
            raise TableUnavailable("%s: %d results, more than expansion_limit %d"
                                   % (spec, len(values), self.expansion_limit))
        if len(values) == 1:
            return values[0]
        return values or None


def key_spellings(key: str) -> List[str]:
    """The spellings an SQL table is asked for key, until one is found: the key with its
    domain (after the last @, or the whole key) in A-labels, the form every lookup
    spells it in (elemta.maps.search); then, when that domain has A-labels, the same key
    with them as U-labels, the UTF-8 text a web panel or an SMTPUTF8 client may have
    stored. So a row is found whichever spelling it holds and whichever the client
    wrote: alice@xn--bcher-kva.example, then alice@bücher.example. A key without @ is
    taken as it is (a domain, or a bare user name, which is never IDNA-encoded)."""
    local, at, domain = key.rpartition("@")
    if at:
        domain = normal_domain(domain)
        first = local + at + domain
    else:
        domain = first = key
    spellings = [first]
    utf8 = unicode_domain(domain)
    if utf8 != domain:
        spellings.append(local + at + utf8)
    return spellings


class UnencodableKey(TableUnavailable):
    """A key the client or the database encoding cannot carry (raised by a table's
    _query): TableUnavailable when it is the key as asked, "not found" for the UTF-8
    spelling key_spellings derived from it."""


class SQLTable(LookupTable):
    """What the sqlite and pgsql tables share: the key becomes the query's bound
    parameters, the query runs off the event loop within the table's timeout (their own
    _query, in a pool thread), and the rows become the result. A subclass sets spec,
    timeout and sql (SQLSettings)."""

    spec: str
    timeout: float
    sql: "SQLSettings"

    def lookup(self, key: str) -> Result:
        for derived, spelling in enumerate(key_spellings(key)):
            parameters = self.sql.parameters(spelling)
            if parameters is None:
                continue
            try:
                rows = call_bounded(self.spec, self.timeout, self._query, parameters)
            except UnencodableKey:
                if not derived:
                    raise
                # Our own UTF-8 spelling, which this database cannot hold: no row can
                # have it (logged nowhere: every such lookup would say it again).
                continue
            result = self.sql.results(self.spec, rows)
            if result is not None:
                return result
        return None

    def _query(self, parameters):
        raise NotImplementedError
