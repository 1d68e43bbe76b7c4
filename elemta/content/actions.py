"""The actions of header and body check tables: a table's result, read as Postfix reads
it (header_checks(5)).

Owned by no process; elemta.content.checks applies them. A result is an action word
(any case) and optional text:

    REJECT [text]     refuse the message: 550 5.7.1 text (default "message content
                      rejected", Postfix's)
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
    return Action(word, text)
