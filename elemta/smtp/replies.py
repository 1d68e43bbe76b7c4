"""SMTP replies: one Reply value, formatted on the wire as RFC 5321 section 4.2 says.

Used by the protocol core (elemta.smtp.protocol) and by its drivers when they turn a
policy verdict into an answer. Every reply but the greeting and the EHLO/HELO answer
carries an RFC 3463 enhanced status code (RFC 2034 section 3 exempts those two).
"""

import re
from dataclasses import dataclass
from typing import Optional, Sequence, Union

# Reply text must be printable US-ASCII (RFC 5321 4.2); anything else is replaced so a
# client's bytes echoed back (an address, a command) can never break the framing.
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")
_STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
# RFC 5321 4.5.3.1.5: a reply line is at most 512 octets including CRLF.
MAX_REPLY_LINE = 512
MAX_REPLY_TEXT = 500
# Reply.encode's bytes by (code, status, text); emptied when it holds this many (texts
# that name an address vary without end).
ENCODED_CACHE = 1024
_ENCODED = {}


def clean_text(text, limit=MAX_REPLY_TEXT):
    """Make text safe to send as (part of) one reply line, at most `limit` characters."""
    text = _UNPRINTABLE.sub("?", text)
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    return text


@dataclass(frozen=True)
class Reply:
    """One SMTP reply: a code, an optional enhanced status and one or more lines of text.

    close=True tells the driver to close the connection once the reply is sent
    (QUIT, 421).
    """
    code: int
    status: Optional[str]
    text: Union[str, Sequence[str]]
    close: bool = False

    def __post_init__(self):
        if not 200 <= self.code <= 599:
            raise ValueError("reply code out of range: %r" % self.code)
        if self.status is not None:
            if not _STATUS.match(self.status) or self.status[0] != str(self.code)[0]:
                raise ValueError("enhanced status %r does not fit code %d"
                                 % (self.status, self.code))

    @property
    def lines(self):
        if isinstance(self.text, str):
            return [self.text]
        return list(self.text) or [""]

    @property
    def is_error(self):
        return self.code >= 400

    def encode(self):
        """The reply as bytes on the wire, CRLF after every line (remembered: most
        replies are sent again and again, several for every message)."""
        key = (self.code, self.status, self.text)
        try:
            data = _ENCODED.get(key)
        except TypeError:               # text given as a list: not remembered
            return self._encode()
        if data is None:
            if len(_ENCODED) >= ENCODED_CACHE:
                _ENCODED.clear()
            data = _ENCODED[key] = self._encode()
        return data

    def _encode(self):
        lines = self.lines
        prefix = "%d%%s%s" % (self.code, (self.status + " ") if self.status else "")
        out = []
        # The code, separator and enhanced status count towards the 512 octets too.
        limit = min(MAX_REPLY_TEXT, MAX_REPLY_LINE - 2 - len(prefix % " "))
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            out.append((prefix % sep) + clean_text(line, limit) + "\r\n")
        return "".join(out).encode("ascii")

    def __str__(self):
        return self.encode().decode("ascii").rstrip("\r\n").replace("\r\n", " / ")


def reply(code, status, text, close=False):
    """Shorthand used throughout the core."""
    return Reply(code, status, text, close)


def lookup_failure(subject):
    """The reply when a lookup table cannot answer (elemta.maps.TableUnavailable: a
    database down, a timeout): 451 4.3.0, so the client retries, never a 5xx (nothing is
    refused for good because a table could not be read). Postfix's words:
    "451 4.3.0 <user@example.org>: Temporary lookup failure". subject is the address or
    name whose lookup failed; the reason goes to the log, not to the client."""
    return Reply(451, "4.3.0", "<%s>: Temporary lookup failure" % subject)
