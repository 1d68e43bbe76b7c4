"""The master process: forks the workers on shared sockets and keeps them running.

In the shape of gunicorn's arbiter (design.md): the master binds (as root when it must),
forks the children its service table asks for (elemta.services, Postfix's master.cf:
`smtpd.workers` smtpd children, the delivery workers, one pickup, one showq and one api
child, and one local delivery agent when there are delivery workers, the only child
that keeps root), and then only watches: it reaps and respawns children, kills a child whose
heartbeat stops, starts a replacement at once when a child retires (max_use, max_idle),
and turns signals into actions. It never parses mail and never opens the queue for work;
no code here names a kind of child, the table says what each kind needs.

Crash loops: a child that cannot start (a port taken, a file it needs missing) exits
with EX_CANTBOOT and leaves the cause on the scoreboard (elemta.util.child); the master
logs one line naming it and tries that kind again after BOOT_BACKOFF seconds, doubling
up to BOOT_BACKOFF_MAX. A child that dies within CRASH_WINDOW of its start waits
CRASH_BACKOFF, doubling up to CRASH_BACKOFF_MAX while it keeps happening. Once a child of
the kind has served STEADY seconds the kind starts from the first delay again.

Signals (handlers only queue them and wake the loop through a pipe, design rule 1):
  SIGTERM, SIGINT  stop: children finish their sessions (up to master.stop_grace), exit 0;
                   a second SIGINT or a SIGQUIT while stopping makes it a fast stop
  SIGQUIT          fast stop: children cut their sessions
  SIGHUP           reload: re-read the config, start new children with it, then stop the
                   old ones once the new ones serve; the sockets never close, so no
                   connection is refused
  SIGUSR1          reopen log files (here and in every child)
  SIGUSR2          a child is retiring: start its replacement now
Stops sent to the whole process group (Ctrl-C in a terminal, `kill -- -PGID`, systemd's
KillMode=control-group) reach the children too, and a child may have exited before the
master runs its own handler. So the master takes its signals before judging what it
reaped, counts a child that ends while a stop is pending or under way as stopping, and
never forks once a stop has begun. Children ignore SIGINT (elemta.util.child): Ctrl-C is
the master's to turn into the orderly stop.
See also: elemta.services, elemta.util.child, elemta.util.scoreboard, elemta.cli.elemta.
"""

import errno
import grp
import logging
import os
import pwd
import select
import signal
import time

from setproctitle import setproctitle

from elemta import metrics
from elemta.services import SERVICES, run_child as run_service
from elemta.util import logs, sdnotify
from elemta.util.child import EX_CANTBOOT
from elemta.util.procs import ended_how
from elemta.util.scoreboard import RETIRING, RUNNING, STARTING, Scoreboard
from elemta.util.text import printable

log = logging.getLogger("elemta.master")


def _exit_before_serving(signum, frame):
    os._exit(0)


def _run_callbacks(callbacks, argument):
    """Run each callback(argument); one that fails is logged, and never ends the master
    (nor keeps the others from running)."""
    for callback in callbacks:
        try:
            callback(argument)
        except Exception:
            log.exception("%s(%s) failed", getattr(callback, "__qualname__", callback),
                          argument)


# A child that dies sooner than this after its start counts as crashing.
CRASH_WINDOW = 5.0
# How long a crashing kind of child waits before it is forked again, doubling while it
# keeps crashing. Kept short: a crash is often a kill from outside (OOM, an admin), and
# mail must flow again soon after it.
CRASH_BACKOFF = 2.0
CRASH_BACKOFF_MAX = 10.0
# The same for a kind whose child could not start (EX_CANTBOOT): that needs an admin (a
# port to free, a file to restore), so the tries thin out further.
BOOT_BACKOFF = 2.0
BOOT_BACKOFF_MAX = 60.0
# A child that has served this long shows its kind is well: the next failure of that kind
# waits the first delay again.
STEADY = 30.0
# A starting child may take this long before its first heartbeat (imports, files).
BOOT_TIMEOUT = 30.0
# After SIGABRT (heartbeat lost) or the stop grace, how long before SIGKILL.
KILL_AFTER = 5.0
# How long new children may take to start serving before old ones are stopped anyway.
RELOAD_WAIT = 15.0

# SIGINT too: a child ignores it for its whole life (elemta.util.child says why).
CHILD_IGNORES_AT_START = (signal.SIGHUP, signal.SIGUSR1, signal.SIGINT)
CHILD_STOPS_AT_START = (signal.SIGTERM, signal.SIGQUIT)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1,
           signal.SIGUSR2, signal.SIGCHLD)


