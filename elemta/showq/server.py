"""The showq process (`elemta: showq`): lists the queue for mailq run by any local user,
as Postfix's showq does, while the spool itself stays readable by Elemta's user alone.

Runs in one child forked by elemta.master (kind "showq"), as Elemta's user. Listens on
spool/public/showq (mode 0666, in a directory anyone may pass but not list; the master
makes it, elemta.queue.maildrop.prepare). For each connection: the peer's uid from
SO_PEERCRED is checked against mailq.authorized_users (root and Elemta's user are
always allowed, as Postfix's postqueue lets root and mail_owner through), one request
line is read (elemta.queue.showq: at most MAX_REQUEST bytes within REQUEST_TIMEOUT), and
the selected messages are written as postqueue -j's fields, never their content.

A client cannot stall the process: each connection is one greenlet, reading and every
write have a timeout, and at most MAX_CONNECTIONS are served at once (the others wait
in the listen backlog). Garbage gets one error line naming what is wrong and a warning
in the log, never a traceback.
Life cycle: elemta.util.child. See also: elemta.queue.showq (the format), elemta.cli.queuecmd
(mailq, the client), elemta.queue.listing (selection, record_to_json).
"""

import logging
import os
import pwd
import socket
import struct
import time

import gevent
from gevent import socket as gsocket
from gevent.pool import Pool
from gevent.server import StreamServer

from elemta.queue import showq
from elemta.queue.listing import record_to_json
from elemta.queue.queue import Queue
from elemta.util.child import BootError, GeventChild
from elemta.util.text import printable

log = logging.getLogger("elemta.showq")

# Connections served at once; Postfix's showq runs up to default_process_limit (100).
MAX_CONNECTIONS = 20
# Messages written between two looks at the rest of the process (heartbeat, signals).
YIELD_EVERY = 200
ANYONE = "anyone"
# What a refused client may still send before the connection is closed on it.
DRAIN_BYTES = 1024 * 1024
DRAIN_SECONDS = 1.0
_PEERCRED = struct.Struct("3i")


class ShowqServer(GeventChild):
    """The one showq process (see the module docstring)."""

    kind = "showq"

    def __init__(self, config, slot, scoreboard, master_pid):
        super().__init__(config, slot, scoreboard, master_pid)
        self.spool = config.queue.spool_dir
        self.path = showq.socket_path(self.spool)
        self.authorized = frozenset(config.mailq.authorized_users)
        self.always_allowed = set()
        self.queue = None
        self.server = None

    def boot(self):
        try:
            self.queue = Queue.from_config(self.config.queue)
        except Exception as exc:          # lmdb.Error or OSError: say which, and back off
            raise BootError("cannot open the queue in %s: %s" % (self.spool, exc)) from None
        try:
            listener = self._bind()
        except OSError as exc:
            raise BootError("cannot listen on %s: %s" % (self.path, exc.strerror or exc)) \
                from None
        self.always_allowed = {0, os.getuid(), os.stat(self.spool).st_uid}
        self.server = StreamServer(listener, self.handle, spawn=Pool(MAX_CONNECTIONS))
        self.server.start()
        log.info("showq listening on %s (mailq for %s)", self.path,
                 "anyone" if ANYONE in self.authorized
                 else ", ".join(sorted(self.authorized)) or "root and Elemta's user only")

    def _bind(self):
        try:
            os.unlink(self.path)              # a dead showq's socket
        except FileNotFoundError:
            pass
        sock = gsocket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.path)
        # Any local user may connect; who sees the queue is decided per peer below.
        os.chmod(self.path, showq.SOCKET_MODE)
        sock.listen(64)
        self.own_socket_file(self.path)
        return sock

    def shut_down(self):
        if self.server is not None:
            self.server.stop(timeout=self.grace)
        if self.queue is not None:
            self.queue.close()

    # ---- one connection: one request, one listing ---------------------------------------

    def handle(self, conn, address):
        try:
            uid = peer_uid(conn)
            refusal = self.refusal(uid)
            if refusal:
                log.warning("refused a queue listing to %s", refusal)
                say_last(conn, showq.encode_error(
                    showq.REFUSED, "%s is not allowed to view the mail queue "
                                   "(mailq.authorized_users)" % refusal))
                return
            try:
                selection = showq.decode_request(read_request(conn), time.time())
            except showq.ShowqError as exc:
                log.warning("uid %d: bad request on %s: %s", uid, self.path, exc)
                say_last(conn, showq.encode_error(showq.BAD_REQUEST, str(exc)))
                return
            conn.settimeout(showq.WRITE_TIMEOUT)
            self.write_listing(conn, selection)
        except OSError as exc:           # the peer went away or stalled: its loss only
            log.info("showq: connection ended early: %s", exc)
        except Exception:
            # A damaged index record, say: the client hears that the listing failed.
            log.exception("showq: the listing failed")
            try:
                conn.sendall(showq.encode_error(showq.FAILED, "the listing failed (see "
                                                              "the mail log)"))
            except OSError:
                pass
        finally:
            conn.close()

    def refusal(self, uid):
        """None if uid may see the queue, else how the log and the reply name the user
        (Postfix's user_acl: the name, or the uid when it has none)."""
        if uid in self.always_allowed or ANYONE in self.authorized:
            return None
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = None
        if name in self.authorized or str(uid) in self.authorized:
            return None
        return "user %s (uid %d)" % (printable(name), uid) if name else "uid %d" % uid

    def write_listing(self, conn, selection):
        count = 0
        for record in self.queue.records_matching(selection):
            conn.sendall(showq.encode_message(record_to_json(record)))
            count += 1
            if count % YIELD_EVERY == 0:
                self.progress()
        conn.sendall(showq.encode_end(count))


def peer_uid(conn):
    """The uid of the process at the other end of a unix socket, as the kernel says."""
    _, uid, _ = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                 _PEERCRED.size))
    return uid


def read_request(conn):
    """One request line: at most MAX_REQUEST bytes within REQUEST_TIMEOUT seconds, from
    the start of the connection (a client sending a byte a second gains nothing)."""
    data = b""
    with gevent.Timeout(showq.REQUEST_TIMEOUT, False):
        while b"\n" not in data and len(data) < showq.MAX_REQUEST:
            chunk = conn.recv(showq.MAX_REQUEST - len(data))
            if not chunk:
                break
            data += chunk
    return data[:data.index(b"\n") + 1] if b"\n" in data else data


def say_last(conn, line):
    """Send a refusal, then read (and drop) what the client still sends, a bounded amount
    for a bounded time: closing with unread data would reset the connection, and the
    client could lose the reason before reading it."""
    conn.settimeout(showq.WRITE_TIMEOUT)
    conn.sendall(line)
    conn.shutdown(socket.SHUT_WR)
    left = DRAIN_BYTES
    with gevent.Timeout(DRAIN_SECONDS, False):
        while left > 0:
            chunk = conn.recv(min(left, 65536))
            if not chunk:
                break
            left -= len(chunk)


def run_showq(config, slot, scoreboard, master_pid):
    """The main of the showq child (its entry in elemta.services)."""
    return ShowqServer(config, slot, scoreboard, master_pid).run()
