"""The SMTP client's byte-level pieces, without sockets: replies, EHLO keywords, DATA encoding.

Used by elemta.delivery.smtp_client in the delivery worker (`elemta: delivery`). Nothing here
does I/O, so all of it is tested by feeding bytes (tests/test_smtp_client.py):

    ReplyReader   bytes from the server in, ServerReply values out; bounded line and reply size
    DataEncoder   message content in (any line endings), DATA bytes out: CRLF only, dot-stuffed
    parse_ehlo    the extensions an EHLO reply offers
    xtext, orcpt_parameter   DSN parameters as RFC 3461 and RFC 6533 want them on the wire

See also: RFC 5321 4.2 (replies) and 4.5.2 (transparency), RFC 2034/3463 (enhanced status).
"""

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from elemta.smtp.replies import clean_text

# RFC 5321 4.5.3.1.5 caps a reply line at 512 octets; real servers exceed it a little, so we
# allow what Postfix's client does (line_length_limit) before calling the server broken.
MAX_REPLY_LINE = 2048
# A multi-line reply longer than this (EHLO lists a few dozen) is garbage, not a reply.
MAX_REPLY_LINES = 256

_REPLY_LINE = re.compile(rb"^([2-5][0-5][0-9])([ -]|$)(.*)$", re.DOTALL)
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?: +|$)")
_LINE_ENDINGS = re.compile(rb"\r\n|\r|\n")


class SMTPProtocolError(Exception):
    """The server sent something that is not SMTP; str() is the reason for the log/DSN."""


@dataclass(frozen=True)
class ServerReply:
    """One SMTP reply. `status` is the RFC 3463 enhanced status the server gave, or one
    derived from the code ("4.0.0"); `lines` hold the text without code and status.
    `local` marks replies Elemta made up itself (connection lost, size refused, ...)."""
    code: int
    status: Optional[str]
    lines: Tuple[str, ...]
    local: bool = False

    @property
    def text(self):
        return " / ".join(line for line in self.lines if line) or ""

    @property
    def positive(self):
        return 200 <= self.code < 400

    @property
    def temporary(self):
        return 400 <= self.code < 500

    @property
    def permanent(self):
        return self.code >= 500

    def __str__(self):
        return " ".join(part for part in (str(self.code), self.status, self.text) if part)


def local_reply(code, status, text):
    """A reply Elemta makes up itself (the server never sent it)."""
    return ServerReply(code, status, (clean_text(text),), local=True)


