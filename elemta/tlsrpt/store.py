"""The TLS-RPT counts on disk: one small LMDB environment, spool/tlsrpt, records per UTC
day. The only module that knows its format.

Shared (elemta.tlsrpt): the delivery workers add counts (through
elemta.tlsrpt.counter, in batches) and claim a day before they send its reports;
elemtactl tlsrpt reads them and claims (or, forced, takes) a day as well. Every process
opens its own environment (never across a fork), as the spool's owner.

    b"c/" DAY b"/" HASH   one policy's counts for DAY (YYYY-MM-DD, UTC); HASH names the
                          policy (its JSON can be longer than an LMDB key). JSON:
                          {"policy": {...}, "success": N, "failure": N,
                           "details": {detail JSON: N}}
    b"s/" DAY             the day's reports were claimed for sending: {"by", "at", "forced"}
    b"p/" DAY b"/" HASH   a report an https: rua did not take yet, posted again on the
                          next runs: {"domain", "url", "attempts", "error"}; HASH names
                          (domain, url)

Details per policy are kept up to MAX_DETAILS distinct ones: beyond that a failure still
counts in "failure", without its detail. Days older than the configured number are pruned.
"""

import hashlib
import json
import os

import lmdb

DIRECTORY = "tlsrpt"
MAP_SIZE = 64 * 1024 * 1024
MAX_DETAILS = 100
_COUNTS = b"c/"
_SENT = b"s/"
_POSTS = b"p/"


def path_of(spool_dir):
    return os.path.join(spool_dir, DIRECTORY)


class Tally:
    """Counts for one (day, policy): successes, failures, and failures by detail."""

    def __init__(self, policy_json):
        self.policy = policy_json
        self.success = 0
        self.failure = 0
        self.details = {}

    def add(self, success=0, failure=0, details=None):
        """Add counts: successes, failures, {detail JSON: failures}."""
        self.success += success
        self.failure += failure
        for detail, count in (details or {}).items():
            if detail in self.details or len(self.details) < MAX_DETAILS:
                self.details[detail] = self.details.get(detail, 0) + count

    def as_dict(self):
        return {"policy": self.policy, "success": self.success, "failure": self.failure,
                "details": self.details}


class CountStore:
    """spool/tlsrpt, opened by this process (see the module docstring)."""

    def __init__(self, spool_dir, create=True):
        path = path_of(spool_dir)
        if create:
            os.makedirs(path, mode=0o700, exist_ok=True)
        elif not os.path.isdir(path):
            raise FileNotFoundError(2, "no TLS-RPT counts (nothing counted yet)", path)
        self.env = lmdb.open(path, map_size=MAP_SIZE, subdir=True, max_dbs=0)

    def close(self):
        self.env.close()

    def add(self, tallies):
        """Add {(day, policy key): Tally} in one durable transaction."""
        with self.env.begin(write=True) as txn:
            for (day, policy_key), tally in tallies.items():
                key = _count_key(day, policy_key)
                stored = txn.get(key)
                total = Tally(tally.policy)
                if stored is not None:
                    known = json.loads(stored)
                    total.add(known["success"], known["failure"], known["details"])
                total.add(tally.success, tally.failure, tally.details)
                txn.put(key, json.dumps(total.as_dict(), sort_keys=True).encode())

    def days(self):
        """The days that have counts, oldest first."""
        found = []
        with self.env.begin() as txn:
            cursor = txn.cursor()
            if cursor.set_range(_COUNTS):
                for key in cursor.iternext(values=False):
                    if not key.startswith(_COUNTS):
                        break
                    day = key[len(_COUNTS):].split(b"/")[0].decode()
                    if not found or found[-1] != day:
                        found.append(day)
        return found

    def counts(self, day):
        """[{"policy", "success", "failure", "details"}] for day."""
        prefix = _COUNTS + day.encode() + b"/"
        found = []
        with self.env.begin() as txn:
            cursor = txn.cursor()
            if cursor.set_range(prefix):
                for key, value in cursor:
                    if not key.startswith(prefix):
                        break
                    found.append(json.loads(value))
        return found

    def claimed(self, day):
        """Who claimed the day's sending ({"by", "at", "forced"}), or None."""
        with self.env.begin() as txn:
            value = txn.get(_SENT + day.encode())
        return json.loads(value) if value is not None else None

    def claim(self, day, by, now, force=False):
        """True when this caller may send day's reports: nobody claimed them, or force
        (elemtactl tlsrpt send). One write transaction: of several delivery workers, one
        wins."""
        with self.env.begin(write=True) as txn:
            key = _SENT + day.encode()
            if txn.get(key) is not None and not force:
                return False
            txn.put(key, json.dumps({"by": by, "at": now, "forced": force}).encode())
        return True

    def post_failed(self, day, domain, url, error):
        """Note that day's report for domain was not taken at url; returns how many
        attempts have failed so far."""
        key = _post_key(day, domain, url)
        with self.env.begin(write=True) as txn:
            stored = txn.get(key)
            attempts = json.loads(stored)["attempts"] + 1 if stored is not None else 1
            txn.put(key, json.dumps({"domain": domain, "url": url, "attempts": attempts,
                                     "error": error}, sort_keys=True).encode())
        return attempts

    def post_done(self, day, domain, url):
        """Forget a pending post (taken, or given up)."""
        with self.env.begin(write=True) as txn:
            txn.delete(_post_key(day, domain, url))

    def pending_posts(self):
        """[(day, {"domain", "url", "attempts", "error"})] of the reports to post again,
        oldest day first."""
        found = []
        with self.env.begin() as txn:
            cursor = txn.cursor()
            if cursor.set_range(_POSTS):
                for key, value in cursor:
                    if not key.startswith(_POSTS):
                        break
                    found.append((key[len(_POSTS):].split(b"/")[0].decode(),
                                  json.loads(value)))
        return found

    def prune(self, before_day):
        """Forget the counts and claims of the days before before_day; their number."""
        gone = set()
        with self.env.begin(write=True) as txn:
            for prefix in (_COUNTS, _SENT, _POSTS):
                cursor = txn.cursor()
                if not cursor.set_range(prefix):
                    continue
                while cursor.key().startswith(prefix):
                    day = cursor.key()[len(prefix):].split(b"/")[0]
                    if day.decode() >= before_day:
                        break
                    gone.add(day)
                    if not cursor.delete():
                        break
        return len(gone)


def _count_key(day, policy_key):
    return _COUNTS + day.encode() + b"/" + hashlib.sha256(
        policy_key.encode()).hexdigest()[:32].encode()


def _post_key(day, domain, url):
    return _POSTS + day.encode() + b"/" + hashlib.sha256(
        ("%s %s" % (domain, url)).encode()).hexdigest()[:32].encode()
