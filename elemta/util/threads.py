"""Blocking work in the gevent hub's thread pool, its exception raised in the caller.

Used by the smtpd (group commit, password checks) and the delivery worker (results,
notices, purges), which must not block their event loops on a disk flush, and by
elemta.sharedstate.guard (Valkey/Redis calls, in a pool of its own). gevent prints the
traceback of anything a pool thread raises, even when the caller handles it: a full disk
would fill the log with tracebacks. Here the exception is carried back as a value and
raised again in the calling greenlet, which alone decides what to log.
"""

from gevent import get_hub


def in_thread(function, *args):
    """function(*args) in a pool thread; returns its result or raises its Exception."""
    return in_pool(get_hub().threadpool, function, *args)


def in_pool(pool, function, *args):
    """function(*args) in a thread of `pool` (a gevent ThreadPool of the caller's own,
    so a service that stalls fills only its pool, not the hub's); as in_thread."""
    outcome = pool.apply(_caught, (function, args))
    if isinstance(outcome, _Raised):
        raise outcome.error
    return outcome


class _Raised:
    def __init__(self, error):
        self.error = error


def _caught(function, args):
    try:
        return function(*args)
    except Exception as error:
        return _Raised(error)
