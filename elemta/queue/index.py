"""The queue index: an LMDB environment at spool_dir/index.lmdb.

The only module that knows the index record format. Every process that schedules, lists or
changes queued messages opens its own QueueIndex after fork (smtpd and pickup add records,
delivery claims them, elemtactl lists them); LMDB lets several processes write, one write
transaction at a time. The spool files are the truth: elemta.queue.queue.Queue.reindex
rebuilds this index from elemta.queue.store. See also elemta.queue.model.

Named databases:

    messages   qid (ASCII) -> one JSON object: every Envelope field, plus "state",
               "attempts", "next_attempt" (seconds since the epoch) and "last_error"
    due        8-byte big-endian next_attempt in milliseconds + qid -> b"", for exactly the
               messages in state incoming or deferred, so delivery workers find due work by
               scanning from the start; kept consistent with "messages" in every write txn
"""

import json
import os
import struct
from dataclasses import dataclass
from typing import Optional

import lmdb

from elemta.queue.model import DEFERRED, INCOMING, Envelope
from elemta.queue.store import envelope_from_dict, envelope_to_dict

DUE_STATES = (INCOMING, DEFERRED)
_RECORD_FIELDS = ("state", "attempts", "next_attempt", "last_error")
_MS = struct.Struct(">Q")


@dataclass
class QueueRecord:
    """What the index knows about one message: its envelope and its delivery state."""
    envelope: Envelope
    state: str = INCOMING
    attempts: int = 0
    next_attempt: float = 0.0            # time.time() of the next delivery attempt
    last_error: Optional[str] = None

    @property
    def queue_id(self):
        return self.envelope.queue_id


def encode_record(record):
    data = envelope_to_dict(record.envelope)
    for name in _RECORD_FIELDS:
        data[name] = getattr(record, name)
    return json.dumps(data, separators=(",", ":")).encode("ascii")


def decode_record(raw):
    data = json.loads(bytes(raw))
    delivery_state = {name: data.pop(name) for name in _RECORD_FIELDS if name in data}
    return QueueRecord(envelope=envelope_from_dict(data), **delivery_state)


def due_key(next_attempt, queue_id):
    """The "due" database key: sorts by time, then by queue id."""
    return _MS.pack(max(0, int(round(next_attempt * 1000)))) + queue_id.encode("ascii")


def _due_key_of(data):
    """The due key for a decoded record dict, or None if its state is not due-able."""
    if data.get("state") not in DUE_STATES:
        return None
    return due_key(data.get("next_attempt") or 0.0, data["queue_id"])


class QueueIndex:
    """One process's handle on the LMDB index.

    metasync=False (used with sync_method "syncfs") skips LMDB's second flush, of the meta
    page, per transaction; the caller then flushes the file system itself before trusting
    the transaction. Never use one QueueIndex across a fork: open a new one in the child.
    """

    def __init__(self, path, map_size, metasync=True, max_readers=512):
        self.path = path
        self._pid = os.getpid()
        self.env = lmdb.open(path, map_size=map_size, subdir=True, max_dbs=4,
                             max_readers=max_readers, sync=True, metasync=metasync,
                             mode=0o600)
        self.env.reader_check()  # free reader slots of processes killed with kill -9
        self.messages = self.env.open_db(b"messages")
        self.due = self.env.open_db(b"due")

    def _check_process(self):
        if os.getpid() != self._pid:
            raise RuntimeError("QueueIndex used across a fork; open a new one in the child")

    def _put(self, txn, record, replace):
        key = record.queue_id.encode("ascii")
        old = txn.get(key, db=self.messages)
        if old is not None:
            if not replace:
                return False
            old_due = _due_key_of(json.loads(bytes(old)))
            if old_due is not None:
                txn.delete(old_due, db=self.due)
        txn.put(key, encode_record(record), db=self.messages)
        if record.state in DUE_STATES:
            txn.put(due_key(record.next_attempt, record.queue_id), b"", db=self.due)
        return True

    def _delete(self, txn, queue_id):
        key = queue_id.encode("ascii")
        old = txn.get(key, db=self.messages)
        if old is None:
            return False
        old_due = _due_key_of(json.loads(bytes(old)))
        if old_due is not None:
            txn.delete(old_due, db=self.due)
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

    def get(self, queue_id):
        """The record for queue_id, or None."""
        self._check_process()
        with self.env.begin() as txn:
            raw = txn.get(queue_id.encode("ascii"), db=self.messages)
            return None if raw is None else decode_record(raw)

    def delete_many(self, queue_ids):
        """Remove records (and their due entries) in one write transaction. Returns how
        many existed."""
        self._check_process()
        with self.env.begin(write=True) as txn:
            return sum(1 for qid in queue_ids if self._delete(txn, qid))

    def delete(self, queue_id):
        """Remove one record. Returns False if there was none."""
        return self.delete_many([queue_id]) == 1

    def iter_queue_ids(self):
        """All queue ids in the index, in id (arrival) order."""
        self._check_process()
        with self.env.begin() as txn:
            for key in txn.cursor(db=self.messages).iternext(keys=True, values=False):
                yield bytes(key).decode("ascii")

    def iter_records(self, state=None):
        """Records in id (arrival) order, only those in `state` if given. Holds a read
        transaction while the caller iterates: do not keep the generator for long."""
        self._check_process()
        with self.env.begin() as txn:
            for _, raw in txn.cursor(db=self.messages):
                record = decode_record(raw)
                if state is None or record.state == state:
                    yield record

    def iter_due(self, until=None):
        """(next_attempt, queue_id) of incoming and deferred messages, soonest first;
        only those due at or before `until` (seconds) if given."""
        self._check_process()
        limit = None if until is None else int(round(until * 1000))
        with self.env.begin() as txn:
            for key in txn.cursor(db=self.due).iternext(keys=True, values=False):
                key = bytes(key)
                ms = _MS.unpack_from(key)[0]
                if limit is not None and ms > limit:
                    break
                yield ms / 1000.0, key[_MS.size:].decode("ascii")

    def count_by_state(self):
        """{state: number of messages} for the states present."""
        counts = {}
        for record in self.iter_records():
            counts[record.state] = counts.get(record.state, 0) + 1
        return counts

    def clear(self):
        """Remove every record (both databases), in one write transaction."""
        self._check_process()
        with self.env.begin(write=True) as txn:
            txn.drop(self.messages, delete=False)
            txn.drop(self.due, delete=False)

    def close(self):
        self.env.close()
