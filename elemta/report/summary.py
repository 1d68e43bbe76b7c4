"""Adds up log events (elemta.report.parse) the way pflogsumm does, for elemtactl report.

Counted as pflogsumm counts them, so the two agree on the same text log: received (an
smtpd "client=" or pickup "uid=" line), delivered (each recipient sent, bounces to
senders included), deferred (messages, and deferral lines), bounced (recipients),
rejected (each reject line). Senders and bytes received come from the queue line of a
received message, recipients and delays from the delivered ones.
See also: elemta.cli.reportcmd (which prints it).
"""

import re
from collections import Counter
from typing import Dict, Iterable, List, Optional

from elemta.report.parse import (DELIVERY, DISCARD, HOLD, NOTICE, QUEUED, RECEIVED, REJECT,
                                  LogEvent)

PERCENTILES = (50, 90, 95, 99)
_ADDRESS = re.compile(r"<[^>]*>:? ?")      # pflogsumm drops addresses from reasons too
REASON_WIDTH = 80


def short_reason(text: Optional[str]) -> str:
    """A reply as a reason to count: without addresses, its first REASON_WIDTH chars."""
    text = _ADDRESS.sub("", text or "").strip() or "(no reason given)"
    return text if len(text) <= REASON_WIDTH else text[:REASON_WIDTH - 3] + "..."


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower() if "@" in address else "(no domain)"


class Summary:
    """Totals and tables of one stretch of log."""

    def __init__(self):
        self.received = self.delivered = self.bounced = self.rejected = 0
        self.deferrals = self.notices = 0
        self.bytes_received = self.bytes_delivered = 0
        self.first = self.last = None        # times of the first and last event counted
        self.untimed = 0                     # events left out by since: no time stamp
        self.deferred_ids = set()
        self.held_ids, self.discarded_ids = set(), set()
        self.holds, self.discards = Counter(), Counter()     # by who decided and why
        self.senders, self.sender_domains = Counter(), Counter()
        self.recipients, self.recipient_domains = Counter(), Counter()
        self.rejects, self.deferral_reasons, self.bounce_reasons = (
            Counter(), Counter(), Counter())
        self.delays = []                     # type: List[float]
        self._sizes = {}                     # queue id -> size
        self._received = set()               # queue ids received, waiting for their size

    def add_all(self, events: Iterable[LogEvent], since: Optional[float] = None):
        for event in events:
            if since is not None:
                if event.when is None:
                    self.untimed += 1
                    continue
                if event.when < since:
                    continue
            self.add(event)
        return self

    def add(self, event: LogEvent) -> None:
        if event.when is not None:
            self.first = event.when if self.first is None else min(self.first, event.when)
            self.last = event.when if self.last is None else max(self.last, event.when)
        kind = event.event
        if kind == RECEIVED:
            self.received += 1
            self._received.add(event.queue_id)
        elif kind == QUEUED:
            self._sizes[event.queue_id] = event.size or 0
            if event.queue_id in self._received:
                self._received.discard(event.queue_id)
                sender = event.sender or "<>"
                self.senders[sender] += 1
                self.sender_domains[domain_of(sender) if event.sender else "<>"] += 1
                self.bytes_received += event.size or 0
        elif kind == DELIVERY:
            self._add_delivery(event)
        elif kind == REJECT:
            self.rejected += 1
            self.rejects["%s: %s" % (event.restriction or "?",
                                     short_reason(event.reason))] += 1
        elif kind == NOTICE:
            self.notices += 1
        elif kind in (HOLD, DISCARD):
            ids, reasons = (self.held_ids, self.holds) if kind == HOLD else \
                (self.discarded_ids, self.discards)
            if event.queue_id not in ids:
                ids.add(event.queue_id)
                reasons["%s: %s" % (event.restriction or "?",
                                    short_reason(event.reason))] += 1

    def _add_delivery(self, event: LogEvent) -> None:
        if event.status == "sent":
            self.delivered += 1
            address = event.recipient or ""
            self.recipients[address] += 1
            self.recipient_domains[domain_of(address)] += 1
            self.bytes_delivered += self._sizes.get(event.queue_id, 0)
            if event.delay is not None:
                self.delays.append(event.delay)
        elif event.status == "deferred":
            self.deferrals += 1
            self.deferred_ids.add(event.queue_id)
            self.deferral_reasons[short_reason(event.reason)] += 1
        elif event.status == "bounced":
            self.bounced += 1
            self.bounce_reasons[short_reason(event.reason)] += 1

    def delay_stats(self) -> Optional[Dict[str, float]]:
        """min, avg, max and PERCENTILES (nearest rank) of the delivered recipients'
        delays, in seconds; None when nothing was delivered."""
        if not self.delays:
            return None
        ordered = sorted(self.delays)
        stats = {"min": ordered[0], "avg": sum(ordered) / len(ordered), "max": ordered[-1]}
        for p in PERCENTILES:
            rank = max(1, -(-p * len(ordered) // 100))      # ceil(p/100 * n)
            stats["p%d" % p] = ordered[rank - 1]
        return stats

    def as_dict(self, top: int) -> dict:
        """Everything, for --json: totals, then each table's top entries."""
        def table(counter):
            return [{"name": name, "count": count} for name, count in
                    sorted(counter.items(), key=lambda item: (-item[1], item[0]))[:top]]
        return {
            "first": self.first, "last": self.last,
            "received": self.received, "delivered": self.delivered,
            "deferred": len(self.deferred_ids), "deferrals": self.deferrals,
            "bounced": self.bounced, "rejected": self.rejected,
            "held": len(self.held_ids), "discarded": len(self.discarded_ids),
            "bounce_notices": self.notices,
            "bytes_received": self.bytes_received, "bytes_delivered": self.bytes_delivered,
            "senders": len(self.senders), "recipients": len(self.recipients),
            "delays": self.delay_stats(),
            "rejects": table(self.rejects), "deferral_reasons": table(self.deferral_reasons),
            "bounce_reasons": table(self.bounce_reasons),
            "holds": table(self.holds), "discards": table(self.discards),
            "top_senders": table(self.senders), "top_sender_domains": table(self.sender_domains),
            "top_recipients": table(self.recipients),
            "top_recipient_domains": table(self.recipient_domains),
            "untimed_left_out": self.untimed,
        }
