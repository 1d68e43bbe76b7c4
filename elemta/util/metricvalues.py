"""Multiprocess metric values that write their file about once a second, not per update.

prometheus-client's MmapedValue writes a metric file (two packed doubles into the mmap)
on every inc(), set() and observe(), and calls os.getpid() each time to notice a fork:
about 8% of an smtpd worker's CPU under load, for ~10 updates per message. BufferedValue
keeps the same files, keys, file names per gauge multiprocess mode and timestamps (so the
api's scrape and the master's fold of dead children read them as before), but an update
only changes the value in memory and marks it dirty. flush() writes the dirty values:

  - on an update once FLUSH_INTERVAL has passed since the last flush (a busy process);
  - every FLUSH_INTERVAL from a greenlet of each gevent child (elemta.util.child), so an
    idle process's last counts reach the file too;
  - when a child ends (elemta.master, before its os._exit, which skips atexit), and at
    any other exit through atexit;
  - before this process's own scrape reads the files (elemta.metrics, the api process).

So a scrape may see a process's counts up to FLUSH_INTERVAL late, and a process killed
with SIGKILL loses the counts of its last interval at most. Counters tolerate that: the
file keeps the last flushed value, so they never go backwards.

A fork is handled by os.register_at_fork instead of a getpid() per update: the child
forgets the parent's files and unflushed changes, and each value starts again from the
child's own file (pid-named: normally empty) when it is next used, as MmapedValue's
reset does. Lazily, not at the fork: a child that forks as root and drops privileges
afterwards (elemta.master) makes its files as the service user.

One lock guards the values, the files and the dirty list: pool threads may count too.
Installed by elemta.metrics.setup() as prometheus_client.values.ValueClass.
See also: elemta.util.metricfiles (the file format), elemta.metrics, issue 20.
"""

import atexit
import os
import threading
import time

from prometheus_client.mmap_dict import mmap_key

from elemta.util.metricfiles import AllocatedDict, read_pair, write_value

ENV = "PROMETHEUS_MULTIPROC_DIR"
# Longest a count waits in memory (while the process lives and its loop runs).
FLUSH_INTERVAL = 1.0

_lock = threading.Lock()
_files = {}          # file prefix ("counter", "gauge_livesum", ...) -> this process's file
_values = []         # every value of this process, for the fork reset
_dirty = []          # values changed since the last flush
_next_flush = 0.0    # time.monotonic() at which an update flushes


class BufferedValue:
    """A float in memory, written to this process's metric file by flush()."""

    _multiprocess = True

    def __init__(self, typ, metric_name, name, labelnames, labelvalues, *help_text,
                 multiprocess_mode="", **kwargs):
        # Gauges get one file per mode, as the collector merges by mode (MmapedValue).
        self._prefix = typ + "_" + multiprocess_mode if typ == "gauge" else typ
        # help_text: passed by the prometheus-client versions whose keys hold it
        self._key = mmap_key(metric_name, name, labelnames, labelvalues, *help_text)
        self._dirty = False
        with _lock:
            self._reset()
            _values.append(self)

    def _reset(self):
        """Open this process's file (made if new) and start from what it holds there.
        Lock held."""
        mapped = _files.get(self._prefix)
        if mapped is None:
            path = os.path.join(os.environ[ENV], "%s_%d.db" % (self._prefix, os.getpid()))
            mapped = _files[self._prefix] = AllocatedDict(path)
        self._file = mapped
        self._value, self._timestamp = read_pair(mapped, self._key)

    def inc(self, amount):
        with _lock:
            if self._file is None:
                self._reset()
            self._value += amount
            self._timestamp = 0.0
            self._changed()

    def set(self, value, timestamp=None):
        with _lock:
            if self._file is None:
                self._reset()
            self._value = value
            self._timestamp = timestamp or 0.0
            self._changed()

    def _changed(self):
        """Mark dirty; flush if the interval is up (a busy process needs no flusher).
        Lock held."""
        if not self._dirty:
            self._dirty = True
            _dirty.append(self)
        if time.monotonic() >= _next_flush:
            _flush_locked()

    def get(self):
        with _lock:
            if self._file is None:
                self._reset()
            return self._value

    def set_exemplar(self, exemplar):
        return          # as MmapedValue: no exemplars in multiprocess mode

    def get_exemplar(self):
        return None

    @classmethod
    def close_all_files(cls):
        with _lock:
            _flush_locked()
            _close_files()
            for value in _values:       # kept: reopened on their next use
                value._file = None


def flush():
    """Write every value changed since the last flush to this process's files."""
    with _lock:
        _flush_locked()


def _flush_locked():
    global _next_flush
    for value in _dirty:
        value._dirty = False
        write_value(value._file, value._key, value._value, value._timestamp)
    del _dirty[:]
    _next_flush = time.monotonic() + FLUSH_INTERVAL


def _close_files():
    for mapped in _files.values():
        mapped.close()
    _files.clear()


def _after_fork_in_child():
    """The parent's files, changes and lock are not the child's (see the docstring)."""
    global _lock, _next_flush
    _lock = threading.Lock()        # another thread may have held it at the fork
    _close_files()
    for value in _values:
        value._file = None
        value._dirty = False
    del _dirty[:]
    _next_flush = 0.0


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(flush)
