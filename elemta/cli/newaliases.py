"""newaliases(1): check the aliases file and report its mistakes by file and line.

Postfix's newaliases compiles /etc/aliases into a database the delivery agent reads.
Elemta reads the text file itself (the local agent and the smtpd read it again whenever
it changes), so there is nothing to compile: newaliases parses local.aliases_file the
way delivery will and says what delivery would skip.

    newaliases [-c FILE | --config FILE] [-v]

Silent when the file is fine (as Postfix's is), -v says how many aliases it holds.
Exit status: 0 fine (or no aliases_file configured), 1 the file has mistakes or cannot
be read, 66 (EX_NOINPUT) or 78 (EX_CONFIG) the configuration file cannot be read or is
wrong.
See also: man/newaliases.1, elemta.addressing.aliases.
"""

import argparse
import os
import sys

from elemta.addressing.aliases import check_file
from elemta.cli.config_finder import find_config
from elemta.cli.failure import EX_FAILED, Failure

PROG = "newaliases"


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog=PROG, description="Check the aliases file (local.aliases_file): Elemta reads "
                               "it directly, so there is nothing to compile.")
    parser.add_argument("-c", "--config", metavar="FILE",
                        help="configuration file (default: $ELEMTA_CONFIG, else "
                             "/etc/elemta/elemta.yaml or .toml if present, else the "
                             "built-in defaults)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="say how many aliases the file holds")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = find_config(args.config)
    except Failure as failure:
        print("%s: %s" % (PROG, failure), file=sys.stderr)
        return failure.code
    path = config.local.aliases_file
    if not path:
        if args.verbose:
            print("%s: local.aliases_file is not set: there are no aliases" % PROG)
        return os.EX_OK
    count, problems = check_file(path)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print("%s: %s: %d mistake%s; delivery skips %s" % (
            PROG, path, len(problems), "" if len(problems) == 1 else "s",
            "it" if len(problems) == 1 else "them"), file=sys.stderr)
        return EX_FAILED
    if args.verbose:
        print("%s: %s: %d alias%s" % (PROG, path, count, "" if count == 1 else "es"))
    return os.EX_OK


if __name__ == "__main__":
    sys.exit(main())
