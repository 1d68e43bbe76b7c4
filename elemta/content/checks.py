"""Header and body checks and the hop count, applied to a message as it streams in.

Owned by no process: the smtpd makes one ContentChecks per worker from the config's
content section and one ContentFilter per message (elemta.smtpd.session). Postfix's
cleanup does this work there (header_checks, mime_header_checks, nested_header_checks,
body_checks, body_checks_size_limit, hopcount_limit; header_checks(5)).

The filter sits between the protocol core and the spool file: each chunk of content
goes through the scanner (elemta.content.scanner), the complete lines are looked up,
and feed() returns the bytes to write in their place, edited: IGNORE drops a line,
PREPEND puts one before it, REPLACE puts one in its place. Headers come first and
every line is decided before it is written, so edits need no second pass and no copy of
the message; only the line being read is ever in memory. The lookups of one chunk go to
a table together (one call to the regexp helper: elemta.maps.regexp), so a long body
costs few calls and the event loop is never held by a pattern. A table sees at most
the first 4096 bytes of a header or line (elemta.maps.regexp.MAX_KEY): a header padded
past that is still checked on its name and start.

A REJECT, a DISCARD, a hop count over the limit or a table that cannot answer ends the
inspection: nothing more is checked or written, and the session gives the verdict at
the end of DATA (the content must still be read to its end). HOLD and REDIRECT are
remembered and inspection goes on, as Postfix's does. Every action is logged as
Postfix's cleanup logs it ("QUEUEID: reject: header Subject: ... from CLIENT; from=<>
to=<> proto=ESMTP helo=<>: 5.7.1 text"), with the check that matched named at the end.
See also: elemta.content.actions, elemta.restrictions.catalogue.
"""

import logging
from typing import List, NamedTuple, Optional

from elemta.content import actions
from elemta.content.actions import BadAction, parse_action
from elemta.content.scanner import BODY, HEADER, HEADER_TAIL, MIME_HEADER, NESTED_HEADER, \
    ContentScanner, HopCounter, Piece
from elemta.maps.base import TableUnavailable
from elemta.maps.regexp import MAX_KEY as KEY_BYTES     # what a table matches, at most
from elemta.maps.spec import LazyTable
from elemta.smtp.replies import Reply
from elemta.util.text import printable

# Postfix's cleanup does these checks and logs them: the same name lets pflogsumm count
# their rejects ("elemta/cleanup[pid]: QUEUEID: reject: header ...").
log = logging.getLogger("elemta.cleanup")

# The check (and restriction name) each kind of piece is looked up in.
CHECK_OF = {HEADER: "header_checks", MIME_HEADER: "mime_header_checks",
            NESTED_HEADER: "nested_header_checks", BODY: "body_checks"}
# Postfix's hop count reply (cleanup_message.c: "too many hops").
TOO_MANY_HOPS = Reply(554, "5.4.6", "Too many hops")
LOOKUP_FAILED = Reply(451, "4.3.0", "Error: temporary lookup failure")
# Keys sent to a table in one call, at most (bounds one call's time).
BATCH = 256
# Characters of a line quoted in the log, at most (Postfix quotes 200).
LOGGED = 200


class ContentRefusal(NamedTuple):
    """A verdict for the whole message: the reply, and the restriction that gave it."""
    reply: Reply
    restriction: str


def _bounded(key: str) -> str:
    """key cut to its first KEY_BYTES bytes: a table matches keys up to that size only
    (elemta.maps.regexp.MAX_KEY bounds the work an attacker's text can cause), and a
    header padded past it must still be checked on its name and start, not skipped."""
    if len(key) <= KEY_BYTES // 4:
        return key
    raw = key.encode("utf-8", "surrogateescape")
    if len(raw) <= KEY_BYTES:
        return key
    return raw[:KEY_BYTES].decode("utf-8", "surrogateescape")


