"""The smtpd worker process's main loop: serve until told to stop, retired, or orphaned.

Runs in a child forked by elemta.master. It opens its own queue (LMDB) after the fork,
serves SMTP on the listening sockets it inherited, beats its heartbeat on the scoreboard,
and stops gracefully on SIGTERM/SIGINT, at once on SIGQUIT, and on its own when it has
served max_use sessions, idled max_idle seconds, or lost its master (so no orphan keeps a
port). SIGUSR1 reopens the log file.
"""

import logging
import os
import random
import signal
import time

import gevent
from gevent.event import Event

from elemta.smtpd.server import SMTPServer
from elemta.util import logs
from elemta.util.scoreboard import RUNNING

log = logging.getLogger("elemta.smtpd")

# How often a worker looks at its master, its use count and its idleness.
WATCH_INTERVAL = 1.0


class SMTPDWorker:
    """One smtpd worker process: an SMTPServer plus its life cycle."""

    def __init__(self, config, listening, slot, scoreboard, client_counts, master_pid):
        self.config = config
        self.listening = listening
        self.slot = slot
        self.scoreboard = scoreboard
        self.client_counts = client_counts
        self.master_pid = master_pid
        self.server = None
        self.grace = config.master.stop_grace
        self._stopping = Event()
        # Jitter, so workers started together do not all retire together (gunicorn).
        max_use = config.smtpd.max_use
        self.max_use = max_use + random.randint(0, max_use // 10) if max_use else 0

    def run(self):
        """Serve until stopped; returns the exit status (0)."""
        from setproctitle import setproctitle
        setproctitle("elemta: smtpd")
        self.server = SMTPServer(self.config, self.listening, self.client_counts)
        self.server.max_use = self.max_use
        self.server.on_retire = self._retire
        gevent.signal_handler(signal.SIGTERM, self.handle_term)
        gevent.signal_handler(signal.SIGINT, self.handle_term)
        gevent.signal_handler(signal.SIGQUIT, self.handle_quit)
        gevent.signal_handler(signal.SIGUSR1, logs.reopen)
        self.server.start()
        self.scoreboard.set_state(self.slot, RUNNING)
        gevent.spawn(self._heartbeat)
        gevent.spawn(self._watch)
        self._stopping.wait()
        log.info("smtpd stopping: %d session(s) get %ds to finish", self.server.sessions,
                 self.grace)
        self.server.stop(self.grace)
        return 0

    def handle_term(self):
        """SIGTERM, SIGINT: stop accepting, let open sessions finish (up to the grace)."""
        self._stopping.set()

    def handle_quit(self):
        """SIGQUIT: stop now, cutting open sessions."""
        self.grace = 0
        self._stopping.set()

    def _heartbeat(self):
        interval = min(1.0, self.config.master.heartbeat_timeout / 4)
        while True:
            self.scoreboard.beat(self.slot)
            gevent.sleep(interval)

    def _watch(self):
        idle_limit = self.config.smtpd.max_idle
        while not self._stopping.is_set():
            gevent.sleep(WATCH_INTERVAL)
            if os.getppid() != self.master_pid:
                log.warning("master %d is gone; smtpd stops", self.master_pid)
                return self._stopping.set()
            if (idle_limit and not self.server.sessions
                    and time.monotonic() - self.server.last_active > idle_limit):
                return self._retire("idle for %ds (max_idle)" % idle_limit)

    def _retire(self, reason):
        """Tell the master to start a replacement now, then stop like on SIGTERM."""
        if self._stopping.is_set():
            return
        log.info("smtpd retiring: %s", reason)
        self.scoreboard.retire(self.slot)
        try:
            os.kill(self.master_pid, signal.SIGUSR2)
        except ProcessLookupError:
            pass
        self._stopping.set()