def _default_status(code):
    return "%d.0.0" % (code // 100) if code // 100 in (2, 4, 5) else None


class ReplyReader:
    """Sans-IO reader of server replies: feed() bytes, then next_reply() until it is None.

    Raises SMTPProtocolError for a line that is not a reply line, a line over MAX_REPLY_LINE,
    a reply over MAX_REPLY_LINES, or codes that change within one reply.
    """

    def __init__(self):
        self._buffer = bytearray()
        self._lines = []  # type: List[Tuple[int, bytes]]

    def feed(self, data):
        self._buffer += data

    @property
    def buffered(self):
        """Bytes received but not yet part of a reply (must be none after STARTTLS's 220)."""
        return len(self._buffer) + sum(len(text) for _, text in self._lines)

    def next_reply(self):
        # type: () -> Optional[ServerReply]
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_REPLY_LINE:
                    raise SMTPProtocolError("reply line longer than %d bytes" % MAX_REPLY_LINE)
                return None
            if end + 1 > MAX_REPLY_LINE:
                raise SMTPProtocolError("reply line longer than %d bytes" % MAX_REPLY_LINE)
            raw = bytes(self._buffer[:end]).rstrip(b"\r")
            del self._buffer[:end + 1]
            match = _REPLY_LINE.match(raw)
            if not match:
                raise SMTPProtocolError("not an SMTP reply: %r" % raw[:60])
            code = int(match.group(1))
            if self._lines and self._lines[0][0] != code:
                raise SMTPProtocolError("reply code changed from %d to %d within one reply"
                                        % (self._lines[0][0], code))
            self._lines.append((code, match.group(3)))
            if match.group(2) == b"-":
                if len(self._lines) >= MAX_REPLY_LINES:
                    raise SMTPProtocolError("reply longer than %d lines" % MAX_REPLY_LINES)
                continue
            lines, self._lines = self._lines, []
            return _make_reply(code, [text for _, text in lines])


def _make_reply(code, raw_lines):
    texts = [clean_text(raw.decode("utf-8", "replace")) for raw in raw_lines]
    status = None
    match = _ENHANCED.match(texts[0])
    if match and int(match.group(1)) == code // 100:
        status = "%s.%s.%s" % match.group(1, 2, 3)
        # Servers repeat the status on every line; the text is what follows it.
        texts = [_ENHANCED.sub("", text, count=1) if text.startswith(status) else text
                 for text in texts]
    return ServerReply(code, status or _default_status(code), tuple(texts))


def parse_ehlo(reply):
    # type: (ServerReply) -> Dict[str, str]
    """EHLO keywords (upper case) and their parameters ('' when none): {"SIZE": "10240000"}."""
    extensions = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            extensions[keyword.upper()] = params.strip()
    return extensions


class DataEncoder:
    """Message content to DATA bytes: every line ending (CRLF, bare LF, bare CR) becomes CRLF
    and a line starting with "." gets another (RFC 5321 4.5.2). So no content can end the
    DATA phase early or smuggle a second message past a server that reads line endings
    differently. Feed chunks of any size in order, then finish() for the terminator.
    """

    def __init__(self):
        self._at_line_start = True
        self._skip_lf = False   # the chunk before ended in CR, already sent as CRLF

    def encode(self, chunk):
        # type: (bytes) -> bytes
        if not chunk:
            return b""
        if self._skip_lf and chunk[:1] == b"\n":
            chunk = chunk[1:]
            self._skip_lf = False
            if not chunk:
                return b""
        self._skip_lf = chunk[-1:] == b"\r"
        crlf = chunk.count(b"\r\n")
        if crlf == chunk.count(b"\n") and crlf == chunk.count(b"\r"):
            out = chunk     # no bare CR or LF (the spool keeps what SMTP sent): as it is
        else:
            out = _LINE_ENDINGS.sub(b"\r\n", chunk)
        out = out.replace(b"\r\n.", b"\r\n..")
        if self._at_line_start and out[:1] == b".":
            out = b"." + out
        self._at_line_start = out[-2:] == b"\r\n"
        return out

    def finish(self):
        # type: () -> bytes
        """The end of DATA: a CRLF first if the content did not end with a line ending."""
        return b".\r\n" if self._at_line_start else b"\r\n.\r\n"


def xtext(value):
    """RFC 3461 section 4 xtext: printable ASCII but "+" and "=" as is, the rest "+HH" per
    UTF-8 byte."""
    out = []
    for byte in value.encode("utf-8"):
        if 0x21 <= byte <= 0x7e and byte not in (0x2b, 0x3d):
            out.append(chr(byte))
        else:
            out.append("+%02X" % byte)
    return "".join(out)


def _utf8_addr_xtext(value):
    """RFC 6533 section 3: utf-8-addr-xtext, non-ASCII and "+", "=", "\\" as \\x{HEX}."""
    return "".join(ch if "!" <= ch <= "~" and ch not in "+=\\" else "\\x{%X}" % ord(ch)
                   for ch in value)


def orcpt_parameter(orcpt, utf8):
    # type: (str, bool) -> Optional[str]
    """The ORCPT parameter value for a stored "addr-type;address", or None when it cannot be
    passed on (a UTF-8 address to a server without SMTPUTF8)."""
    addr_type, _, address = orcpt.partition(";")
    if not address:
        return None
    try:
        address.encode("ascii")
    except UnicodeEncodeError:
        if not utf8:
            return None
        return "utf-8;" + _utf8_addr_xtext(address)
    return "%s;%s" % (addr_type or "rfc822", xtext(address))
