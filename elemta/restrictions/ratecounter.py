"""Event counters per key and time window, shared by every smtpd worker of the host.

Owned by the smtpd worker (the ratelimit restriction, elemta.restrictions.ratelimit),
which opens its RateCounter after fork. RateCounter is the whole interface the
restrictions see: hit(key, cost, window) adds `cost` events to `key` and returns how
many the key has in its current window. LMDBRateCounter keeps the counts in an LMDB
environment, so every worker sees the same counts and they survive a worker's restart;
a later store shared by several hosts (Valkey/Redis: INCRBY + EXPIRE) implements the
same method and nothing else changes.

The window is Postfix's anvil(8) rate window: it starts at a key's first event and lasts
`window` seconds; the first event after it starts a new window at 1. Each hit is one
short write transaction (the lock is held for a get and a put). Writes are not fsync'd
(sync=False): a crash of the host may forget the last counts, which only gives a client
a little more of its allowance; a worker killed by a signal loses nothing, the pages are
already the kernel's.

See also: elemta.plugins.greylist (the same LMDB pattern), tests/test_ratelimit.py.
"""

import os
import struct
import time

import lmdb

# Start of the window (time.time()), events in it.
_RECORD = struct.Struct("!dQ")
# Forget keys whose window has ended after this many new windows (and at start).
PURGE_EVERY = 1000
# LMDB keys are at most 511 bytes.
MAX_KEY = 500


class RateCounter:
    """Counts events per key over a fixed window. Implementations are shared by every
    process that opens the same store."""

    def hit(self, key, cost, window, now=None):
        # type: (str, int, float, object) -> int
        """Add `cost` events (0: just look) to `key`; return the key's count in its
        current window of `window` seconds, this hit included."""
        raise NotImplementedError

    def close(self):
        """Release the store."""


class LMDBRateCounter(RateCounter):
    """RateCounter in an LMDB environment (one per process and path: open after fork)."""

    def __init__(self, path, map_size=16 << 20):
        os.makedirs(path, mode=0o750, exist_ok=True)
        self.env = lmdb.open(path, map_size=map_size, subdir=True, sync=False,
                             metasync=False, max_dbs=0)
        self._new_windows = 0

    def close(self):
        self.env.close()

    def hit(self, key, cost, window, now=None):
        now = time.time() if now is None else now
        try:
            return self._hit(key, cost, window, now)
        except lmdb.MapFullError:
            # Full: forget the ended windows and try once more (a burst of clients
            # between two purges); still full, the caller hears it.
            self.purge(window, now)
            return self._hit(key, cost, window, now)

    def _hit(self, key, cost, window, now):
        raw_key = key.encode("utf-8", "surrogateescape")[:MAX_KEY]
        with self.env.begin(write=bool(cost)) as txn:
            raw = txn.get(raw_key)
            start, count = _RECORD.unpack(raw) if raw and len(raw) == _RECORD.size \
                else (now, 0)
            if now - start >= window or start > now + window:   # ended (or clock jumped)
                start, count = now, 0
            if count == 0 and cost:
                self._new_windows += 1
            count += cost
            if cost:
                txn.put(raw_key, _RECORD.pack(start, count))
        if self._new_windows >= PURGE_EVERY:
            self.purge(window, now)
        return count

    def purge(self, window, now=None):
        """Delete the keys whose window of `window` seconds has ended; how many."""
        now = time.time() if now is None else now
        with self.env.begin() as txn:
            doomed = [key for key, raw in txn.cursor()
                      if len(raw) != _RECORD.size or now - _RECORD.unpack(raw)[0] >= window]
        with self.env.begin(write=True) as txn:
            for key in doomed:
                txn.delete(key)
        self._new_windows = 0
        return len(doomed)

    def count(self):
        return self.env.stat()["entries"]
