r"""The streaming content scanner: message bytes in, classed logical lines out.

Owned by no process (elemta.content.checks drives it for the smtpd). Content arrives in
chunks cut anywhere (a DATA line, a BDAT chunk); the scanner keeps only the line it has
not seen the end of (and, in a header section, the logical header it has not seen the
end of: the next line may continue it), so memory stays bounded whatever the message
size. Each piece it returns carries the raw bytes, so the caller can write the content
back exactly, or edited, and the key a check table is asked about:

    HEADER         a primary message header (not a MIME one): header_checks; the key is
                   the whole unfolded header "Name: value" (line breaks before
                   continuation lines removed, the whitespace kept), without line end
    MIME_HEADER    a MIME header (MIME-Version, Content-*) at any level, and every header
                   of a multipart body part: mime_header_checks
    NESTED_HEADER  a non-MIME header of an attached message (message/rfc822):
                   nested_header_checks
    BODY           a body line, of any part, while that part's body has sent fewer than
                   body_limit bytes (Postfix's body_checks_size_limit): body_checks; the
                   key is the line without its line end
    HEADER_TAIL    the lines of a header past MAX_HEADER, unchecked: they belong to the
                   header before them (removed with it by IGNORE)
    OTHER          bytes no check looks at: the blank line after headers, MIME boundary
                   lines, body lines past the limit (key None)

Postfix's cleanup classes headers the same way (cleanup_message.c: a MIME header goes to
mime_header_checks, a multipart part's headers too, an attached message's others to
nested_header_checks). The MIME state machine follows RFC 2046: a multipart header
block's boundary opens a level, "--boundary" starts a part (its headers come first),
"--boundary--" closes the level (an outer boundary closes the inner ones as well); a
message/rfc822 part's body starts with the attached message's headers. Nesting deeper
than MAX_DEPTH is not followed (its lines are body lines), as Postfix's
mime_nesting_limit.

Lines longer than MAX_LINE are cut into pieces of MAX_LINE bytes (each checked on its
own, as Postfix's line_length_limit cuts them); a header longer than MAX_HEADER is
checked as far as MAX_HEADER and its remaining lines pass unchecked, as HEADER_TAIL
(Postfix's header_size_limit). `received` counts the primary Received: headers (hopcount_limit).
With headers_only, nothing after the primary header section is scanned: it passes as
OTHER in the pieces the chunks arrived in, at no cost per line; past body_limit the
same holds up to the next line that may be a boundary (found with one search).
See also: elemta.content.checks, RFC 5322 2.2.3 (unfolding), RFC 2046 5.1.1.
"""

import re
from typing import List, NamedTuple, Optional

HEADER, MIME_HEADER, NESTED_HEADER, BODY, HEADER_TAIL, OTHER = (
    "header", "mime_header", "nested_header", "body", "header_tail", "other")

# Postfix's line_length_limit (2048) cuts longer lines; our regexp keys go to 4096.
MAX_LINE = 4096
# Postfix's header_size_limit.
MAX_HEADER = 102400
# Postfix's mime_nesting_limit.
MAX_DEPTH = 100

_HEADER_NAME = re.compile(rb"[!-9;-~]+[ \t]*:")
# A Received: header at the start of a line; the empty line that ends a header section.
_RECEIVED = re.compile(rb"\nreceived[ \t]*:", re.I)
_SECTION_END = re.compile(rb"\n\r?\n")
_UNFOLD = re.compile(rb"\r?\n(?=[ \t])")
_CONTENT_TYPE = re.compile(r"^\s*([!#-'*+.0-9A-Z^-~-]+)\s*/\s*([!#-'*+.0-9A-Z^-~-]+)", re.I)
_BOUNDARY = re.compile(r';\s*boundary\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s;]+))', re.I)

# Header classes of a header section: the primary message's, a multipart body part's,
# an attached message's.
_PRIMARY, _PART, _NESTED = "primary", "part", "nested"


class Piece(NamedTuple):
    """A run of content bytes: its class (HEADER .. OTHER), the raw bytes as received,
    and the key to look up (None for OTHER)."""
    kind: str
    raw: bytes
    key: Optional[str]


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _strip_eol(raw: bytes) -> bytes:
    if raw.endswith(b"\r\n"):
        return raw[:-2]
    if raw.endswith(b"\n"):
        return raw[:-1]
    return raw


def is_mime_header(name: str) -> bool:
    """MIME-Version and Content-* are MIME headers (RFC 2045 3; Postfix's HDR_OPT_MIME
    covers those it knows of, all Content-*)."""
    name = name.lower()
    return name == "mime-version" or name.startswith("content-")


