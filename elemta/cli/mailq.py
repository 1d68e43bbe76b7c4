"""mailq: the queue listing in Postfix's mailq layout, installed as /usr/bin/mailq.

Runs in the caller's process. For now a stub that says so and exits EX_UNAVAILABLE.
See also: elemta/cli/sendmail.py (sendmail -bp is the same listing), elemtactl queue list.
"""

import sys

from elemta.cli import EX_UNAVAILABLE


def main(argv=None):
    sys.stderr.write("mailq: not yet implemented (see issue: admin surface)\n")
    return EX_UNAVAILABLE


if __name__ == "__main__":
    sys.exit(main())
