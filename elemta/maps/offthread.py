"""Lookups that block (SQL clients) run in the gevent hub's thread pool, bounded in time.

Used by elemta.maps.sqlite and elemta.maps.pgsql. A database client waits on its socket
or file lock inside C code the event loop cannot interrupt, so the wait happens in a pool
thread while the calling greenlet yields; the other sessions go on. gevent.Timeout bounds
the caller's wait: past `timeout` seconds the lookup is TableUnavailable ("timed out"),
and the thread finishes on its own (the clients are given the same timeout, so it ends
soon after). Works the same outside a gevent server (elemtactl map query).
See also: elemta.util.threads.
"""

import gevent

from elemta.maps.base import TableUnavailable
from elemta.util.threads import in_thread


def call_bounded(spec: str, timeout: float, function, *args):
    """function(*args) in a pool thread; TableUnavailable when it takes over timeout."""
    try:
        with gevent.Timeout(timeout):
            return in_thread(function, *args)
    except gevent.Timeout:
        raise TableUnavailable("%s: no answer within %g seconds" % (spec, timeout))