class ContentChecks:
    """The check tables of one config (a content section), opened at first use."""

    def __init__(self, settings) -> None:
        def table(spec):
            return LazyTable(spec) if spec is not None else None
        header = table(settings.header_checks)
        self.tables = {
            HEADER: header,
            # Postfix's defaults: $header_checks.
            MIME_HEADER: table(settings.mime_header_checks) or header,
            NESTED_HEADER: table(settings.nested_header_checks) or header,
            BODY: table(settings.body_checks),
        }
        self.body_limit = settings.body_checks_size_limit
        self.hopcount_limit = settings.hopcount_limit

    def start(self, queue_id: str, where: str) -> "ContentFilter":
        """A filter for one message; where: "from CLIENT; from=<> to=<> proto= helo=<>"
        as the log lines say it."""
        return ContentFilter(self, queue_id, where)

    def close(self) -> None:
        for table in set(t for t in self.tables.values() if t is not None):
            table.close()


class ContentFilter:
    """One message's inspection: feed() its chunks, then finish(); then read refusal,
    discard, hold and redirect."""

    def __init__(self, checks: ContentChecks, queue_id: str, where: str) -> None:
        self.tables = checks.tables
        self.hopcount_limit = checks.hopcount_limit
        self.queue_id, self.where = queue_id, where
        # No table at all: only the Received headers are counted, by a quicker path
        # (HopCounter: no logical lines made, the content passes as it came).
        self.hop_counter = HopCounter() if not any(self.tables.values()) else None
        self.scanner = None
        if self.hop_counter is None:
            beyond_headers = any(self.tables[kind] is not None
                                 for kind in (MIME_HEADER, NESTED_HEADER, BODY))
            self.scanner = ContentScanner(checks.body_limit, headers_only=not beyond_headers)
        self.refusal: Optional[ContentRefusal] = None
        self.discard: Optional[str] = None        # the check that said DISCARD
        self.hold: Optional[str] = None           # the check that said HOLD (first)
        self.hold_reason = ""                     # its text, or what matched
        self.redirect: Optional[str] = None       # REDIRECT's address (the last)
        self.hops = 0                             # primary Received headers so far
        self._header_dropped = False              # the last header was IGNOREd/REPLACEd

    @property
    def stopped(self) -> bool:
        """Inspection is over: the message is refused or discarded."""
        return self.refusal is not None or self.discard is not None

    def feed(self, data: bytes) -> bytes:
        """The bytes to write for this chunk (edited; b"" once stopped)."""
        if self.stopped:
            return b""
        if self.hop_counter is not None:
            return self._count_hops(data)
        return self._apply(self.scanner.feed(data))

    def finish(self) -> bytes:
        """The bytes still to write at the end of the content."""
        if self.stopped or self.hop_counter is not None:
            return b""
        return self._apply(self.scanner.close())

    # ---- the work -------------------------------------------------------------------

    def _apply(self, pieces) -> bytes:
        results = self._lookups(pieces)
        if results is None:
            return b""
        out = bytearray()
        for piece, result in zip(pieces, results):
            if piece.kind == HEADER and self._too_many_hops(piece):
                return b""
            if piece.kind == HEADER_TAIL:
                if not self._header_dropped:        # the rest of a header IGNOREd
                    out += piece.raw
                continue
            if piece.kind in CHECK_OF and piece.kind != BODY:
                self._header_dropped = False
            if result is None:
                out += piece.raw
                continue
            out += self._act(piece, result)
            if self.stopped:
                return b""
        return bytes(out)

    def _count_hops(self, data: bytes) -> bytes:
        counter = self.hop_counter
        counter.feed(data)
        if counter.received <= self.hopcount_limit:
            return data
        self.hops = counter.received
        self._log("reject", Piece(HEADER, b"", counter.last), "%s %s" % (
            TOO_MANY_HOPS.status, TOO_MANY_HOPS.text), "hopcount_limit")
        self.refusal = ContentRefusal(TOO_MANY_HOPS, "hopcount_limit")
        return b""

    def _too_many_hops(self, piece) -> bool:
        """Count a primary Received header; True (refused) once over the limit."""
        if piece.key.partition(":")[0].strip().lower() != "received":
            return False
        self.hops += 1
        if self.hops <= self.hopcount_limit:
            return False
        self._log("reject", piece, "%s %s" % (TOO_MANY_HOPS.status, TOO_MANY_HOPS.text),
                  "hopcount_limit")
        self.refusal = ContentRefusal(TOO_MANY_HOPS, "hopcount_limit")
        return True

    def _lookups(self, pieces) -> Optional[List]:
        """Each piece's table result (None: not looked up or not found), or None once
        a table could not answer (the message is then refused for now)."""
        results: List = [None] * len(pieces)
        by_kind = {}
        for index, piece in enumerate(pieces):
            if piece.kind in CHECK_OF and self.tables[piece.kind] is not None:
                by_kind.setdefault(piece.kind, []).append(index)
        for kind, indexes in by_kind.items():
            table = self.tables[kind]
            for start in range(0, len(indexes), BATCH):
                batch = indexes[start:start + BATCH]
                try:
                    found = table.lookup_many([_bounded(pieces[i].key) for i in batch])
                except TableUnavailable as error:
                    log.warning("%s: %s lookup failed: %s", self.queue_id, CHECK_OF[kind],
                                error)
                    self.refusal = ContentRefusal(LOOKUP_FAILED, CHECK_OF[kind])
                    return None
                for index, result in zip(batch, found):
                    results[index] = result
        return results

    def _act(self, piece, result) -> bytes:
        """What to write for piece given its table result; sets the verdicts."""
        check = CHECK_OF[piece.kind]
        try:
            action = parse_action(result)
        except BadAction as error:
            log.warning("%s: %s: %s in %r (table %s): ignored", self.queue_id, check, error,
                        printable(str(result))[:LOGGED], self.tables[piece.kind].spec)
            return piece.raw
        word, text = action
        is_header = piece.kind != BODY
        if word in (actions.PREPEND, actions.REPLACE) and is_header \
                and not actions.HEADER_LINE.match(text):
            log.warning("%s: %s: %s text %r is no header line (\"Name: value\"): ignored",
                        self.queue_id, check, word, printable(text)[:LOGGED])
            return piece.raw
        eol = b"\r\n" if piece.raw.endswith(b"\r\n") or not piece.raw.endswith(b"\n") \
            else b"\n"
        if word == actions.DUNNO:
            return piece.raw
        if word == actions.REJECT:
            reply = Reply(*actions.reject_reply(text))
            self._log("reject", piece, "%s %s" % (reply.status, reply.text), check)
            self.refusal = ContentRefusal(reply, check)
            return b""
        if word == actions.DISCARD:
            self._log("discard", piece, text, check)
            self.discard = check
            return b""
        if word == actions.HOLD:
            self._log("hold", piece, text, check)
            if self.hold is None:
                self.hold = check
                self.hold_reason = text or "%s %s matched" % (
                    "body" if piece.kind == BODY else "header",
                    printable(piece.key)[:LOGGED])
            return piece.raw
        if word == actions.WARN:
            self._log("warning", piece, text, check)
            return piece.raw
        if word == actions.REDIRECT:
            self._log("redirect", piece, text, check)
            self.redirect = text
            return piece.raw
        line = text.encode("utf-8", "surrogateescape") + eol
        if word == actions.IGNORE:
            self._log("ignore", piece, "", check)
            self._header_dropped = is_header
            return b""
        if word == actions.PREPEND:
            self._log("prepend", piece, text, check)
            return line + piece.raw
        self._log("replace", piece, text, check)       # REPLACE
        self._header_dropped = is_header
        return line

    def _log(self, what, piece, text, check) -> None:
        part = "body" if piece.kind == BODY else "header"
        log.info("%s: %s: %s %s %s: %s (restriction %s)", self.queue_id, what, part,
                 printable(piece.key)[:LOGGED], self.where, text or "", check,
                 extra={"event": "reject" if what == "reject" else "content_" + what,
                        "queue_id": self.queue_id, "command": part,
                        "reason": text or None, "restriction": check})
