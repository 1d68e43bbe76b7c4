"""The scoreboard: each worker's heartbeat and state, shared by the master and workers.

Created by the master before it forks (an anonymous shared mapping, like Apache's
scoreboard); each worker writes only its own slot. The master reads it to find workers
that stopped beating (it kills and replaces them) and workers that are retiring (it
starts their replacement at once, so service has no gap). Times are time.monotonic(),
which every process on the host shares.
"""

import mmap
import struct
import time

_SLOT = struct.Struct("=dii")      # last heartbeat, state, pid

FREE = 0
STARTING = 1    # forked, not yet serving
RUNNING = 2     # serving
RETIRING = 3    # finishing its sessions; a replacement may start


class Scoreboard:
    """A fixed number of worker slots in shared memory."""

    def __init__(self, slots):
        self.slots = slots
        self._memory = mmap.mmap(-1, slots * _SLOT.size)    # MAP_SHARED | MAP_ANONYMOUS

    def _read(self, slot):
        return _SLOT.unpack_from(self._memory, slot * _SLOT.size)

    def _write(self, slot, beat, state, pid):
        _SLOT.pack_into(self._memory, slot * _SLOT.size, beat, state, pid)

    def claim(self, slot, pid):
        """The master gives slot to a new worker; its first beat is now."""
        self._write(slot, time.monotonic(), STARTING, pid)

    def set_state(self, slot, state):
        beat, _, pid = self._read(slot)
        self._write(slot, beat, state, pid)

    def release(self, slot):
        self._write(slot, 0.0, FREE, 0)

    def beat(self, slot):
        """A worker says it is alive (its event loop is turning)."""
        _, state, pid = self._read(slot)
        self._write(slot, time.monotonic(), state, pid)

    def retire(self, slot):
        """A worker says it will stop accepting and exit once its sessions are done."""
        self.set_state(slot, RETIRING)

    def state(self, slot):
        return self._read(slot)[1]

    def silence(self, slot):
        """Seconds since the slot's last heartbeat."""
        return time.monotonic() - self._read(slot)[0]
