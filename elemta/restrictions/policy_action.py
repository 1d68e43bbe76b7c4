"""A policy server's answer, read as Postfix's access(5) reads an action.

Owned by the policy_service restriction (elemta.restrictions.policy_service), which sends
Postfix's policy protocol requests and gets back one `action=...` line; this module turns
the text after `action=` into a PolicyDecision and does no I/O, so it is tested by strings
alone. It is also what checks a configured default_action (elemta.plugins.settings).

    OK, or all digits          accept: the later checks of the stage are skipped
    DUNNO                      no opinion
    REJECT [text]              554 5.7.1 (text may start with its own 5.X.Y status),
                               Postfix's access_map_reject_code default
    DEFER [text]               450 4.7.1
    DEFER_IF_PERMIT [text]     450 4.7.1 unless something later rejects (see the plugin)
    DEFER_IF_REJECT [text]     turns a later reject into 450 4.7.1
    4NN / 5NN [X.Y.Z] text     that code; the status defaults to 4.7.1 / 5.7.1
    HOLD [text]                the message is queued on hold
    DISCARD [text]             250, then the message is dropped
    PREPEND name: value        the header field is added to the message
    WARN / INFO [text]         logged, no opinion
    FILTER / REDIRECT / BCC    logged as not supported, no opinion

Everything else is a malformed answer (`problem` says why) and the caller applies the
server's default action, as Postfix answers an invalid action with a server configuration
error. The checks keep a policy server from putting anything on the wire the SMTP client
would misread: a 2xx or 3xx code, a code that is not 4xx/5xx, a multi-line marker
("450-text"), control characters (CR, LF, NUL...), or an enhanced status of the wrong
class (which is corrected, as Postfix corrects it). Postfix's 421 and 521 also hang up;
Elemta answers them as 450 and 550 and keeps the connection, so that a policy server
never ends a session (logged with the answer).
See also: Postfix access(5), SMTPD_POLICY_README; tests/test_policy_service.py.
"""

import re
from dataclasses import dataclass
from typing import Optional, Tuple

ACCEPT = "ok"
DUNNO = "dunno"
REFUSE = "refuse"                   # code, status, text: reject or defer
DEFER_IF_PERMIT = "defer_if_permit"
DEFER_IF_REJECT = "defer_if_reject"
HOLD = "hold"
DISCARD = "discard"
PREPEND = "prepend"

# Postfix's access_map_reject_code and access_map_defer_code defaults: what a REJECT
# and a DEFER without a code answer.
REJECT_CODE = 554
DEFER_CODE = 450
# What Postfix answers when no text is given (its "generic error response message").
REJECT_TEXT = "Access denied"
DEFER_TEXT = "Service unavailable, try again later"
# The longest text taken from a policy server; Reply trims the line to 512 octets anyway.
MAX_TEXT = 400

_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_STATUS = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")
_CODE = re.compile(r"^([45])(\d\d)(?:( )(.*))?$", re.S)
_HEADER = re.compile(r"^([\x21-\x39\x3b-\x7e]+):[ \t]*(.*)$", re.S)


@dataclass(frozen=True)
class PolicyDecision:
    """What an action asks for. kind is one of the constants above; code/status/text
    for REFUSE and the DEFER_IF_*; text for HOLD, DISCARD, WARN and the log; header for
    PREPEND; note for the log (an action Elemta does not support, a code it changed);
    problem: why the action is malformed (then kind is None)."""
    kind: Optional[str]
    code: Optional[int] = None
    status: Optional[str] = None
    text: str = ""
    header: Optional[Tuple[str, str]] = None
    note: str = ""
    problem: str = ""


def _bad(why):
    return PolicyDecision(None, problem=why)


def _status_and_text(rest, code, default_text):
    """(status, text) from 'X.Y.Z text' or 'text', the status's class made the code's."""
    first, _, tail = rest.partition(" ")
    match = _STATUS.match(first)
    klass = str(code)[0]
    if match:
        status = "%s.%s.%s" % (klass, match.group(2), match.group(3))
        text = tail.strip()
    else:
        status = "%s.7.1" % klass
        text = rest.strip()
    if len(text) > MAX_TEXT:
        text = text[:MAX_TEXT - 3] + "..."
    return status, text or default_text


def parse_action(value: str) -> PolicyDecision:
    """The PolicyDecision for the text after `action=` (see the module docstring)."""
    if _CONTROL.search(value):
        return _bad("control characters in the action")
    value = value.strip(" \t")
    if not value:
        return _bad("empty action")
    word, _, rest = value.partition(" ")
    rest = rest.strip(" \t")
    verb = word.upper()
    if value.isdigit() or verb == "OK":
        return PolicyDecision(ACCEPT)
    if verb == "DUNNO":
        return PolicyDecision(DUNNO)
    if verb == "REJECT":
        status, text = _status_and_text(rest, REJECT_CODE, REJECT_TEXT)
        return PolicyDecision(REFUSE, REJECT_CODE, status, text)
    if verb in ("DEFER", DEFER_IF_PERMIT.upper(), DEFER_IF_REJECT.upper()):
        status, text = _status_and_text(rest, DEFER_CODE, DEFER_TEXT)
        kind = REFUSE if verb == "DEFER" else verb.lower()
        return PolicyDecision(kind, DEFER_CODE, status, text)
    if verb in ("HOLD", "DISCARD"):
        return PolicyDecision(verb.lower(), text=rest)
    if verb == "PREPEND":
        header = _HEADER.match(rest)
        if not header or not header.group(2).strip():
            return _bad("PREPEND without a 'name: value' header field")
        return PolicyDecision(PREPEND, header=(header.group(1), header.group(2).rstrip()))
    if verb in ("WARN", "INFO"):
        return PolicyDecision(DUNNO, text=rest, note="%s %s" % (verb, rest))
    if verb in ("FILTER", "REDIRECT", "BCC"):
        return PolicyDecision(DUNNO, note="%s is not supported, taken as DUNNO" % verb)
    if word[:1].isdigit():
        return _numeric(value)
    return _bad("unknown action %r" % (word[:40],))


def _numeric(value):
    """4NN/5NN [X.Y.Z] text; 421 and 521 become 450 and 550 (see the module docstring)."""
    match = _CODE.match(value)
    if not match or (match.group(3) is None and len(value) != 3):
        return _bad("%r is not a 4xx or 5xx reply code followed by a space" % value[:40])
    code = int(value[:3])
    note = ""
    if code in (421, 521):
        note = "%d would end the session: answered as %d" % (code, code + 29)
        code += 29
    status, text = _status_and_text(match.group(4) or "", code,
                                    REJECT_TEXT if code >= 500 else DEFER_TEXT)
    return PolicyDecision(REFUSE, code, status, text, note=note)
