"""The queue index: an LMDB environment at spool_dir/index.lmdb.

The only module that knows the index record format. Every process that schedules, lists or
changes queued messages opens its own QueueIndex after fork (smtpd and pickup add records,
delivery claims them, elemtactl lists and changes them); LMDB lets several processes write,
one write transaction at a time, so every write here is one short transaction. The spool
files are the truth: elemta.queue.queue.Queue.reindex rebuilds this index from
elemta.queue.store. See also elemta.queue.model.

Named databases, kept consistent with each other in every write transaction (all writes go
through _put and _delete; a new writer must too):

    messages   qid (ASCII) -> one JSON object: every Envelope field, plus "state",
               "attempts", "next_attempt" (seconds since the epoch), "last_error",
               "history" (each recipient's delivery results, oldest first), for
               an active message its lease: "lease_owner" and "lease_expires", and
               for a held one "hold": {"by", "reason", "since"} (model.Hold; absent
               in records written before it existed, which read as a hold of
               unknown origin)
    due        1 byte of priority (PRIORITY_MAX - priority: the highest sorts first) +
               8-byte big-endian next_attempt in milliseconds + qid -> b"", for exactly
               the messages in state incoming or deferred: one run of keys per priority,
               soonest first within it, so delivery workers find the due work of the
               highest priority first by looking at the start of each run (claim)
    by_state   state name + b":" + qid -> a Brief packed in a few bytes (size, arrival,
               sender domain, waiting recipients' domains with counts), so a state of a
               queue of a million messages is counted and summarised without
               decoding a million JSON records
    listing    the same keys -> what mailq shows of the message: size and arrival as in
               by_state, then NUL-separated UTF-8 text: the sender, then a delay reason
               and an address per waiting recipient, control characters shown as "?"
               (elemta.util.text.printable), so a state is listed without decoding its
               JSON records either

The main database holds those four and one key of ours, elemta-nudge (see nudge: after
a MapFullError it makes the pages freed by the last write reusable).
"""

import heapq
import json
import os
import struct
import time
from bisect import bisect_left
from collections import Counter
from functools import partial
from itertools import islice
from operator import itemgetter
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Tuple

import lmdb

from elemta.queue.model import (ACTIVE, BOUNCED, DEFERRED, FAILED, HOLD, INCOMING, PENDING,
                                PRIORITY_MAX, PRIORITY_MIN, SENT, STATES, Envelope, Hold,
                                Recipient)
from elemta.queue.store import envelope_from_dict, envelope_to_dict
from elemta.queue.transitions import move
from elemta.util.text import printable

INDEX_NAME = "index.lmdb"            # the index's directory, inside the spool directory
DEFAULT_MAP_SIZE = 16 * 1024 ** 3   # address space only; the file grows as records are added
DUE_STATES = (INCOMING, DEFERRED)
_RECORD_FIELDS = ("state", "attempts", "next_attempt", "last_error", "lease_owner",
                  "lease_expires", "history", "delay_warned", "orphaned")
_MS = struct.Struct(">Q")
_DUE_HEAD = 1 + _MS.size                # priority byte, due time
_OLD_DUE_KEY = _MS.size + 20            # a due key before priorities (time + qid)
_BRIEF_HEAD = struct.Struct(">Qd")      # size, arrival
_STATE_SEP = b":"
# Records per read transaction when iterating: readers never pin old pages for long, so
# the index does not grow while an admin pages through a listing.
SCAN_CHUNK = 1000
# Briefs per read transaction when only counting them (tally_briefs): a few milliseconds
# of reading each.
TALLY_CHUNK = 20000
# A key of the main database (where LMDB keeps the named ones), written by nudge().
_NUDGE_KEY = b"elemta-nudge"
# LMDB's two files in the index directory.
_DATA_FILE = "data.mdb"
_LOCK_FILE = "lock.mdb"


@dataclass
class QueueRecord:
    """What the index knows about one message: its envelope and its delivery state."""
    envelope: Envelope
    state: str = INCOMING
    attempts: int = 0
    next_attempt: float = 0.0            # time.time() of the next delivery attempt
    last_error: Optional[str] = None
    lease_owner: Optional[str] = None    # the delivery worker that claimed it (state active)
    lease_expires: float = 0.0           # time.time() after which the claim lapses
    # Delivery results, oldest first: [time, recipient, status, relay, reply] each.
    history: List[list] = field(default_factory=list)
    delay_warned: bool = False           # the sender was told delivery is delayed
    # Lease holders in a row that ended while holding it (reset by a recorded attempt):
    # after the first, the message may be what kills them, and it waits a backoff.
    orphaned: int = 0
    hold: Optional[Hold] = None          # who held it and why (state hold only)

    @property
    def queue_id(self):
        return self.envelope.queue_id


