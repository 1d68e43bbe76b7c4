"""mailq: the queue listing in Postfix's mailq layout, installed as /usr/bin/mailq.

Runs in the caller's own process, while Elemta runs or is stopped. The same listing as
`elemtactl queue list` (and, later, `sendmail -bp`), with the same filters and --json.
See also: elemta.cli.queuecmd (where it is written), man/mailq.1, man/elemtactl.8.
"""

import sys

from elemta.cli.queuecmd import mailq_main


def main(argv=None):
    return mailq_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
