"""Choosing and summarising queued messages: the filters and the qshape-style counts.

Reached through the Queue facade (records_matching, ids_matching, summarise) by elemtactl's
queue commands (and mailq) and the REST API. Reads the index only through
elemta.queue.index (the Brief and listing views per state first, full records only for
what a filter or the output needs), so a listing of one state of a million-message queue
starts at once and streams, and a summary of it is counted in bulk (tally_briefs).
See also elemta.cli.queuecmd (the text and JSON output), elemta.queue.index.
"""

import fnmatch
import heapq
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from elemta.queue.index import (SCAN_CHUNK, Brief, Listed, QueueIndex, QueueRecord,
                                delay_reason, waiting_recipients)
from elemta.queue.model import HOLD, STATES
from elemta.util.text import printable

NULL_SENDER = "MAILER-DAEMON"    # how Postfix's tools show the null sender <>
NO_DOMAIN = "(no domain)"
QSHAPE_BUCKETS = 10              # qshape -b
QSHAPE_MINUTES = 5               # qshape -t


@dataclass
class Selection:
    """Which messages a command acts on. Empty fields select everything.

    sender, recipient: shell-style patterns (fnmatch), case-insensitive, on the whole
    address; "<>" is the null sender. recipient and domain look at the recipients not yet
    delivered. older_than and newer_than are ages in seconds at `now`.
    """
    now: float
    states: Tuple[str, ...] = ()
    sender: Optional[str] = None
    recipient: Optional[str] = None
    domain: Optional[str] = None
    older_than: Optional[float] = None
    newer_than: Optional[float] = None

    @property
    def needs_brief(self):
        """True if age or domain filters apply (else every id of a state is wanted).
        A subclass that adds to brief_matches must say so here too."""
        return (self.older_than is not None or self.newer_than is not None
                or self.domain is not None)

    @property
    def needs_record(self):
        """True if the Brief alone cannot decide (sender or recipient patterns)."""
        return self.sender is not None or self.recipient is not None

    def brief_matches(self, brief: Brief) -> bool:
        age = self.now - brief.arrival
        if self.older_than is not None and age < self.older_than:
            return False
        if self.newer_than is not None and age > self.newer_than:
            return False
        if self.domain is not None:
            wanted = self.domain.lower().strip(".")
            return any(domain == wanted for domain, _ in brief.domains)
        return True

    def record_matches(self, record: QueueRecord) -> bool:
        envelope = record.envelope
        if self.sender is not None and not _address_matches(self.sender, envelope.sender):
            return False
        if self.recipient is not None:
            waiting = waiting_recipients(record.state, envelope.recipients)
            return any(_address_matches(self.recipient, r.address) for r in waiting)
        return True


def _address_matches(pattern: str, address: str) -> bool:
    if pattern == "<>":
        return address == ""
    return fnmatch.fnmatchcase(address.lower(), pattern.lower())


def _states(selection: Selection) -> Sequence[str]:
    return selection.states or STATES


def iter_records(index: QueueIndex, selection: Selection) -> Iterator[QueueRecord]:
    """The selected records, in queue id (arrival) order across states, streamed."""
    streams = [_records_in_state(index, state, selection) for state in _states(selection)]
    return heapq.merge(*streams, key=lambda record: record.queue_id)


def _records_in_state(index, state, selection):
    wanted: List[str] = []
    if selection.needs_brief:
        ids = (b.queue_id for b in index.iter_briefs(state) if selection.brief_matches(b))
    else:
        ids = index.iter_state_ids(state)       # no Brief to decode
    for queue_id in ids:
        wanted.append(queue_id)
        if len(wanted) == SCAN_CHUNK:
            yield from _fetch(index, wanted, state, selection)
            wanted = []
    yield from _fetch(index, wanted, state, selection)


def _fetch(index, queue_ids, state, selection):
    found = index.get_many(queue_ids)
    for queue_id in queue_ids:
        record = found.get(queue_id)
        # Changed state or gone since its Brief was read: its new state's stream has it.
        if record is not None and record.state == state and selection.record_matches(record):
            yield record


