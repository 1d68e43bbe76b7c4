"""pgsql: a query against PostgreSQL, as Postfix's pgsql_table(5).

Opened by any process that looks up. The spec names the .cf file:
pgsql:/etc/elemta/virtual-pgsql.cf, with these keys (elemta.maps.sqlconf reads them):

    hosts            servers tried in the order given until one answers: host,
                     host:port, inet:host:port, unix:/run/postgresql (the socket
                     directory), or a postgresql:// URI (default: libpq's, the local socket)
    user, password, dbname
    query            the SELECT, with %s %u %d ... (bound parameters, never pasted)
    result_format, expansion_limit, domain   as in every SQL table
    encoding         the client encoding (default UTF8)
    timeout          seconds to connect and to run the query (default 5; Elemta's own
                     key: Postfix has none, and waits as long as the kernel does)

The client is psycopg 3 (libpq underneath). Each process keeps a few open connections
(autocommit: no transaction stays open between lookups), made on first use in that
process, so they are never shared across a fork. When a kept connection turns out broken
(the server restarted or stopped), all kept ones are dropped and one fresh connection is
tried before the lookup gives up, so the reason given is the server's state now. Every lookup runs in
the thread pool (elemta.maps.offthread), bounded by the timeout. Connection refused, a
server that does not answer, authentication refused, an SQL error: TableUnavailable
with the server's reason on one line ("pgsql:/etc/elemta/virtual-pgsql.cf: 127.0.0.1:5432:
connection refused ..."), which consumers turn into 451 4.3.0 or a deferral.

Encodings. Keys are sent in the client encoding (encoding, default UTF8) and the server
converts them into the database's. A key that cannot be converted (an SMTPUTF8 address
in a LATIN1 database: "has no equivalent in encoding LATIN1" from the server, or a
character the client encoding itself lacks, such as the euro sign with encoding =
LATIN1) is TableUnavailable, 451 4.3.0 at RCPT, with the reason in the log, as Postfix
answers when its query fails the same way: the lookup could not be made, which is not
the same as a key the table lacks (a "not found" would let such an address past a
table that refuses what it lists). The UTF-8 spelling of an A-label domain, which
the table asks for second (elemta.maps.sqlconf.key_spellings), is another matter: Elemta
made it up, so a database that cannot hold it has no row with it ("not found").
A SQL_ASCII database converts nothing: keys reach it as UTF-8 bytes, as Postfix's do.
A result that is not valid in the client encoding (a SQL_ASCII database holding LATIN1
bytes) is TableUnavailable too. The connection stays
open for the next lookup after any of these, as after every error that leaves it idle
(an SQL error); a connection in any other state is closed, never left behind.
See also: pgsql_table(5), elemta.maps.sqlconf, elemta.maps.sqlite.
"""

import math
import os
import re
from typing import Dict, List

from elemta.maps.base import TableError, TableUnavailable
from elemta.maps.sqlconf import COMMON_KEYS, SQLSettings, SQLTable, UnencodableKey, read_cf
from elemta.maps.sqlite import parse_timeout

KEYS = COMMON_KEYS + ("hosts", "user", "password", "dbname", "encoding", "timeout")
MAX_IDLE = 4        # connections kept open per table and process


def _one_line(error: Exception) -> str:
    return re.sub(r"\s+", " ", str(error)).strip() or type(error).__name__


def _escaped(text: str) -> str:
    """text in ASCII, for a log line: \\u20ac for the euro sign."""
    return text.encode("ascii", "backslashreplace").decode("ascii")


def parse_hosts(path: str, text: str) -> List[Dict[str, str]]:
    """libpq connection keywords for each entry of hosts."""
    targets = []
    for entry in text.replace(",", " ").split():
        if entry.startswith(("postgresql://", "postgres://")):
            targets.append({"conninfo": entry})
            continue
        if entry.startswith("unix:"):
            directory = entry[5:]
            if not directory.startswith("/"):
                raise TableError("%s: hosts: %r: a socket directory must be absolute"
                                 % (path, entry))
            name = os.path.basename(directory)
            if name.startswith(".s.PGSQL."):      # the socket file itself
                targets.append({"host": os.path.dirname(directory), "port": name[9:]})
            else:
                targets.append({"host": directory})
            continue
        if entry.startswith("inet:"):
            entry = entry[5:]
        host, colon, port = entry.rpartition(":") if not entry.endswith("]") else \
            ("", "", "")
        if not colon:
            host, port = entry, ""
        host = host.strip("[]")
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise TableError("%s: hosts: %r: bad port %r" % (path, entry, port))
        targets.append(dict({"host": host}, **({"port": port} if port else {})))
    return targets or [{}]


