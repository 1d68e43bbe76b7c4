"""newaliases(1): check the aliases file (Postfix's newaliases compiles it; Elemta reads
it directly, again whenever it changes, so this only reports its errors).

Not written yet (local delivery, issue 4).
"""

import sys


def main(argv=None):
    print("newaliases: not implemented yet", file=sys.stderr)
    return 69        # EX_UNAVAILABLE


if __name__ == "__main__":
    sys.exit(main())
