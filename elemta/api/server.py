"""The api process's main: the WSGI app served by gevent.pywsgi on api.address:api.port.

Owned by the `elemta: api` child the master forks. The application (elemta.api.app) is the
REST API under /api/v1 and /metrics for Prometheus. SIGTERM/SIGINT stop it after the
requests in progress, SIGQUIT at once, SIGUSR1 reopens the log file; it stops on its own
when its master is gone. A reload starts a new api process, which reads the token again.
See also: elemta.api.app, elemta.api.handler (reading requests: deadline, framing),
elemta.metrics, elemta.master.
"""

import logging
import os
import signal
import socket

import gevent
from gevent.event import Event
from gevent.pywsgi import LoggingLogAdapter, WSGIServer

from elemta.api.handler import Handler

log = logging.getLogger("elemta.api")

# How often the process beats its heartbeat and looks for its master.
WATCH_INTERVAL = 1.0
# How long requests in progress may take to finish on SIGTERM.
STOP_GRACE = 5.0


def make_app(config):
    """The WSGI application (elemta.api.app): the REST API and /metrics for config."""
    from elemta.api.app import create_app
    return create_app(config)


def run_api(config, heartbeat=None, master_pid=None, sock=None):
    """The api process's main: serve until SIGTERM; returns the exit status.

    heartbeat: called every WATCH_INTERVAL seconds (the master's liveness check).
    master_pid: stop when the parent is no longer this process. Pass the master's pid as
    taken before the fork: the default, the parent now, is already init's if the master
    died in between.
    sock: an already bound listening socket; default: bind api.address:api.port here."""
    from setproctitle import setproctitle
    setproctitle("elemta: api")
    api = config.api
    master_pid = os.getppid() if master_pid is None else master_pid
    try:
        sock = sock if sock is not None else listen(api.address, api.port)
    except OSError as exc:
        log.error("api cannot listen on %s port %d: %s", api.address, api.port,
                  exc.strerror or exc)
        return 1
    stopping = Event()
    grace = [STOP_GRACE]

    def handle_term():
        stopping.set()

    def handle_quit():
        grace[0] = 0
        stopping.set()

    # Before building the app (Falcon's import takes a while): a SIGTERM or SIGUSR1 sent
    # meanwhile, as a quick reload or log rotation does, must not kill the process.
    gevent.signal_handler(signal.SIGTERM, handle_term)
    gevent.signal_handler(signal.SIGINT, handle_term)
    gevent.signal_handler(signal.SIGQUIT, handle_quit)
    gevent.signal_handler(signal.SIGUSR1, _reopen_logs)
    # pywsgi reports clients' malformed requests there: a warning, not our error (Falcon
    # answers and logs the application's own errors).
    # The handler bounds how long a client may take to send a request (a slow-loris would
    # otherwise hold connections for ever) and refuses ambiguous framing.
    server = WSGIServer(sock, make_app(config), log=None,
                        error_log=LoggingLogAdapter(log, logging.WARNING),
                        handler_class=Handler.with_timeout(api.read_timeout))
    server.start()
    watcher = gevent.spawn(_watch, stopping, heartbeat, master_pid)
    log.info("api listening on %s port %d", *server.address[:2])
    stopping.wait()
    watcher.kill()
    server.stop(timeout=grace[0])
    return 0


def listen(address, port):
    """The api's listening socket. SO_REUSEPORT: after a reload the new api child binds
    while the old one still finishes its requests, so /metrics never goes away."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((address, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)       # gevent's server waits for it in the event loop
    return sock


def _watch(stopping, heartbeat, master_pid):
    while not stopping.is_set():
        if heartbeat is not None:
            heartbeat()
        if os.getppid() != master_pid:
            log.warning("master %d is gone; api stops", master_pid)
            stopping.set()
            return
        gevent.sleep(WATCH_INTERVAL)


def _reopen_logs():
    from elemta.util import logs
    logs.reopen()
