"""Elemta's log lines back into events, for elemtactl report: the JSON format's keys as
they are, and the text format's Postfix-style lines by the patterns below (the lines
the code writes in elemta.smtpd.session, elemta.queue.queue, elemta.delivery.worker,
elemta.pickup.worker, elemta.content.checks).

A text line is found anywhere in its line ("elemta/PROGRAM[pid]: ..."), so the file
target, a syslog file and `journalctl -o short` output all read; its time is the
syslog stamp at the start of the line ("Dec  6 03:01:36", the year guessed as
pflogsumm does: this year, or last year if that would be in the future). Lines that
are not Elemta's, or not about mail traffic, give no event.
See also: elemta.util.logjson (the JSON writer), elemta.report.summary.
"""

import calendar
import json
import re
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

RECEIVED, QUEUED, DELIVERY, REJECT, NOTICE, HOLD, DISCARD = (
    "received", "queued", "delivery", "reject", "notice", "hold", "discard")
EVENTS = (RECEIVED, QUEUED, DELIVERY, REJECT, NOTICE, HOLD, DISCARD)
# The JSON events of header and body checks (elemta.content.checks) that mean the same.
_JSON_ALIASES = {"content_hold": HOLD, "content_discard": DISCARD}


@dataclass
class LogEvent:
    """One fact about the traffic. when: Unix time or None (a line without a stamp)."""
    event: str
    when: Optional[float] = None
    queue_id: Optional[str] = None
    client: Optional[str] = None
    sender: Optional[str] = None
    recipient: Optional[str] = None
    status: Optional[str] = None        # delivery: sent, deferred, bounced
    delay: Optional[float] = None
    size: Optional[int] = None
    reason: Optional[str] = None        # the reply, for rejects, deferrals and bounces
    restriction: Optional[str] = None   # who decided: restriction, plugin, "milter NAME"
    notice_id: Optional[str] = None     # a bounce's own queue id


_STAMP = re.compile(r"^([A-Z][a-z]{2}) {1,2}(\d{1,2}) (\d\d):(\d\d):(\d\d) ")
_MONTHS = {name: number for number, name in enumerate(calendar.month_abbr) if name}
_PROGRAM = re.compile(r"\belemta/([\w.]+)\[\d+\]: (?:(?:warning|error|fatal): )?(.*)$")
_RECEIVED = re.compile(r"^(\w+): client=([^,\s]+)")
_PICKUP = re.compile(r"^(\w+): uid=\d+ from=<(.*)>$")
_QUEUED = re.compile(r"^(\w+): from=<(.*)>, size=(\d+), nrcpt=\d+")
_DELIVERY = re.compile(r"^(\w+): to=<(.*)>, relay=\S+, delay=([\d.]+), (?:dsn=\S+, )?"
                       r"status=(sent|deferred|bounced) \((.*)\)$")
# "QID: reject: RCPT from CLIENT: REPLY; from=<> to=<> ... (restriction NAME)" (smtpd),
# "QID: reject: header Subject: x from CLIENT; from=<> ...: TEXT (restriction NAME)"
# (cleanup), "(plugin NAME at data stage)", "(milter NAME)"; hold and discard lines
# alike, and pickup's "QID: hold: REASON". Every such line counts, whoever decided:
# a line without a recognised "(who)" at its end counts under "?".
_VERDICT = re.compile(r"^(\w+): (reject|hold|discard): (.*)$")
_DECIDER = re.compile(r" \((restriction|plugin|milter) ([^\s)]+)[^)]*\)$")
_REJECT_SMTPD = re.compile(r"^from (\S+?): (.*?)(?:;|$)")
_REJECT_CLEANUP = re.compile(r" from (\S+?);.*: (.*)$")
_FROM = re.compile(r"\bfrom=<(.*?)>(?: |$)")
_TO = re.compile(r"\bto=<(.*?)>(?: |$)")
_NOTICE = re.compile(r"^(\w+): sender non-delivery notification: (\w+)$")


def read_events(lines: Iterable[str], now: Optional[float] = None) -> Iterator[LogEvent]:
    """The events of log lines, text or JSON (each line on its own: a file may hold
    both, as after a change of logging.format)."""
    now = time.time() if now is None else now
    for line in lines:
        if line.startswith("{"):
            event = _from_json(line)
        else:
            event = _from_text(line, now)
        if event is not None:
            yield event


