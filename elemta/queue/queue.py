"""The durable queue: spool files and their index records, made durable together.

The facade every process uses (smtpd and pickup accept mail through start_message and commit,
the daemon runs reconcile at start-up before any worker accepts mail, elemtactl runs
reindex), and the only door to the index and its files: callers ask it (count_by_state,
next_due_time, records_matching, has_index, ...) and never touch QueueIndex. It owns the
durability rule: commit returns only once the message files, their renames into place and
their index records are on disk, so the 250 after DATA can be sent.
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
message and will send it again. A full file system or index (LMDB's MapFullError) is an
OSError with errno ENOSPC, which the smtpd answers 452 4.3.1 (see also elemta.queue.space). So commit removes what it had put in place (files first: the
files are the truth, and reconcile drops any index record left without its file). If the
removal itself cannot reach the disk before a crash, reconcile may bring the message back: it
is then delivered twice, never lost.

Admin actions (elemtactl queue hold, release, delete, requeue, flush) change the files first
and the index after, in batches of short write transactions, so they run safely beside the
daemon's processes:

    hold     creates the message's hold marker (store.hold_path) saying who held it and
             why (model.Hold: "admin" for elemtactl and the REST API), then sets state
             hold and the same Hold on the record;
    release  removes the marker, then sets incoming (never tried) or deferred, due now
             (the Hold is forgotten). The message is not scanned again: the content
             plugins ran when it was accepted, and delivery runs none of them;
    rescan   (release --rescan) runs a judge the caller gives (elemta.plugins.rescan:
             the content scanners) over a held message; it is released when the judge
             finds nothing, else it stays on hold with the judge's Hold;
    delete   removes the message file and marker, then the record (a crash in between leaves
             a record without a file, which reconcile drops; the other order could bring a
             deleted message back);
    requeue  removes any marker, then sets incoming, due now, attempts 0, every recipient
             not delivered pending again;
    flush    makes deferred messages due now (index only);
    set_priority  changes the priority (index only: reindex gives back the priority a
             message was accepted with, as it does attempts and next attempt).

Reading a message as stored goes through open_message (elemtactl queue cat, the REST API).

A message being delivered (active) may be held or deleted: the delivery worker must check
that its lease still stands before it writes the outcome. It is not released, requeued or
flushed: it is not waiting.

Delivery workers (elemta.delivery.worker) use these calls:

    claim          due messages become active, leased to the worker (one write transaction);
    claim_ids      the same for named waiting messages, due or not (elemtactl drain --to);
    reclaim        active messages whose lease lapsed (worker killed) become deferred, due
                   now: at worst a message is sent twice, never lost;
    free_gone_leases  the same at once for the messages of a holder that has certainly
                   ended (elemta.queue.holders: same host, no such process, or its pid
                   reused); a live holder, however stuck, keeps its leases;
    renew_leases   a live worker extends the leases of deliveries still under way, so a
                   slow delivery is never taken for a dead worker's;
    record_attempts the outcomes of attempts, per recipient, for a batch of messages in one
                   write transaction made durable before anything else happens to them. A delivered recipient
                   becomes sent whoever holds the lease (it must never be sent again); the
                   message's state changes only if the lease is still this worker's (an admin
                   may have held or deleted it meanwhile). When every recipient is sent, the
                   file is removed first, then the record (a crash in between leaves a record
                   without a file, which reconcile drops, and whose recipients are all sent,
                   so a worker that claims it only removes it). With forget_later the
                   records are not deleted there: the caller passes their ids as `forget`
                   to its next record_attempts (one write transaction and flush fewer per
                   batch, so the next batch's results are durable sooner) or to forget().
"""

import ctypes
import errno
import logging
import os
import time
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import lmdb

from elemta.queue import holders, listing
from elemta.queue.ids import is_queue_id
from elemta.queue.index import (DEFAULT_MAP_SIZE, INDEX_NAME, Listed, QueueIndex, QueueRecord,
                                index_exists)
from elemta.queue.listing import Selection, Shape
from elemta.queue.model import (ACTIVE, BOUNCED, DEFERRED, FAILED, HOLD, INCOMING, PENDING,
                                RCPT_DEFERRED, SENT, Hold, priority_error)
from elemta.queue.priority import PriorityRules
from elemta.queue.space import free_bytes
from elemta.queue.store import CorruptSpoolFile, SpoolStore
from elemta.queue.transitions import move
from elemta.util.text import printable

# "elemta/queue[pid]: QUEUEID: ...", whichever process (or elemtactl) acts on the queue.
log = logging.getLogger("elemta.queue")