class Listed(NamedTuple):
    """A message as mailq lists it, from its Brief; text with control characters shown
    as "?" (elemta.util.text.printable), ready to print."""
    queue_id: str
    state: str
    size: int
    arrival: float
    sender: str                              # "" for the null sender
    recipients: Tuple[Tuple[str, str], ...]  # (address, delay reason) of each waiting one


# Listed from one tuple, without NamedTuple's __new__ in Python (per message in mailq).
_new_listed = partial(tuple.__new__, Listed)


class Brief(NamedTuple):
    """The few facts about a message that listing filters and summaries need."""
    queue_id: str
    state: str
    size: int
    arrival: float
    sender_domain: str                       # lower case; "" for the null sender
    domains: Tuple[Tuple[str, int], ...]     # (domain, waiting recipients there)


def waiting_recipients(state: str, recipients: List[Recipient]) -> List[Recipient]:
    """The recipients a message still has to deal with: not delivered, and not bounced
    unless the whole message failed (then the bounced ones are what the admin looks at)."""
    return [r for r in recipients
            if r.status != SENT and (r.status != BOUNCED or state == FAILED)]


def delay_reason(record, recipient: Recipient) -> str:
    """Why a waiting recipient is not delivered yet: who held the message and why if it
    is on hold (mailq shows it under the "!"), else its own last reply if it was
    deferred or bounced, else the message's last error, else ""."""
    if record.state == HOLD and record.hold is not None:
        return record.hold.describe()
    if recipient.status != PENDING and recipient.last_reply:
        return recipient.last_reply
    return record.last_error or ""


def address_domain(address):
    """The lower-cased domain of an address ("" for the null sender or a bare name)."""
    return address.rpartition("@")[2].lower() if "@" in address else ""


# json.dumps(value, separators=(",", ":")) without making a JSONEncoder per call: a record
# (and a spool file's envelope line, elemta.queue.store) is encoded for every message.
compact_json = json.JSONEncoder(separators=(",", ":")).encode


def encode_record(record):
    data = envelope_to_dict(record.envelope)
    for name in _RECORD_FIELDS:
        data[name] = getattr(record, name)
    if record.hold is not None:
        data["hold"] = record.hold.to_dict()
    return compact_json(data).encode("ascii")


def decode_record(raw):
    return _record_of(json.loads(bytes(raw)))


def _decode_for_rewrite(raw):
    """(record, the entries its stored form is indexed under): a record about to be
    changed and written back, its stored JSON decoded once, not again by _put."""
    data = json.loads(bytes(raw))
    entries = _entries_of(data)          # first: _record_of takes data apart
    return _record_of(data), entries


def _record_of(data):
    delivery_state = {name: data.pop(name) for name in _RECORD_FIELDS if name in data}
    hold = Hold.from_dict(data.pop("hold", None))
    return QueueRecord(envelope=envelope_from_dict(data), hold=hold, **delivery_state)


def _priority_byte(priority):
    """The first byte of a due key: 0 for PRIORITY_MAX, so higher priorities sort first.
    A value out of range (written by hand into a spool file) counts as the nearest bound,
    one that is not a whole number as 0: the message is still delivered."""
    if isinstance(priority, bool) or not isinstance(priority, int):
        priority = 0
    return PRIORITY_MAX - max(PRIORITY_MIN, min(PRIORITY_MAX, priority))


def due_key(next_attempt, queue_id, priority=0):
    """The "due" database key: sorts by priority (highest first), then time, then id."""
    return (bytes((_priority_byte(priority),))
            + _MS.pack(max(0, int(round(next_attempt * 1000)))) + queue_id.encode("ascii"))


def _due_time_ms(key):
    return _MS.unpack_from(key, 1)[0]


def _entries_of(data):
    """(due key or None, state key) of a decoded record dict: what a rewrite of it
    removes (read before _record_of takes the dict apart)."""
    return _due_key_of(data), state_key(data.get("state") or INCOMING, data["queue_id"])


