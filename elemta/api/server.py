"""The api process's main: the WSGI app served by gevent.pywsgi on api.address:api.port.

Owned by the `elemta: api` child the master forks. The application (elemta.api.app) is the
REST API under /api/v1 and /metrics for Prometheus; with cluster.store set, it also
registers the node in the cluster view (elemta.api.registration). Its life cycle is
every child's (elemta.util.child): SIGTERM stops it after the requests in progress,
which get master.stop_grace (APIServer: a keep-alive connection idle between two requests is
closed at once, as a client must expect, RFC 9112 section 9.3.1), SIGQUIT at once,
SIGUSR1 reopens the log file, a heartbeat on the scoreboard, and it stops on its own
when its master is gone. A port it cannot listen on
is a boot failure: the master logs why and tries again later, backing off. A reload
starts a new api process, which reads the token again.
See also: elemta.api.app, elemta.api.handler (reading requests: deadline, framing),
elemta.metrics, elemta.master.
"""

import logging
import socket

from gevent.pool import Pool
from gevent.pywsgi import LoggingLogAdapter, WSGIServer

from elemta.api import registration
from elemta.api.handler import Handler
from elemta.util.child import BootError, GeventChild

log = logging.getLogger("elemta.api")


def make_app(config, master_pid=None, registry=None, scoreboard=None):
    """The WSGI application (elemta.api.app): the REST API and /metrics for config."""
    from elemta.api.app import create_app
    return create_app(config, master_pid=master_pid, registry=registry,
                      scoreboard=scoreboard)


class APIChild(GeventChild):
    """The one api process: a WSGIServer plus the child life cycle."""

    kind = "api"

    def __init__(self, config, slot, scoreboard, master_pid):
        super().__init__(config, slot, scoreboard, master_pid)
        self.server = None
        self.registry = None            # the cluster's node registry, if any
        self.heartbeat = None           # this node's registration in it

    def boot(self):
        api = self.config.api
        try:
            self.registry = registration.open_registry(self.config)
        except OSError as exc:
            raise BootError("cluster.password_file: cannot read %s: %s" % (
                self.config.cluster.password_file, exc.strerror or exc)) from None
        try:
            sock = listen(api.address, api.port)
        except OSError as exc:
            raise BootError("cannot listen on %s port %d: %s"
                            % (api.address, api.port, exc.strerror or exc)) from None
        # pywsgi reports clients' malformed requests there: a warning, not our error
        # (Falcon answers and logs the application's own errors). The handler bounds how
        # long a client may take to send a request (a slow-loris would otherwise hold
        # connections for ever) and refuses ambiguous framing.
        # With a certificate, https only: the cluster's nodes send the api token here.
        tls = dict(certfile=api.cert_file, keyfile=api.key_file) \
            if api.cert_file and api.key_file else {}
        self.server = APIServer(sock, make_app(self.config, self.master_pid, self.registry,
                                               self.scoreboard),
                                log=None, **tls,
                                error_log=LoggingLogAdapter(log, logging.WARNING),
                                handler_class=Handler.with_timeout(api.read_timeout))
        self.server.start()
        log.info("api listening on %s port %d%s", self.server.address[0],
                 self.server.address[1], " (https)" if tls else "")
        self.heartbeat = registration.start(self.config, self.registry)

    def shut_down(self):
        if self.heartbeat is not None:
            self.heartbeat.close()
        self.server.stop(timeout=self.grace)
        if self.registry is not None:
            self.registry.close()


class APIServer(WSGIServer):
    """pywsgi's server with each connection in a pool, so that stop(grace) waits up to
    grace for the requests under way (without a pool it waits for none: the process
    then exits under them), and closes the keep-alive connections idle between two
    requests at once rather than letting them hold the stop (elemta.api.handler keeps
    them in `idle`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, spawn=Pool(), **kwargs)
        self.idle = set()            # handlers waiting for a next request

    def wrap_socket_and_handle(self, client_socket, address):
        # A client that fails the TLS handshake (an http:// request, an unknown CA, a
        # port scan) is a line in the log, not a greenlet's traceback.
        try:
            ssl_socket = self.wrap_socket(client_socket, **self.ssl_args)
        except OSError as error:
            log.info("api: TLS handshake with %s failed: %s", address[0], error)
            client_socket.close()
            return None
        try:
            return self.handle(ssl_socket, address)
        finally:
            ssl_socket.close()

    def stop(self, timeout=None):
        self.close()                 # first: no new connection, no next request
        for handler in list(self.idle):
            handler.close_idle()
        super().stop(timeout)


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
    """The main of the api child (its row in elemta.services.SERVICES)."""
    return APIChild(config, slot, scoreboard, master_pid).run()
