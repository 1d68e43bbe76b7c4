"""What a well-formed SMTP reply looks like on the wire (RFC 5321 4.2, 4.5.3.1.5).

Shared by the in-process fuzzer of the protocol core (tests/test_protocol_fuzz.py) and the
live-server fuzzer (tests/smtp_fuzzer.py), so both hold the server to the same rule: a
three-digit code 2xx-5xx, a space (last line) or hyphen (more lines follow), printable
US-ASCII, at most 512 octets with the CRLF, and one code throughout a multi-line reply.
"""

import re

MAX_REPLY_LINE = 512        # octets, CRLF included (RFC 5321 4.5.3.1.5)

# One reply line without its CRLF.
REPLY_LINE = re.compile(rb"^[2-5]\d\d[ -][\x20-\x7e]{0,%d}\Z" % (MAX_REPLY_LINE - 6))


def line_problem(line, previous=None):
    """Why `line` (no CRLF) is not a well-formed reply line after `previous` (the line
    before it in the same reply, if any); None when it is fine."""
    if not REPLY_LINE.match(line):
        return "malformed reply line %r" % line[:600]
    if previous is not None and previous[:3] != line[:3]:
        return "code changes inside a multi-line reply: %r then %r" % (previous, line)
    return None
