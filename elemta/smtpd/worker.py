"""The smtpd worker process's main loop: serve until told to stop, or orphaned.

Runs in a child forked by elemta.master (or in the `elemta` process itself when one
worker is configured). It opens its own queue (LMDB) after the fork, serves SMTP on the
listening sockets it inherited, and stops gracefully on SIGTERM/SIGINT or when its
master disappears, so no orphan keeps a port.
"""

import logging
import os
import signal

import gevent
from gevent.event import Event

from elemta.smtpd.server import SMTPServer

log = logging.getLogger("elemta.smtpd")

# Seconds a stopping worker lets open sessions finish before it cuts them.
STOP_GRACE = 10.0
# How often a worker checks that its master is still there.
ORPHAN_CHECK = 1.0


def run_worker(config, listening, client_counts=None, master_pid=None):
    """Serve SMTP on `listening` until stopped; returns the exit status (0).

    client_counts: the ClientCounts shared with the other workers, this worker's row
    already chosen (None: a private table, for a lone worker)."""
    try:
        from setproctitle import setproctitle
        setproctitle("elemta: smtpd")
    except ImportError:      # pragma: no cover - a declared dependency
        pass
    server = SMTPServer(config, listening, client_counts)
    stopping = Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, stopping.set)
    if master_pid is not None:
        gevent.spawn(_watch_master, master_pid, stopping)
    server.start()
    stopping.wait()
    log.info("smtpd stopping: %d session(s) get %ds to finish", server.sessions, STOP_GRACE)
    server.stop(STOP_GRACE)
    return 0


def _watch_master(master_pid, stopping):
    while os.getppid() == master_pid:
        gevent.sleep(ORPHAN_CHECK)
    log.warning("master %d is gone; smtpd stops", master_pid)
    stopping.set()