class PgSQLTable(SQLTable):
    def __init__(self, path: str, spec: str = "") -> None:
        self.spec = spec or "pgsql:" + path
        try:
            # A missing client is a configuration error, said when the table opens.
            import importlib
            importlib.import_module("psycopg")
        except ImportError as error:
            raise TableError("%s: pgsql tables need psycopg: %s" % (self.spec, error))
        settings = read_cf(path, KEYS)
        self.targets = parse_hosts(path, settings.get("hosts", ""))
        self.timeout = parse_timeout(path, settings)
        self.sql = SQLSettings(path, settings)
        self.statement = self.sql.query.sql("%s", "%%")
        self.keywords = {name: settings[name] for name in ("user", "password", "dbname")
                         if settings.get(name)}
        self.keywords["client_encoding"] = settings.get("encoding") or "UTF8"
        # libpq waits whole seconds, at least 2.
        self.keywords["connect_timeout"] = str(max(2, math.ceil(self.timeout)))
        self.keywords["options"] = "-c statement_timeout=%d" % (self.timeout * 1000)
        self._idle = []     # open connections of process self._pid
        self._pid = os.getpid()

    # -- in a pool thread

    def _query(self, parameters):
        import psycopg
        if self._pid != os.getpid():
            # Forked: the parent's connections are its own (closing them would end its
            # sessions); drop them unclosed.
            self._idle, self._pid = [], os.getpid()
        try:
            connection, reused = self._idle.pop(), True
        except IndexError:
            connection, reused = self._connect(), False
        try:
            rows = self._execute(connection, parameters)
        except psycopg.OperationalError as error:
            if not reused:
                raise TableUnavailable("%s: %s" % (self.spec, _one_line(error)))
            # A kept connection broke while idle (the server restarted or went away):
            # so did the others kept with it. Drop them all; one fresh try tells.
            self.close()
            connection = self._connect()
            try:
                rows = self._execute(connection, parameters)
            except psycopg.OperationalError as error:
                raise TableUnavailable("%s: %s" % (self.spec, _one_line(error)))
        self._release(connection)
        return rows

    def _release(self, connection) -> None:
        """Keep an idle connection for the next lookup (up to MAX_IDLE); close any
        other."""
        from psycopg.pq import TransactionStatus
        if connection.closed or len(self._idle) >= MAX_IDLE or \
                connection.info.transaction_status != TransactionStatus.IDLE:
            connection.close()
        else:
            self._idle.append(connection)

    def _execute(self, connection, parameters):
        """The rows of the query. A broken connection (OperationalError) is closed and
        raised; every other error is TableUnavailable, the connection kept when it is
        idle (an SQL error, a key the encodings cannot carry), else closed."""
        import psycopg
        try:
            return connection.execute(self.statement, parameters).fetchall()
        except psycopg.OperationalError:
            connection.close()
            raise
        except (psycopg.errors.UntranslatableCharacter,
                psycopg.errors.CharacterNotInRepertoire) as error:
            # The server could not convert the key into the database's encoding.
            self._release(connection)
            raise UnencodableKey("%s: query failed: %s" % (self.spec, _one_line(error)))
        except psycopg.Error as error:
            self._release(connection)
            raise TableUnavailable("%s: query failed: %s" % (self.spec, _one_line(error)))
        except UnicodeEncodeError as error:
            # Raised by psycopg before anything is sent: the connection is as it was.
            self._release(connection)
            raise UnencodableKey(
                "%s: the key has a character (%s) that the client encoding %s cannot "
                "carry: not looked up (encoding = UTF8 lets the server convert)"
                % (self.spec, _escaped(error.object[error.start:error.end]),
                   (connection.pgconn.parameter_status(b"client_encoding") or b"?").decode()))
        except UnicodeDecodeError as error:
            self._release(connection)
            raise TableUnavailable("%s: a result is not valid %s: %s" % (
                self.spec, error.encoding, _one_line(error)))

    def _connect(self):
        import psycopg
        reasons = []
        for target in self.targets:
            keywords = dict(self.keywords, **target)
            conninfo = keywords.pop("conninfo", "")
            try:
                return psycopg.connect(conninfo, autocommit=True, **keywords)
            except psycopg.Error as error:
                reasons.append(_one_line(error))
        raise TableUnavailable("%s: cannot connect: %s" % (self.spec, "; ".join(reasons)))

    def close(self) -> None:
        if self._pid == os.getpid():
            for connection in self._idle:
                connection.close()
        self._idle = []
