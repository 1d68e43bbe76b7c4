"""The acme-http child (`elemta: acme-http`): answers the ACME server's HTTP-01 requests,
GET /.well-known/acme-challenge/<token>, from the challenge files the acme child writes
(elemta.certs.store), on the socket the master bound for it (acme.http_address and
acme.http_port, port 80 needing root). Everything else gets 404.

Runs as master.user and holds no key: it faces the internet, so it can read the pending
challenges and nothing else (the account key and certificates stay with the acme child
and the smtpd). Each connection has REQUEST_TIMEOUT to send its request, and at most
MAX_CONNECTIONS are served at once (more wait in the listen queue until one ends), so a
flood of idle connections costs a bounded number of greenlets, as for acme-tls.
See also: elemta.acme.worker, RFC 8555 section 8.3.
"""

import logging

from gevent.pywsgi import LoggingLogAdapter, WSGIHandler, WSGIServer

from elemta.certs.store import Store
from elemta.util.child import BootError, GeventChild

log = logging.getLogger("elemta.acme-http")

PREFIX = "/.well-known/acme-challenge/"
REQUEST_TIMEOUT = 10.0
# Connections served at once (the ACME server needs a handful; the rest is abuse).
MAX_CONNECTIONS = 256


class TimedHandler(WSGIHandler):
    """pywsgi's handler with a deadline on each read: a slow client cannot hold a
    connection for ever."""

    def handle(self):
        self.socket.settimeout(REQUEST_TIMEOUT)
        super().handle()


def challenge_app(store):
    """The WSGI application: a challenge's key authorization, or 404."""

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        answer = None
        if environ["REQUEST_METHOD"] in ("GET", "HEAD") and path.startswith(PREFIX):
            answer = store.challenge(path[len(PREFIX):])
        if answer is None:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]
        log.info("acme-http: answered the challenge %s for %s", path[len(PREFIX):],
                 environ.get("REMOTE_ADDR"))
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(len(answer)))])
        return [answer]

    return app


def challenge_server(sock, store, max_connections=MAX_CONNECTIONS):
    """The (not yet started) WSGI server answering challenges on sock."""
    return WSGIServer(sock, challenge_app(store), log=None,
                      error_log=LoggingLogAdapter(log, logging.WARNING),
                      handler_class=TimedHandler, spawn=max_connections)


class HTTP01Child(GeventChild):
    """The one acme-http process."""

    kind = "acme-http"

    def __init__(self, config, slot, scoreboard, master_pid, sock):
        super().__init__(config, slot, scoreboard, master_pid)
        self.sock = sock
        self.server = None

    def boot(self):
        if self.sock is None:
            raise BootError("no socket for acme.http_address port %d (enabling acme "
                            "needs a restart of elemta)" % self.config.acme.http_port)
        self.server = challenge_server(self.sock, Store(self.config.acme.state_directory))
        self.server.start()
        log.info("acme-http answering HTTP-01 on %s port %d", *self.sock.getsockname()[:2])

    def shut_down(self):
        self.server.stop(timeout=self.grace)


def run_acme_http(config, slot, scoreboard, master_pid, sock):
    """The main of the acme-http child (its row in elemta.services.SERVICES)."""
    return HTTP01Child(config, slot, scoreboard, master_pid, sock).run()