def log_queued(queue_id, sender, size, nrcpt, note="", client=None):
    """A message's "QUEUEID: from=<...>, size=N, nrcpt=N (queue active)" line, whoever
    queued it (smtpd, pickup, a bounce): under the queue's name, as Postfix's qmgr
    writes it, so pflogsumm counts its sender and size; note: ", priority=N" or ""."""
    sender = printable(sender)
    log.info("%s: from=<%s>, size=%d, nrcpt=%d%s (queue active)", queue_id, sender, size,
             nrcpt, note, extra={"event": "queued", "queue_id": queue_id, "from": sender,
                                 "size": size, "nrcpt": nrcpt, "client": client})

SYNC_METHODS = ("syncfs", "fsync")
_BATCH = 1000                       # records per write transaction when rebuilding
ACTION_BATCH = 500                  # messages per write transaction for admin actions

# Outcomes of admin actions, as elemtactl prints them after the queue id.
HELD = "placed on hold"
ALREADY_HELD = "already on hold"
RELEASED = "released from hold"
NOT_HELD = "not on hold"
RESCANNED_CLEAN = "rescanned: nothing found; released from hold"
STILL_HELD = "rescanned: still on hold"        # + ": held by WHO: REASON"
# Who holds a message an admin holds (elemtactl queue hold, the REST API).
ADMIN = "admin"
DELETED = "deleted"
REQUEUED = "requeued"
FLUSHED = "due now"
ALREADY_DUE = "already due"
BEING_DELIVERED = "being delivered now, left alone"
NOT_FLUSHED = {HOLD: "on hold, left alone (release it first)",
               FAILED: "failed, left alone (requeue it to try again)"}
NO_SUCH_MESSAGE = "no such message"
PRIORITY_CHANGED = "priority changed"
PRIORITY_UNCHANGED = "priority unchanged (already that)"
# A delivery worker has it: while it waits for a connection to its destination the worker
# reads the new priority within a second (elemta.delivery.concurrency); a delivery already
# under way goes on.
PRIORITY_CHANGED_ACTIVE = ("priority changed; being delivered now: counts for its place in "
                           "line for a connection, and for its next attempt")

# Outcomes of Queue.record_attempt.
ATTEMPT_REMOVED = "removed"          # every recipient sent: file and record gone
ATTEMPT_DEFERRED = "deferred"        # some recipients wait for next_attempt
ATTEMPT_FAILED = "failed"            # nothing left to try, some recipients bounced
ATTEMPT_LEASE_LOST = "lease lost"    # held, or reclaimed by another worker: statuses only
ATTEMPT_GONE = "gone"                # deleted meanwhile
LEASE_LAPSED = "delivery worker stopped before it finished (lease lapsed); retrying"
HOLDER_GONE = "delivery worker died before it finished; retrying"

# Delivery results kept per message for `queue show` (the oldest go first).
HISTORY_LIMIT = 100

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass
class Attempt:
    """The outcome of one delivery attempt of one claimed message (record_attempts)."""
    queue_id: str
    results: Dict[int, Tuple[str, str, str]]     # index -> (status, reply, relay)
    next_attempt: float                          # when still-waiting recipients try again
    last_error: Optional[str]                    # the reason shown by mailq
    when: float = field(default_factory=time.time)
    delay_warned: bool = False                   # a delay warning goes out for it now


# Below this many free bytes, a failed index write counts as a full file system: LMDB
# reports a short page write as EIO ("Input/output error"), not ENOSPC.
NEARLY_FULL = 1024 * 1024


def _no_space(text):
    """An OSError with errno ENOSPC (the smtpd answers it 452 4.3.1) that reads as text."""
    error = OSError(text)
    error.errno = errno.ENOSPC
    return error


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


class NoSuchMessage(LookupError):
    """The queue holds no message with this id (args[0])."""


