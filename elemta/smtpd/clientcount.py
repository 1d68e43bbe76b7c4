"""Concurrent sessions per client, counted across all smtpd workers.

Postfix asks its anvil server; we share a table in memory instead. The master creates it
before it forks (an anonymous shared mapping), gives every worker one row, and each
worker is the only writer of its row, so no lock is needed; readers add the rows up.
When a worker dies its sessions died with it, so the master zeroes its row before the
replacement starts.

Clients are hashed into two independent slots (a count-min sketch): a count is the
smaller of the two sums, so two clients sharing a slot can only be over-counted when
both of their slots collide, and a client is never under-counted. The hash is keyed
with a secret drawn when the table is made (in the master, before the fork, so every
worker hashes alike; anew at each master start): with an unkeyed hash anyone could
compute two addresses whose slots cover a victim's and, holding the limit's worth of
sessions from each, lock the victim out with 421. A client is an IPv4 address or an
IPv6 /64 (elemta.smtpd.clientnet).
"""

import hashlib
import mmap
import os

from elemta.smtpd.clientnet import client_group

SLOTS = 32768            # per half-row; one row is 2 * SLOTS int32 counters (256 KiB)
# Clients whose slots a worker remembers (each session looks them up three times: the
# limit check, its start and its end); the memory is emptied when full.
SLOT_CACHE = 4096
_ROW = 2 * SLOTS


class ClientCounts:
    """A shared table of per-client session counts, one row per worker."""

    def __init__(self, rows):
        self.rows = rows
        self._memory = mmap.mmap(-1, rows * _ROW * 4)     # MAP_SHARED | MAP_ANONYMOUS
        self._cells = memoryview(self._memory).cast("i")
        self._key = os.urandom(32)      # inherited by the workers: made before the fork
        self.row = 0
        self._slot_cache = {}           # address -> _slots(address)

    def use_row(self, row):
        """Called in a worker after fork: this worker writes only row `row`."""
        self.row = row

    def clear_row(self, row):
        """Called by the master when row's worker has died."""
        self._memory[row * _ROW * 4:(row + 1) * _ROW * 4] = bytes(_ROW * 4)

    def count(self, address):
        """Sessions open from the client (IPv4 address or IPv6 /64) of `address`."""
        first, second = self._slots(address)
        # A slot's column across every row is a strided view: summed in C, not in a
        # Python loop over the rows (this runs for every connection).
        return min(sum(self._cells[first::_ROW]), sum(self._cells[second::_ROW]))

    def add(self, address, delta):
        first, second = self._slots(address)
        base = self.row * _ROW
        self._cells[base + first] += delta
        self._cells[base + second] += delta

    def _slots(self, address):
        slots = self._slot_cache.get(address)
        if slots is None:
            if len(self._slot_cache) >= SLOT_CACHE:
                self._slot_cache.clear()
            slots = self._slot_cache[address] = self._hash_slots(address)
        return slots

    def _hash_slots(self, address):
        digest = hashlib.blake2b(client_group(address).encode("ascii", "replace"),
                                 digest_size=8, key=self._key).digest()
        return (int.from_bytes(digest[:4], "big") % SLOTS,
                SLOTS + int.from_bytes(digest[4:], "big") % SLOTS)
