"""The smtpd worker's server: listening sockets in, one Session greenlet per connection.

Owned by the smtpd worker process (`elemta: smtpd`). The sockets are bound by the master
before it forks the workers, so several workers share them. This
module applies the per-worker and per-client connection limits and owns the services
every session shares: the queue, the group committer, the room check (elemta.queue.space),
the relay policy, AUTH, TLS, the plugins with their DNS resolver, and the cluster's
shared state (elemta.sharedstate).
"""

import logging
import time
from functools import partial

from gevent.pool import Pool
from gevent.server import StreamServer

from elemta import metrics
from elemta.cluster.trust import PeerNetworks
from elemta.config.loader import auth_configured
from elemta.config.schema import HANDOVER
from elemta.content.checks import ContentChecks
from elemta.milter.chain import configured as configured_milters
from elemta.milter.chain import facts_of as milter_facts
from elemta.plugins.manager import PluginManager
from elemta.plugins.resolver import Resolver
from elemta.queue.draining import DrainWatch
from elemta.queue.queue import Queue
from elemta.queue.space import RoomCheck
from elemta.sharedstate import process as sharedstate
from elemta.smtp.protocol import Settings
from elemta.smtp.replies import Reply
from elemta.smtpd.authn import Authenticator, FailurePenalty
from elemta.smtpd.certwatch import CertificateWatch
from elemta.smtpd.clientcount import ClientCounts
from elemta.smtpd.clientnet import client_group
from elemta.smtpd.committer import GroupCommitter
from elemta.smtpd.handoverauth import HandoverAuthenticator
from elemta.smtpd.policy import RelayPolicy
from elemta.smtpd.senderlogin import SenderLogins
from elemta.smtpd.session import Session

log = logging.getLogger("elemta.smtpd")


def protocol_settings(config, listener, tls_ready, auth_ready):
    """What sessions on this listener may do, for the protocol core."""
    s = config.smtpd
    return Settings(
        hostname=config.hostname, banner=s.banner,
        max_message_size=config.limits.message_size,
        max_recipients=config.limits.recipients, max_errors=config.limits.errors,
        junk_command_limit=s.junk_command_limit,
        bare_line_endings=s.bare_line_endings, undeclared_8bit=s.undeclared_8bit,
        starttls_available=tls_ready and listener.mode != "smtps",
        implicit_tls=listener.mode == "smtps",
        # A handover listener always offers its own AUTH; before STARTTLS only when the
        # node has no certificate (Postfix's smtpd_tls_auth_only): the hand-over
        # password must not cross the pod network in clear when TLS could protect it.
        auth_available=auth_ready or listener.mode == HANDOVER,
        # (Configured, not merely loaded: an ACME certificate on its way counts.)
        auth_plaintext=(not all(config.tls_files)) if listener.mode == HANDOVER
        else config.auth.allow_plaintext,
        auth_required=listener.mode in ("submission", "smtps", HANDOVER),
        pipelining_test=config.protocol_tests.pipelining_enable and listener.mode == "smtp",
        report_unknown_commands=any(entry.smtp for entry in config.milters))