class ContentScanner:
    """Feed it the content in order; each feed() returns the pieces now complete, and
    close() the rest. Concatenating every piece's raw bytes gives the input back."""

    def __init__(self, body_limit: int = 51200, headers_only: bool = False) -> None:
        self.body_limit = body_limit
        self.headers_only = headers_only
        self.received = 0
        self._line = bytearray()        # the current physical line, not yet ended
        self._partial = False           # the last piece given was a line cut short
        self._in_headers = True
        self._class = _PRIMARY
        self._header = bytearray()      # the pending logical header (raw)
        self._header_cut = False        # the pending header went past MAX_HEADER
        self._type = None               # (type, boundary) of the section's Content-Type
        self._boundaries: List[bytes] = []   # b"--boundary" of each open multipart
        self._body_bytes = 0            # checked body bytes of the current part
        self._passing = False           # headers_only, past the primary headers
        self._out: List[Piece] = []

    # ---- input ----------------------------------------------------------------------

    def feed(self, data: bytes) -> List[Piece]:
        if self._passing:
            if self._line:          # the start of a line the pass began in
                data, self._line = bytes(self._line) + data, bytearray()
            return [Piece(OTHER, bytes(data), None)] if data else []
        start = 0
        while start < len(data):
            if self._skipping():
                start = self._skip(data, start)
                if start >= len(data):
                    break
            end = data.find(b"\n", start)
            if end < 0:
                self._line += data[start:]
                self._cut_long_line(0)
                break
            self._line += data[start:end + 1]
            start = end + 1
            self._cut_long_line(1)
            line, self._line = bytes(self._line), bytearray()
            self._physical(line, ended=True)
            if self._passing:
                if start < len(data):
                    self._out.append(Piece(OTHER, bytes(data[start:]), None))
                break
        out, self._out = self._out, []
        return out

    def _skipping(self) -> bool:
        """At a line start in a body past body_limit: nothing to check until the next
        boundary line, so the bytes up to it can pass without being split into lines."""
        return (not self._in_headers and not self._line and not self._partial
                and not self._passing and self._body_bytes >= self.body_limit)

    def _skip(self, data: bytes, start: int) -> int:
        """Pass the lines from start that can be no boundary as one OTHER piece; the
        index of the first line to read one by one. No multipart open: the rest of the
        message passes (no structure can start again)."""
        if not self._boundaries:
            self._passing = True
            self._out.append(Piece(OTHER, bytes(data[start:]), None))
            return len(data)
        if data.startswith(b"--", start) or len(data) - start < 2:
            return start
        found = data.find(b"\n--", start)
        stop = found + 1 if found >= 0 else data.rfind(b"\n", start) + 1
        if stop <= start:
            return start
        self._out.append(Piece(OTHER, bytes(data[start:stop]), None))
        return stop

    def _cut_long_line(self, keep: int) -> None:
        """Give the current line's first MAX_LINE bytes as pieces cut short while more
        than MAX_LINE + keep bytes of it are held (keep: its line end, still to come
        as the last piece)."""
        while len(self._line) > MAX_LINE + keep or (not keep and len(self._line) == MAX_LINE):
            piece = bytes(self._line[:MAX_LINE])
            del self._line[:MAX_LINE]
            self._physical(piece, ended=False)

    def close(self) -> List[Piece]:
        """The pieces still pending at the end of the content."""
        if self._line:
            line, self._line = bytes(self._line), bytearray()
            self._physical(line, ended=False)
        self._end_header()
        out, self._out = self._out, []
        return out

    # ---- lines ----------------------------------------------------------------------

    def _physical(self, line: bytes, ended: bool) -> None:
        """One physical line (ended: it has its line end; else a piece cut short,
        whose next piece is no new line)."""
        continued, self._partial = self._partial, not ended
        if self._in_headers:
            self._header_line(line, continued)
        else:
            self._body_line(line, continued)

    def _header_line(self, line: bytes, continued: bool) -> None:
        if (continued or line[:1] in (b" ", b"\t")) and self._header:
            if self._header_cut or len(self._header) + len(line) > MAX_HEADER:
                if not self._header_cut:
                    self._emit_header()
                    self._header_cut = True
                self._out.append(Piece(HEADER_TAIL, line, None))
            else:
                self._header += line
            return
        self._end_header()
        if _HEADER_NAME.match(line):
            self._header += line
            return
        # The end of the header section: a blank line (kept with it), or a line that
        # is no header, which is the first body line already.
        self._end_headers()
        if _strip_eol(line):
            self._body_line(line, False)
        else:
            self._out.append(Piece(OTHER, line, None))

    def _end_header(self) -> None:
        """The pending logical header is complete."""
        if self._header and not self._header_cut:
            self._emit_header()
        self._header = bytearray()
        self._header_cut = False

    def _emit_header(self) -> None:
        raw = bytes(self._header)
        line = _strip_eol(raw)
        key = _text(_UNFOLD.sub(b"", line) if b"\n" in line else line)
        name, _, value = key.partition(":")
        name = name.strip()
        mime = is_mime_header(name)
        if self._class == _PRIMARY and name.lower() == "received":
            self.received += 1
        if name.lower() == "content-type":
            self._type = _content_type(value)
        if mime or self._class == _PART:
            kind = MIME_HEADER
        elif self._class == _NESTED:
            kind = NESTED_HEADER
        else:
            kind = HEADER
        self._out.append(Piece(kind, raw, key))

    def _end_headers(self) -> None:
        """A header section ended: its Content-Type decides what the body is."""
        self._in_headers = False
        self._body_bytes = 0
        kind = self._type
        self._type = None
        if self.headers_only and self._class == _PRIMARY:
            self._passing = True
            return
        if kind is None or len(self._boundaries) >= MAX_DEPTH:
            return
        media, boundary = kind
        if media.startswith("multipart/") and boundary:
            self._boundaries.append(b"--" + boundary.encode("utf-8", "surrogateescape"))
        elif media in ("message/rfc822", "message/global"):
            self._in_headers = True
            self._class = _NESTED

    def _body_line(self, line: bytes, continued: bool) -> None:
        if self._passing:
            self._out.append(Piece(OTHER, line, None))
            return
        if not continued and line.startswith(b"--") and self._boundaries \
                and self._boundary(line):
            return
        if self._body_bytes < self.body_limit:
            self._body_bytes += len(line)
            self._out.append(Piece(BODY, line, _text(_strip_eol(line))))
        else:
            self._out.append(Piece(OTHER, line, None))

    def _boundary(self, line: bytes) -> bool:
        """A delimiter line of an open multipart: handle it and return True."""
        text = _strip_eol(line).rstrip(b" \t")
        for depth in range(len(self._boundaries) - 1, -1, -1):
            delimiter = self._boundaries[depth]
            if text == delimiter:           # a part starts: its headers first
                del self._boundaries[depth + 1:]
                self._out.append(Piece(OTHER, line, None))
                self._in_headers, self._class, self._type = True, _PART, None
                return True
            if text == delimiter + b"--":   # the multipart ends: its epilogue follows
                del self._boundaries[depth:]
                self._out.append(Piece(OTHER, line, None))
                self._body_bytes = 0
                return True
        return False


