"""The delivery worker's TLS-RPT counter: session results kept in memory and written to
elemta.tlsrpt.store in one transaction per batch (the worker flushes every
FLUSH_EVERY seconds, in a thread, and at its stop), so counting costs a session no
disk write. A worker killed with -9 loses the last batch: these are statistics, never mail.

Used by the delivery worker (elemta.delivery.smtp_transport counts, the worker flushes).
"""

import json
import time

from elemta.tlsrpt.store import Tally

FLUSH_EVERY = 1.0
# Kept at most in a failure detail's failure-reason-code.
MAX_REASON = 300


def day_of(now):
    return time.strftime("%Y-%m-%d", time.gmtime(now))


class TLSCounter:
    """Counts successes and failures per (UTC day, ReportedPolicy) until take()n."""

    def __init__(self, clock=time.time):
        self.clock = clock
        self._tallies = {}

    def success(self, policy):
        self._tally(policy).add(success=1)

    def failure(self, policy, result, mx_host=None, address=None, reason=None):
        """A failed session (or policy lookup) under policy, of RFC 8460 result type
        result, with the MX host and address it was for when there was one."""
        detail = {"result-type": result}
        if mx_host:
            detail["receiving-mx-hostname"] = mx_host
        if address:
            detail["receiving-ip"] = address
        if reason:
            detail["failure-reason-code"] = reason[:MAX_REASON]
        self._tally(policy).add(failure=1,
                                details={json.dumps(detail, sort_keys=True): 1})

    @property
    def pending(self):
        return bool(self._tallies)

    def take(self):
        """The counts so far ({(day, policy key): Tally}); the counter starts afresh."""
        tallies, self._tallies = self._tallies, {}
        return tallies

    def _tally(self, policy):
        key = (day_of(self.clock()), policy.key())
        tally = self._tallies.get(key)
        if tally is None:
            tally = self._tallies[key] = Tally(policy.as_json())
        return tally


class NullCounter:
    """What counts nothing (tlsrpt.enabled off): a TLSCounter's methods, doing nothing."""

    pending = False

    def success(self, policy):
        pass

    def failure(self, policy, result, mx_host=None, address=None, reason=None):
        pass