def _due_key_of(data):
    """The due key for a decoded record dict, or None if its state is not due-able."""
    if data.get("state") not in DUE_STATES:
        return None
    return due_key(data.get("next_attempt") or 0.0, data["queue_id"],
                   data.get("priority", 0))


def state_key(state, queue_id):
    """The "by_state" database key: groups by state, then sorts by queue id (arrival)."""
    return state.encode("ascii") + _STATE_SEP + queue_id.encode("ascii")


def _encode_brief(record):
    envelope = record.envelope
    counts: Dict[str, int] = {}
    for recipient in waiting_recipients(record.state, envelope.recipients):
        domain = address_domain(recipient.address)
        counts[domain] = counts.get(domain, 0) + 1
    parts = [address_domain(envelope.sender)]
    for domain, count in counts.items():
        parts += [domain, str(count)]
    text = "\0".join(parts).encode("utf-8", "surrogatepass")
    return _BRIEF_HEAD.pack(envelope.size or 0, envelope.arrival or 0.0) + text


def _encode_listing(record):
    envelope = record.envelope
    parts = [printable(envelope.sender)]
    for recipient in waiting_recipients(record.state, envelope.recipients):
        parts += [printable(delay_reason(record, recipient)), printable(recipient.address)]
    return (_BRIEF_HEAD.pack(envelope.size or 0, envelope.arrival or 0.0)
            + "\0".join(parts).encode("utf-8"))


def _decode_summary(summary):
    """(sender domain, ((domain, count), ...)) from the text of a Brief."""
    parts = summary.decode("utf-8", "surrogatepass").split("\0")
    return parts[0], tuple((parts[i], int(parts[i + 1])) for i in range(1, len(parts) - 1, 2))


def decode_brief(key, value):
    """The Brief for one by_state entry (bytes key and value)."""
    state, _, queue_id = bytes(key).partition(_STATE_SEP)
    size, arrival = _BRIEF_HEAD.unpack_from(value)
    sender_domain, domains = _decode_summary(bytes(value[_BRIEF_HEAD.size:]))
    return Brief(queue_id.decode("ascii"), state.decode("ascii"), size, arrival,
                 sender_domain, domains)


def decode_listed(key, value):
    """The Listed for one listing entry (bytes key and value)."""
    state, _, queue_id = bytes(key).partition(_STATE_SEP)
    size, arrival = _BRIEF_HEAD.unpack_from(value)
    parts = bytes(value[_BRIEF_HEAD.size:]).decode("utf-8").split("\0")
    return Listed(queue_id.decode("ascii"), state.decode("ascii"), size, arrival, parts[0],
                  tuple(zip(parts[2::2], parts[1::2])))


def _decode_listed_chunk(items, state, prefix_length):
    """decode_listed of each (key, value) of one state's listing entries, as one loop:
    mailq over a big queue spends most of its time here."""
    head = _BRIEF_HEAD.size
    unpack = _BRIEF_HEAD.unpack_from
    for key, value in items:
        size, arrival = unpack(value)
        parts = value[head:].decode("utf-8").split("\0")
        yield _new_listed((key[prefix_length:].decode("ascii"), state, size, arrival,
                           parts[0], tuple(zip(parts[2::2], parts[1::2]))))


def _after(key):
    """The smallest key greater than `key`: where the next chunk of a scan starts."""
    return bytes(key) + b"\0"


def _at_once(orphaned):
    """retry_delay of a message whose lease holder ended: none."""
    return 0.0


