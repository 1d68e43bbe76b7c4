"""The durable queue: spool files and their index records, made durable together.

The facade every process uses (smtpd and pickup accept mail through start_message and commit,
the daemon runs reconcile at start-up before any worker accepts mail, elemtactl runs
reindex). It owns the durability rule: commit returns only once the message files, their
renames into place and their index records are on disk, so the 250 after DATA can be sent.
See also elemta.queue.store (the files), elemta.queue.index (the LMDB index).

Group commit: commit takes every message finished since the last commit and makes the whole
batch durable with one flush, so N messages cost about one disk flush rather than N.

    sync_method "syncfs": LMDB syncs its data pages but not its meta page (metasync off, so a
        crash can only undo the last transaction, never corrupt the index), then one syncfs(2)
        on the spool directory flushes the files, the renames and the meta page together. A
        crash in the middle can leave a renamed file whose data never reached the disk: the
        footer (length) and the CRC catch it, and that message was never acknowledged.
    sync_method "fsync": each file is fsync'd before its rename, each touched directory after,
        and LMDB syncs fully; the classic order, more flushes per batch.

When commit fails it raises OSError and the caller must answer 4xx: the client still owns the
message and will send it again. So commit removes what it had put in place (files first: the
files are the truth, and reconcile drops any index record left without its file). If the
removal itself cannot reach the disk before a crash, reconcile may bring the message back: it
is then delivered twice, never lost.
"""

import ctypes
import logging
import os
from dataclasses import dataclass, field
from typing import List

import lmdb

from elemta.queue.ids import is_queue_id
from elemta.queue.index import QueueIndex, QueueRecord
from elemta.queue.model import INCOMING
from elemta.queue.store import CorruptSpoolFile, SpoolStore

log = logging.getLogger(__name__)

SYNC_METHODS = ("syncfs", "fsync")
DEFAULT_MAP_SIZE = 16 * 1024 ** 3   # address space only; the file grows as records are added
INDEX_NAME = "index.lmdb"
_BATCH = 1000                       # records per write transaction when rebuilding

_libc = ctypes.CDLL(None, use_errno=True)


def _syncfs(fd):
    """syncfs(2): flush the whole file system holding fd; reports write-back errors since
    this fd last asked (Linux >= 5.8). ctypes releases the GIL during the call."""
    if _libc.syncfs(fd) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, "syncfs: " + os.strerror(errno))


def _fsync_path(path, directory=False):
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECTORY if directory else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class ReconcileSummary:
    """What reconcile found and did."""
    tmp_removed: List[str] = field(default_factory=list)    # leftover temp files deleted
    corrupt: List[str] = field(default_factory=list)        # ids moved to corrupt/
    added: List[str] = field(default_factory=list)          # files given an index record
    dropped: List[str] = field(default_factory=list)        # records whose file was gone
    messages: int = 0                                       # messages in the queue after