class Child:
    """What the master knows of one forked child."""

    def __init__(self, service, slot, generation, started):
        self.service = service
        self.kind = service.kind
        self.slot = slot
        self.generation = generation
        self.started = started
        self.stopping = False          # asked to stop: its exit is expected
        self.abort_sent = None         # when SIGABRT went out for a lost heartbeat


class Master:
    """Supervises the children of the service table. Create, then run()."""

    def __init__(self, config, listening, reload_config, bind, run_child=run_service,
                 services=SERVICES, own_sockets=None):
        """listening: list of (Listener, socket), bound already.
        reload_config(): the new Config, or raises ConfigError (SIGHUP).
        bind(listener): a listening socket for a listener new in a reload; raises OSError.
        run_child(service, config, listening, slot, scoreboard, master_pid, shared): the
        child's main (default elemta.services.run_child), returning its exit status;
        listening is [] unless service.listens, or [(Endpoint, socket)] for a row that
        binds a socket of its own.
        own_sockets: {kind: (Endpoint, socket)} bound already for the rows that bind.
        services: the service table (elemta.services.SERVICES)."""
        self.config = config
        self.listening = list(listening)
        self.reload_config = reload_config
        self.bind = bind
        self.run_child = run_child
        self.services = tuple(services)
        self.own_sockets = dict(own_sockets or {})     # kind -> (Endpoint, socket)
        self.generation = 0
        self.children = {}             # pid -> Child
        # Each kind its own range of slots, sized once for the master's life.
        self.slots = {}                # kind -> range of scoreboard slots
        start = 0
        for service in self.services:
            self.slots[service.kind] = range(start, start + service.slots(config))
            start += service.slots(config)
        self.scoreboard = Scoreboard(start)
        self.slot_freed = []           # callbacks(slot) run when a child's slot frees up
        # Tables the children of a kind share, made now: before any fork.
        self.shared = {}               # kind -> the service's shared table
        for service in self.services:
            if service.shared:
                self.shared[service.kind] = service.make_shared(self.scoreboard.slots)
                self.slot_freed.append(self.shared[service.kind].clear_row)
        self.child_exited = []         # callbacks(pid) run when any child has been reaped
        self.close_in_child = []       # descriptors only the master may hold (the lock)
        self._signals = []
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        self._not_before = {}          # kind -> monotonic time a crashed kind may respawn
        self._failures = {}            # kind -> (failures in a row, time of the last)
        self._reload_started = None
        self.stopping = False          # a stop has begun: nothing is forked any more

    # ---- the loop -------------------------------------------------------------------------

    def run(self):
        """Supervise until told to stop; returns the exit status."""
        for signum in SIGNALS:
            signal.signal(signum, self._on_signal)
        setproctitle("elemta: master")
        logs.set_process("master")
        self.spawn_children()
        sdnotify.notify("READY=1", "MAINPID=%d" % os.getpid())
        while True:
            # Signals first: after a stop sent to the whole group, the children's exits
            # must be judged knowing that a stop is on (reap_children looks, too).
            for signum in self._take_signals():
                name = signal.Signals(signum).name[3:].lower()
                status = getattr(self, "handle_" + name)()
                if status is not None:
                    return status
            self.reap_children()
            self.murder_children()
            self.forget_failures()
            self.stop_old_generation()
            self.spawn_children()
            self._sleep(1.0)

    # ---- signal handlers (in the loop, never in signal context) --------------------------

    def handle_term(self):
        """SIGTERM: graceful stop."""
        return self.stop(signal.SIGTERM)

    handle_int = handle_term

    def handle_quit(self):
        """SIGQUIT: fast stop."""
        return self.stop(signal.SIGQUIT)

    def handle_hup(self):
        """SIGHUP: reload the configuration."""
        self.reload()

    def handle_usr1(self):
        """SIGUSR1: reopen log files, here and in every child."""
        logs.reopen()
        self._kill_all(signal.SIGUSR1)

    def handle_usr2(self):
        """SIGUSR2: a child retires; the loop's spawn_children() replaces it."""

    def handle_chld(self):
        """SIGCHLD: the loop's reap_children() collects it."""

    # ---- children -------------------------------------------------------------------------

    def wanted(self):
        """{kind: count} the current configuration asks for."""
        return {service.kind: service.count(self.config) for service in self.services}

    def spawn_children(self):
        if self.stopping or self.stop_pending():
            return
        now = self.clock()
        for service in self.services:
            kind = service.kind
            if now < self._not_before.get(kind, 0):
                continue
            serving = [c for c in self.children.values()
                       if c.kind == kind and c.generation == self.generation
                       and not c.stopping
                       and self.scoreboard.state(c.slot) != RETIRING]
            for _ in range(service.count(self.config) - len(serving)):
                slot = self._free_slot(kind)
                if slot is None:
                    log.warning("no free %s slot; raise it by restarting elemta", kind)
                    break
                self.spawn_child(service, slot)

    def _free_slot(self, kind):
        used = {c.slot for c in self.children.values()}
        return next((s for s in self.slots[kind] if s not in used), None)

    def spawn_child(self, service, slot):
        kind = service.kind
        self.scoreboard.claim(slot, 0)
        master_pid = os.getpid()     # taken before the fork: the child's ppid may change
        # Signals wait until the child has put the master's handlers away: caught by them
        # in the child, a stop would be lost, and the child killed only after the grace.
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            pid = self.fork()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
            raise
        if pid:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
            self.children[pid] = Child(service, slot, self.generation, self.clock())
            return pid
        status = 1
        # First thing: until its title is set, `ps` and `elemtactl status` would show
        # the child as a second master (building the child may take a while).
        setproctitle("elemta: " + kind)
        logs.set_process(kind)
        try:
            for signum in SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
            # Until the child has its own handlers (building it may take a while), a stop
            # ends it at once and cleanly: it holds nothing yet.
            for signum in CHILD_STOPS_AT_START:
                signal.signal(signum, _exit_before_serving)
            # Until the child has its own handlers, a reload or log reopen sent to the
            # whole group must not kill it (their default action is to terminate).
            for signum in CHILD_IGNORES_AT_START:
                signal.signal(signum, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
            for fd in [self._wake_r, self._wake_w] + self.close_in_child:
                os.close(fd)
            listening = self.listening
            if not service.listens:
                for _, sock in listening:
                    sock.close()          # this process's copies: it never accepts on them
                listening = []
            for other, bound in self.own_sockets.items():
                if other == kind:
                    listening = [bound]
                else:
                    bound[1].close()
            if not service.privileged:
                drop_privileges(self.config.master)
            status = self.run_child(service, self.config, listening, slot,
                                    self.scoreboard, master_pid, self.shared.get(kind))
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 1
        except BaseException as exc:
            log.exception("%s child failed", kind)
            if self.scoreboard.state(slot) == STARTING:     # it never served
                self.scoreboard.set_cause(slot, "%s: %s" % (type(exc).__name__, exc))
                status = EX_CANTBOOT
        finally:
            try:
                metrics.flush()    # os._exit skips atexit: the last counts, before it
            finally:
                logging.shutdown()
                os._exit(status)

    def reap_children(self):
        while True:
            try:
                pid, status = self.wait_any()
            except ChildProcessError:
                return
            if not pid:
                return
            _run_callbacks(self.child_exited, pid)
            child = self.children.pop(pid, None)
            if child is None:
                continue
            retired = self.scoreboard.state(child.slot) == RETIRING
            cause = self.scoreboard.cause(child.slot)
            self.scoreboard.release(child.slot)
            _run_callbacks(self.slot_freed, child.slot)
            code = os.waitstatus_to_exitcode(status)
            how = ended_how(status)
            if not child.stopping and (self.stopping or self.stop_pending()):
                # The group's stop reached it before the master got to send its own.
                child.stopping = True
            if child.stopping or (retired and code == 0):
                log.info("%s child %d ended (%s)", child.kind, pid,
                         "retired" if retired else how)
                if retired or child.generation != self.generation:
                    metrics.worker_restarted(child.kind, "retired" if retired else "reload")
                continue
            if code == EX_CANTBOOT:
                self.cannot_start(child, pid, cause)
                continue
            metrics.worker_restarted(child.kind,
                                     "heartbeat" if child.abort_sent else "crashed")
            if self.clock() - child.started >= CRASH_WINDOW:
                log.warning("%s child %d ended with %s; starting another", child.kind, pid,
                            how)
                continue
            delay = self.back_off(child.kind, CRASH_BACKOFF, CRASH_BACKOFF_MAX)
            if delay is None:
                delay = self._not_before[child.kind] - self.clock()
            log.warning("%s child %d ended with %s; starting another in %s", child.kind,
                        pid, how, _seconds(delay))

    def cannot_start(self, child, pid, cause):
        """A child exited with EX_CANTBOOT: one line naming the cause, then a pause."""
        metrics.worker_restarted(child.kind, "cannot_start")
        delay = self.back_off(child.kind, BOOT_BACKOFF, BOOT_BACKOFF_MAX)
        if delay is None:
            # A sibling of the same round failed already and said so: no second line.
            log.debug("%s child %d cannot start either: %s", child.kind, pid, cause)
            return
        log.error("%s child cannot start: %s; trying again in %s", child.kind,
                  printable(cause or "it exited with status %d and gave no cause"
                            % EX_CANTBOOT), _seconds(delay))

    def back_off(self, kind, first, most):
        """Hold kind back after a failure: first seconds, doubling with each failure in
        a row, at most `most`. Returns the delay, or None when a failure of the same round
        (another child of the kind, forked at the same time) holds it back already."""
        now = self.clock()
        if now < self._not_before.get(kind, 0):
            return None
        failures = self._failures.get(kind, (0, 0))[0] + 1
        self._failures[kind] = (failures, now)
        delay = min(most, first * 2 ** min(failures - 1, 16))
        self._not_before[kind] = now + delay
        return delay

    def forget_failures(self):
        """A kind with a child started since its last failure that has served STEADY
        seconds starts its count anew (an older sibling that kept serving proves nothing
        about a new child's start)."""
        if not self._failures:
            return
        now = self.clock()
        for child in list(self.children.values()):
            failed = self._failures.get(child.kind)
            if (failed is not None and child.started > failed[1]
                    and now - child.started >= STEADY
                    and self.scoreboard.state(child.slot) == RUNNING):
                del self._failures[child.kind]

    def murder_children(self):
        """Kill children whose heartbeat stopped: SIGABRT, then SIGKILL."""
        timeout = self.config.master.heartbeat_timeout
        now = self.clock()
        for pid, child in list(self.children.items()):
            if child.abort_sent is not None:
                if now - child.abort_sent > KILL_AFTER:
                    self._kill(pid, signal.SIGKILL)
                continue
            # Until it serves, a child beats only once its boot is done.
            limit = max(timeout, BOOT_TIMEOUT) \
                if self.scoreboard.state(child.slot) == STARTING else timeout
            if self.scoreboard.silence(child.slot) > limit:
                log.error("%s child %d sent no heartbeat for %gs; killing it", child.kind,
                          pid, limit)
                child.abort_sent = now
                self._kill(pid, signal.SIGABRT)

    def stop_old_generation(self):
        """After a reload, stop the previous children once the new listening ones serve
        (so no connection waits for a child that is not there yet)."""
        old = [(pid, c) for pid, c in self.children.items()
               if c.generation != self.generation and not c.stopping]
        if not old:
            self._reload_started = None
            return
        wanted = self.wanted()
        ready = True
        for service in self.services:
            if not service.listens:
                continue
            new = [c for c in self.children.values()
                   if c.generation == self.generation and c.kind == service.kind]
            ready = ready and len(new) >= wanted[service.kind] and all(
                self.scoreboard.state(c.slot) == RUNNING for c in new)
        if not ready and self.clock() - (self._reload_started or 0) < RELOAD_WAIT:
            return
        for pid, child in old:
            child.stopping = True
            self._kill(pid, signal.SIGTERM)
        sdnotify.notify("READY=1")

    # ---- reload and stop ------------------------------------------------------------------

    def reload(self):
        from elemta.config import ConfigError
        log.info("reloading the configuration")
        try:
            config = self.reload_config()
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration:\n%s", exc)
            return
        sdnotify.notify("RELOADING=1")
        by_address = {(l.address, l.port): sock for l, sock in self.listening}
        listening, fresh = [], []
        try:
            for listener in config.listeners:
                sock = by_address.get((listener.address, listener.port))
                if sock is None:
                    sock = self.bind(listener)
                    fresh.append(sock)
                listening.append((listener, sock))
        except OSError as exc:
            for sock in fresh:
                sock.close()
            log.error("reload refused, keeping the running configuration: cannot listen "
                      "on %s port %d: %s", listener.address, listener.port,
                      exc.strerror or exc)
            sdnotify.notify("READY=1")
            return
        own_sockets = self.rebind_own_sockets(config)
        kept = {id(sock) for _, sock in listening}
        for _, sock in self.listening:
            if id(sock) not in kept:
                sock.close()       # the old children keep their own copy until they exit
        self.own_sockets = own_sockets
        if config.logging != self.config.logging:
            logs.setup(config.logging)
        self.config, self.listening = config, listening
        self.generation += 1
        self._reload_started = self.clock()
        self._not_before.clear()       # the new configuration may have fixed it
        self._failures.clear()
        self.spawn_children()

    def rebind_own_sockets(self, config):
        """{kind: (Endpoint, socket)} for config: the sockets of the rows that bind,
        kept where the endpoint stayed, bound anew where it moved (one that cannot be is
        logged, and its child then says it has none), closed where it went."""
        bound = {}
        for service in self.services:
            endpoint = service.binds(config) if service.binds else None
            old = self.own_sockets.get(service.kind)
            if old is not None and old[0] == endpoint:
                bound[service.kind] = old
                continue
            if old is not None:
                old[1].close()
            if endpoint is None:
                continue
            try:
                bound[service.kind] = (endpoint, self.bind(endpoint))
            except OSError as exc:
                log.error("%s: cannot listen on %s port %d: %s", service.kind,
                          endpoint.address, endpoint.port, exc.strerror or exc)
        return bound

    def stop(self, signum):
        """Send signum to every child, wait for them (then SIGKILL); returns 0. A SIGINT
        (a second Ctrl-C) or SIGQUIT meanwhile makes the rest of it a fast stop."""
        self.stopping = True
        sdnotify.notify("STOPPING=1")
        log.info("master stopping %d child(ren)%s", len(self.children),
                 " fast" if signum == signal.SIGQUIT else "")
        # New connections are refused from now on, not left waiting in a backlog nobody
        # will accept from (the children close their copies as they stop accepting).
        for _, sock in self.listening + list(self.own_sockets.values()):
            sock.close()
        for child in self.children.values():
            child.stopping = True
        self._kill_all(signum)
        deadline = self.clock() + self.config.master.stop_grace + KILL_AFTER
        fast = signum == signal.SIGQUIT
        while self.children and self.clock() < deadline:
            if not fast and {signal.SIGINT, signal.SIGQUIT} & set(self._take_signals()):
                fast = True
                log.info("master stopping %d child(ren) fast", len(self.children))
                self._kill_all(signal.SIGQUIT)
            self.reap_children()
            self._sleep(0.1)
        if self.children:
            log.warning("killing %d child(ren) that did not stop", len(self.children))
            self._kill_all(signal.SIGKILL)
            while self.children:
                self.reap_children()
                self._sleep(0.05)
        return 0

    # ---- the system calls (a test's Master fakes these three: no processes) --------------

    def fork(self):
        return os.fork()

    def wait_any(self):
        """(pid, wait status) of a child that ended, (0, 0) if none; raises
        ChildProcessError when there are no children."""
        return os.waitpid(-1, os.WNOHANG)

    def _kill(self, pid, signum):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    clock = staticmethod(time.monotonic)

    # ---- helpers --------------------------------------------------------------------------

    def _kill_all(self, signum):
        for pid in list(self.children):
            self._kill(pid, signum)

    def _on_signal(self, signum, frame):
        self._signals.append(signum)
        try:
            os.write(self._wake_w, b".")
        except OSError as exc:       # the pipe is full: the loop is awake anyway
            if exc.errno != errno.EAGAIN:
                raise

    def _take_signals(self):
        signals, self._signals = self._signals, []
        return signals

    def stop_pending(self):
        """True if a stop signal has arrived that the loop has not handled yet."""
        return any(signum in STOP_SIGNALS for signum in self._signals)

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


def _seconds(value):
    """A delay for a log line: "8 s", "0.5 s"."""
    return "%g s" % round(value, 1)


def drop_privileges(master_config):
    """Become master.user / master.group (children only; the master keeps root to bind)."""
    if master_config.user is None and master_config.group is None:
        return
    uid, gid = resolve_user(master_config)
    if os.getuid() == uid and os.getgid() == gid:
        return
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


def resolve_user(master_config):
    """(uid, gid) for master.user and master.group; raises KeyError naming what is missing."""
    user, group = master_config.user, master_config.group
    if user:
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise KeyError("master.user: no such user: %s" % user) from None
        uid, gid = entry.pw_uid, entry.pw_gid
    else:
        # No master.user: stay who we are. That uid need not be in /etc/passwd: container
        # runtimes (Kubernetes runAsUser, OpenShift's random uids) run images as any uid.
        uid, gid = os.getuid(), os.getgid()
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise KeyError("master.group: no such group: %s" % group) from None
    return uid, gid