@dataclass
class ReconcileSummary:
    """What reconcile found and did."""
    tmp_removed: List[str] = field(default_factory=list)    # leftover temp files deleted
    corrupt: List[str] = field(default_factory=list)        # ids moved to corrupt/
    added: List[str] = field(default_factory=list)          # files given an index record
    dropped: List[str] = field(default_factory=list)        # records whose file was gone
    held: List[str] = field(default_factory=list)           # hold marker, record said otherwise
    released: List[str] = field(default_factory=list)       # record said hold, no marker
    stale_markers: List[str] = field(default_factory=list)  # hold markers without a message
    reclaimed: List[str] = field(default_factory=list)      # were active: due again
    messages: int = 0                                       # messages in the queue after

    def __str__(self):
        """One sentence for the log: "5 messages, nothing repaired", or what was."""
        repairs = [(len(ids), singular, plural) for ids, singular, plural in (
            (self.tmp_removed, "leftover temp file removed", "leftover temp files removed"),
            (self.corrupt, "corrupt file moved to corrupt/",
             "corrupt files moved to corrupt/"),
            (self.added, "file without index record queued again",
             "files without index records queued again"),
            (self.dropped, "index record without its file dropped",
             "index records without their files dropped"),
            (self.held, "put on hold (hold marker)", "put on hold (hold markers)"),
            (self.released, "released (no hold marker)", "released (no hold markers)"),
            (self.stale_markers, "stale hold marker removed", "stale hold markers removed"),
            (self.reclaimed, "message that was being delivered due again",
             "messages that were being delivered due again"),
        ) if ids]
        done = ", ".join("%d %s" % (count, singular if count == 1 else plural)
                         for count, singular, plural in repairs)
        return "%d message%s, %s" % (self.messages, "" if self.messages == 1 else "s",
                                     done or "nothing repaired")


