"""Group commit: many sessions' messages made durable by one flush.

Owned by the smtpd worker. A session that reaches the end of DATA hands its finished
spool file to commit() and waits; one committer greenlet takes every message waiting at
that moment and has Queue.commit make them all durable in a worker thread (one sync of
the spool, one index transaction), while the event loop keeps serving other sessions.
Messages arriving during a flush form the next batch. Each session still sends its 250
only after its own message is on disk. After each batch the delivery workers are woken
(elemta.queue.wakeup). See design.md "What the disk costs".
"""

import logging
import time

import gevent
from gevent.event import AsyncResult, Event

from elemta import metrics
from elemta.queue import wakeup
from elemta.util.threads import in_thread

log = logging.getLogger("elemta.smtpd")


class GroupCommitter:
    """Batches Queue.commit calls from many greenlets into few."""

    def __init__(self, queue, max_batch=256):
        self.queue = queue
        self.max_batch = max_batch
        self._waiting = []            # (writer, AsyncResult)
        self._wakeup = Event()
        self._runner = gevent.spawn(self._run)
        self.batches = 0
        self.messages = 0
        self.seconds = 0.0

    def commit(self, writer):
        """Block this greenlet until writer's message is durable; raise OSError if not."""
        result = AsyncResult()
        self._waiting.append((writer, result))
        self._wakeup.set()
        result.get()

    def _run(self):
        while True:
            if not self._waiting:
                self._wakeup.clear()
                self._wakeup.wait()
                continue
            batch = self._waiting[:self.max_batch]
            del self._waiting[:self.max_batch]
            started = time.perf_counter()
            try:
                in_thread(self.queue.commit, [w for w, _ in batch])
            except Exception as exc:       # every waiter learns of it; none is lost
                log.error("queue commit of %d message(s) failed: %s", len(batch), exc)
                for _, result in batch:
                    result.set_exception(exc)
                continue
            elapsed = time.perf_counter() - started
            self.batches += 1
            self.messages += len(batch)
            self.seconds += elapsed
            metrics.COMMIT_BATCH.observe(len(batch))
            metrics.COMMIT_FLUSH.observe(elapsed)
            wakeup.notify(self.queue.spool_dir)     # the delivery workers take it from here
            for _, result in batch:
                result.set(None)

    def close(self):
        self._runner.kill()