class Queue:
    """One process's handle on the queue (open it after fork, never before)."""

    def __init__(self, spool_dir, sync_method="syncfs", map_size=DEFAULT_MAP_SIZE):
        if sync_method not in SYNC_METHODS:
            raise ValueError("sync_method must be one of %s" % (SYNC_METHODS,))
        self.sync_method = sync_method
        self.store = SpoolStore(spool_dir)
        self.spool_dir = self.store.spool_dir
        self._map_size = map_size
        # Opened first: syncfs on this fd reports write-back errors from now on.
        self._spool_fd = os.open(self.spool_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.index = self._open_index()

    def _open_index(self):
        return QueueIndex(os.path.join(self.spool_dir, INDEX_NAME), self._map_size,
                          metasync=self.sync_method == "fsync")

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    # -- accepting mail

    def start_message(self, envelope):
        """Open a spool file for a new message. Returns a SpoolWriter (write, finish, abort)."""
        return self.store.create(envelope)

    def commit(self, writers):
        """Make finished messages durable, all with about one flush. Blocking: run it in a
        thread. Returns when every file and index record is on disk; raises OSError (and
        leaves none of the batch accepted) otherwise."""
        writers = list(writers)
        for writer in writers:
            # Checked before anything moves: a roll-back must never touch an accepted message.
            if not writer.finished or writer.committed:
                raise ValueError("spool writer for %s is %s" % (
                    writer.queue_id, "already committed" if writer.committed else "not finished"))
        if len({id(w) for w in writers}) != len(writers):
            raise ValueError("the same spool writer appears twice in one commit")
        if not writers:
            return
        installed = []
        indexed = False
        try:
            if self.sync_method == "fsync":
                for writer in writers:
                    _fsync_path(writer.temp_path)
            for writer in writers:
                self.store.install(writer)
                installed.append(writer)
            if self.sync_method == "fsync":
                self._flush({self.store.directory(w.queue_id) for w in writers})
            records = [QueueRecord(w.envelope, INCOMING, 0, w.envelope.arrival, None)
                       for w in writers]
            indexed = True
            self._index_call(self.index.put_many, records)  # fully synced in fsync mode
            if self.sync_method == "syncfs":
                self._flush(())
        except BaseException:
            self._roll_back(writers, installed, indexed)
            raise

    def _index_call(self, method, *args, **kwargs):
        """Call an index method, turning LMDB's errors into OSError like the rest of commit."""
        try:
            return method(*args, **kwargs)
        except lmdb.Error as e:
            if isinstance(e, lmdb.PanicError):
                self._reopen_index()
            raise OSError("queue index: %s" % e) from e

    def _reopen_index(self):
        try:
            self.index.close()
        except lmdb.Error:
            pass
        self.index = self._open_index()

    def _flush(self, directories):
        """Make everything written so far durable (see the module docstring)."""
        if self.sync_method == "syncfs":
            _syncfs(self._spool_fd)
        else:
            for directory in sorted(directories):
                _fsync_path(directory, directory=True)

    def _roll_back(self, writers, installed, indexed):
        """Undo a failed commit: no 250 will be sent, so none of the batch may stay queued."""
        for writer in installed:
            try:
                self.store.remove(writer.queue_id)
            except OSError as e:
                log.error("queue: cannot remove %s after a failed commit: %s",
                          writer.queue_id, e)
            writer.committed = False
        if indexed:
            try:
                self._index_call(self.index.delete_many, [w.queue_id for w in writers])
            except OSError as e:
                # Harmless: reconcile drops records whose file is gone.
                log.error("queue: cannot remove index records after a failed commit: %s", e)
        for writer in writers:
            writer.abort()

    # -- start-up and repair

    def reconcile(self):
        """Bring files and index back in line after a crash; run at start-up before any
        process accepts mail. Returns a ReconcileSummary."""
        summary = ReconcileSummary()
        summary.tmp_removed = self.store.clean_tmp()
        for name in summary.tmp_removed:
            log.info("queue: removed leftover temp file %s (never acknowledged)", name)
        # Index first, then files: a message committed meanwhile is then seen on disk.
        indexed = set(self.index.iter_queue_ids())
        complete = {}
        for queue_id in self.store.iter_queue_ids():
            envelope = self._read_or_quarantine(queue_id, summary)
            if envelope is not None:
                complete[queue_id] = envelope
        missing_files = [qid for qid in sorted(indexed - set(complete))
                         if not os.path.exists(self.store.path(qid))]
        for start in range(0, len(missing_files), _BATCH):
            self._index_call(self.index.delete_many, missing_files[start:start + _BATCH])
        summary.dropped = missing_files
        for queue_id in missing_files:
            log.warning("queue: %s: index record without its file, dropped", queue_id)
        unindexed = sorted(set(complete) - indexed)
        summary.added = self._add_records([complete[qid] for qid in unindexed])
        for queue_id in summary.added:
            log.info("queue: %s: file without index record, queued again", queue_id)
        self._flush({self.store.corrupt_dir})
        summary.messages = len(complete)
        return summary

    def reindex(self):
        """Drop the index and rebuild it from the files (elemtactl queue reindex). Delivery
        state kept only in the index (attempts, hold) is lost: every message starts over as
        incoming. Returns the number of messages indexed."""
        summary = ReconcileSummary()
        self._index_call(self.index.clear)
        envelopes = []
        for queue_id in self.store.iter_queue_ids():
            envelope = self._read_or_quarantine(queue_id, summary)
            if envelope is not None:
                envelopes.append(envelope)
        self._add_records(envelopes)
        self._flush({self.store.corrupt_dir})
        return len(envelopes)

    def _read_or_quarantine(self, queue_id, summary):
        try:
            return self.store.read_envelope(queue_id)
        except FileNotFoundError:
            return None  # delivered and removed meanwhile
        except CorruptSpoolFile as e:
            target = self.store.quarantine(queue_id)
            log.warning("queue: %s; moved to %s (it was never acknowledged)", e, target)
            summary.corrupt.append(queue_id)
            return None

    def _add_records(self, envelopes):
        """Index envelopes as incoming, keeping any record that appeared meanwhile. Returns
        the ids added."""
        envelopes = sorted(envelopes, key=lambda e: e.queue_id)
        added = []
        for start in range(0, len(envelopes), _BATCH):
            batch = envelopes[start:start + _BATCH]
            records = [QueueRecord(e, INCOMING, 0, e.arrival, None) for e in batch]
            added.extend(self._index_call(self.index.put_many, records, replace=False))
        return added

    # -- reading

    def get(self, queue_id):
        """The index record (QueueRecord) for queue_id, or None. ValueError for a non-id."""
        if not is_queue_id(queue_id):
            raise ValueError("not a queue id: %r" % (queue_id,))
        return self.index.get(queue_id)

    def close(self):
        if self._spool_fd is not None:
            os.close(self._spool_fd)
            self._spool_fd = None
            self.index.close()
