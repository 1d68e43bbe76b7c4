"""The actions of header and body check tables: a table's result, read as Postfix reads
it (header_checks(5)).

Owned by no process; elemta.content.checks applies them. A result is an action word
(any case) and optional text:

    REJECT [text]     refuse the message: 550 5.7.1 text (default "message content
                      rejected", Postfix's); text that starts with an enhanced status
                      code gives it instead ("REJECT 4.7.1 try later": 451 4.7.1)
    HOLD [text]       queue the message on hold
    DISCARD [text]    250 to the client, then nothing is queued
    WARN [text]       log the line, nothing more
    IGNORE            delete the header (or body line)
    PREPEND text      add the line text before this one (a header: "Name: value")
    REPLACE text      put the line text in this one's place
    REDIRECT address  send the message to address instead of its recipients
    DUNNO, OK         nothing (OK is accepted as Postfix accepts it in these tables)

An unknown word, or an action missing its text, is logged as a warning and does
nothing, as Postfix's cleanup does ("unknown command in header/body_checks"); text
with control characters is refused the same way, so a table cannot inject lines.
See also: elemta.content.checks.
"""

import re
from typing import NamedTuple, Optional

REJECT, HOLD, DISCARD, WARN, IGNORE, PREPEND, REPLACE, REDIRECT, DUNNO = (
    "REJECT", "HOLD", "DISCARD", "WARN", "IGNORE", "PREPEND", "REPLACE", "REDIRECT", "DUNNO")
# Actions whose text is required.
NEEDS_TEXT = (PREPEND, REPLACE, REDIRECT)
ACTIONS = (REJECT, HOLD, DISCARD, WARN, IGNORE, PREPEND, REPLACE, REDIRECT, DUNNO, "OK")
_CONTROL = re.compile("[\x00-\x1f\x7f]")
# Postfix's default REJECT text (cleanup_act).
REJECT_TEXT = "message content rejected"
_STATUS = re.compile(r"^([45]\.\d{1,3}\.\d{1,3})(?:\s+|$)")
# What REDIRECT takes: one address, no spaces, no brackets.
_ADDRESS = re.compile(r"^[^\s<>@,]+@[^\s<>@,]+$")
# A header line as PREPEND and REPLACE of a header must give it.
HEADER_LINE = re.compile(r"^[!-9;-~]+:")


class Action(NamedTuple):
    """A parsed result: word (one of ACTIONS but OK, which reads as DUNNO) and text."""
    word: str
    text: str


class BadAction(ValueError):
    """A result that is no action; str() says why (logged as a warning)."""


def parse_action(result) -> Optional[Action]:
    """The Action of a table result (a str, or a list whose first item counts), or None
    for no result. Raises BadAction."""
    if isinstance(result, list):
        result = result[0] if result else None
    if result is None:
        return None
    word, _, text = result.strip().partition(" ")
    word, text = word.upper(), text.strip()
    if word not in ACTIONS:
        raise BadAction("unknown action %r" % word)
    if word == "OK":
        word = DUNNO
    if word in NEEDS_TEXT and not text:
        raise BadAction("%s needs text" % word)
    if _CONTROL.search(text):
        raise BadAction("control character in the text of %s" % word)
    if word == REDIRECT and not _ADDRESS.match(text):
        raise BadAction("REDIRECT needs one address (user@domain), not %r" % text)
    return Action(word, text)


def reject_reply(text: str):
    """(code, status, text) of REJECT's text, as Postfix's cleanup reads it: a leading
    enhanced status code (4.x.x or 5.x.x) is kept and sets the reply code (451 or
    550); otherwise 550 5.7.1, and with no text at all Postfix's "message content
    rejected". Checked against a real Postfix 3.7 (tests/test_content_checks.py)."""
    found = _STATUS.match(text)
    if found is None:
        return 550, "5.7.1", text or REJECT_TEXT
    status = found.group(1)
    # A code alone stays alone ("REJECT 5.7.0": Postfix replies "550 5.7.0").
    return (451 if status[0] == "4" else 550), status, text[found.end():]