def _allocate_lock_file(path):
    """Allocate every page of LMDB's lock file (its reader table), which LMDB makes
    sparse with ftruncate and writes through a memory mapping: a process taking a reader
    slot in a page not yet allocated on a full file system would die of SIGBUS. Done
    by whoever opens the index while there is room; contents are unchanged.

    Call it only BEFORE this process opens the environment. LMDB keeps fcntl locks on
    this file, and closing any descriptor of it drops all of a process's fcntl locks on
    it: the next process to open the index would then find no other user, reset the
    lock file under running writers (two writers at once: lost records) and its reader
    check would free our reader slots (pages reused under our cursors)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return                # none yet: the next process to open the index allocates it
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError:
        pass                  # no room now: the next process to open the index tries again
    finally:
        os.close(fd)


def index_exists(path):
    """True if an index was ever written at path (its data file exists)."""
    return os.path.exists(os.path.join(path, _DATA_FILE))


class QueueIndex:
    """One process's handle on the LMDB index.

    metasync=False (used with sync_method "syncfs") skips LMDB's second flush, of the meta
    page, per transaction; the caller then flushes the file system itself before trusting
    the transaction. Never use one QueueIndex across a fork: open a new one in the child.
    """

    def __init__(self, path, map_size, metasync=True, max_readers=512):
        self.path = path
        self._pid = os.getpid()
        # lmdb.open would make the directory with `mode` (0600): without its x bit only
        # root could enter it, so a non-root worker could never open its own index.
        os.makedirs(path, mode=0o700, exist_ok=True)
        _allocate_lock_file(os.path.join(path, _LOCK_FILE))     # before lmdb.open: see there
        self.env = lmdb.open(path, map_size=map_size, subdir=True, max_dbs=8,
                             max_readers=max_readers, sync=True, metasync=metasync,
                             mode=0o600)
        self.env.reader_check()  # free reader slots of processes killed with kill -9
        self.messages = self.env.open_db(b"messages")
        self.due = self.env.open_db(b"due")
        self.by_state = self.env.open_db(b"by_state")
        self.listing = self.env.open_db(b"listing")
        self._complete(self.by_state, _encode_brief)
        self._complete(self.listing, _encode_listing)
        self._upgrade_due()

    def _complete(self, db, encode):
        """Fill a per-state view (by_state with encode=_encode_brief, listing with
        _encode_listing) for an index written before it existed: same count when whole."""
        with self.env.begin() as txn:
            whole = txn.stat(self.messages)["entries"] == txn.stat(db)["entries"]
        if whole:
            return
        with self.env.begin(write=True) as txn:
            txn.drop(db, delete=False)
            for _, raw in txn.cursor(db=self.messages):
                record = decode_record(raw)
                txn.put(state_key(record.state, record.queue_id), encode(record), db=db)

    def _upgrade_due(self):
        """Rewrite the due entries of an index written before priorities had their byte
        (one look at the first key; the rewrite happens once)."""
        with self.env.begin() as txn:
            first = txn.cursor(db=self.due)
            if not first.first() or len(first.key()) != _OLD_DUE_KEY:
                return
        with self.env.begin(write=True) as txn:
            txn.drop(self.due, delete=False)
            for _, raw in txn.cursor(db=self.messages):
                key = _due_key_of(json.loads(bytes(raw)))
                if key is not None:
                    txn.put(key, b"", db=self.due)

    def _check_process(self):
        if os.getpid() != self._pid:
            raise RuntimeError("QueueIndex used across a fork; open a new one in the child")

    # -- writing: every change goes through _put and _delete

    def _put(self, txn, record, replace, old_entries=None):
        """Write a record and its entries. old_entries: the _entries_of the stored record
        it replaces, when the caller has just decoded it (no second read and decode)."""
        key = record.queue_id.encode("ascii")
        if old_entries is not None:
            self._drop_entries(txn, old_entries)
        else:
            old = txn.get(key, db=self.messages)
            if old is not None:
                if not replace:
                    return False
                self._forget(txn, json.loads(bytes(old)))
        txn.put(key, encode_record(record), db=self.messages)
        if record.state in DUE_STATES:
            txn.put(due_key(record.next_attempt, record.queue_id, record.envelope.priority),
                    b"", db=self.due)
        key = state_key(record.state, record.queue_id)
        txn.put(key, _encode_brief(record), db=self.by_state)
        txn.put(key, _encode_listing(record), db=self.listing)
        return True

    def _forget(self, txn, data):
        """Remove the due, by_state and listing entries of a decoded record."""
        self._drop_entries(txn, _entries_of(data))

    def _drop_entries(self, txn, entries):
        old_due, key = entries
        if old_due is not None:
            txn.delete(old_due, db=self.due)
        txn.delete(key, db=self.by_state)
        txn.delete(key, db=self.listing)

    def _delete(self, txn, queue_id):
        key = queue_id.encode("ascii")
        old = txn.get(key, db=self.messages)
        if old is None:
            return False
        self._forget(txn, json.loads(bytes(old)))
        txn.delete(key, db=self.messages)
        return True

    def put_many(self, records, replace=True):
        """Add records, all in one write transaction. With replace=False an existing record
        is kept as it is. Returns the ids written."""
        self._check_process()
        with self.env.begin(write=True) as txn:
            return [r.queue_id for r in records if self._put(txn, r, replace)]

    def put(self, record):
        self.put_many([record])

    def update_many(self, queue_ids: Iterable[str],
                    change: Callable[[QueueRecord], Tuple[str, bool]],
                    delete: Iterable[str] = ()) -> Dict[str, Optional[str]]:
        """Read, change and write back records in one write transaction, so nothing another
        process writes meanwhile is lost. change(record) alters the record in place and
        returns (outcome, changed); the record is written only if changed. The records of
        `delete` are removed in the same transaction. Returns {queue_id: outcome}, None
        for ids without a record."""
        self._check_process()
        outcomes: Dict[str, Optional[str]] = {}
        with self.env.begin(write=True) as txn:
            for queue_id in delete:
                self._delete(txn, queue_id)
            for queue_id in queue_ids:
                raw = txn.get(queue_id.encode("ascii"), db=self.messages)
                if raw is None:
                    outcomes[queue_id] = None
                    continue
                record, entries = _decode_for_rewrite(raw)
                outcome, changed = change(record)
                if changed:
                    self._put(txn, record, replace=True, old_entries=entries)
                outcomes[queue_id] = outcome
        return outcomes

    # -- delivery: claiming work with a lease

    def claim(self, owner: str, now: float, lease_seconds: float,
              limit: int) -> List[QueueRecord]:
        """Take up to `limit` due messages (incoming or deferred, next_attempt <= now;
        the highest priority first, then the soonest due) in one write transaction: each
        becomes active, leased to `owner` until now + lease_seconds. Returns their
        records."""
        self._check_process()
        if limit <= 0:
            return []
        horizon = int(round(now * 1000))
        claimed = []
        with self.env.begin(write=True) as txn:
            for key in self._due_keys(txn, horizon, limit):
                raw = txn.get(key[_DUE_HEAD:], db=self.messages)
                if raw is None:
                    continue
                record, entries = _decode_for_rewrite(raw)
                if record.state not in DUE_STATES:
                    continue
                move(record, ACTIVE)
                record.lease_owner = owner
                record.lease_expires = now + lease_seconds
                claimed.append((record, entries))
            for record, entries in claimed:
                self._put(txn, record, replace=True, old_entries=entries)
        claimed = [record for record, _ in claimed]
        return claimed

    def _due_keys(self, txn, horizon_ms, limit):
        """Up to `limit` due keys due at or before horizon_ms, highest priority first and
        soonest first within a priority. One seek per priority present: the keys of a
        priority not yet due are skipped at once."""
        cursor = txn.cursor(db=self.due)
        keys = []
        found = cursor.set_range(b"")
        while found and len(keys) < limit:
            key = bytes(cursor.key())
            if _due_time_ms(key) <= horizon_ms:
                keys.append(key)
                found = cursor.next()
            else:               # the rest of this priority is later: the next priority
                if key[0] == 255:
                    break
                found = cursor.set_range(bytes((key[0] + 1,)))
        return keys

    def reclaim(self, now: float, reason: str,
                retry_delay: Callable[[int], float] = _at_once,
                orphaning: bool = True) -> List[str]:
        """Return active messages whose lease has lapsed (their worker died) to the queue:
        deferred, `reason` as their last error, due after retry_delay(orphaned) (see
        _requeue_leased). Pass now=float("inf") to reclaim every active message (at
        start-up, when no worker runs), with orphaning=False: a restart is not counted
        as a holder that died with the message (due now, its count unchanged). Returns
        their ids."""
        self._check_process()
        reclaimed = []
        with self.env.begin(write=True) as txn:
            expired = [record for record in self._active_records(txn)
                       if record.lease_expires <= now]
            due_now = min(now, time.time())
            for record in expired:
                self._requeue_leased(txn, record, due_now, reason, retry_delay, orphaning)
                reclaimed.append(record.queue_id)
        return reclaimed

    def nudge(self):
        """Commit one small write (a time stamp in the main database, beside the named
        ones). LMDB reuses the pages a write freed only once no reader can see the
        snapshot before it, that is from the next-but-one write on; after a
        MapFullError this makes the room freed by the last write usable."""
        self._check_process()
        with self.env.begin(write=True) as txn:
            txn.put(_NUDGE_KEY, struct.pack(">d", time.time()))

    def free_leases(self, holder_gone: Callable[[str], bool], reason: str,
                    retry_delay: Callable[[int], float] = _at_once
                    ) -> List[Tuple[str, str, float]]:
        """Return the active messages of lease holders that are gone to the queue:
        deferred, `reason` as their last error, due after retry_delay(orphaned) (see
        _requeue_leased). holder_gone(owner) is asked once
        per distinct owner, outside any write transaction; the write transaction is opened
        only when some holder is gone, and a message is freed only if its owner is still
        that holder. Cheap: it reads only the active messages. Returns (queue id, owner,
        next attempt) of each message freed."""
        self._check_process()
        with self.env.begin() as txn:
            owners = {record.queue_id: record.lease_owner
                      for record in self._active_records(txn)}
        gone = {owner for owner in set(owners.values())
                if owner is not None and holder_gone(owner)}
        if not gone:
            return []
        freed = []
        with self.env.begin(write=True) as txn:
            due_now = time.time()
            for queue_id, owner in sorted(owners.items()):
                if owner not in gone:
                    continue
                raw = txn.get(queue_id.encode("ascii"), db=self.messages)
                if raw is None:
                    continue
                record = decode_record(raw)
                if record.state == ACTIVE and record.lease_owner == owner:
                    self._requeue_leased(txn, record, due_now, reason, retry_delay)
                    freed.append((queue_id, owner, record.next_attempt))
        return freed

    def _active_records(self, txn):
        """The records in state active, read in txn (through by_state: no full scan)."""
        prefix = state_key(ACTIVE, "")
        cursor = txn.cursor(db=self.by_state)
        if not cursor.set_range(prefix):
            return
        for key in cursor.iternext(keys=True, values=False):
            if not bytes(key).startswith(prefix):
                return
            raw = txn.get(bytes(key)[len(prefix):], db=self.messages)
            if raw is not None:
                record = decode_record(raw)
                if record.state == ACTIVE:
                    yield record

    def _requeue_leased(self, txn, record, now, reason, retry_delay, orphaning=True):
        """An active message whose holder ended without finishing it: deferred, due
        retry_delay(orphaned) seconds after `now`, orphaned counting the holders in a row
        that ended holding it. A crash is most often not the message's fault (the first
        is due at once), but one that kills every worker that takes it must not keep
        them in a crash loop (Postfix defers it as after a failed attempt). Not
        orphaning (a restart): due at `now`, the count left as it was."""
        move(record, DEFERRED)
        record.lease_owner, record.lease_expires = None, 0.0
        if not orphaning:
            record.next_attempt, record.last_error = now, reason
        else:
            record.orphaned += 1
            record.next_attempt = now + retry_delay(record.orphaned)
            record.last_error = reason if record.orphaned == 1 else \
                "%s (%d times in a row)" % (reason, record.orphaned)
        self._put(txn, record, replace=True)

    def sync(self):
        """Flush the environment to disk, meta page included (after a transaction that must
        survive a crash when metasync is off)."""
        self.env.sync(True)

    def delete_many(self, queue_ids):
        """Remove records (and their due entries) in one write transaction. Returns how
        many existed."""
        return len(self.delete_many_ids(queue_ids))

    def delete_many_ids(self, queue_ids):
        """Remove records in one write transaction. Returns the set of ids that had one."""
        self._check_process()
        with self.env.begin(write=True) as txn:
            return {qid for qid in queue_ids if self._delete(txn, qid)}

    def delete(self, queue_id):
        """Remove one record. Returns False if there was none."""
        return self.delete_many([queue_id]) == 1

    def clear(self):
        """Remove every record (all databases), in one write transaction."""
        self._check_process()
        with self.env.begin(write=True) as txn:
            txn.drop(self.messages, delete=False)
            txn.drop(self.due, delete=False)
            txn.drop(self.by_state, delete=False)
            txn.drop(self.listing, delete=False)

    # -- reading

    def get(self, queue_id):
        """The record for queue_id, or None."""
        self._check_process()
        with self.env.begin() as txn:
            raw = txn.get(queue_id.encode("ascii"), db=self.messages)
        return None if raw is None else decode_record(raw)

    def get_many(self, queue_ids: Iterable[str]) -> Dict[str, QueueRecord]:
        """{queue_id: record} for those of queue_ids that have one (one read transaction)."""
        self._check_process()
        with self.env.begin() as txn:
            raws = [(qid, txn.get(qid.encode("ascii"), db=self.messages))
                    for qid in queue_ids]
        return {qid: decode_record(raw) for qid, raw in raws if raw is not None}

    def _scan(self, db, prefix=b"", keys_only=False):
        """(key, value) pairs of db whose key starts with prefix, in key order, read
        SCAN_CHUNK at a time, each chunk in its own short read transaction (so a change made
        between chunks may or may not be seen, as in any live listing)."""
        self._check_process()
        start = prefix
        while True:
            chunk = []
            with self.env.begin() as txn:
                cursor = txn.cursor(db=db)
                if not cursor.set_range(start):
                    return
                for item in cursor.iternext(keys=True, values=not keys_only):
                    key, value = (item, None) if keys_only else item
                    if not key.startswith(prefix):
                        break
                    chunk.append((key, value))
                    if len(chunk) == SCAN_CHUNK:
                        break
            yield from chunk
            if len(chunk) < SCAN_CHUNK:
                return
            start = _after(chunk[-1][0])

    def iter_queue_ids(self):
        """All queue ids in the index, in id (arrival) order, from one snapshot."""
        self._check_process()
        with self.env.begin() as txn:
            for key in txn.cursor(db=self.messages).iternext(keys=True, values=False):
                yield bytes(key).decode("ascii")

    def iter_state_ids(self, state):
        """Ids of the messages in `state`, in id order."""
        prefix = state.encode("ascii") + _STATE_SEP
        for key, _ in self._scan(self.by_state, prefix, keys_only=True):
            yield key[len(prefix):].decode("ascii")

    def iter_briefs(self, state: Optional[str] = None) -> Iterator[Brief]:
        """Briefs of the messages in `state` in id order, or of all messages grouped by
        state if state is None. Cheap: no JSON record is decoded."""
        prefix = b"" if state is None else state.encode("ascii") + _STATE_SEP
        for key, value in self._scan(self.by_state, prefix):
            yield decode_brief(key, value)

    def iter_listed(self, state: str,
                    wanted: Optional[Callable[[Brief], bool]] = None) -> Iterator[Listed]:
        """The messages in `state` as mailq lists them, in id order; with `wanted`, only
        those whose Brief it accepts. No JSON record is decoded."""
        if wanted is None:
            prefix = state_key(state, "")
            for chunk in self._item_chunks(self.listing, prefix, SCAN_CHUNK):
                yield from _decode_listed_chunk(chunk, state, len(prefix))
            return
        chosen = []
        for key, value in self._scan(self.by_state, state_key(state, "")):
            if wanted(decode_brief(key, value)):
                chosen.append(key)
                if len(chosen) == SCAN_CHUNK:
                    yield from self._listed(chosen)
                    chosen = []
        yield from self._listed(chosen)

    def _listed(self, keys):
        """The Listed of each listing key (one read transaction)."""
        with self.env.begin() as txn:
            found = [(key, txn.get(key, db=self.listing)) for key in keys]
        for key, value in found:
            if value is not None:     # gone, or in another state, since its Brief was read
                yield decode_listed(key, value)

    def tally_briefs(self, state: str, arrival_limits: List[float]
                     ) -> Tuple[int, int, Counter]:
        """Count the messages in `state` for a summary, the loop in C: (messages, total
        size, Counter of (position, sender domain, ((domain, count), ...))), position
        being bisect_left(arrival_limits, arrival) (arrival_limits sorted). Each distinct
        summary is decoded once, however many messages share it."""
        messages = size = 0
        tally: Counter = Counter()                  # (position, summary bytes) -> count
        position = partial(bisect_left, arrival_limits)
        for values in self._value_chunks(self.by_state, state_key(state, "")):
            heads = list(map(_BRIEF_HEAD.unpack_from, values))
            messages += len(heads)
            size += sum(map(itemgetter(0), heads))
            summaries = map(itemgetter(slice(_BRIEF_HEAD.size, None)), values)
            arrivals = list(map(itemgetter(1), heads))
            first = position(min(arrivals))
            if first == position(max(arrivals)):
                # The whole chunk in one bucket, as with ids in arrival order mostly.
                for summary, count in Counter(summaries).items():
                    tally[first, summary] += count
            else:
                tally.update(zip(map(position, arrivals), summaries))
        counted: Counter = Counter()
        for (place, summary), count in tally.items():
            counted[(place,) + _decode_summary(summary)] += count
        return messages, size, counted

    def _value_chunks(self, db, prefix):
        """Lists of the values of db whose key starts with prefix, in key order, up to
        TALLY_CHUNK per short read transaction, read without their keys."""
        self._check_process()
        start = prefix
        while True:
            with self.env.begin() as txn:
                cursor = txn.cursor(db=db)
                if not cursor.set_range(start):
                    return
                values = list(islice(cursor.iternext(keys=False, values=True), TALLY_CHUNK))
                last = bytes(cursor.key())         # the key of the last value read
                if not last.startswith(prefix):    # past the prefix: keep what is in it
                    cursor.set_range(start)
                    values = [value for key, value in islice(cursor, len(values))
                              if bytes(key).startswith(prefix)]
            if values:
                yield values
            if len(values) < TALLY_CHUNK:
                return
            start = _after(last)

    def _item_chunks(self, db, prefix, size):
        """Lists of the (key, value) pairs of db whose key starts with prefix, in key
        order, up to `size` per short read transaction; read by LMDB's iterator in C, the
        prefix checked once per chunk (keys are sorted: only the last chunk ends past it)."""
        self._check_process()
        start = prefix
        while True:
            with self.env.begin() as txn:
                cursor = txn.cursor(db=db)
                if not cursor.set_range(start):
                    return
                items = list(islice(cursor.iternext(), size))
            if not items[-1][0].startswith(prefix):
                items = [item for item in items if item[0].startswith(prefix)]
            if items:
                yield items
            if len(items) < size:
                return
            start = _after(items[-1][0])

    def iter_records(self, state=None):
        """Records in id (arrival) order, only those in `state` if given. Reads a chunk of
        records per short read transaction; decodes outside it."""
        if state is None:
            for _, raw in self._scan(self.messages):
                yield decode_record(raw)
            return
        ids = []
        for queue_id in self.iter_state_ids(state):
            ids.append(queue_id)
            if len(ids) == SCAN_CHUNK:
                yield from self._records_in_state(ids, state)
                ids = []
        yield from self._records_in_state(ids, state)

    def _records_in_state(self, ids, state):
        found = self.get_many(ids)
        for queue_id in ids:
            record = found.get(queue_id)
            if record is not None and record.state == state:
                yield record

    def iter_due(self, until=None):
        """(next_attempt, queue_id) of incoming and deferred messages, soonest first
        whatever their priority; only those due at or before `until` (seconds) if given."""
        self._check_process()
        limit = None if until is None else int(round(until * 1000))
        with self.env.begin() as txn:
            runs = []            # one sorted run of keys per priority present
            cursor = txn.cursor(db=self.due)
            found = cursor.first()
            while found:
                first = bytes(cursor.key())
                runs.append(self._due_run(txn, first[:1]))
                if first[0] == 255:
                    break
                found = cursor.set_range(bytes((first[0] + 1,)))
            for key in heapq.merge(*runs, key=lambda key: key[1:]):
                ms = _due_time_ms(key)
                if limit is not None and ms > limit:
                    break
                yield ms / 1000.0, key[_DUE_HEAD:].decode("ascii")

    def _due_run(self, txn, prefix):
        """The due keys of one priority (prefix: its byte), in order."""
        cursor = txn.cursor(db=self.due)
        cursor.set_range(prefix)
        for key in cursor.iternext(keys=True, values=False):
            key = bytes(key)
            if not key.startswith(prefix):
                return
            yield key

    def usage(self):
        """(bytes the index's pages take, bytes it may take: the map size): how full it is
        (elemta.queue.space refuses new mail before it is). Pages freed by deletions and
        reusable count as free. Cheap: one read transaction and a few page counts."""
        self._check_process()
        databases = (self.messages, self.due, self.by_state, self.listing)
        with self.env.begin() as txn:
            stats = [txn.stat(db) for db in databases] + [txn.stat(self.env.open_db())]
        pages = 2 + sum(s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"]
                        for s in stats)             # 2: LMDB's two meta pages
        return pages * stats[0]["psize"], self.env.info()["map_size"]

    def count_by_state(self):
        """{state: number of messages} for the states present."""
        counts = {}
        for state in STATES:
            n = sum(1 for _ in self.iter_state_ids(state))
            if n:
                counts[state] = n
        return counts

    def oldest_arrival_by_state(self):
        """{state: arrival time of its oldest message} for the states present: the first
        by_state entry of each state, ids sorting by arrival (one key per state read,
        whatever the queue's size)."""
        self._check_process()
        oldest = {}
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self.by_state)
            for state in STATES:
                prefix = state.encode("ascii") + _STATE_SEP
                if cursor.set_range(prefix) and cursor.key().startswith(prefix):
                    oldest[state] = decode_brief(cursor.key(), cursor.value()).arrival
        return oldest

    def close(self):
        self.env.close()