def _content_type(value: str):
    """(type/subtype lower case, boundary or None) of a Content-Type value, or None."""
    found = _CONTENT_TYPE.match(value)
    if found is None:
        return None
    media = "%s/%s" % (found.group(1).lower(), found.group(2).lower())
    boundary = _BOUNDARY.search(value[found.end():])
    if boundary is None:
        return media, None
    quoted = boundary.group(1)
    return media, (re.sub(r"\\(.)", r"\1", quoted) if quoted is not None
                   else boundary.group(2))


class HopCounter:
    """Counts the Received: headers of the primary header section and nothing else:
    what every message pays when no check table is configured (hopcount_limit only),
    so it makes no logical lines: a few searches in C per chunk. Keeps only the start
    of the line not yet ended (MAX_LINE bytes at most: a name needs fewer). The header
    section ends at the first empty line. `last` is the last Received: line counted
    (its first line), for the log."""

    def __init__(self) -> None:
        self.received = 0
        self.last = ""
        self.done = False         # past the header section
        self._partial = b"\n"     # "\n" and the start of the line not yet ended

    def feed(self, data: bytes) -> None:
        if self.done or not data:
            return
        text = self._partial + data
        end = _SECTION_END.search(text)
        if end is not None:
            block, self.done, self._partial = text[:end.start() + 1], True, b""
        else:
            cut = text.rfind(b"\n")
            block, self._partial = text[:cut], text[cut:cut + MAX_LINE]
        found = _RECEIVED.findall(block)
        if found:
            self.received += len(found)
            start = block.rfind(found[-1]) + 1
            stop = block.find(b"\n", start)
            self.last = _text(block[start:stop if stop >= 0 else None].rstrip(b"\r"))
