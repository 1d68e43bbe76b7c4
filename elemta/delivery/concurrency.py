"""Per-destination concurrency limits that hold across all delivery workers.

Owned by the delivery workers. Postfix's qmgr is one process and counts connections per
destination in memory; our workers are several processes, so a destination's limit is a
set of numbered slots in spool/run/destinations.lock, as many as the limit, and a
delivery to it holds a lock on one of them. The kernel drops a dead worker's locks with
its process, so a killed worker can never leak a slot, and no process has to count for
the others. The slots are byte ranges of that one file under fcntl record locks (many on
one file descriptor): the destination key hashed to 40 bits, times 65536, plus the slot
number. Only the first in line of a destination tries for a slot: it is woken when one of
its own worker's slots is given back, or looks again after a short pause (the holders are
other processes, which cannot wake it); the others sleep until their turn comes. A busy
worker has many deliveries waiting for one destination, and waking them all on every
slot given back cost more CPU than the deliveries themselves.

Within a worker, the deliveries waiting for one destination take its slots in the order
of their messages' priority (queue.priority_rules), the highest first, then in the order
they began to wait: a message of higher priority that a busy worker claimed late still
gets the next connection. A waiter's priority may be a function: it is asked again
every PRIORITY_RECHECK_SECONDS while the delivery waits, so a priority an admin changes
(elemtactl queue priority) moves a message already claimed to its new place in line
(the first place comes from `initial` when the caller knows it: the worker has the one
its claim just read, and asking the index costs a read and a decode per delivery).
Across workers there is no order: each worker's best waiter tries whenever it looks.
"""

import fcntl
import functools
import hashlib
import itertools
import os
import random
import time

from gevent.event import Event

from elemta.addressing.normal import normal_domain
from elemta.addressing.resolve import domain_entry

# Longest pause before a waiting delivery looks at other workers' slots again.
RECHECK_SECONDS = 0.1
# How often a waiter asks its priority function again (one index read each time).
PRIORITY_RECHECK_SECONDS = 1.0
# Slots one destination can have (the room each key has in the lock file).
MAX_LIMIT = 65535
# Hosts whose limits a worker remembers (cleared when full: a lookup is cheap).
LIMIT_CACHE = 4096


class DestinationSlots:
    """Concurrency slots for destinations, shared by every delivery worker of a spool."""

    def __init__(self, path, default_limit, limits=()):
        # limits: (domain, limit) pairs; ".example.org" covers every subdomain.
        self.path = path
        self.default_limit = default_limit
        self.limits = {normal_domain(domain): limit for domain, limit in limits}
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        # Never closed before the process ends: closing any descriptor of the file would
        # drop every lock the process holds on it (POSIX).
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._held = set()        # (key, n) held by this process
        # key -> {(-priority, ticket): the Event that wakes that waiting greenlet}
        self._waiting = {}
        self._tickets = itertools.count()
        self._limit_of = {}       # host -> its limit (the same few hosts, again and again)

    def limit_for(self, destination):
        """The limit for a Destination: an entry for its host or a parent domain, or
        the default."""
        limit = self._limit_of.get(destination.host)
        if limit is None:
            host = normal_domain(destination.host)
            limit = min(domain_entry(self.limits, host, self.default_limit), MAX_LIMIT)
            if len(self._limit_of) >= LIMIT_CACHE:
                self._limit_of.clear()
            self._limit_of[destination.host] = limit
        return limit

    def hold(self, destination, priority=0, initial=None):
        """A context manager holding one slot of destination's limit (waits for one,
        behind this process's waiters of higher priority). priority: a number, or a
        function giving the current one (asked again while waiting; initial, when given,
        is its value now, so it need not be asked at once)."""
        return _Slot(self, destination.key, self.limit_for(destination), priority, initial)

    def _acquire(self, key, limit, priority=0, initial=None):
        current = priority if callable(priority) else (lambda: priority)
        ticket = next(self._tickets)
        place = (-(current() if initial is None else initial), ticket)
        asked = time.monotonic()
        waiting = self._waiting.setdefault(key, {})
        turn = Event()
        waiting[place] = turn
        try:
            while True:
                if min(waiting) == place:       # only the first in line tries
                    taken = self._try(key, limit)
                    if taken is not None:
                        return taken
                    pause = RECHECK_SECONDS * (0.5 + random.random())
                else:                           # woken when its turn comes
                    pause = PRIORITY_RECHECK_SECONDS if callable(priority) else None
                turn.clear()
                turn.wait(pause)
                if callable(priority) and time.monotonic() - asked >= PRIORITY_RECHECK_SECONDS:
                    asked = time.monotonic()
                    moved = (-current(), ticket)
                    if moved != place:
                        del waiting[place]
                        place = moved
                        waiting[place] = turn
                        self._wake_first(key)   # the line changed: its new first looks
        finally:
            del waiting[place]
            if waiting:
                self._wake_first(key)           # the next in line may find a slot too
            else:
                del self._waiting[key]

    def _wake_first(self, key):
        waiting = self._waiting.get(key)
        if waiting:
            waiting[min(waiting)].set()

    def _try(self, key, limit):
        base = _offset(key)
        start = random.randrange(limit)
        for offset in range(limit):
            n = (start + offset) % limit
            if (key, n) in self._held:
                continue        # POSIX locks never conflict within one process
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, base + n)
            except OSError:     # EAGAIN or EACCES: another worker holds it
                continue
            self._held.add((key, n))
            return key, n
        return None

    def _release(self, slot):
        self._held.discard(slot)
        fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, _offset(slot[0]) + slot[1])
        self._wake_first(slot[0])

    def held(self):
        """How many slots this process holds now (for tests and metrics)."""
        return len(self._held)

    def close(self):
        os.close(self._fd)
        self._held.clear()


@functools.lru_cache(maxsize=4096)
def _offset(key):
    """Where a destination's slots start in the lock file (room for 65536 slots)."""
    digest = hashlib.sha1(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:5], "big") << 16


class _Slot:
    def __init__(self, slots, key, limit, priority, initial):
        self.slots, self.key, self.limit = slots, key, limit
        self.priority, self.initial = priority, initial
        self.slot = None

    def __enter__(self):
        self.slot = self.slots._acquire(self.key, self.limit, self.priority, self.initial)
        return self

    def __exit__(self, *exc_info):
        self.slots._release(self.slot)
        return False
