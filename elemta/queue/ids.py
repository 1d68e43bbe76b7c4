"""Queue ids: short, unique across hosts, sorted by arrival.

Used by every process that creates or names a queued message (smtpd, pickup, the CLI that
validates ids typed by an admin). See also elemta.queue.store, which names files after them.

An id is 20 characters of Crockford base32 (0-9 and A-Z without I, L, O, U):

    11 characters: microseconds since the Unix epoch (55 bits, good until the year 3111)
     9 characters: 45 random bits, so two hosts (or processes) in the same microsecond
                   do not collide

Fixed width and a big-endian time prefix make string order equal arrival order. Within one
process ids are strictly increasing: if the clock has not moved (or went backwards) since the
last id, the last timestamp plus one microsecond is used instead.
"""

import os
import threading
import time

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
TIME_CHARS = 11
RANDOM_CHARS = 9
QUEUE_ID_LENGTH = TIME_CHARS + RANDOM_CHARS
_RANDOM_BITS = 5 * RANDOM_CHARS
_VALUE = {c: i for i, c in enumerate(ALPHABET)}
_ALPHABET_SET = frozenset(ALPHABET)

_lock = threading.Lock()
_last_us = 0


def _reset_lock_after_fork():
    # A fork taken while another thread held the lock would leave the child's copy held.
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_lock_after_fork)


def _encode(value, width):
    chars = []
    for _ in range(width):
        chars.append(ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def _decode(text):
    value = 0
    for c in text:
        value = (value << 5) | _VALUE[c]
    return value


def _next_timestamp_us():
    """Now in microseconds, strictly greater than the previous call's in this process."""
    global _last_us
    now_us = time.time_ns() // 1000
    with _lock:
        if now_us <= _last_us:
            now_us = _last_us + 1
        _last_us = now_us
    return now_us


def new_queue_id():
    """A new queue id: 20 characters of [0-9A-Z], later ids sort after earlier ones."""
    random_part = int.from_bytes(os.urandom(6), "big") >> (48 - _RANDOM_BITS)
    return _encode(_next_timestamp_us(), TIME_CHARS) + _encode(random_part, RANDOM_CHARS)


def queue_id_time(queue_id):
    """The time (seconds since the epoch, as time.time()) encoded in a queue id."""
    if not is_queue_id(queue_id):
        raise ValueError("not a queue id: %r" % (queue_id,))
    return _decode(queue_id[:TIME_CHARS]) / 1e6


def is_queue_id(text):
    """True if text is exactly a queue id: safe to use as a file name (no '/', no '..')."""
    return (isinstance(text, str) and len(text) == QUEUE_ID_LENGTH
            and _ALPHABET_SET.issuperset(text))
