"""The api process's main: the WSGI app served by gevent.pywsgi on api.address:api.port.

Owned by the `elemta: api` child the master forks. The application (elemta.api.app) is the
REST API under /api/v1 and /metrics for Prometheus. Its life cycle is every child's
(elemta.util.child): SIGTERM/SIGINT stop it after the requests in progress (within
master.stop_grace), SIGQUIT at once, SIGUSR1 reopens the log file, a heartbeat on the
scoreboard, and it stops on its own when its master is gone. A port it cannot listen on
is a boot failure: the master logs why and tries again later, backing off. A reload
starts a new api process, which reads the token again.
See also: elemta.api.app, elemta.api.handler (reading requests: deadline, framing),
elemta.metrics, elemta.master.
"""

import logging
import socket

from gevent.pywsgi import LoggingLogAdapter, WSGIServer

from elemta.api.handler import Handler
from elemta.util.child import BootError, GeventChild

log = logging.getLogger("elemta.api")


def make_app(config):
    """The WSGI application (elemta.api.app): the REST API and /metrics for config."""
    from elemta.api.app import create_app
    return create_app(config)


class APIChild(GeventChild):
    """The one api process: a WSGIServer plus the child life cycle."""

    kind = "api"

    def __init__(self, config, slot, scoreboard, master_pid):
        super().__init__(config, slot, scoreboard, master_pid)
        self.server = None

    def boot(self):
        api = self.config.api
        try:
            sock = listen(api.address, api.port)
        except OSError as exc:
            raise BootError("cannot listen on %s port %d: %s"
                            % (api.address, api.port, exc.strerror or exc)) from None
        # pywsgi reports clients' malformed requests there: a warning, not our error
        # (Falcon answers and logs the application's own errors). The handler bounds how
        # long a client may take to send a request (a slow-loris would otherwise hold
        # connections for ever) and refuses ambiguous framing.
        self.server = WSGIServer(sock, make_app(self.config), log=None,
                                 error_log=LoggingLogAdapter(log, logging.WARNING),
                                 handler_class=Handler.with_timeout(api.read_timeout))
        self.server.start()
        log.info("api listening on %s port %d", *self.server.address[:2])

    def serve(self):
        self.stopping.wait()

    def shut_down(self):
        self.server.stop(timeout=self.grace)


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


def run_api(config, slot, scoreboard, master_pid):
    """The main of the api child (called by elemta.cli.elemta's child runner)."""
    return APIChild(config, slot, scoreboard, master_pid).run()