class SMTPServer:
    """Serves SMTP on already-bound listening sockets until stopped."""

    def __init__(self, config, listening, client_counts=None):
        """listening: list of (Listener config, bound and listening socket);
        client_counts: sessions per client address shared by all workers."""
        self.config = config
        self.hostname = config.hostname
        # The cluster's shared state first: AUTH and the plugins ask for it.
        sharedstate.install(config.cluster, config.queue.spool_dir)
        self.queue = Queue.from_config(config.queue)
        self.committer = GroupCommitter(self.queue)
        self.room = RoomCheck(self.queue, config.queue.min_free_space,
                              config.limits.message_size)
        # elemtactl drain: new sessions get 421 while the queue empties.
        self.drain = DrainWatch(config.queue.spool_dir)
        self.policy = RelayPolicy(config)
        self.sender_logins = SenderLogins.from_config(config, self.policy.addressing)
        # Header and body checks and the hop count, applied as content streams in.
        self.content_checks = ContentChecks(config.content)
        # One failure count for every listener's AUTH: guesses anywhere slow them all.
        penalty = FailurePenalty(config.auth)
        self.authenticator = (Authenticator(config.auth, penalty)
                              if auth_configured(config.auth) else None)
        # The handover listeners': the cluster's nodes alone, from cluster.peer_networks.
        self.handover_authenticator = HandoverAuthenticator(config, penalty)
        self.peer_networks = PeerNetworks.of(config)
        # The certificate, swapped for a renewed one by the worker's watch.
        self.certificates = CertificateWatch(config)
        # Plugins and their DNS, once per worker (after fork); closed by stop().
        dns = config.dns
        self.resolver = Resolver(nameservers=list(dns.nameservers) or None, port=dns.port,
                                 timeout=dns.timeout)
        self.plugins = PluginManager(config.plugins.to_run()).start()
        # The milters every session talks to (Postfix's smtpd_milters).
        self.milters = configured_milters(config, "smtp")
        self.milter_facts = milter_facts(config)
        self.sessions = 0
        self.last_active = time.monotonic()   # when the last session ended (for max_idle)
        self.client_counts = client_counts or ClientCounts(1)
        self.on_admit = None           # on_admit() after each admitted session (max_use)
        # Every session greenlet, from the moment it is spawned: stop() waits for (or
        # kills) them all, including one accepted a moment before the listeners closed.
        self._session_greenlets = Pool()       # unbounded: limits are checked per session
        self._servers = []
        for listener, sock in listening:
            # Without and with a certificate: an ACME one may come while we serve.
            settings = tuple(protocol_settings(config, listener, tls_ready,
                                               self.authenticator is not None)
                             for tls_ready in (False, True))
            self._servers.append(StreamServer(
                sock, partial(self._handle, listener, settings),
                spawn=self._session_greenlets))

    @property
    def tls_context(self):
        """The SSLContext new TLS sessions get, or None while there is no certificate."""
        return self.certificates.context

    def start(self):
        for server in self._servers:
            server.start()

    def close_listeners(self):
        """Accept no more connections (other workers and the backlog take them)."""
        for server in self._servers:
            server.close()

    def stop(self, grace):
        """Stop accepting; give running sessions `grace` seconds, then end them.

        Ended sessions run their clean-up (a half-received message is removed)."""
        self.close_listeners()
        if not self._session_greenlets.join(timeout=grace):
            log.warning("stopping with %d session(s) still open: cutting them",
                        len(self._session_greenlets))
            self._session_greenlets.kill(block=True, timeout=5)
        self.committer.close()
        self.content_checks.close()
        self.plugins.close()
        if self.authenticator is not None:
            self.authenticator.close()
        self.queue.close()
        sharedstate.uninstall()
        if self.committer.batches:
            log.info("group commit: %d message(s) made durable in %d flush(es), "
                     "%.1f ms each on average", self.committer.messages,
                     self.committer.batches,
                     1000.0 * self.committer.seconds / self.committer.batches)

    def _handle(self, listener, both_settings, sock, address):
        settings = both_settings[self.tls_context is not None]
        client_ip = address[0]
        limits = self.config.limits
        if self.drain.draining():
            metrics.per_listener("CONNECTIONS", listener, "refused_draining").inc()
            return self._refuse(sock, listener, client_ip, "Service not available: this "
                                "node is being drained, try another", "draining",
                                status="4.3.2")
        if listener.mode == HANDOVER and not self.peer_networks.holds_text(client_ip):
            metrics.per_listener("CONNECTIONS", listener, "refused_not_peer").inc()
            return self._refuse(sock, listener, client_ip, "Error: this port takes mail "
                                "from the cluster's nodes only", "cluster_peer_networks",
                                status="4.7.1")
        if self.sessions >= limits.connections_per_worker:
            metrics.per_listener("CONNECTIONS", listener, "refused_worker_limit").inc()
            return self._refuse(sock, listener, client_ip, "Error: too many connections",
                                "worker_connection_limit")
        if (self.client_counts.count(client_ip) >= limits.connections_per_client
                and not self.policy.client_trusted(client_ip)):
            group = client_group(client_ip)
            log.warning("too many connections from %s%s", client_ip,
                        " (counted per %s)" % group if group != client_ip else "")
            metrics.per_listener("CONNECTIONS", listener, "refused_client_limit").inc()
            return self._refuse(sock, listener, client_ip,
                                "Error: too many connections from %s" % client_ip,
                                "client_connection_limit")
        metrics.per_listener("CONNECTIONS", listener, "accepted").inc()
        open_sessions = metrics.per_listener("SESSIONS_OPEN", listener)
        open_sessions.inc()
        self.sessions += 1
        if self.on_admit is not None:
            self.on_admit()
        self.client_counts.add(client_ip, 1)
        try:
            Session(self, sock, address, listener, settings).run()
        finally:
            open_sessions.dec()
            self.sessions -= 1
            self.client_counts.add(client_ip, -1)
            self.last_active = time.monotonic()

    def _refuse(self, sock, listener, client_ip, text, restriction, status="4.7.0"):
        """Answer a connection over a limit, or to a draining node, with 421 (RFC 5321
        3.8) and close it."""
        metrics.count_refusal(restriction, "connect")
        client = "unknown[%s]" % client_ip
        log.info("NOQUEUE: reject: CONNECT from %s: 421 %s %s; proto=SMTP "
                 "(restriction %s)", client, status, text, restriction,
                 extra={"event": "reject", "command": "CONNECT", "client": client,
                        "reason": "421 %s %s" % (status, text), "dsn": status,
                        "restriction": restriction, "proto": "SMTP"})
        try:
            if listener.mode != "smtps":      # no plaintext into a TLS port
                sock.settimeout(5)
                sock.sendall(Reply(421, status, "%s %s" % (self.hostname, text)).encode())
                metrics.count_reply(421, status, "CONNECT")
        except OSError:
            pass
        finally:
            sock.close()
