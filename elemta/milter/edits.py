"""A milter's modifications applied to the message: header fields and the body.

Owned by elemta.milter.chain. The message here is what the milters saw: the header
fields Elemta writes above the content (its own Received header, and the fields plugins
prepend above that), then the content as received. So a milter sees our Received header
first, as it sees Postfix's, and its header indexes count the same fields; split()
gives the two parts back, edited, for the smtpd to write in their places.

Header edits follow libmilter's rules as Postfix applies them:
    add     the field goes at the end of the header section (smfi_addheader)
    insert  the field goes before the index-th field, 0 being the first; past the end it
            is added at the end (smfi_insheader)
    change  the index-th field of that name (1 is the first) gets the value; an empty
            value deletes it; an index past the last adds the field (smfi_chgheader)
A header from a milter is checked like one from a plugin: a name of printable characters
without a colon, a value whose line breaks are all folds; one that fails is refused with
ValueError (the chain logs it and leaves the message as it was for that edit), so a
milter cannot split the header section or inject a body.
"""

import re
from typing import List, Tuple

from elemta.plugins.api import Message

_NAME = re.compile(r"^[\x21-\x39\x3b-\x7e]{1,998}$")


def wire_value(value):
    """A header value as it goes to a milter: without the space after the colon, folds
    as "\\n" + whitespace (Sendmail's and Postfix's form)."""
    if value.startswith(" "):
        value = value[1:]
    return value.replace("\r\n", "\n")


def field_bytes(name, value):
    # type: (str, str) -> bytes
    """A milter's header as a field line ending in CRLF; ValueError when it is unsafe."""
    if not _NAME.match(name):
        raise ValueError("header name %r is not a field name" % name[:60])
    raw = value.encode("utf-8", "surrogateescape").replace(b"\r\n", b"\n")
    if b"\r" in raw or b"\0" in raw:
        raise ValueError("header %s has a CR or NUL in its value" % name)
    lines = raw.split(b"\n")
    if any(not line[:1] in (b" ", b"\t") or not line.strip() for line in lines[1:]):
        raise ValueError("header %s has a line break that is not a fold" % name)
    text = b"\r\n".join(lines)
    if not text.startswith((b" ", b"\t")):
        text = b" " + text
    return name.encode("ascii") + b":" + text + b"\r\n"


class HeaderSection:
    """The header fields of a message as a list of (name, raw bytes) that edits change;
    kept fields stay byte-identical. prefix: header fields that go above the content
    (ours: the Received header), shown and edited as the first fields."""

    def __init__(self, content, prefix=b""):
        # type: (bytes, bytes) -> None
        # The prefix and the content are parsed apart and the body is a view into the
        # content: nothing here copies the body (a 30 MB message stays one buffer).
        ours = Message(prefix).headers if prefix else []
        message = Message(content)
        self.pairs = list(ours) + list(message.headers)
        self.fields = [(name, (name + ":").encode("ascii", "replace")
                        + value.encode("utf-8", "surrogateescape") + b"\r\n")
                       for name, value in self.pairs]
        # Where each field came from: the prefix ("ours"), the content ("message") or a
        # milter ("milter"); split() cuts the header section by it.
        self.origins = ["ours"] * len(ours) + ["message"] * len(message.headers)
        self.content, self.body_offset = message.raw, message.body_offset
        self.body = memoryview(self.content)[self.body_offset:]   # bytes once replaced
        self._message_fields = self.fields[len(ours):]
        # The blank line between, when the content had one (one that is all header
        # fields has none).
        head = self.content[:self.body_offset]
        self.separator = b"\r\n" if head in (b"\r\n", b"\n") or head.endswith(
            (b"\n\r\n", b"\n\n")) else b""

    def replace_body(self, body):
        # type: (bytes) -> None
        """A milter's replacement body (bytes, every line ending CRLF)."""
        self.body = body

    def apply(self, kind, name, value, index):
        """One header edit (see the module docstring); ValueError when unsafe."""
        if kind == "change" and value == "":
            position = self._nth(name, index)
            if position is not None:
                del self.fields[position]
                del self.pairs[position]
                del self.origins[position]
            return
        line = field_bytes(name, value)
        pair = (name, line[len(name) + 1:-2].decode("utf-8", "surrogateescape"))
        if kind == "change":
            position = self._nth(name, index)
            if position is not None:
                self.fields[position] = (name, line)
                self.pairs[position] = pair
                return
            kind = "add"
        if kind == "insert" and index < len(self.fields):
            self.fields.insert(index, (name, line))
            self.pairs.insert(index, pair)
            self.origins.insert(index, "milter")
            return
        self.fields.append((name, line))
        self.pairs.append(pair)
        self.origins.append("milter")

    def _nth(self, name, index):
        seen = 0
        for position, (field, _) in enumerate(self.fields):
            if field.lower() == name.lower():
                seen += 1
                if seen == max(index, 1):
                    return position
        return None

    def split(self):
        # type: () -> Tuple[bytes, List[bytes]]
        """(prefix, pieces of the content) as edited: the prefix is every field above
        the message's own first one (ours, and what milters put above it); with no
        field of the message left, every field up to the last of ours. The pieces
        joined are the content; joined() joins them without holding up the event loop."""
        origins = self.origins
        if "message" in origins:
            cut = origins.index("message")
        else:
            cut = len(origins) - origins[::-1].index("ours") if "ours" in origins else 0
        prefix = b"".join(line for _, line in self.fields[:cut])
        rest = self.fields[cut:]
        if rest == self._message_fields and isinstance(self.body, memoryview):
            return prefix, [self.content]      # the message as it came: no copy at all
        separator = self.separator or (b"\r\n" if rest else b"")
        return prefix, [b"".join(line for _, line in rest) + separator, self.body]


class CrlfStream:
    """A replacement body's line endings made CRLF as its chunks arrive (milters may
    send bare LF or bare CR), so a large body is never rewritten in one piece. A CR at
    the end of a chunk is held back until the next shows whether an LF follows it."""

    def __init__(self):
        self._cr = False                # the last chunk ended in a CR not yet written

    def feed(self, chunk):
        # type: (bytes) -> bytes
        if self._cr:
            chunk = b"\r" + chunk
        self._cr = chunk.endswith(b"\r")
        if self._cr:
            chunk = chunk[:-1]
        # CRLF and bare CR become LF, then every LF becomes CRLF.
        return chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")

    def end(self):
        # type: () -> bytes
        """What is left at the end of the body: a CR that ended it, as CRLF."""
        left, self._cr = (b"\r\n" if self._cr else b""), False
        return left
