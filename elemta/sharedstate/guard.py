"""Every call to the shared store bounded in time and off the event loop; outages noticed.

Owned by the smtpd worker (one StoreGuard per process, elemta.sharedstate.process).

Why threads: redis-py's client blocks on its socket, and Elemta does not monkey-patch
the process (group commit, LMDB and the offload helpers rely on real blocking calls).
So each call runs in a thread of the guard's own small gevent ThreadPool while the
calling greenlet yields: a slow store delays only the sessions waiting for it, and,
its pool being its own, never the group commit or the password checks that use the
hub's pool. gevent.Timeout bounds the caller's wait (cluster.timeout, waiting for a
free thread included); the client has the same socket timeouts, so an abandoned thread
ends soon after. TLS, AUTH and script reloading stay redis-py's, unchanged.

An outage: the first call that fails sets elemta_cluster_store_up to 0; then every
call fails at once (StoreUnavailable) for cluster.retry_interval seconds, so a dead
store costs no session a timeout. After that one call, the probe, tries the store (the
others still fall back at once); the first answer ends the outage. Every worker sees
the outage, but the node logs it once: the first process to see it begin logs it and
counts elemta_cluster_store_outages_total, the first to see it end logs that
(elemta.sharedstate.outage).
See also: elemta.sharedstate.fallback (what a check does then), elemta.util.threads.
"""

import logging
import time

import gevent
from gevent.threadpool import ThreadPool

from elemta import metrics
from elemta.sharedstate.interface import StoreUnavailable
from elemta.util.threads import in_pool

log = logging.getLogger("elemta.sharedstate")

# Store calls in flight per process at most; more wait for a thread (within their
# timeout). Each is one short round trip, so a few threads serve thousands of sessions.
THREADS = 8


class StoreGuard:
    """Runs store calls for one process; knows whether the store is in an outage."""

    def __init__(self, name, timeout, retry_interval, threads=THREADS, flag=None):
        """flag: the node's OutageFlag (None: this process logs every outage it sees)."""
        self.name = name                    # the store as the log names it
        self.flag = flag
        self.timeout = timeout
        self.retry_interval = retry_interval
        self._pool = ThreadPool(threads)
        self._down_since = None             # time.monotonic() the outage began
        self._retry_at = 0.0
        self._why = ""
        metrics.CLUSTER_STORE_UP.set(1)

    @property
    def down(self):
        return self._down_since is not None

    def call(self, function, *args):
        """function(*args) in a thread; its result, or StoreUnavailable."""
        if self._down_since is not None:
            now = time.monotonic()
            if now < self._retry_at:
                raise StoreUnavailable(self._why)
            self._retry_at = now + self.retry_interval     # this call is the probe
        try:
            with gevent.Timeout(self.timeout):
                result = in_pool(self._pool, function, *args)
        except gevent.Timeout:
            self._failed("no answer within %gs" % self.timeout)
        except Exception as error:      # redis.RedisError, OSError: any failure is one
            self._failed("%s: %s" % (type(error).__name__, error))
        else:
            if self._down_since is not None:
                self._recovered()
            return result
        raise StoreUnavailable(self._why)

    def _failed(self, why):
        now = time.monotonic()
        self._why = why
        self._retry_at = now + self.retry_interval
        if self._down_since is None:
            self._down_since = now
            metrics.CLUSTER_STORE_UP.set(0)
            if self.flag is None or self.flag.begin():
                log.error("cluster store %s unavailable (%s): checks fall back as "
                          "cluster.store_failure says until it is back", self.name, why)
                metrics.CLUSTER_STORE_OUTAGES.inc()

    def _recovered(self):
        if self.flag is None or self.flag.end():
            log.warning("cluster store %s answers again after %.0fs: shared state "
                        "resumed", self.name, time.monotonic() - self._down_since)
        self._down_since = None
        metrics.CLUSTER_STORE_UP.set(1)

    def close(self):
        self._pool.kill()
