"""The api process's one handle on the queue, and running queue work off the event loop.

Owned by the api process: the REST routes and the /metrics queue collector share one Queue
(LMDB must not be opened twice in one process), opened on first use in this process (never
across a fork) and opened again after an error. Index reads and the admin actions' flushes
block, so each request's queue work runs in gevent's thread pool and the event loop keeps
answering meanwhile. See also elemta.queue.queue, elemta.api.queue_routes.

Never two environments at once: closing any descriptor of LMDB's lock file drops all of
this process's fcntl locks on it, those of a newer environment on the same spool too (then
the next process to open the index resets the lock file under running writers: lost
records, see elemta.queue.index); py-lmdb refuses such a second open ("already open in
this process"), which made a request that came during a close fail. So a close waits
until no thread uses the Queue, and other threads wait for it before opening a new one.
"""

import logging
import threading
from contextlib import contextmanager

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
        self._users = 0              # threads inside using() with self._queue
        self._closing = False
        self._changed = threading.Condition()

    @contextmanager
    def using(self):
        """The open Queue (opening it if needed) for the block; it stays open until the
        block ends. An lmdb.Error or OSError out of the block closes it (see close), so the
        next use opens it again. Call from a pool thread: it may block. Never call close()
        inside the block (it would wait for this very use)."""
        with self._changed:
            while self._closing:
                self._changed.wait()
            if self._queue is None:
                from elemta.queue.queue import Queue
                self._queue = Queue.from_config(self.queue_config)
            queue = self._queue
            self._users += 1
        failed = False
        try:
            yield queue
        except (lmdb.Error, OSError):
            failed = True
            raise
        finally:
            with self._changed:
                self._users -= 1
                self._changed.notify_all()
            if failed:
                self.close(queue)

    def call(self, work, *args):
        """work(queue, *args) in this thread; its result, or QueueUnavailable."""
        try:
            with self.using() as queue:
                return work(queue, *args)
        except (lmdb.Error, OSError) as exc:
            log.error("api: queue in %s: %s", self.queue_config.spool_dir, exc)
            raise QueueUnavailable("the queue cannot be read or written now: %s" % (
                getattr(exc, "strerror", None) or exc))

    def run(self, work, *args):
        """work(queue, *args) in the thread pool; its result, or QueueUnavailable."""
        return gevent.get_hub().threadpool.apply(self.call, (work,) + args)

    def close(self, queue=None):
        """Close the open Queue (only if it is still `queue`, when given: a thread that saw
        an old one fail must not close the one opened since) once no thread uses it;
        meanwhile nobody opens another."""
        with self._changed:
            while self._closing:
                self._changed.wait()
            if self._queue is None or queue not in (None, self._queue):
                return
            self._closing = True
            try:
                while self._users:
                    self._changed.wait()
                self._queue.close()
            except Exception:           # already broken; we only let go of it
                pass
            finally:
                self._queue, self._closing = None, False
                self._changed.notify_all()
