"""What every gevent child of the master shares: its title, signals, heartbeat, noticing
that the master is gone or that it should retire (max_use, with jitter, or a reason of
its own), the socket files it leaves behind, and how it says that it cannot start.

Used by every kind of child in the master's service table (elemta.services): smtpd,
delivery, pickup, local, api and showq (elemta.smtpd.worker, elemta.delivery.worker,
elemta.pickup.worker, elemta.local.agent, elemta.api.server, elemta.showq.server); none
of them sets its own title, signal handlers, heartbeat or orphan check.
A subclass sets `kind` and fills in the life cycle run() goes through:

    boot()       open what it needs; raise BootError naming what is missing or taken
                 (a port in use, a file it cannot read): the child then leaves that text
                 on the scoreboard and exits with EX_CANTBOOT, and the master backs off
                 before it tries that kind again, logging the text once per attempt
    serve()      work until self.stopping is set (default: wait for it)
    shut_down()  close what boot() opened

Signals (handlers only set flags or wake the loop, design rule 1): SIGTERM stops taking
work and gives what is under way master.stop_grace, SIGQUIT stops at once, SIGUSR1
reopens the log files, SIGINT is ignored. A heartbeat greenlet writes the scoreboard; a watch greenlet stops
the child when the master is gone and retires it when watch() says so; a third writes
its metric counts to their files every second. A long job run
without yielding calls progress() between its pieces, so the master never takes it for
a hung process. A child whose kind has a max_use (smtpd sessions, delivery messages) sets
`max_use_option` and calls used() as it takes work on: it retires once it has taken
max_use (plus up to a tenth, jittered) pieces.
See also: elemta.master (who reads the scoreboard), design.md rule 7.
"""

import logging
import os
import random
import signal

import gevent
from gevent.event import Event

from elemta.util import logs, metricvalues
from elemta.util.scoreboard import RUNNING

# The exit status of a child that could not start (sysexits style; gunicorn's
# WORKER_BOOT_ERROR is 3 too). The master backs off instead of respawning it at once.
EX_CANTBOOT = 3
# How often a child looks at its master (and at whatever watch() checks).
WATCH_INTERVAL = 1.0


class BootError(Exception):
    """A child cannot start; the text is the one line the master logs about it."""


