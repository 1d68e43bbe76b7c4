"""The local delivery agent (`elemta: local`): the one child of the master that keeps
root, because a mailbox is written as its user, as Postfix's local(8) does.

Runs in one child forked by elemta.master (kind "local"), which skips the drop to
master.user for it. It listens on spool/run/local.sock (owned by master.user, mode 0600;
a peer must be that user or root, checked with SO_PEERCRED) for the delivery workers'
requests (elemta.addressing.local_protocol). For each recipient it forks a process
(elemta.local.deliver), which stays root only to fork again for each piece of work done
as a user (elemta.local.privileges): it never writes a mailbox, reads a .forward or
runs a command as root. The aliases file is looked at before each request and read
again when it changed.

When the master is not root (a development run) the agent works as that user: mail to
that user is delivered where the files allow it, the rest defers saying why.
Life cycle: elemta.util.child (heartbeat, SIGTERM lets deliveries under way finish
within master.stop_grace, SIGQUIT stops at once, SIGUSR1 reopens logs, exits when the
master is gone). See also: elemta.delivery.local_transport (the other end).
"""

import json
import logging
import os
import signal
import socket
import struct

import gevent
import gevent.os
from gevent import socket as gsocket
from gevent.lock import BoundedSemaphore
from gevent.pool import Pool
from gevent.server import StreamServer

from elemta.addressing import local_protocol
from elemta.addressing.aliases import AliasTable
from elemta.addressing.resolve import Addressing
from elemta.local.deliver import RecipientDelivery
from elemta.local.privileges import is_root
from elemta.queue import wakeup
from elemta.queue.model import RCPT_DEFERRED
from elemta.queue.store import SpoolStore
from elemta.util.child import GeventChild
from elemta.util.eugid import acting_as
from elemta.util.procs import ended_how

log = logging.getLogger("elemta.local")

# Recipients delivered at once (one forked process each), and connections served at once.
MAX_DELIVERIES = 20
MAX_CONNECTIONS = 100
_PEERCRED = struct.Struct("3i")