def iter_listed(index: QueueIndex, selection: Selection) -> Iterator[Listed]:
    """The selected messages as mailq lists them, in queue id order across states, from
    the Briefs alone unless the selection looks at addresses (then from the records)."""
    if selection.needs_record:
        return (listed_from_record(record) for record in iter_records(index, selection))
    wanted = selection.brief_matches if selection.needs_brief else None
    streams = [index.iter_listed(state, wanted) for state in _states(selection)]
    if len(streams) == 1:
        return streams[0]
    return heapq.merge(*streams)     # tuples: queue ids first, and ids are unique


def listed_from_record(record: QueueRecord) -> Listed:
    """What mailq shows of a full record (the same as its Brief holds)."""
    envelope = record.envelope
    return Listed(record.queue_id, record.state, envelope.size, envelope.arrival,
                  printable(envelope.sender),
                  tuple((printable(r.address), printable(delay_reason(record, r)))
                        for r in waiting_recipients(record.state, envelope.recipients)))


def listed_from_json(data: dict) -> Listed:
    """What mailq shows of a record_to_json dict (the showq process's reply)."""
    return Listed(data["queue_id"], data["queue_name"], data["message_size"],
                  data["arrival_time"], printable(data["sender"]),
                  tuple((printable(r["address"]), printable(r.get("delay_reason", "")))
                        for r in data["recipients"]))


def iter_ids(index: QueueIndex, selection: Selection) -> Iterator[str]:
    """The selected queue ids, in id order; full records are read only when the selection
    looks at addresses."""
    if selection.needs_record:
        return (record.queue_id for record in iter_records(index, selection))
    streams = [(brief.queue_id for brief in index.iter_briefs(state)
                if selection.brief_matches(brief))
               for state in _states(selection)]
    return heapq.merge(*streams)


# -- summary: counts by state, and qshape's table of domains by age

@dataclass
class StateTotal:
    messages: int = 0
    size: int = 0


@dataclass
class Shape:
    """What `elemtactl queue summary` shows.

    by_state: every state with its message count and total size. domains: for each
    recipient domain (or sender domain), its count in total and per age bucket, as qshape
    counts: one per waiting recipient (per message for senders). bucket_limits: the upper
    age limit of each bucket in minutes; the last bucket has none.
    """
    by_state: Dict[str, StateTotal]
    domains: Dict[str, List[int]]
    bucket_limits: List[int]
    total: List[int] = field(default_factory=list)


def bucket_limits(buckets: int = QSHAPE_BUCKETS, minutes: int = QSHAPE_MINUTES) -> List[int]:
    """Upper limits in minutes of all buckets but the last: 5, 10, 20, 40 ... (qshape)."""
    return [minutes * 2 ** i for i in range(buckets - 1)]


def age_bucket(age_seconds: float, buckets: int = QSHAPE_BUCKETS,
               minutes: int = QSHAPE_MINUTES) -> int:
    """qshape's bucket (1 .. buckets) for an age: [0, t), [t, 2t), [2t, 4t), ..."""
    m = age_seconds / (60.0 * minutes)
    if m < 1:
        return 1
    return min(2 + int(math.log2(m)), buckets)


def qshape_domain(domain: str) -> str:
    """A domain as qshape shows it: no empty labels, no dots at either end."""
    while ".." in domain:
        domain = domain.replace("..", ".")
    return domain.strip(".")