class Queue:
    """One process's handle on the queue (open it after fork, never before)."""

    @staticmethod
    def has_index(spool_dir) -> bool:
        """True if spool_dir holds a queue index (elemtactl refuses to make one unasked)."""
        return index_exists(os.path.join(spool_dir, INDEX_NAME))

    def __init__(self, spool_dir, sync_method="syncfs", map_size=DEFAULT_MAP_SIZE,
                 priority_rules=()):
        if sync_method not in SYNC_METHODS:
            raise ValueError("sync_method must be one of %s" % (SYNC_METHODS,))
        self.sync_method = sync_method
        self.priority_rules = PriorityRules(priority_rules)
        self.store = SpoolStore(spool_dir)
        self.spool_dir = self.store.spool_dir
        self._map_size = map_size
        # Opened first: syncfs on this fd reports write-back errors from now on.
        self._spool_fd = os.open(self.spool_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.index = self._open_index()

    @classmethod
    def from_config(cls, queue_config, **overrides):
        """The Queue a [queue] configuration section (elemta.config.schema.QueueSettings)
        names; overrides (spool_dir, sync_method, map_size, priority_rules) win over the
        section's values."""
        settings = dict(spool_dir=queue_config.spool_dir,
                        sync_method=queue_config.sync_method,
                        map_size=queue_config.index_map_size,
                        priority_rules=queue_config.priority_rules)
        settings.update(overrides)
        return cls(**settings)

    def _open_index(self):
        return QueueIndex(os.path.join(self.spool_dir, INDEX_NAME), self._map_size,
                          metasync=self.sync_method == "fsync")

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    # -- accepting mail

    def start_message(self, envelope, listener=None):
        """Open a spool file for a new message. Returns a SpoolWriter (write, finish, abort).
        The first of queue.priority_rules that matches sets envelope.priority first
        (elemta.queue.priority); listener: the config Listener it came in on, or
        priority.SENDMAIL_LISTENER, or None for a message Elemta makes itself."""
        priority = self.priority_rules.priority_for(envelope, listener)
        if priority is not None:
            envelope.priority = priority
        return self.store.create(envelope)

    def add(self, envelope, chunks) -> str:
        """Queue one whole message made here (a bounce, a forwarded copy): its content
        from the byte strings `chunks`, committed alone. Blocking. Returns its queue id;
        nothing is left behind if it raises."""
        writer = self.start_message(envelope)
        try:
            for chunk in chunks:
                writer.write(chunk)
            writer.finish()
            self.commit([writer])
        except BaseException:
            writer.abort()
            raise
        # Its first line in the log, as smtpd's and pickup's for theirs, so that grep
        # QUEUEID follows a bounce or a forwarded copy from its start too.
        log_queued(writer.queue_id, envelope.sender, writer.size, len(envelope.recipients))
        return writer.queue_id

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
            held = [w for w in writers if w.hold]
            for writer in held:
                # The marker before the record: a crash in between leaves a held message
                # (reconcile trusts markers), never one delivery could claim.
                self.store.mark_held(writer.queue_id, writer.hold)
            for writer in writers:
                self.store.install(writer)
                installed.append(writer)
            if self.sync_method == "fsync":
                self._flush({self.store.directory(w.queue_id) for w in writers}
                            | ({self.store.hold_dir} if held else set()))
            records = [QueueRecord(w.envelope, HOLD if w.hold else INCOMING, 0,
                                   w.envelope.arrival, None, hold=w.hold or None)
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
            try:
                return method(*args, **kwargs)
            except lmdb.MapFullError:
                # The transaction was aborted; the environment stays usable (no reopening
                # or resizing needed). Pages the last write freed are reused only from
                # the next-but-one write on: one small write, then try once more.
                self.index.nudge()
                return method(*args, **kwargs)
        except lmdb.MapFullError as e:
            raise _no_space("queue index full (queue.index_map_size is %d bytes)"
                            % self._map_size) from e
        except lmdb.DiskError as e:          # py-lmdb's ENOSPC: the file system is full
            raise _no_space("queue index: %s" % e) from e
        except lmdb.Error as e:
            if isinstance(e, lmdb.PanicError):
                self._reopen_index()
            if self._nearly_full():
                raise _no_space("queue index: %s (the file system is full)" % e) from e
            raise OSError("queue index: %s" % e) from e

    def _nearly_full(self):
        try:
            return free_bytes(self.spool_dir) < NEARLY_FULL
        except OSError:
            return False

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
            if writer.hold:
                self.store.unmark_held(writer.queue_id)
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
            log.warning("%s: index record without its file, dropped", queue_id)
        unindexed = sorted(set(complete) - indexed)
        summary.added = self._add_records([complete[qid] for qid in unindexed])
        for queue_id in summary.added:
            log.info("%s: file without index record, queued again", queue_id)
        self._reconcile_hold(set(complete), summary)
        # No delivery worker runs yet: whatever was being delivered is due again. A
        # restart or power loss is not the message's doing: no orphan backoff.
        summary.reclaimed = self._index_call(self.index.reclaim, float("inf"), LEASE_LAPSED,
                                             orphaning=False)
        self._flush({self.store.corrupt_dir, self.store.hold_dir})
        summary.messages = len(complete)
        return summary

    def _reconcile_hold(self, queue_ids, summary):
        """Make the index's hold state match the hold markers (the truth)."""
        markers = set(self.store.iter_held())
        summary.stale_markers = sorted(
            qid for qid in markers - queue_ids if not os.path.exists(self.store.path(qid)))
        for queue_id in summary.stale_markers:
            self.store.unmark_held(queue_id)
        markers -= set(summary.stale_markers)
        held_in_index = set(self.index.iter_state_ids(HOLD))
        summary.held = self._change(
            sorted(markers - held_in_index),
            lambda record: _holder(self.store.read_hold(record.queue_id)
                                   or Hold("unknown"))(record),
            HELD)
        summary.released = self._change(sorted(held_in_index - markers),
                                        _releaser(time.time()), RELEASED)
        for queue_id in summary.held:
            log.info("%s: on hold (hold marker), index said otherwise", queue_id)
        for queue_id in summary.released:
            log.info("%s: index said hold but there is no hold marker, released",
                     queue_id)

    def reindex(self):
        """Drop the index and rebuild it from the files (elemtactl queue reindex). Delivery
        state kept only in the index (attempts, next attempt) is lost: every message starts
        over as incoming, except those with a hold marker, which stay on hold. Returns the
        number of messages indexed."""
        summary = ReconcileSummary()
        self._index_call(self.index.clear)
        envelopes = []
        for queue_id in self.store.iter_queue_ids():
            envelope = self._read_or_quarantine(queue_id, summary)
            if envelope is not None:
                envelopes.append(envelope)
        self._add_records(envelopes)
        self._reconcile_hold({e.queue_id for e in envelopes}, summary)
        self._flush({self.store.corrupt_dir, self.store.hold_dir})
        return len(envelopes)

    def _read_or_quarantine(self, queue_id, summary):
        try:
            return self.store.read_envelope(queue_id)
        except FileNotFoundError:
            return None  # delivered and removed meanwhile
        except CorruptSpoolFile as e:
            target = self.store.quarantine(queue_id)
            # e names the queue id first: "QUEUEID: content checksum mismatch".
            log.warning("%s; moved to %s (it was never acknowledged)", e, target)
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

    # -- admin actions (elemtactl queue ...): files first, then the index

    def hold(self, queue_ids: Iterable[str], by: str = ADMIN,
             reason: str = "") -> Iterator[Tuple[str, str]]:
        """Put messages on hold, `by` holding them for `reason` (a message already on hold
        keeps who held it first and why). Yields (queue_id, outcome) as each batch is
        done."""
        hold = Hold(by, reason, time.time())
        for batch in _batches(queue_ids):
            found = self._index_call(self.index.get_many, batch)
            present = [qid for qid in batch if qid in found]
            for queue_id in present:
                self.store.mark_held(queue_id, hold)
            self._flush({self.store.hold_dir})
            outcomes = self._index_call(self.index.update_many, present, _holder(hold))
            for queue_id in present:
                if outcomes[queue_id] is None:   # delivered or deleted meanwhile
                    self.store.unmark_held(queue_id)
            self._flush(())
            yield from _report(batch, outcomes)

    def release(self, queue_ids: Iterable[str],
                now: Optional[float] = None) -> Iterator[Tuple[str, str]]:
        """Take messages off hold: due now, incoming if never tried, else deferred. Yields
        (queue_id, outcome)."""
        release = _releaser(now or time.time())
        for batch in _batches(queue_ids):
            for queue_id in batch:
                self.store.unmark_held(queue_id)
            self._flush({self.store.hold_dir})
            outcomes = self._index_call(self.index.update_many, batch, release)
            self._flush(())
            yield from _report(batch, outcomes)

    def rehold(self, queue_ids: Iterable[str], hold: Hold) -> Iterator[Tuple[str, str]]:
        """Give held messages a new Hold (who, why): a rescan that still finds something.
        A message not on hold is left alone. Yields (queue_id, outcome)."""
        for batch in _batches(queue_ids):
            found = self._index_call(self.index.get_many, batch)
            for queue_id, record in found.items():
                if record.state == HOLD:
                    self.store.mark_held(queue_id, hold, replace=True)
            self._flush({self.store.hold_dir})
            outcomes = self._index_call(self.index.update_many, batch, _reholder(hold))
            self._flush(())
            for queue_id in batch:
                outcome = outcomes.get(queue_id) or NO_SUCH_MESSAGE
                if outcome.startswith(STILL_HELD):
                    log.info("%s: %s (admin action)", queue_id, outcome)
                yield queue_id, outcome

    def delete(self, queue_ids: Iterable[str],
               why: Optional[str] = "admin action") -> Iterator[Tuple[str, str]]:
        """Delete messages: their files first, then their records. Yields (queue_id,
        outcome). Each message deleted is logged "QUEUEID: removed (why)", unless why is
        None (a caller that logs its own line)."""
        for batch in _batches(queue_ids):
            removed = set()
            for queue_id in batch:
                if self.store.remove(queue_id):
                    removed.add(queue_id)
                self.store.unmark_held(queue_id)
            self._flush({self.store.directory(qid) for qid in batch} | {self.store.hold_dir})
            existed = self._index_call(self.index.delete_many_ids, batch)
            self._flush(())
            for queue_id in batch:
                deleted = queue_id in removed or queue_id in existed
                if deleted and why:
                    log.info("%s: removed (%s)", queue_id, why)
                yield queue_id, DELETED if deleted else NO_SUCH_MESSAGE

    def requeue(self, queue_ids: Iterable[str],
                now: Optional[float] = None) -> Iterator[Tuple[str, str]]:
        """Start messages over: incoming, due now, attempts 0, every recipient not yet
        delivered pending again (so a failed message is tried again). Yields (queue_id,
        outcome)."""
        requeue = _requeuer(now or time.time())
        for batch in _batches(queue_ids):
            found = self._index_call(self.index.get_many, batch)
            for queue_id, record in found.items():
                if record.state != ACTIVE:
                    self.store.unmark_held(queue_id)
            self._flush({self.store.hold_dir})
            outcomes = self._index_call(self.index.update_many, batch, requeue)
            self._flush(())
            yield from _report(batch, outcomes)

    def flush(self, queue_ids: Iterable[str],
                now: Optional[float] = None) -> Iterator[Tuple[str, str]]:
        """Make deferred messages due now. Yields (queue_id, outcome)."""
        flush = _flusher(now or time.time())
        for batch in _batches(queue_ids):
            outcomes = self._index_call(self.index.update_many, batch, flush)
            self._flush(())
            yield from _report(batch, outcomes)

    def set_priority(self, queue_ids: Iterable[str],
                     priority: int) -> Iterator[Tuple[str, str]]:
        """Give messages a priority (model.PRIORITY_MIN to PRIORITY_MAX; higher is
        delivered sooner among messages due now). Index only, like flush: `queue reindex`
        gives each message back the priority it was accepted with. Yields (queue_id,
        outcome). ValueError for a priority out of range."""
        problem = priority_error(priority)
        if problem:
            raise ValueError(problem)
        change = _prioritiser(priority)
        for batch in _batches(queue_ids):
            outcomes = self._index_call(self.index.update_many, batch, change)
            self._flush(())
            yield from _report(batch, outcomes, priority)

    def _change(self, queue_ids, change, wanted):
        """Apply an index change in batches; returns the ids whose outcome is `wanted`."""
        done = []
        for batch in _batches(queue_ids):
            outcomes = self._index_call(self.index.update_many, batch, change)
            done.extend(qid for qid in batch if outcomes[qid] == wanted)
        return done

    # -- delivery workers: claim, reclaim, record_attempt

    def claim(self, owner: str, limit: int, lease_seconds: float,
              now: Optional[float] = None) -> List[QueueRecord]:
        """Take up to `limit` due messages for `owner` (see QueueIndex.claim)."""
        return self._index_call(self.index.claim, owner, now or time.time(), lease_seconds,
                                limit)

    def claim_ids(self, owner: str, queue_ids: Iterable[str], lease_seconds: float,
                  now: Optional[float] = None) -> List[QueueRecord]:
        """Take the named messages that wait (incoming or deferred, due or not) for
        `owner`, leased as claim leases them, in one write transaction: elemtactl drain
        hands a node's queue over at once, whenever each message was due. A message
        active, held, failed or gone is left as it is. Returns the records taken."""
        now = now or time.time()
        taken = []

        def take(record):
            if record.state not in (INCOMING, DEFERRED):
                return None, False
            move(record, ACTIVE)
            record.lease_owner, record.lease_expires = owner, now + lease_seconds
            taken.append(record)
            return ACTIVE, True
        self._index_call(self.index.update_many, list(queue_ids), take)
        return taken

    def reclaim(self, now: Optional[float] = None,
                retry_delay: Callable[[int], float] = lambda orphaned: 0.0) -> List[str]:
        """Return messages whose lease lapsed to the queue, due after
        retry_delay(orphaned) (see QueueIndex.reclaim). Returns their ids."""
        return self._index_call(self.index.reclaim, now or time.time(), LEASE_LAPSED,
                                retry_delay)

    def free_gone_leases(self, retry_delay: Callable[[int], float] = lambda orphaned: 0.0
                         ) -> List[Tuple[str, str, float]]:
        """Return the messages of lease holders that have ended (a killed delivery worker)
        to the queue, due after retry_delay(orphaned) (see QueueIndex.free_leases).
        Returns (queue id, holder name, next attempt) of each."""
        return self._index_call(self.index.free_leases, holders.holder_gone, HOLDER_GONE,
                                retry_delay)

    def release_claims(self, owner: str, queue_ids: Iterable[str]) -> List[str]:
        """Give back messages `owner` claimed but will not finish (a worker stopping): due
        now, deferred, if the lease is still its own. Returns the ids given back."""
        now = time.time()

        def give_back(record):
            if record.state != ACTIVE or record.lease_owner != owner:
                return None, False
            move(record, DEFERRED)
            record.next_attempt = now
            record.lease_owner, record.lease_expires = None, 0.0
            record.last_error = "delivery interrupted by a stopping worker; retrying"
            return RELEASED, True
        outcomes = self._index_call(self.index.update_many, list(queue_ids), give_back)
        return [qid for qid, outcome in outcomes.items() if outcome == RELEASED]

    def renew_leases(self, owner: str, queue_ids: Iterable[str], lease_seconds: float,
                     now: Optional[float] = None) -> List[str]:
        """Extend the leases `owner` still holds on queue_ids (deliveries still under way)
        to now + lease_seconds, in one write transaction. Returns the ids renewed; a
        message held, deleted or reclaimed meanwhile is not."""
        expires = (now or time.time()) + lease_seconds

        def renew(record):
            if record.state != ACTIVE or record.lease_owner != owner:
                return None, False
            record.lease_expires = expires
            return "renewed", True
        outcomes = self._index_call(self.index.update_many, list(queue_ids), renew)
        return [qid for qid, outcome in outcomes.items() if outcome == "renewed"]

    def purge_failed(self, before: float, limit: int = ACTION_BATCH) -> List[str]:
        """Remove up to `limit` failed messages whose last delivery result came before
        `before` (delivery.failed_retention: they were bounced and kept for the admin).
        Blocking. Returns their ids."""
        old = []
        for record in self.index.iter_records(FAILED):
            finished = record.history[-1][0] if record.history else record.envelope.arrival
            if finished < before:
                old.append(record.queue_id)
                if len(old) >= limit:
                    break
        return [qid for qid, outcome in self.delete(old, why=None) if outcome == DELETED]

    def record_attempt(self, owner: str, queue_id: str,
                       results: Dict[int, Tuple[str, str, str]], next_attempt: float,
                       last_error: Optional[str]) -> str:
        """record_attempts for one message. Returns its ATTEMPT_* outcome."""
        return self.record_attempts(
            owner, [Attempt(queue_id, results, next_attempt, last_error)])[queue_id]

    def record_attempts(self, owner: str, attempts: List["Attempt"],
                        forget: Iterable[str] = (),
                        forget_later: bool = False) -> Dict[str, str]:
        """Write the outcomes of delivery attempts of messages `owner` claimed, all in one
        write transaction and one flush (blocking: the delivery worker runs it in a thread
        for a whole batch of finished deliveries, as the smtpd's group commit does).

        Per attempt, results: {index into envelope.recipients: (new status, reply, relay)}.
        Recipients left pending or deferred make the message deferred until next_attempt
        (attempts + 1); with none left it is removed (all sent) or failed (some bounced).
        Each result is added to the message's history (queue show). Durable when it
        returns. Returns {queue_id: ATTEMPT_* outcome}.

        forget: records whose files an earlier call removed (forget_later), deleted in
        the same transaction. forget_later: leave the records of removed messages for
        the caller to forget (see the module docstring)."""
        by_id = {attempt.queue_id: attempt for attempt in attempts}

        def change(record):
            attempt = by_id[record.queue_id]
            recipients = record.envelope.recipients
            for index, (status, reply, relay) in sorted(attempt.results.items()):
                if index < len(recipients) and recipients[index].status != SENT:
                    recipients[index].status = status
                    recipients[index].last_reply = reply
                    record.history.append(
                        [round(attempt.when, 3), recipients[index].address, status, relay,
                         reply])
            del record.history[:-HISTORY_LIMIT]
            record.delay_warned = record.delay_warned or attempt.delay_warned
            if record.state != ACTIVE or record.lease_owner != owner:
                return ATTEMPT_LEASE_LOST, True
            record.attempts += 1
            record.orphaned = 0
            record.last_error = attempt.last_error
            if all(r.status == SENT for r in recipients):
                # Stays active and leased until its record is deleted (below, or with
                # the caller's next batch): nobody else claims it meanwhile.
                return ATTEMPT_REMOVED, True
            record.lease_owner, record.lease_expires = None, 0.0
            if any(r.status in (PENDING, RCPT_DEFERRED) for r in recipients):
                move(record, DEFERRED)
                record.next_attempt = attempt.next_attempt
                return ATTEMPT_DEFERRED, True
            move(record, FAILED)
            return ATTEMPT_FAILED, True
        outcomes = self._index_call(self.index.update_many, list(by_id), change,
                                    [qid for qid in forget if qid not in by_id])
        if self.sync_method == "syncfs":
            self._index_call(self.index.sync)
        removed = [qid for qid, outcome in outcomes.items() if outcome == ATTEMPT_REMOVED]
        for queue_id in removed:
            self.store.remove(queue_id)
            self.store.unmark_held(queue_id)
        if removed and not forget_later:
            self.forget(removed)
        return {qid: ATTEMPT_GONE if outcome is None else outcome
                for qid, outcome in outcomes.items()}

    def forget(self, queue_ids: Iterable[str]):
        """Delete the records of messages whose files record_attempts removed."""
        self._index_call(self.index.delete_many, list(queue_ids))

    # -- reading: what callers ask of the index, so none of them reaches into it

    def get(self, queue_id):
        """The index record (QueueRecord) for queue_id, or None. ValueError for a non-id."""
        if not is_queue_id(queue_id):
            raise ValueError("not a queue id: %r" % (queue_id,))
        return self.index.get(queue_id)

    def open_message(self, queue_id: str) -> Tuple[QueueRecord, BinaryIO]:
        """(index record, content) of a queued message, for reading it as stored
        (elemtactl queue cat, the REST API): content is a binary file over the content
        alone, which the caller closes; reading it to its end checks its CRC
        (CorruptSpoolFile). The spool file is opened without following a link and must
        be a plain file (elemta.queue.store), whoever runs this. Raises ValueError for
        what is not a queue id (a path, say), NoSuchMessage for an id the queue does not
        hold (never accepted, or delivered or deleted meanwhile), UnsafePath (an
        OSError) for a link or other thing planted in its place."""
        if not is_queue_id(queue_id):
            raise ValueError("not a queue id: %r" % (queue_id,))
        record = self.index.get(queue_id)
        if record is None:
            raise NoSuchMessage(queue_id)
        try:
            return record, self.store.open_content(queue_id)
        except FileNotFoundError:
            raise NoSuchMessage(queue_id) from None

    def count_by_state(self) -> Dict[str, int]:
        """{state: number of messages} for the states that have any."""
        return self.index.count_by_state()

    def oldest_arrival_by_state(self) -> Dict[str, float]:
        """{state: arrival (time.time()) of its oldest message} for the states that have
        any."""
        return self.index.oldest_arrival_by_state()

    def next_due_time(self) -> Optional[float]:
        """When (time.time()) the soonest incoming or deferred message is due, or None if
        none waits."""
        due = self.index.iter_due()
        try:
            first = next(due, None)
        finally:
            due.close()                 # ends its read transaction now
        return None if first is None else first[0]

    def records_matching(self, selection: Selection) -> Iterator[QueueRecord]:
        """The records a listing Selection picks, in queue id (arrival) order, streamed."""
        return listing.iter_records(self.index, selection)

    def listed_matching(self, selection: Selection) -> Iterator[Listed]:
        """What mailq shows of the messages a Selection picks, in queue id order,
        streamed (from the Briefs unless the selection looks at addresses)."""
        return listing.iter_listed(self.index, selection)

    def ids_matching(self, selection: Selection) -> Iterator[str]:
        """The queue ids a listing Selection picks, in id order, streamed."""
        return listing.iter_ids(self.index, selection)

    def summarise(self, selection: Selection, by_sender: bool = False) -> Shape:
        """The selected messages counted by state and by domain and age (qshape)."""
        return listing.summarise(self.index, selection, by_sender=by_sender)

    def close(self):
        if self._spool_fd is not None:
            os.close(self._spool_fd)
            self._spool_fd = None
            self.index.close()


# -- the index changes behind the admin actions: change(record) -> (outcome, changed)

def _holder(hold):
    def hold_it(record):
        if record.state == HOLD:
            if record.hold is None:     # held by an Elemta that kept no reason
                record.hold = hold
                return ALREADY_HELD, True
            return ALREADY_HELD, False
        move(record, HOLD)
        record.hold = hold
        return HELD, True
    return hold_it


def _reholder(hold):
    def rehold(record):
        if record.state != HOLD:
            return NOT_HELD, False
        record.hold = hold
        return "%s: %s" % (STILL_HELD, hold.describe()), True
    return rehold


def _releaser(now):
    def release(record):
        if record.state != HOLD:
            return NOT_HELD, False
        move(record, DEFERRED if record.attempts else INCOMING)
        record.next_attempt = now
        record.orphaned = 0         # the admin's "try now": no orphan backoff carried over
        return RELEASED, True
    return release


def _requeuer(now):
    def requeue(record):
        if record.state == ACTIVE:
            return BEING_DELIVERED, False
        move(record, INCOMING)
        record.attempts, record.next_attempt = 0, now
        record.last_error, record.orphaned = None, 0
        for recipient in record.envelope.recipients:
            if recipient.status in (RCPT_DEFERRED, BOUNCED):
                recipient.status = PENDING
        return REQUEUED, True
    return requeue


def _prioritiser(priority):
    def prioritise(record):
        if record.envelope.priority == priority:
            return PRIORITY_UNCHANGED, False
        record.envelope.priority = priority
        return (PRIORITY_CHANGED_ACTIVE if record.state == ACTIVE else PRIORITY_CHANGED), True
    return prioritise


def _flusher(now):
    def flush(record):
        if record.state == ACTIVE:
            return BEING_DELIVERED, False
        if record.state == INCOMING:
            return ALREADY_DUE, False
        if record.state != DEFERRED:
            return NOT_FLUSHED.get(record.state, record.state + ", left alone"), False
        record.next_attempt = now
        return FLUSHED, True
    return flush


def _batches(items, size=ACTION_BATCH):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# What an admin's action (elemtactl queue, the REST API) logs for each message it changed,
# in postsuper's words, so that grep QUEUEID shows who took a message off its course.
_ADMIN_LOG = {HELD: "placed on hold", RELEASED: "released from hold", REQUEUED: "requeued",
              FLUSHED: "made due now"}


def _report(batch, outcomes, priority=None):
    for queue_id in batch:
        outcome = outcomes.get(queue_id) or NO_SUCH_MESSAGE
        if outcome in _ADMIN_LOG:
            log.info("%s: %s (admin action)", queue_id, _ADMIN_LOG[outcome])
        elif outcome in (PRIORITY_CHANGED, PRIORITY_CHANGED_ACTIVE):
            log.info("%s: priority set to %d (admin action)", queue_id, priority)
        yield queue_id, outcome
