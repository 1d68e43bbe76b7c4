"""What a queued message is: its envelope, its recipients and its queue states.

Plain data, shared by every process. The on-disk encodings belong elsewhere:
elemta.queue.store owns the spool file, elemta.queue.index owns the index record.
"""

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

# Queue states, as Postfix admins know them (which may follow which: elemta.queue.transitions).
INCOMING = "incoming"   # accepted, not yet tried
ACTIVE = "active"       # claimed by a delivery worker
DEFERRED = "deferred"   # waiting for its next attempt
HOLD = "hold"           # parked by the admin or a plugin; never tried until released
FAILED = "failed"       # given up on; kept for the admin to inspect
STATES = (INCOMING, ACTIVE, DEFERRED, HOLD, FAILED)

# Message priority: a whole number, higher delivered sooner among messages due now, 0 for
# most mail (queue.priority_rules, elemtactl queue priority).
PRIORITY_MIN = -100
PRIORITY_MAX = 100
PRIORITY_DEFAULT = 0


def priority_error(value):
    """Why value is not a message priority, or None if it is one."""
    if isinstance(value, bool) or not isinstance(value, int):
        return "a priority is a whole number from %d to %d, not %r" % (
            PRIORITY_MIN, PRIORITY_MAX, value)
    if not PRIORITY_MIN <= value <= PRIORITY_MAX:
        return "a priority is from %d to %d, not %d" % (PRIORITY_MIN, PRIORITY_MAX, value)
    return None


# Per-recipient status.
PENDING = "pending"
SENT = "sent"
RCPT_DEFERRED = "deferred"
BOUNCED = "bounced"
RECIPIENT_STATUSES = (PENDING, SENT, RCPT_DEFERRED, BOUNCED)


@dataclass
class Recipient:
    """One envelope recipient and its RFC 3461 DSN parameters."""
    address: str
    notify: Optional[Tuple[str, ...]] = None  # ("NEVER",) or subset of SUCCESS/FAILURE/DELAY
    orcpt: Optional[str] = None               # "rfc822;user@example.com", xtext-decoded
    status: str = PENDING
    last_reply: Optional[str] = None          # the remote server's last reply to this one


@dataclass
class Hold:
    """Why a message is on hold: who held it and their reason, kept until it is released.

    by: who held it, as its log lines name it: a plugin ("clamav", "rspamd"), a milter,
    a content check ("header_checks"), "admin" (elemtactl queue hold, the REST API).
    Whoever holds a message gives both; the queue records them as given.
    """
    by: str
    reason: str = ""
    since: float = 0.0                         # time.time() it was held

    def describe(self):
        """'held by clamav: virus found: Eicar', as `queue show` and mailq say it."""
        return "held by %s%s" % (self.by or "unknown", ": " + self.reason if self.reason
                                 else "")

    def to_dict(self):
        return {"by": self.by, "reason": self.reason, "since": self.since}

    @classmethod
    def from_dict(cls, data):
        """The Hold a record or marker stored; None for anything that is not one (an
        older Elemta's empty marker, a marker cut short by a crash)."""
        if not isinstance(data, dict) or not isinstance(data.get("by"), str):
            return None
        reason, since = data.get("reason", ""), data.get("since", 0.0)
        return cls(data["by"], reason if isinstance(reason, str) else "",
                   float(since) if isinstance(since, (int, float)) else 0.0)


@dataclass
class Envelope:
    """Everything known about a message apart from its content.

    Fixed when the message is accepted; the delivery state lives in the index.
    """
    queue_id: str
    sender: str                                # "" is the null sender <>
    recipients: List[Recipient]
    arrival: float                             # time.time() when DATA/BDAT began
    size: int = 0                              # content bytes, Received header included
    body: str = "7BIT"                         # 7BIT or 8BITMIME (RFC 6152) or BINARYMIME
    smtputf8: bool = False                     # RFC 6531
    ret: Optional[str] = None                  # DSN RET: FULL or HDRS
    envid: Optional[str] = None                # DSN ENVID, xtext-decoded
    requiretls: bool = False                   # RFC 8689 REQUIRETLS on MAIL FROM
    client_address: str = ""                   # IP of the SMTP client ("" for local)
    client_helo: str = ""
    protocol: str = "ESMTP"                    # as in the Received header: ESMTPSA, ...
    auth_user: Optional[str] = None
    priority: int = PRIORITY_DEFAULT           # higher goes first among due messages
    extra: dict = field(default_factory=dict)  # room for later issues; kept round-trip
