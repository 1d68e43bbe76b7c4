"""The wake-up channel: new mail in the queue wakes the delivery workers at once.

Shared by two processes: each delivery worker (elemta.delivery.worker) binds a datagram
socket at spool/run/delivery-<slot>.sock and waits on it; the smtpd's group committer
(elemta.smtpd.committer) calls notify() after every committed batch, which sends one byte to
every such socket. Like Postfix's qmgr FIFO: a hint, never the truth. A missing, full or
dead socket is ignored, since the worker also wakes at the earliest next_attempt in the index.

A second word goes the same way: the master sends CHILD_ENDED (notify(spool, CHILD_ENDED))
when it has reaped a delivery worker or the local agent, so the workers left free the
dead one's leases at once (Queue.free_gone_leases) instead of at their next regular look.
The master sends it acting as master.user (elemta.util.eugid): the run directory is that
user's, and root must not follow a link planted there.
"""

import errno
import os
import socket
import time

RUN_DIR = "run"
_PREFIX = "delivery-"
_SUFFIX = ".sock"
# How long notify() trusts its list of sockets before it reads the directory again.
_RESCAN_SECONDS = 1.0

# What a datagram says: new mail was queued, or a child of the master that may have held
# leases has ended.
NEW_MAIL = b"!"
CHILD_ENDED = b"ended"

_known = {}          # spool run dir -> (monotonic time listed, [socket paths])
_sender = None


def run_dir(spool_dir):
    return os.path.join(spool_dir, RUN_DIR)


def socket_path(spool_dir, slot):
    """Where the delivery worker in scoreboard slot `slot` listens."""
    return os.path.join(run_dir(spool_dir), "%s%d%s" % (_PREFIX, slot, _SUFFIX))


def bind(spool_dir, slot, socket_module=socket):
    """The worker's wake-up socket, replacing any left by a dead worker.
    socket_module: gevent.socket in a gevent process (its recv waits cooperatively)."""
    os.makedirs(run_dir(spool_dir), mode=0o700, exist_ok=True)
    return bind_path(socket_path(spool_dir, slot), socket_module)


def bind_path(path, socket_module=socket):
    """A datagram socket bound at path, replacing a socket file a dead process left."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket_module.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    return sock


def _paths(directory):
    now = time.monotonic()
    listed = _known.get(directory)
    if listed is None or now - listed[0] > _RESCAN_SECONDS:
        try:
            names = os.listdir(directory)
        except OSError:              # not made yet (no worker ever ran), or unreadable
            names = []
        listed = (now, [os.path.join(directory, n) for n in names
                        if n.startswith(_PREFIX) and n.endswith(_SUFFIX)])
        _known[directory] = listed
    return listed[1]


def notify(spool_dir, word=NEW_MAIL):
    """Wake every delivery worker of this spool with `word` (NEW_MAIL or CHILD_ENDED).
    Never blocks, never raises."""
    global _sender
    if _sender is None:
        _sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        _sender.setblocking(False)
    directory = run_dir(spool_dir)
    for path in _paths(directory):
        try:
            _sender.sendto(word, path)
        except OSError as error:
            if error.errno in (errno.ENOENT, errno.ECONNREFUSED):
                _known.pop(directory, None)      # a worker went away: list again next time
            # EAGAIN: its buffer is full of wake-ups it has not read, so it is awake anyway.
