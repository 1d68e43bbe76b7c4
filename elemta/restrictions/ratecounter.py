"""Event counters per key and time window, shared by every smtpd worker of the host.

Owned by the smtpd worker (the ratelimit restriction, elemta.restrictions.ratelimit),
which opens its RateCounter after fork. RateCounter (elemta.sharedstate.interface) is
the whole interface the restrictions see: hit(key, cost, window) adds `cost` events to
`key` and returns how many the key has in its current window. LMDBRateCounter keeps the
counts in an LMDB environment, so every worker sees the same counts and they survive a
worker's restart; the store several hosts share (Valkey/Redis: a Lua script of INCRBY
and PEXPIRE, elemta.sharedstate.redisstore) implements the same method.

The window is Postfix's anvil(8) rate window: it starts at a key's first event and lasts
`window` seconds; the first event after it starts a new window at 1. Each hit is one
short write transaction (the lock is held for a get and a put). Writes are not fsync'd
(sync=False): a crash of the host may forget the last counts, which only gives a client
a little more of its allowance; a worker killed by a signal loses nothing, the pages are
already the kernel's.

The store has a fixed size and clients choose the keys (one per address, per IPv6 /64,
per sender), so a flood of new keys must never fill it into refusing everyone. Before a
new key is added to a store that is more than HIGH_WATER full, the ended windows are
deleted and then the least recently used keys, until at most half the keys remain:
forgetting a key only gives that client a fresh allowance, and the keys of clients
active right now (the ones a limit is about) are the last to go. The headroom matters:
LMDB copies every page it changes, so a store that is completely full cannot even
delete; should it get there anyway (a smaller map_size than before), it is emptied.

See also: elemta.plugins.greylist (the same LMDB pattern), tests/test_ratelimit.py.
"""

import logging
import os
import struct
import time

import lmdb

from elemta.sharedstate.interface import RateCounter

log = logging.getLogger("elemta.restrictions.ratecounter")

# Start of the window, events in it, last event (time.time()): the last event is what
# least recently used means. Records of the older 16-byte layout lack it.
_RECORD = struct.Struct("!dQd")
_OLD_RECORD = struct.Struct("!dQ")
# Forget keys whose window has ended after this many new windows (and at start).
PURGE_EVERY = 1000
# Make room when the store's pages are more than this part of its size: the rest is
# what LMDB needs to copy pages while it deletes.
HIGH_WATER = 0.6
# Keys deleted per write transaction: a small transaction copies few pages, and its
# commit frees them for the next one.
DELETE_BATCH = 256
# LMDB keys are at most 511 bytes.
MAX_KEY = 500


def _unpack(raw):
    """(start, count, last) of a stored record; an unreadable one as long ended."""
    if len(raw) == _RECORD.size:
        return _RECORD.unpack(raw)
    if len(raw) == _OLD_RECORD.size:
        start, count = _OLD_RECORD.unpack(raw)
        return start, count, start
    return 0.0, 0, 0.0


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
            # Full to the last page anyway (a store made with a larger map_size):
            # nothing can be deleted any more, start afresh rather than fail.
            self.forget_all()
            return self._hit(key, cost, window, now)

    def _hit(self, key, cost, window, now):
        raw_key = key.encode("utf-8", "surrogateescape")[:MAX_KEY]
        with self.env.begin(write=bool(cost)) as txn:
            raw = txn.get(raw_key)
            start, count, _ = _unpack(raw) if raw else (now, 0, now)
            if now - start >= window or start > now + window:   # ended (or clock jumped)
                start, count = now, 0
            new_window = count == 0 and cost
            count += cost
            if cost:
                txn.put(raw_key, _RECORD.pack(start, count, now))
        if new_window:
            # Only new keys make the store grow: room is made after this one was
            # added (it is the most recent, it stays).
            self._new_windows += 1
            filled = self._filled()
            if filled > HIGH_WATER:
                self.make_room(window, now, filled)
            elif self._new_windows >= PURGE_EVERY:
                self.purge(window, now)
        return count

    def _filled(self):
        """The part of the store's size its pages take, 0 to 1."""
        stat = self.env.stat()
        used = stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]
        return used * stat["psize"] / float(self.env.info()["map_size"])

    def purge(self, window, now=None):
        """Delete the keys whose window of `window` seconds has ended; how many."""
        now = time.time() if now is None else now
        with self.env.begin() as txn:
            doomed = [key for key, raw in txn.cursor()
                      if now - _unpack(raw)[0] >= window]
        self._new_windows = 0
        return self._delete(doomed)

    def make_room(self, window, now=None, filled=None):
        """Delete the ended windows, then the least recently used keys until at most
        half the keys remain; how many were deleted. filled: how full it was, for the
        log."""
        now = time.time() if now is None else now
        with self.env.begin() as txn:
            records = [(key, _unpack(raw)) for key, raw in txn.cursor()]
        ended = [key for key, (start, _, _) in records if now - start >= window]
        live = sorted((last, key) for key, (start, _, last) in records
                      if now - start < window)
        excess = max(0, len(live) - len(records) // 2)
        doomed = ended + [key for _, key in live[:excess]]
        deleted = self._delete(doomed)
        log.warning("rate counter store %s was %d%% full: forgot %d ended and %d least "
                    "recently used counts of %d", self.env.path(),
                    round((self._filled() if filled is None else filled) * 100),
                    len(ended), excess, len(records))
        self._new_windows = 0
        return deleted

    def _delete(self, keys):
        """Delete keys in small transactions; a store too full to delete is emptied."""
        try:
            for first in range(0, len(keys), DELETE_BATCH):
                with self.env.begin(write=True) as txn:
                    for key in keys[first:first + DELETE_BATCH]:
                        txn.delete(key)
        except lmdb.MapFullError:
            return self.forget_all()
        return len(keys)

    def forget_all(self):
        """Empty the store (dropping the tree needs no page copies); how many keys."""
        with self.env.begin(write=True) as txn:
            entries = txn.stat(self.env.open_db())["entries"]
            txn.drop(self.env.open_db(), delete=False)
        log.warning("rate counter store %s is full: forgot all %d counts",
                    self.env.path(), entries)
        return entries

    def count(self):
        return self.env.stat()["entries"]