def jittered(max_use):
    """max_use plus up to a tenth more, so children started together do not all retire
    together (gunicorn's max_requests_jitter); 0 stays 0 (no limit)."""
    return max_use + random.randint(0, max_use // 10) if max_use else 0


class GeventChild:
    """Life cycle of one forked gevent child: SIGTERM graceful, SIGQUIT at once, SIGUSR1
    reopen logs, SIGINT ignored, a heartbeat on the scoreboard, exit when orphaned."""

    kind = "child"
    # The config section of this kind's max_use, or None: it never retires for its use.
    max_use_option = None

    def __init__(self, config, slot, scoreboard, master_pid):
        self.config = config
        self.slot = slot
        self.scoreboard = scoreboard
        self.master_pid = master_pid
        self.grace = config.master.stop_grace
        self.max_use = jittered(getattr(config, self.max_use_option).max_use) \
            if self.max_use_option else 0
        self.uses = 0                # pieces of work taken on since start (for max_use)
        self.stopping = Event()
        self.log = logging.getLogger("elemta." + self.kind)
        self._signals_installed = False
        self._socket_files = []      # (path, inode) of sockets bound here

    # ---- the life cycle -------------------------------------------------------------------

    def run(self):
        """The child's main: boot, serve until stopped, shut down; returns the exit
        status (0, or EX_CANTBOOT with the cause on the scoreboard)."""
        self.set_title()
        # Before boot, which may take a while (imports, files): a SIGTERM or SIGQUIT sent
        # meanwhile, as a quick reload or stop does, then ends it cleanly.
        self.install_signal_handlers()
        try:
            self.boot()
        except BootError as exc:
            return self.cannot_boot(str(exc))
        helpers = self.start_life()
        try:
            self.serve()
        finally:
            gevent.killall(helpers)
            try:
                self.shut_down()
            finally:
                self.remove_socket_files()
        return 0

    def boot(self):
        """Open what the child needs; raise BootError naming what is missing (subclasses)."""

    def serve(self):
        """Work until stopped (subclasses; the default waits)."""
        self.stopping.wait()

    def shut_down(self):
        """Close what boot() opened (subclasses)."""

    def cannot_boot(self, cause):
        """Leave the cause for the master (who logs it) and return EX_CANTBOOT."""
        self.scoreboard.set_cause(self.slot, cause)
        return EX_CANTBOOT

    def set_title(self):
        from setproctitle import setproctitle
        setproctitle("elemta: " + self.kind)
        logs.set_process(self.kind)

    def install_signal_handlers(self):
        if self._signals_installed:
            return
        self._signals_installed = True
        gevent.signal_handler(signal.SIGTERM, self.handle_term)
        # SIGINT is the terminal's Ctrl-C and reaches every process of the foreground
        # group at once. Were each child to stop on it by itself, children would be gone
        # before the master knew of a stop (it would see deaths, not a stop), and they
        # would not stop in the master's order. So the master alone acts on SIGINT, as
        # Postfix's master_sig.c does (it tells its children with SIGTERM): the orderly
        # stop (SIGTERM to each child, master.stop_grace), or on a second one SIGQUIT.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        gevent.signal_handler(signal.SIGQUIT, self.handle_quit)
        gevent.signal_handler(signal.SIGUSR1, logs.reopen)

    def start_life(self):
        """Say it serves and start beating; returns the helper greenlets."""
        self.install_signal_handlers()
        self.scoreboard.set_state(self.slot, RUNNING)
        return [gevent.spawn(self._heartbeat), gevent.spawn(self._watch),
                gevent.spawn(self._flush_metrics)]

    # ---- signals, retirement, progress ----------------------------------------------------

    def handle_term(self):
        """SIGTERM: stop taking work; what is under way gets master.stop_grace."""
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
        except (ProcessLookupError, PermissionError):
            # Gone, or a root master this child (now master.user) may not signal: the
            # master reads the scoreboard's RETIRING within a second anyway.
            pass
        self.handle_term()

    def used(self, count, done):
        """count more pieces of work were taken on; done says what all of them were
        ("served %d sessions"). Retires once max_use is reached; True when it does."""
        self.uses += count
        if self.max_use and self.uses >= self.max_use:
            self.retire((done + " (max_use)") % self.uses)
            return True
        return False

    def progress(self):
        """Called between the pieces of a long job that does not yield by itself (a big
        maildrop batch): a piece was done, so beat, and let signals and the watch run."""
        self.scoreboard.beat(self.slot)
        gevent.sleep(0)

    # ---- socket files -----------------------------------------------------------------------

    def own_socket_file(self, path):
        """Remove path, a socket this child just bound, when the child ends."""
        self._socket_files.append((path, os.lstat(path).st_ino))

    def remove_socket_files(self):
        """Unlink the sockets this child bound, unless a newer child (a reload's) has bound
        the same name since. Root children call it acting as the spool's owner."""
        for path, inode in self._socket_files:
            try:
                if os.lstat(path).st_ino == inode:
                    os.unlink(path)
            except OSError:
                pass
        self._socket_files = []

    # ---- the helper greenlets ---------------------------------------------------------------

    def _heartbeat(self):
        interval = min(1.0, self.config.master.heartbeat_timeout / 4)
        while True:
            self.scoreboard.beat(self.slot)
            gevent.sleep(interval)

    def _flush_metrics(self):
        # Counts of a quiet spell reach the files too (busy ones flush as they count);
        # the master flushes the rest when the child ends (elemta.util.metricvalues).
        while True:
            gevent.sleep(metricvalues.FLUSH_INTERVAL)
            metricvalues.flush()

    def _watch(self):
        while not self.stopping.is_set():
            gevent.sleep(WATCH_INTERVAL)
            if os.getppid() != self.master_pid:
                self.log.warning("master %d is gone; %s stops", self.master_pid, self.kind)
                return self.handle_term()
            reason = self.watch()
            if reason:
                return self.retire(reason)
