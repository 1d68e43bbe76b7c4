"""Query parameters of the REST API: the queue filters, the page size and the cursor.

Used by the api process's routes (elemta.api.queue_routes). The filters are those of
`elemtactl queue list` (state, sender, recipient, domain, older_than, newer_than), parsed
into the same elemta.queue.listing.Selection; every bad value is a 400 whose message
names the parameter. See also elemta.api.openapi, which documents them.
"""

import re
import time
from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

import falcon

from elemta.queue.ids import is_queue_id
from elemta.queue.listing import Selection
from elemta.queue.model import STATES
from elemta.util.text import printable as text_printable

FILTERS = ("state", "sender", "recipient", "domain", "older_than", "newer_than")
PAGE = ("limit", "cursor")
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000        # one page is read and encoded in one go: keep it small
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw]?)$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_LIMIT = re.compile(r"^[0-9]{1,7}$")


def bad(name: str, problem: str) -> falcon.HTTPBadRequest:
    """The 400 for one parameter: its message starts with the parameter's name."""
    return falcon.HTTPBadRequest(title="bad parameter",
                                 description="parameter %s: %s" % (name, problem))


@dataclass
class PageSelection(Selection):
    """A Selection that also skips every message up to and including `after` (the cursor).

    Queue ids sort by arrival and listings come in id order, so the next page starts right
    after the last id of the previous one, whatever arrived or left in between. Skipping
    by Brief avoids decoding the full records of the pages already seen."""
    after: Optional[str] = None

    @property
    def needs_brief(self):
        return self.after is not None or super().needs_brief

    def brief_matches(self, brief) -> bool:
        if self.after is not None and brief.queue_id <= self.after:
            return False
        return super().brief_matches(brief)


def check_known(req: falcon.Request, allowed: Iterable[str]) -> None:
    """400 for a parameter the route does not take (a typo would otherwise select all)."""
    allowed = set(allowed)
    for name in sorted(req.params):
        if name not in allowed:
            raise bad(printable(name), "unknown (this route takes %s)"
                      % (", ".join(sorted(allowed)) or "no parameters"))


def _single(req: falcon.Request, name: str) -> Optional[str]:
    value = req.params.get(name)
    if isinstance(value, list):
        raise bad(name, "given more than once")
    if value is not None and value == "":
        raise bad(name, "empty")
    return value


def flag(req: falcon.Request, name: str) -> bool:
    """A yes/no parameter: true or 1, false or 0 (absent: false)."""
    value = _single(req, name)
    if value is None:
        return False
    if value.lower() in ("true", "1"):
        return True
    if value.lower() in ("false", "0"):
        return False
    raise bad(name, "%r is neither true nor false" % printable(value))


def _states(req: falcon.Request) -> Tuple[str, ...]:
    values = req.params.get("state")
    if values is None:
        return ()
    states: List[str] = []
    for value in values if isinstance(values, list) else [values]:
        for state in value.split(","):
            state = state.strip().lower()
            if state not in STATES:
                raise bad("state", "%r is not a queue state (one of %s)"
                          % (printable(state), ", ".join(STATES)))
            if state not in states:
                states.append(state)
    return tuple(states)


def _duration(req: falcon.Request, name: str) -> Optional[float]:
    value = _single(req, name)
    if value is None:
        return None
    match = _DURATION.match(value.strip().lower())
    if not match:
        raise bad(name, "%r is not an age (a number with s, m, h, d or w, e.g. 30m)"
                  % printable(value))
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def selection(req: falcon.Request, default_states: Tuple[str, ...] = (),
              after: Optional[str] = None) -> PageSelection:
    """The filters of the request as a Selection (with the cursor, if any)."""
    return PageSelection(now=time.time(), states=_states(req) or default_states,
                         sender=_single(req, "sender"), recipient=_single(req, "recipient"),
                         domain=_single(req, "domain"),
                         older_than=_duration(req, "older_than"),
                         newer_than=_duration(req, "newer_than"), after=after)


def limit(req: falcon.Request) -> int:
    value = _single(req, "limit")
    if value is None:
        return DEFAULT_LIMIT
    if not _LIMIT.match(value) or not 1 <= int(value) <= MAX_LIMIT:
        raise bad("limit", "%r is not a whole number from 1 to %d"
                  % (printable(value), MAX_LIMIT))
    return int(value)


def cursor(req: falcon.Request) -> Optional[str]:
    value = _single(req, "cursor")
    if value is not None and not is_queue_id(value):
        raise bad("cursor", "%r is not a queue id (use next_cursor of the previous page)"
                  % printable(value))
    return value


def printable(text: str, limit: int = 80) -> str:
    """A parameter as quoted back in a message: short, and no control characters."""
    text = text_printable(text)
    return text if len(text) <= limit else text[:limit] + "..."
