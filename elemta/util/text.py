"""Making envelope text safe to write: what every writer applies before envelope data
(addresses, ORCPT, ENVID, remote replies) goes into a header, a mailbox or a command's
environment.

Shared by every process. The protocol core and pickup already refuse control characters
(elemta.smtp.address, elemta.smtp.dsn); this is the second line, for values that came
some other way (a queue file written by an older version, a remote server's reply), as
Postfix's bounce and local sanitize what they write.
"""

import re

# C0 (CR, LF, NUL, ...), DEL, C1 (U+0085 is a line break to some readers), the Unicode
# line and paragraph separators, and lone surrogates (they cannot be written as UTF-8).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def printable(text):
    """text with every control character replaced by "?", as Postfix's printable()."""
    return _UNSAFE.sub("?", text)