class LocalAgent(GeventChild):
    """The one local delivery agent process (see the module docstring)."""

    kind = "local"

    def __init__(self, config, slot, scoreboard, master_pid):
        super().__init__(config, slot, scoreboard, master_pid)
        self.spool = config.queue.spool_dir
        self.path = local_protocol.socket_path(self.spool)
        self.addressing = Addressing.from_config(config)
        self.aliases = AliasTable(config.local.aliases_file) if config.local.aliases_file \
            else None
        self.store = None
        self.deliveries = BoundedSemaphore(MAX_DELIVERIES)
        self.listener = None
        self.server = None
        self._logged_error = None
        self.children = set()        # pids of per-recipient processes under way
        # Sockets a per-recipient process must not keep open: a worker's connection held
        # by a long command would hide the agent's death from that worker until it ends.
        self.sockets = set()

    def boot(self):
        self.listener = self.open_spool()
        self.refresh_aliases()
        self.sockets.add(self.listener)
        self.server = StreamServer(self.listener, self.handle, spawn=Pool(MAX_CONNECTIONS))
        self.server.start()
        log.info("local delivery agent started (%s, as %s)", self.path,
                 "root" if is_root() else "uid %d, not root: mail is written as this user"
                 % os.getuid())

    def shut_down(self):
        log.info("local delivery agent stopping")
        try:
            self.server.stop(timeout=self.grace)
        finally:
            for pid in self.children:      # past the grace: the worker defers them
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    # ---- the socket ---------------------------------------------------------------------

    def open_spool(self):
        """The spool's store and the listening socket. The spool and spool/run are
        master.user's: root works there acting as that user."""
        owner = os.stat(self.spool)
        gevent.get_hub()       # its lazy imports need root's view of the Python library
        with acting_as(owner.st_uid, owner.st_gid):
            self.store = SpoolStore(self.spool)
            return self._bind()

    def _bind(self):
        """spool/run/local.sock, mode 0600. Called acting as the spool's owner
        (master.user), so the directory and the socket are that user's and no link
        planted there is followed with root's rights."""
        run = wakeup.run_dir(self.spool)
        try:
            os.mkdir(run, 0o700)
        except FileExistsError:
            pass
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        sock = gsocket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            sock.bind(self.path)
        finally:
            os.umask(old_umask)
        sock.listen(128)
        self.allowed_uids = {0, os.getuid(), os.stat(self.spool).st_uid}
        self.own_socket_file(self.path)
        return sock

    def remove_socket_files(self):
        """As the base does, acting as the spool's owner: root never unlinks by name in a
        directory that user can change."""
        try:
            owner = os.stat(self.spool)
            with acting_as(owner.st_uid, owner.st_gid):
                super().remove_socket_files()
        except OSError:
            pass

    # ---- one connection: one request, one reply per recipient ---------------------------

    def handle(self, conn, address):
        self.sockets.add(conn)
        try:
            _, uid, _ = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET,
                                                         socket.SO_PEERCRED, _PEERCRED.size))
            if uid not in self.allowed_uids:
                log.warning("refused a request from uid %d on %s", uid, self.path)
                return
            rfile = conn.makefile("rb")
            line = rfile.readline(local_protocol.MAX_LINE)
            if not line:
                return
            try:
                queue_id, recipients = local_protocol.decode_request(line)
            except local_protocol.ProtocolError as error:
                log.warning("%s: %s", self.path, error)
                return
            self.refresh_aliases()
            jobs = [gevent.spawn(self.deliver, conn, queue_id, recipient)
                    for recipient in recipients]
            gevent.joinall(jobs)
        except OSError as error:
            log.warning("%s: connection lost: %s", self.path, error)
        finally:
            self.sockets.discard(conn)
            conn.close()

    def deliver(self, conn, queue_id, recipient):
        with self.deliveries:
            status, reply = self.deliver_in_child(queue_id, recipient)
        try:
            conn.sendall(local_protocol.encode_reply(recipient["index"], status, reply))
        except OSError:
            pass           # the worker went away; it defers what it did not hear about

    def deliver_in_child(self, queue_id, recipient):
        """Fork the per-recipient process (still root); its (status, reply)."""
        read_end, write_end = os.pipe()
        pid = gevent.os.fork_gevent()       # no child watcher: see _reap
        if pid == 0:
            os.close(read_end)
            self._child(write_end, queue_id, recipient)      # never returns
        os.close(write_end)
        self.children.add(pid)
        gevent.os.make_nonblocking(read_end)
        chunks = []
        try:
            while True:
                data = gevent.os.nb_read(read_end, 65536)
                if not data:
                    break
                chunks.append(data)
        finally:
            os.close(read_end)
        try:
            wait_status = _reap(pid)
        finally:
            self.children.discard(pid)
        try:
            status, reply = json.loads(b"".join(chunks).decode("utf-8"))
            return status, reply
        except ValueError:
            log.error("%s: delivery to <%s> ended with %s and no answer", queue_id,
                      recipient["address"], _ending(wait_status))
            return RCPT_DEFERRED, "451 4.3.0 local delivery failed (see the log)"

    def _child(self, write_end, queue_id, recipient):
        """The per-recipient process: plain blocking code, no gevent from here on. A
        SIGTERM to the whole process group (systemctl stop) lets it finish: a mailbox is
        never left half-written; the agent decides when it must stop."""
        status = 1
        try:
            for sock in list(self.sockets):
                try:
                    os.close(sock.fileno())      # this process's copy only
                except OSError:
                    pass
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
                           signal.SIGUSR1):
                signal.signal(signum, signal.SIG_IGN)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            try:
                result = RecipientDelivery(self.config, self.addressing, self.aliases,
                                           self.store, queue_id, recipient).run()
                status = 0
            except Exception:
                log.exception("%s: delivery to <%s> failed", queue_id,
                              recipient["address"])
                result = (RCPT_DEFERRED, "451 4.3.0 local delivery failed (see the log)")
            data = json.dumps(list(result)).encode("utf-8")
            while data:
                data = data[os.write(write_end, data):]
        finally:
            logging.shutdown()
            os._exit(status)

    def refresh_aliases(self):
        if self.aliases is None:
            return
        if self.aliases.refresh():
            log.info("aliases read from %s: %d entries", self.aliases.path, len(self.aliases))
            for problem in self.aliases.problems:
                log.warning("%s (run newaliases to check the file)", problem)
        if self.aliases.error and self.aliases.error != self._logged_error:
            log.warning("aliases: %s (using what was read before)", self.aliases.error)
        self._logged_error = self.aliases.error


def _reap(pid):
    """The wait status of a per-recipient process whose pipe has closed (it exits right
    after); None if something else reaped it. Polled, because this process must never
    make a gevent child watcher: gevent installs libev's SIGCHLD handler only when the
    first watcher is made, after fork() has returned, so a first child that exits before
    that has its SIGCHLD dropped and its watcher never fires. The agent's first delivery
    then waited on a zombie for good (tests/test_local_protocol.py)."""
    delay = 0.001
    while True:
        try:
            reaped, wait_status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if reaped:
            return wait_status
        gevent.sleep(delay)
        delay = min(2 * delay, 0.1)


def _ending(wait_status):
    """How a per-recipient process ended, for the log."""
    if wait_status is None:
        return "an exit status unknown (reaped elsewhere)"
    return ended_how(wait_status)


def run_local(config, slot, scoreboard, master_pid):
    """The main of the local child (its entry in elemta.services)."""
    return LocalAgent(config, slot, scoreboard, master_pid).run()
