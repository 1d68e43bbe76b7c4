"""Group recording of delivery results: many finished deliveries made durable by one flush.

Owned by the delivery worker. A delivery greenlet hands its Attempt (elemta.queue.queue) to
record() and waits; one recorder greenlet takes every attempt waiting at that moment and has
Queue.record_attempts write them in one index transaction and one flush, in a worker
thread, while the event loop goes on sending other messages. Each waiter returns only when
its own results are on disk, so nothing is logged, bounced or retried before then. Without
this every message cost an fdatasync inside the event loop, stalling every other delivery
of the worker for its duration. The smtpd's elemta.smtpd.committer does the same for
acceptance.

Results the queue cannot take (OSError: a full disk, a full index) are tried again every
RETRY seconds until they are recorded: those deliveries happened, and a result dropped
would send its message again. Only when the worker stops are they given up (the message
then waits for its lease to lapse and is sent again: twice at worst, never lost).
"""

import logging

import gevent
from gevent.event import AsyncResult, Event

from elemta.util.threads import in_thread

log = logging.getLogger("elemta.delivery")

# Seconds between tries to record results the queue could not take (a full disk or index).
RETRY = 5


class AttemptRecorder:
    """Batches Queue.record_attempts calls from many greenlets into few."""

    def __init__(self, queue, owner, max_batch=256):
        self.queue = queue
        self.owner = owner
        self.max_batch = max_batch
        self._waiting = []            # (Attempt, AsyncResult)
        self._wakeup = Event()
        self._closing = False
        self._closed = Event()
        self._runner = gevent.spawn(self._run)

    def record(self, attempt):
        """Block this greenlet until attempt's results are durable; returns the message's
        ATTEMPT_* outcome, or raises what the queue raised (the message then stays active
        until its lease lapses and is tried again: at worst sent twice)."""
        result = AsyncResult()
        self._waiting.append((attempt, result))
        self._wakeup.set()
        return result.get()

    def _run(self):
        while True:
            if not self._waiting:
                if self._closing:
                    return
                self._wakeup.clear()
                self._wakeup.wait()
                continue
            batch = self._waiting[:self.max_batch]
            del self._waiting[:self.max_batch]
            try:
                outcomes = in_thread(self.queue.record_attempts, self.owner,
                                     [a for a, _ in batch])
            except OSError as exc:
                if self._closing:
                    self._fail(batch, exc)
                    continue
                # A full disk or index: the deliveries happened, so keep trying to record
                # them (giving up would send them again) while delivery frees space.
                log.error("recording the results of %d delivery attempt(s) failed: %s; "
                          "trying again in %d s", len(batch), exc, RETRY)
                self._waiting[:0] = batch
                self._closed.wait(RETRY)      # closing cuts the wait short
                continue
            except Exception as exc:
                self._fail(batch, exc)
                continue
            for attempt, result in batch:
                result.set(outcomes[attempt.queue_id])

    @staticmethod
    def _fail(batch, exc):
        log.error("recording the results of %d delivery attempt(s) failed: %s",
                  len(batch), exc)
        for _, result in batch:
            result.set_exception(exc)

    def close(self, timeout=10.0):
        """Record what is still waiting (those deliveries happened: recording them keeps
        them from being sent twice), then stop; the queue may be closed after this."""
        self._closing = True
        self._closed.set()
        self._wakeup.set()
        self._runner.join(timeout)
