"""elemta-sendmail: the sendmail(8) command line, installed as /usr/sbin/sendmail.

Runs in the caller's process (cron, mail, PHP); it will drop submissions into the
maildrop for the pickup process. For now a stub that says so and exits EX_UNAVAILABLE,
so a caller sees a failure rather than mail silently going nowhere.
See also: elemta/cli/mailq.py, ../shared/design.md (the CLI surface).
"""

import sys

from elemta.cli import EX_UNAVAILABLE


def main(argv=None):
    sys.stderr.write("elemta-sendmail: not yet implemented (see issue: admin surface)\n")
    return EX_UNAVAILABLE


if __name__ == "__main__":
    sys.exit(main())
