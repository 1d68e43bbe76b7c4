"""What every gevent child of the master shares: its title, signals, heartbeat, and
noticing that the master is gone or that it should retire.

Used by the smtpd and delivery workers (elemta.smtpd.worker, elemta.delivery.worker).
A subclass sets `kind`, calls start_life() once it serves, and overrides on_stop() to
wake its main loop. See also: elemta.master (who reads the scoreboard), design.md rule 7.
"""

import logging
import os
import signal

import gevent
from gevent.event import Event

from elemta.util import logs
from elemta.util.scoreboard import RUNNING

# How often a child looks at its master (and at whatever watch() checks).
WATCH_INTERVAL = 1.0


class GeventChild:
    """Life cycle of one forked gevent child: SIGTERM/SIGINT graceful, SIGQUIT at once,
    SIGUSR1 reopen logs, a heartbeat on the scoreboard, exit when orphaned."""

    kind = "child"

    def __init__(self, config, slot, scoreboard, master_pid):
        self.config = config
        self.slot = slot
        self.scoreboard = scoreboard
        self.master_pid = master_pid
        self.grace = config.master.stop_grace
        self.stopping = Event()
        self.log = logging.getLogger("elemta." + self.kind)

    def set_title(self):
        from setproctitle import setproctitle
        setproctitle("elemta: " + self.kind)

    def start_life(self):
        """Install the signal handlers and start beating; returns the helper greenlets."""
        gevent.signal_handler(signal.SIGTERM, self.handle_term)
        gevent.signal_handler(signal.SIGINT, self.handle_term)
        gevent.signal_handler(signal.SIGQUIT, self.handle_quit)
        gevent.signal_handler(signal.SIGUSR1, logs.reopen)
        self.scoreboard.set_state(self.slot, RUNNING)
        return [gevent.spawn(self._heartbeat), gevent.spawn(self._watch)]

    def handle_term(self):
        """SIGTERM, SIGINT: stop taking work; what is under way gets master.stop_grace."""
        self.stopping.set()
        self.on_stop()

    def handle_quit(self):
        """SIGQUIT: stop now."""
        self.grace = 0
        self.handle_term()

    def on_stop(self):
        """Wake the main loop (subclasses)."""

    def watch(self):
        """Checked every WATCH_INTERVAL: a reason to retire, or None (subclasses)."""
        return None

    def retire(self, reason):
        """Tell the master to start a replacement now, then stop like on SIGTERM."""
        if self.stopping.is_set():
            return
        self.log.info("%s retiring: %s", self.kind, reason)
        self.scoreboard.retire(self.slot)
        try:
            os.kill(self.master_pid, signal.SIGUSR2)
        except ProcessLookupError:
            pass
        self.handle_term()

    def _heartbeat(self):
        interval = min(1.0, self.config.master.heartbeat_timeout / 4)
        while True:
            self.scoreboard.beat(self.slot)
            gevent.sleep(interval)

    def _watch(self):
        while not self.stopping.is_set():
            gevent.sleep(WATCH_INTERVAL)
            if os.getppid() != self.master_pid:
                self.log.warning("master %d is gone; %s stops", self.master_pid, self.kind)
                return self.handle_term()
            reason = self.watch()
            if reason:
                return self.retire(reason)
