"""The scoreboard: each worker's heartbeat, state and boot failure, shared by the master
and workers.

Created by the master before it forks (an anonymous shared mapping, like Apache's
scoreboard); each worker writes only its own slot. The master reads it to find workers
that stopped beating (it kills and replaces them), workers that are retiring (it
starts their replacement at once, so service has no gap), and why a worker could not
start (a short text the worker leaves before it exits with EX_CANTBOOT, so the master
logs the cause without parsing logs: elemta.util.child). Times are time.monotonic(),
which every process on the host shares.
"""

import mmap
import os
import struct
import time

CAUSE_BYTES = 240                   # room for a path and an errno text
_SLOT = struct.Struct("=dii%ds" % CAUSE_BYTES)      # last heartbeat, state, pid, cause

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

    def _write(self, slot, beat, state, pid, cause=b""):
        _SLOT.pack_into(self._memory, slot * _SLOT.size, beat, state, pid, cause)

    def claim(self, slot, pid):
        """The master gives slot to a new worker; its first beat is now."""
        self._write(slot, time.monotonic(), STARTING, pid)

    def set_state(self, slot, state):
        beat, _, pid, cause = self._read(slot)
        self._write(slot, beat, state, pid, cause)

    def release(self, slot):
        self._write(slot, 0.0, FREE, 0)

    def beat(self, slot):
        """A worker says it is alive (its event loop is turning), and which process it
        is (the master claims the slot before the fork; the api's health maps a
        process to its heartbeat by it)."""
        _, state, _, cause = self._read(slot)
        self._write(slot, time.monotonic(), state, os.getpid(), cause)

    def retire(self, slot):
        """A worker says it will stop accepting and exit once its sessions are done."""
        self.set_state(slot, RETIRING)

    def set_cause(self, slot, text):
        """A worker that cannot start says why (cut to CAUSE_BYTES, on a character)."""
        beat, state, pid, _ = self._read(slot)
        cause = text.encode("utf-8", "replace")[:CAUSE_BYTES]
        self._write(slot, beat, state, pid, cause.decode("utf-8", "ignore").encode("utf-8"))

    def cause(self, slot):
        """What the slot's worker said when it could not start ("" if nothing)."""
        return self._read(slot)[3].rstrip(b"\0").decode("utf-8", "replace")

    def state(self, slot):
        return self._read(slot)[1]

    def silences(self):
        """{pid: (state, seconds since its last heartbeat)} of every slot in use."""
        now, found = time.monotonic(), {}
        for slot in range(self.slots):
            beat, state, pid, _ = self._read(slot)
            if state != FREE and pid:
                found[pid] = (state, now - beat)
        return found

    def silence(self, slot):
        """Seconds since the slot's last heartbeat."""
        return time.monotonic() - self._read(slot)[0]
