"""`elemtactl map compile FILE...` and `elemtactl map query SPEC KEY`: postmap's two jobs.

Run by the administrator (owned by no daemon). compile turns a table's source file into
FILE.lmdb atomically (elemta.maps.lmdbtable.compile_source); running daemons see the new
table at their next lookup, no reload needed. query opens any table spec, as the daemons
would, and prints the value of one key (or of each key read from standard input when
KEY is -, as "key<TAB>value" lines), as `postmap -q` does.

A key listed twice in a source file is compiled as postmap does: a warning naming
file:line on stderr, and the first value kept.

Exit status, as postmap's where it has one: 0 found (or compiled, with warnings or
not), 1 not found, 64 a spec that is not one, 65 a table file with an error
(file:line), 66 a source file that cannot be read, 73 a compiled file that cannot be
written, 75 a table that cannot answer now (a database down: the daemons would answer
451 4.3.0).
See also: elemta.maps, man/elemtactl.8, man/elemta-tables.5.
"""

import sys
from os import EX_CANTCREAT, EX_DATAERR, EX_NOINPUT, EX_OK, EX_TEMPFAIL, EX_USAGE
from typing import List

from elemta.cli.failure import EX_FAILED, Failure
from elemta.util.text import printable

NOT_FOUND = EX_FAILED


def cmd_map_compile(args) -> int:
    """map compile: write each FILE.lmdb from FILE (postmap FILE), replacing it atomically"""
    compile_sources(args.files)
    return EX_OK


def compile_sources(sources) -> None:
    """FILE.lmdb from each FILE; Failure (one line, a sysexits code) for the first that
    cannot be compiled. A key listed twice is a warning on stderr naming file:line, the
    first value kept, as postmap's "duplicate entry" (the status stays 0). Also
    import-postfix --compile's."""
    from elemta.maps import TableError
    from elemta.maps.lmdbtable import compile_source
    for source in sources:
        warnings: List[str] = []
        try:
            compile_source(source, warnings)
        except TableError as error:
            raise Failure(EX_DATAERR, str(error))
        except OSError as error:
            failed = error.filename or source
            code = EX_NOINPUT if failed == source else EX_CANTCREAT
            raise Failure(code, "%s: %s" % (failed, error.strerror or error))
        for warning in warnings:
            print("elemtactl: warning: %s" % printable(warning), file=sys.stderr)


def cmd_map_query(args) -> int:
    """map query: print the value of KEY in the table SPEC (postmap -q KEY SPEC)"""
    from elemta.maps import TableError, TableUnavailable, as_text, open_table, parse_spec
    try:
        spec = parse_spec(args.spec)
    except TableError as error:
        raise Failure(EX_USAGE, str(error))
    try:
        table = open_table(spec)
    except TableError as error:
        raise Failure(EX_DATAERR, str(error))
    try:
        if args.key != "-":
            value = table.lookup(args.key)
            if value is None:
                return NOT_FOUND
            print(printable(as_text(value)))
            return EX_OK
        found = False
        for line in sys.stdin:
            key = line.strip()
            value = table.lookup(key) if key else None
            if value is not None:
                found = True
                print("%s\t%s" % (printable(key), printable(as_text(value))))
        return EX_OK if found else NOT_FOUND
    except TableUnavailable as error:
        raise Failure(EX_TEMPFAIL, str(error))
    finally:
        table.close()


def add_commands(commands, parser_class, parents):
    """The map command and its actions, under elemtactl's COMMAND."""
    maps = commands.add_parser("map", help="lookup tables (postmap's jobs)")
    actions = maps.add_subparsers(dest="map_command", metavar="ACTION",
                                  parser_class=parser_class)
    actions.required = True
    doc = cmd_map_compile.__doc__.split(": ", 1)[1]
    compile_ = actions.add_parser("compile", parents=parents, help=doc, description=doc)
    compile_.add_argument("files", metavar="FILE", nargs="+",
                          help="table source file (key value lines)")
    compile_.set_defaults(handler=cmd_map_compile)
    doc = cmd_map_query.__doc__.split(": ", 1)[1]
    query = actions.add_parser("query", parents=parents, help=doc, description=doc)
    query.add_argument("spec", metavar="SPEC",
                       help="the table: lmdb:/path, regexp:/path, sqlite:/path.cf, "
                            "pgsql:/path.cf or inline:{key=value,...}")
    query.add_argument("key", metavar="KEY",
                       help="the key to look up; - reads keys from standard input")
    query.set_defaults(handler=cmd_map_query)
