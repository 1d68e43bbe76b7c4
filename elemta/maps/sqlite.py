"""sqlite: a query against an SQLite database, as Postfix's sqlite_table(5).

Opened by any process that looks up. The spec names the .cf file:
sqlite:/etc/elemta/virtual-sqlite.cf, with these keys (elemta.maps.sqlconf reads them):

    dbpath           the database file (required)
    query            the SELECT, with %s %u %d ... (bound parameters, never pasted)
    result_format, expansion_limit, domain   as in every SQL table
    timeout          seconds a lookup may take, waiting for a writer's lock included
                     (default 5; Elemta's own key)

The database is opened read-only for each lookup (a few tens of microseconds), so a
replaced or edited database is seen at once and a forked process holds nothing of its
parent's. The lookup runs in the thread pool (elemta.maps.offthread). A database that
cannot be opened or read, a locked one past the timeout, or an SQL error, is
TableUnavailable with SQLite's reason.
See also: sqlite_table(5), elemta.maps.sqlconf, elemta.maps.pgsql.
"""

import sqlite3
import urllib.parse

from elemta.maps.base import TableError, TableUnavailable
from elemta.maps.sqlconf import COMMON_KEYS, SQLSettings, SQLTable, read_cf

KEYS = COMMON_KEYS + ("dbpath", "timeout")


def parse_timeout(path: str, settings, default: float = 5.0) -> float:
    text = settings.get("timeout", str(default))
    try:
        value = float(text)
    except ValueError:
        value = 0
    if not 0 < value < 3600:
        raise TableError("%s: timeout: must be a number of seconds above 0, not %r"
                         % (path, text))
    return value


class SQLiteTable(SQLTable):
    def __init__(self, path: str, spec: str = "") -> None:
        self.spec = spec or "sqlite:" + path
        settings = read_cf(path, KEYS)
        if not settings.get("dbpath"):
            raise TableError("%s: dbpath is missing" % path)
        self.dbpath = settings["dbpath"]
        self.timeout = parse_timeout(path, settings)
        self.sql = SQLSettings(path, settings)
        self.statement = self.sql.query.sql("?", "%")

    def _query(self, parameters):
        uri = "file:%s?mode=ro" % urllib.parse.quote(self.dbpath)
        try:
            connection = sqlite3.connect(uri, uri=True, timeout=self.timeout,
                                         check_same_thread=False)
        except sqlite3.Error as error:
            raise TableUnavailable("%s: cannot open %s: %s" % (self.spec, self.dbpath, error))
        try:
            return connection.execute(self.statement, parameters).fetchall()
        except sqlite3.Error as error:
            raise TableUnavailable("%s: query failed on %s: %s"
                                   % (self.spec, self.dbpath, error))
        finally:
            connection.close()
