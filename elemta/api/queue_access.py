"""The api process's one handle on the queue, and running queue work off the event loop.

Owned by the api process: the REST routes and the /metrics queue collector share one Queue
(LMDB must not be opened twice in one process), opened on first use in this process (never
across a fork) and opened again after an error. Index reads and the admin actions' flushes
block, so each request's queue work runs in gevent's thread pool and the event loop keeps
answering meanwhile. See also elemta.queue.queue, elemta.api.queue_routes.
"""

import logging
import threading

import gevent
import lmdb

log = logging.getLogger("elemta.api")


class QueueUnavailable(Exception):
    """The queue could not be read or written (answered 503: nothing the client did)."""


class QueueAccess:
    """Opens the queue of queue_config lazily; run(work) calls work(queue) in a thread."""

    def __init__(self, queue_config):
        self.queue_config = queue_config
        self._queue = None
        self._lock = threading.Lock()

    def queue(self):
        """The open Queue (opening it if needed). Call from a pool thread: it may block."""
        with self._lock:
            if self._queue is None:
                from elemta.queue.queue import Queue
                q = self.queue_config
                self._queue = Queue(q.spool_dir, sync_method=q.sync_method,
                                    map_size=q.index_map_size)
            return self._queue

    def run(self, work, *args):
        """work(queue, *args) in the thread pool; its result, or QueueUnavailable."""
        return gevent.get_hub().threadpool.apply(self._call, (work, args))

    def _call(self, work, args):
        try:
            return work(self.queue(), *args)
        except (lmdb.Error, OSError) as exc:
            log.error("api: queue in %s: %s", self.queue_config.spool_dir, exc)
            self.close()
            raise QueueUnavailable("the queue cannot be read or written now: %s" % (
                getattr(exc, "strerror", None) or exc))

    def close(self):
        with self._lock:
            queue, self._queue = self._queue, None
        if queue is not None:
            try:
                queue.close()
            except Exception:           # already broken; we only let go of it
                pass
