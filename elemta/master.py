"""The master process: forks smtpd workers on shared sockets and keeps them running.

A first, small supervisor in the shape of gunicorn's arbiter (design.md): it binds
nothing and parses no mail itself; it forks `smtpd.workers` children that share the
listening sockets, respawns one that dies (with a pause if it keeps dying), and on
SIGTERM/SIGINT asks them all to finish and waits. Signal handlers only queue the
signal and wake the loop through a pipe (design rule 1). The master issue grows this
into the full process model (delivery, pickup, api, heartbeats, reload).
"""

import errno
import logging
import os
import select
import signal
import time

log = logging.getLogger("elemta")

# A worker that dies sooner than this after its start counts as crashing.
CRASH_WINDOW = 5.0
# How long a crashing worker slot waits before it is forked again.
CRASH_BACKOFF = 2.0
# Beyond the workers' own grace period, how long the master waits before SIGKILL.
KILL_AFTER = 5.0


class Master:
    """Supervises smtpd worker processes."""

    def __init__(self, worker_count, run_worker, stop_grace, slot_freed=None):
        """run_worker(master_pid, slot) runs in each child and returns its exit status;
        slot (0 .. worker_count-1) is the child's place in shared tables, and
        slot_freed(slot) is called in the master once that child has died."""
        self.worker_count = worker_count
        self.run_worker = run_worker
        self.stop_grace = stop_grace
        self.slot_freed = slot_freed
        self.workers = {}            # pid -> (slot, start time)
        self._signals = []
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._next_spawn = 0.0

    # ---- the loop -------------------------------------------------------------------

    def run(self):
        """Supervise until SIGTERM/SIGINT; returns the exit status."""
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(signum, self._on_signal)
        try:
            from setproctitle import setproctitle
            setproctitle("elemta: master")
        except ImportError:      # pragma: no cover - a declared dependency
            pass
        while True:
            self.reap_workers()
            while self._signals:
                signum = self._signals.pop(0)
                if signum in (signal.SIGTERM, signal.SIGINT):
                    return self.stop()
            self.spawn_workers()
            self._sleep(1.0)

    def spawn_workers(self):
        while len(self.workers) < self.worker_count and time.monotonic() >= self._next_spawn:
            busy = {slot for slot, _ in self.workers.values()}
            self.spawn_worker(min(set(range(self.worker_count)) - busy))

    def spawn_worker(self, slot):
        pid = os.fork()
        if pid:
            self.workers[pid] = (slot, time.monotonic())
            return pid
        # The child: plain signal handling again; the worker installs its own.
        status = 1
        try:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                signal.signal(signum, signal.SIG_DFL)
            os.close(self._wake_r)
            os.close(self._wake_w)
            status = self.run_worker(os.getppid(), slot)
        except BaseException:
            log.exception("smtpd worker failed")
        finally:
            logging.shutdown()
            os._exit(status)

    def reap_workers(self):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if not pid:
                return
            if pid not in self.workers:
                continue
            slot, started = self.workers.pop(pid)
            if self.slot_freed is not None:
                self.slot_freed(slot)
            code = os.waitstatus_to_exitcode(status)
            how = "exit status %d" % code if code >= 0 else "signal %d" % -code
            log.warning("smtpd worker %d ended with %s; starting another", pid, how)
            if time.monotonic() - started < CRASH_WINDOW:
                self._next_spawn = time.monotonic() + CRASH_BACKOFF

    def stop(self):
        """Ask every worker to finish (SIGTERM), wait, then kill what is left."""
        log.info("master stopping %d worker(s)", len(self.workers))
        self._kill_all(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace + KILL_AFTER
        while self.workers and time.monotonic() < deadline:
            self.reap_workers()
            self._sleep(0.1)
        if self.workers:
            log.warning("killing %d worker(s) that did not stop", len(self.workers))
            self._kill_all(signal.SIGKILL)
            while self.workers:
                pid, _ = os.waitpid(-1, 0)
                self.workers.pop(pid, None)
        return 0

    # ---- helpers ------------------------------------------------------------------------

    def _kill_all(self, signum):
        for pid in list(self.workers):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                self.workers.pop(pid, None)

    def _on_signal(self, signum, frame):
        self._signals.append(signum)
        try:
            os.write(self._wake_w, b".")
        except OSError as exc:       # the pipe is full: the loop is awake anyway
            if exc.errno != errno.EAGAIN:
                raise

    def _sleep(self, seconds):
        try:
            ready, _, _ = select.select([self._wake_r], [], [], seconds)
        except InterruptedError:
            return
        if ready:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
