"""The shared-state interface: what the checks call, whichever store answers.

Owned by no process; used by the smtpd worker's checks (see elemta.sharedstate). Each
kind is a class of one or two methods; a local implementation sits with its check, the
Valkey/Redis one in elemta.sharedstate.redisstore, and elemta.sharedstate.fallback
chooses between them.
"""

from typing import List, Optional, Sequence, Tuple

# The reply of a check that cannot be made while the store is down and
# cluster.store_failure is tempfail (421 at connect: a greeting cannot be 451).
TEMPFAIL_CODE, TEMPFAIL_STATUS = 451, "4.3.0"
TEMPFAIL_TEXT = "Temporary failure: shared state store unavailable, try again later"


class StoreUnavailable(Exception):
    """The shared store did not answer in time, or is known to be down; str() says why."""


class StoreTempfail(Exception):
    """cluster.store_failure is tempfail and the store is down: the check refuses with
    TEMPFAIL_CODE TEMPFAIL_STATUS what it guards."""


class RateCounter:
    """Counts events per key over a fixed window (Postfix's anvil(8) rate window: it
    starts at a key's first event and lasts `window` seconds)."""

    def hit(self, key, cost, window, now=None):
        # type: (str, int, float, object) -> int
        """Add `cost` events (0: just look) to `key`; return the key's count in its
        current window of `window` seconds, this hit included."""
        raise NotImplementedError

    def close(self):
        """Release the store."""


class Greylist:
    """Greylisting triplets; delay, retry window and expiry are the implementation's."""

    def check(self, network, sender, recipient, now=None):
        # type: (str, str, str, Optional[float]) -> Tuple[bool, float]
        """(let through?, seconds still to wait). Records the attempt."""
        raise NotImplementedError

    def close(self):
        """Release the store."""


class FailureCounts:
    """Recent AUTH failures per client group, forgotten a window after the last one."""

    def failures(self, group, now):
        # type: (str, float) -> int
        raise NotImplementedError

    def record_failure(self, group, now):
        # type: (str, float) -> int
        """Count one more failure; returns the group's new count."""
        raise NotImplementedError


class VerdictCache:
    """DNS list answers per query name ([]: not listed), kept for a TTL."""

    def get_many(self, queries):
        # type: (Sequence[str]) -> dict
        """{query: addresses} of the queries whose answer is still known."""
        raise NotImplementedError

    def put(self, query, addresses, ttl):
        # type: (str, List[str], float) -> None
        raise NotImplementedError
