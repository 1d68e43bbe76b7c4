"""Recent AUTH failures per client, in a bounded table a flood cannot purge.

Owned by the smtpd worker (one table per worker, used by elemta.smtpd.authn). A client is
an IPv4 address or an IPv6 /64 (elemta.smtpd.clientnet). Failures are forgotten
FAILURE_WINDOW seconds after a client's last one.

The table holds at most `capacity` clients. When it is full, expired entries go first,
then the clients with the fewest failures (the oldest of those first). An attacker who
fails from many fresh addresses therefore displaces only entries as light as his own
one-failure entries, never the entry of a client that has failed many times: to purge
that one he would have to fail more often from every flooding address, which is what
the penalty makes slow. (Clearing the whole table, or LRU eviction, would let a burst of
new addresses reset anyone's penalty.)

This is the local FailureCounts of elemta.sharedstate: with cluster.store set, the
counts live in the cluster's Valkey/Redis (each key expiring `window` seconds after its
last failure), so a client's failures on one node slow it on every node.
"""

import heapq

from elemta.sharedstate.interface import FailureCounts

# Failures older than this are forgotten (seconds).
FAILURE_WINDOW = 600.0
# Clients remembered per worker (an entry costs about 200 bytes).
CAPACITY = 50000


class FailureTable(FailureCounts):
    """client group -> (failures, time of the last failure), bounded, evicting fairly."""

    def __init__(self, capacity=CAPACITY, window=FAILURE_WINDOW):
        self.capacity = capacity
        self.window = window
        self._entries = {}

    def __len__(self):
        return len(self._entries)

    def failures(self, group, now):
        """Recent failures of the client group (0 once the window has passed)."""
        entry = self._entries.get(group)
        if entry is None:
            return 0
        if now - entry[1] > self.window:
            del self._entries[group]
            return 0
        return entry[0]

    def record_failure(self, group, now):
        """Count one more failure for the group; returns its new count."""
        count = self.failures(group, now) + 1
        if group not in self._entries and len(self._entries) >= self.capacity:
            self._make_room(now)
        self._entries[group] = (count, now)
        return count

    def _make_room(self, now):
        entries = self._entries
        for group in [g for g, (_, last) in entries.items() if now - last > self.window]:
            del entries[group]
        if len(entries) < self.capacity:
            return
        # Evict a batch (a sixteenth) so the scan is paid once per many insertions.
        lightest = heapq.nsmallest(max(1, self.capacity // 16), entries.items(),
                                   key=lambda item: item[1])
        for group, _ in lightest:
            del entries[group]
