"""Metric files that never kill their process when the disk is full.

prometheus-client's multiprocess mode keeps each process's values in a file mapped into
memory (MmapedDict), made and grown with ftruncate: a sparse file. A value written through
the mapping into a page the file system has not allocated yet needs a new page then, and
on a full file system (the spool's, where elemta keeps these files) the kernel answers
with SIGBUS: the process dies without a word. Seen here: a full spool killed an smtpd
worker at its first 452 reply, then the master as it folded that worker's counters.

AllocatedDict allocates every page of its file (posix_fallocate) before the mapping can
reach it, so a full disk is an OSError at a moment of our choosing. The values then move
to memory (a memfd): this process's metrics stop reaching the scrape until it is replaced,
which beats dying. With strict=True (the master folding a dead child's counters into the
archive) the OSError is raised instead, and the dead child's file stays where the scrape
still counts it.

The file format changed under us: prometheus-client before 0.17 stores one double per
value and its MmapedDict reads and writes bare values; from 0.17 on a value is two doubles
(value, timestamp). read_entries, read_value, write_value and VALUE_SIZE are the one place
that knows which (setup.cfg allows both; Debian 12 ships 0.16).
Owned by elemta.metrics; its values (elemta.util.metricvalues) write through AllocatedDict.
"""

import logging
import mmap
import os

from prometheus_client import mmap_dict
from prometheus_client.mmap_dict import _INITIAL_MMAP_SIZE, MmapedDict

log = logging.getLogger("elemta")

# 0.17 added a timestamp after each value (and _pack_two_doubles to write both).
_HAS_TIMESTAMPS = hasattr(mmap_dict, "_pack_two_doubles")
# Bytes of one value in a metric file: value, and from 0.17 on its timestamp.
VALUE_SIZE = 16 if _HAS_TIMESTAMPS else 8


def read_entries(path):
    """(key, value, offset of the value) for every value in the metric file at path."""
    for entry in MmapedDict.read_all_values_from_file(path):
        yield entry[0], entry[1], entry[-1]


def read_value(mapped, key):
    """The value of key in the MmapedDict `mapped` (0.0 if it has none yet)."""
    return read_pair(mapped, key)[0]


def read_pair(mapped, key):
    """(value, timestamp) of key in the MmapedDict `mapped`, adding key as (0.0, 0.0) if
    it has none yet; the timestamp is 0.0 before 0.17."""
    value = mapped.read_value(key)
    return (value[0], value[1]) if _HAS_TIMESTAMPS else (value, 0.0)


def write_value(mapped, key, value, timestamp=0.0):
    """Set key to value in the MmapedDict `mapped` (timestamp: 0.0, none; dropped before
    0.17, whose files have no room for it)."""
    if _HAS_TIMESTAMPS:
        mapped.write_value(key, value, timestamp)
    else:
        mapped.write_value(key, value)


def _allocate(path, size):
    """Give the file at path at least `size` bytes, every page allocated (none of its
    contents changes). Raises OSError (ENOSPC) when the file system has no room."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.posix_fallocate(fd, 0, max(size, os.fstat(fd).st_size))
    except OSError:
        if os.fstat(fd).st_size == 0:
            os.unlink(path)     # an empty metric file would break every scrape and fold
        raise
    finally:
        os.close(fd)


def _entry_size(key):
    """Bytes MmapedDict._init_value appends for key (length, padded key, value)."""
    length = len(key.encode("utf-8"))
    return 4 + length + (8 - (length + 4) % 8) + VALUE_SIZE


class AllocatedDict(MmapedDict):
    """An MmapedDict whose mapped pages are always allocated (see the module docstring)."""

    def __init__(self, filename, read_mode=False, strict=False):
        self._strict = strict
        self._in_memory = False
        memory_fd = None
        if not read_mode:
            try:
                _allocate(filename, _INITIAL_MMAP_SIZE)
            except OSError as error:
                if strict:
                    raise
                self._warn(filename, error)
                memory_fd = os.memfd_create("elemta-metrics", os.MFD_CLOEXEC)
                self._in_memory = True
                filename = "/proc/self/fd/%d" % memory_fd
        try:
            super().__init__(filename, read_mode)
        finally:
            if memory_fd is not None:
                os.close(memory_fd)         # the file object holds its own reference

    def _init_value(self, key):
        capacity = self._capacity
        while self._used + _entry_size(key) > capacity:
            capacity *= 2
        if capacity > self._capacity and not self._in_memory:
            try:
                os.posix_fallocate(self._f.fileno(), 0, capacity)
            except OSError as error:
                if self._strict:
                    raise
                self._move_to_memory(error)
        super()._init_value(key)

    def _move_to_memory(self, error):
        """Go on in a memfd holding what the file held."""
        self._warn(self._fname, error)
        memory = os.fdopen(os.memfd_create("elemta-metrics", os.MFD_CLOEXEC), "a+b")
        memory.write(self._m[:self._capacity])
        memory.flush()
        mapping = mmap.mmap(memory.fileno(), self._capacity)
        self._m.close()
        self._f.close()
        self._f, self._m, self._in_memory = memory, mapping, True

    @staticmethod
    def _warn(filename, error):
        log.warning("metrics: %s: %s; this process keeps its metrics in memory (the "
                    "scrape misses them until it is replaced)", filename, error)