def summarise(index: QueueIndex, selection: Selection, by_sender: bool = False,
              buckets: int = QSHAPE_BUCKETS, minutes: int = QSHAPE_MINUTES) -> Shape:
    """Count the selected messages by state and by domain and age, from Briefs only."""
    by_state = {state: StateTotal() for state in STATES}
    domains: Dict[str, List[int]] = {}
    total = [0] * (buckets + 1)
    names: Dict[str, str] = {}   # domain as stored -> as shown, computed once each
    for state in _states(selection):
        totals = by_state.setdefault(state, StateTotal())
        totals.messages, totals.size, tally = _tally(index, state, selection, buckets,
                                                     minutes)
        for (bucket, sender_domain, recipient_domains), messages in tally.items():
            counted = ((sender_domain, 1),) if by_sender else recipient_domains
            for domain, count in counted:
                count *= messages
                name = names.get(domain)
                if name is None:
                    name = names[domain] = (qshape_domain(domain)
                                            or (NULL_SENDER if by_sender else NO_DOMAIN))
                row = domains.get(name)
                if row is None:
                    row = domains[name] = [0] * (buckets + 1)
                row[0] += count
                row[bucket] += count
                total[0] += count
                total[bucket] += count
    return Shape(by_state, domains, bucket_limits(buckets, minutes), total)


def _tally(index, state, selection, buckets, minutes):
    """(messages, total size, Counter of (age bucket, sender domain, recipient domains
    with counts)) of the selected messages in `state`. Without age or domain filters
    the index counts them all in bulk; an age bucket is then found by comparing the
    arrival time with each bucket's oldest arrival (as age_bucket buckets ages)."""
    if selection.needs_brief:
        messages = size = 0
        tally: Counter = Counter()
        for brief in index.iter_briefs(state):
            if selection.brief_matches(brief):
                messages += 1
                size += brief.size
                bucket = age_bucket(selection.now - brief.arrival, buckets, minutes)
                tally[bucket, brief.sender_domain, brief.domains] += 1
        return messages, size, tally
    # Arrival at or before now - limit is at least that old: bucket buckets - position.
    arrival_limits = sorted(selection.now - 60.0 * limit
                            for limit in bucket_limits(buckets, minutes))
    messages, size, by_position = index.tally_briefs(state, arrival_limits)
    tally = Counter()
    for (position, *summary), count in by_position.items():
        tally[(buckets - position,) + tuple(summary)] += count
    return messages, size, tally


# -- one message as data (elemtactl --json, in the spirit of postqueue -j)

def record_to_json(record: QueueRecord) -> dict:
    """postqueue -j's fields (queue_name, queue_id, arrival_time, message_size,
    forced_expire, sender, recipients with delay_reason) and Elemta's own."""
    envelope = record.envelope
    recipients = []
    for recipient in waiting_recipients(record.state, envelope.recipients):
        item = {"address": recipient.address, "status": recipient.status}
        reason = delay_reason(record, recipient)
        if reason:
            item["delay_reason"] = reason
        recipients.append(item)
    return {
        "queue_name": record.state,
        "queue_id": record.queue_id,
        "arrival_time": int(envelope.arrival),
        "message_size": envelope.size,
        "forced_expire": False,
        "sender": envelope.sender,
        "recipients": recipients,
        "attempts": record.attempts,
        "next_attempt": record.next_attempt,
        "last_error": record.last_error,
        "priority": envelope.priority,
        "hold": hold_json(record),
    }


def hold_json(record: QueueRecord) -> Optional[dict]:
    """Who held a message and why, {"by", "reason", "since"}; None when it is not held.
    A message held by an Elemta that kept no reason shows by "unknown"."""
    if record.hold is not None:
        return record.hold.to_dict()
    if record.state == HOLD:
        return {"by": "unknown", "reason": "", "since": 0.0}
    return None


def record_show_json(record: QueueRecord, spool_path: str) -> dict:
    """`elemtactl queue show --json`'s object (also the REST API's): record_to_json plus
    the whole envelope, the delivery history and the spool file."""
    data = record_to_json(record)
    envelope = record.envelope
    data["recipients"] = [dict(vars(r), notify=list(r.notify) if r.notify else r.notify)
                          for r in envelope.recipients]
    for name in ("body", "smtputf8", "ret", "envid", "requiretls", "client_address",
                 "client_helo", "protocol", "auth_user", "extra"):
        data[name] = getattr(envelope, name)
    data["arrival"] = envelope.arrival
    data["history"] = [dict(zip(("time", "recipient", "status", "relay", "reply"), entry))
                       for entry in record.history]
    data["spool_file"] = spool_path
    return data
