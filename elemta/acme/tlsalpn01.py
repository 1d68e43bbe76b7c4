"""The acme-tls child (`elemta: acme-tls`): answers the ACME server's TLS-ALPN-01
validation handshakes (RFC 8737) on the socket the master bound for it (acme.tls_address
and acme.tls_port, port 443 needing root), when acme.challenge is tls-alpn-01.

A handshake gets the validation certificate the acme child left in the state directory
for the name the client asked for by SNI (elemta.certs.store, made by
elemta.acme.client.validation_certificate), and only if it offers ALPN acme-tls/1. A
name with no pending challenge, or no name, is refused with an unrecognized_name alert;
a handshake without acme-tls/1 is closed at once, having seen only that certificate
(which proves nothing but the challenge). Nothing is read or written after the
handshake: RFC 8737 3 has the ACME server close the connection then.

Runs as master.user and holds no key but the throw-away validation keys: it faces the
internet, so it can read the pending challenges and nothing else. Each connection has
HANDSHAKE_TIMEOUT to complete its handshake, and at most MAX_CONNECTIONS are served at
once (the rest wait in the listen queue).
See also: elemta.acme.worker, elemta.acme.http01 (the HTTP-01 counterpart).
"""

import logging

from gevent import ssl
from gevent.server import StreamServer

from elemta.acme.client import ACME_TLS_ALPN
from elemta.certs.store import Store
from elemta.util.child import BootError, GeventChild

log = logging.getLogger("elemta.acme-tls")

HANDSHAKE_TIMEOUT = 10.0
MAX_CONNECTIONS = 256


class ValidationResponder:
    """Serves one connection: the handshake with the name's validation certificate."""

    def __init__(self, store):
        self.store = store
        self.context = self._context()
        self.context.sni_callback = self._select_certificate

    @staticmethod
    def _context(certificate_file=None):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2     # RFC 8737 4
        context.set_alpn_protocols([ACME_TLS_ALPN])
        if certificate_file is not None:
            context.load_cert_chain(certificate_file)
        return context

    def _select_certificate(self, ssl_sock, server_name, _initial):
        """The SNI callback: switch to the name's validation certificate, or refuse."""
        path = self.store.alpn_certificate_path(server_name)
        if path is None or not self.store.has_alpn_certificate(server_name):
            log.info("acme-tls: refused a handshake for %s: no pending challenge",
                     "no name (no SNI)" if server_name is None else repr(server_name))
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        try:
            context = self._context(path)
            context.pending_name = server_name        # for the log line after it
            ssl_sock.context = context
        except (OSError, ssl.SSLError) as exc:       # removed meanwhile: order over
            log.info("acme-tls: refused a handshake for %s: %s", server_name, exc)
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        return None

    def __call__(self, sock, address):
        sock.settimeout(HANDSHAKE_TIMEOUT)
        try:
            with self.context.wrap_socket(sock, server_side=True) as tls:
                name = getattr(tls.context, "pending_name", None)
                if tls.selected_alpn_protocol() != ACME_TLS_ALPN:
                    log.info("acme-tls: closed a handshake from %s for %s: it did not "
                             "ask for ALPN %s", address[0], name, ACME_TLS_ALPN)
                    return
                log.info("acme-tls: answered the TLS-ALPN-01 challenge for %s from %s",
                         name, address[0])
        except (OSError, ssl.SSLError) as exc:
            log.debug("acme-tls: handshake from %s failed: %s", address[0], exc)
        finally:
            sock.close()


class TLSALPN01Child(GeventChild):
    """The one acme-tls process."""

    kind = "acme-tls"

    def __init__(self, config, slot, scoreboard, master_pid, sock):
        super().__init__(config, slot, scoreboard, master_pid)
        self.sock = sock
        self.server = None

    def boot(self):
        if self.sock is None:
            raise BootError("no socket for acme.tls_address port %d (enabling acme or "
                            "changing acme.challenge needs a restart of elemta)"
                            % self.config.acme.tls_port)
        store = Store(self.config.acme.state_directory)
        self.server = StreamServer(self.sock, ValidationResponder(store),
                                   spawn=MAX_CONNECTIONS)
        self.server.start()
        log.info("acme-tls answering TLS-ALPN-01 on %s port %d",
                 *self.sock.getsockname()[:2])

    def shut_down(self):
        self.server.stop(timeout=self.grace)


def run_acme_tls(config, slot, scoreboard, master_pid, sock):
    """The main of the acme-tls child (its row in elemta.services.SERVICES)."""
    return TLSALPN01Child(config, slot, scoreboard, master_pid, sock).run()