def _from_json(line: str) -> Optional[LogEvent]:
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    event = _JSON_ALIASES.get(data.get("event"), data.get("event"))
    if event not in EVENTS:
        return None
    if event == NOTICE and data.get("notice") != "non-delivery notification":
        return None
    # Only values of the type the writer gives: a line is read, never trusted.
    text = {key: value for key, value in data.items() if isinstance(value, str)}
    size, delay = data.get("size"), data.get("delay")
    client = text.get("client") or ("local" if event == RECEIVED and "uid" in data else None)
    return LogEvent(
        event, _iso_time(text.get("time")), text.get("queue_id"), client, text.get("from"),
        text.get("to"), text.get("status"),
        float(delay) if isinstance(delay, (int, float)) else None,
        size if isinstance(size, int) else None, text.get("reason"),
        text.get("restriction"), text.get("notice_id"))


def _iso_time(text) -> Optional[float]:
    """"2024-12-06T03:01:36.123Z" (as elemta.util.logjson writes it) -> Unix time."""
    if not isinstance(text, str) or len(text) < 20:
        return None
    try:
        whole = calendar.timegm(time.strptime(text[:19], "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None
    fraction = text[19:].rstrip("Z")
    return whole + (float(fraction) if fraction.startswith(".") and fraction[1:].isdigit()
                    else 0.0)


def _from_text(line: str, now: float) -> Optional[LogEvent]:
    found = _PROGRAM.search(line)
    if found is None:
        return None
    program, text = found.group(1), found.group(2).rstrip("\n")
    when = _syslog_time(line, now)
    if program == "smtpd":
        match = _RECEIVED.match(text)
        if match:
            return LogEvent(RECEIVED, when, match.group(1), client=match.group(2))
    elif program == "pickup":
        match = _PICKUP.match(text)
        if match:
            return LogEvent(RECEIVED, when, match.group(1), client="local",
                            sender=match.group(2))
    elif program == "queue":
        match = _QUEUED.match(text)
        if match:
            return LogEvent(QUEUED, when, match.group(1), sender=match.group(2),
                            size=int(match.group(3)))
    elif program == "delivery":
        match = _DELIVERY.match(text)
        if match:
            return LogEvent(DELIVERY, when, match.group(1), recipient=match.group(2),
                            status=match.group(4), delay=float(match.group(3)),
                            reason=match.group(5))
        match = _NOTICE.match(text)
        if match:
            return LogEvent(NOTICE, when, match.group(1), notice_id=match.group(2))
    return _verdict(text, when)


def _verdict(text: str, when: Optional[float]) -> Optional[LogEvent]:
    """A reject, hold or discard line of any program. A hold or discard without a
    queue id ("NOQUEUE: hold: RCPT ...; applies to this message") gives no event: the
    message's own line follows at its end of data."""
    match = _VERDICT.match(text)
    if match is None:
        return None
    queue_id = None if match.group(1) == "NOQUEUE" else match.group(1)
    kind = match.group(2)
    if kind != REJECT and queue_id is None:
        return None
    decider = _DECIDER.search(match.group(3))
    rest = match.group(3)[:decider.start()] if decider else match.group(3)
    restriction = None
    if decider is not None:
        restriction = decider.group(2) if decider.group(1) != "milter" else \
            "milter " + decider.group(2)
    command, _, detail = rest.partition(" ")
    where = _REJECT_SMTPD.match(detail) or _REJECT_CLEANUP.search(detail)
    sender, recipient = _FROM.search(rest), _TO.search(rest)
    return LogEvent(kind, when, queue_id, client=where.group(1) if where else None,
                    sender=sender.group(1) if sender else None,
                    recipient=recipient.group(1) if recipient else None,
                    reason=where.group(2) if where else rest,
                    restriction=restriction)


def _syslog_time(line: str, now: float) -> Optional[float]:
    """The time of a "Mmm dd hh:mm:ss" stamp at the start of line, local time, in the
    year that does not put it more than a day into the future."""
    match = _STAMP.match(line)
    if match is None or match.group(1) not in _MONTHS:
        return None
    year = time.localtime(now).tm_year
    fields = (_MONTHS[match.group(1)], int(match.group(2)), int(match.group(3)),
              int(match.group(4)), int(match.group(5)))
    for guess in (year, year - 1):
        try:
            when = time.mktime((guess,) + fields + (0, 0, -1))
        except (OverflowError, ValueError):
            return None
        if when <= now + 86400:
            return when
    return None
