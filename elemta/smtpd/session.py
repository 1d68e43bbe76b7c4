"""One SMTP session: drives the sans-IO protocol core over a gevent socket.

Owned by the smtpd worker; one greenlet runs one Session. The protocol core decides what
is valid SMTP, in every state, a client refused at connection time included; this module
parses none of it and supplies what needs the outside world: timeouts, TLS, the relay
policy, AUTH checks, and the queue (spool file, group commit). Log lines follow Postfix's
layout, queue id first, so admins can grep them the same way, and name the client as
Postfix does, name[ip]: the name is looked up once at connect, before the greeting and
under smtpd.peername_timeout (elemta.plugins.peername), and is "unknown" unless its
forward lookup gives the client's address back.

Plugins (elemta.plugins) see the session through one Context (self.ctx) and are asked at
each stage: connection (before the greeting), helo, auth, mail, rcpt (after the relay
check), data_command (DATA, before the 354), then data and storage (elemta.plugins.
content), and queue once the 250 is sent.
The data and storage stages need the whole content, so only when some plugin wants it is
the content kept in memory (bounded by limits.message_size, which the protocol core
enforces) and written to the spool file at the end, edited by the plugins; otherwise it
streams straight to the file. Either way it first streams through the header and body
checks (elemta.content.checks: Postfix's cleanup checks and hop count), which edit it
line by line as it passes and give their verdict at the end of DATA, before the
plugins'. A discard or quarantine given before the content (at
connection, helo or auth for the whole session; at mail, rcpt or data_command for the
message) is remembered and applied at the end of DATA.
See also: elemta.smtpd.server (the shared services), elemta.plugins.manager.
"""

import dataclasses
import errno
import logging
import socket
import time

import gevent
from gevent import ssl

from elemta import metrics
from elemta.addressing.headers import rewrite_headers
from elemta.addressing.rewrite import RewriteError
from elemta.addressing.virtual import expanded_recipients
from elemta.maps import TableUnavailable
from elemta.milter.chain import (MilterChain, RecipientLookupError, content_verdict,
                                 mail_args)
from elemta.plugins.api import DATA_COMMAND, DISCARD, TEMPFAIL, Context
from elemta.plugins.content import (ContentVerdict, notify_queued, outbound,
                                    run_content_stages, wants_content)
from elemta.plugins.manager import header_block
from elemta.plugins.peername import OK as NAME_OK
from elemta.plugins.peername import PERM as NAME_PERM
from elemta.plugins.peername import look_up, timed_out
from elemta.queue.ids import new_queue_id
from elemta.queue.model import Envelope, Hold, Recipient
from elemta.queue.queue import log_queued
from elemta.restrictions.catalogue import CORE_REFUSALS, PLUGIN_STAGES, stage_of_command
from elemta.restrictions.protocoltests import ProtocolTests
from elemta.config.schema import HANDOVER
from elemta.smtp.events import (CLOSED, NEED_DATA, AuthRequest, DataAborted, DataChunk,
                                DataStart, Helo, ImproperPipelining, MailFrom,
                                MessageReceived, RcptTo, StartTLS, UnknownCommand)
from elemta.smtp.protocol import AUTH_MECHANISMS, ServerProtocol
from elemta.smtp.replies import Reply
from elemta.smtpd import authresult, tls
from elemta.smtpd.received import protocol_name, received_header
from elemta.util.sockets import send_all, set_timeout, unread_bytes
from elemta.util.text import printable
from elemta.util.threads import in_thread

# Content kept for the plugins is written to the spool file in a thread above this size.
THREADED_WRITE = 1 << 20

log = logging.getLogger("elemta.smtpd")

RECV_SIZE = 65536
# A full spool or queue index (Postfix: "452 4.3.1 Insufficient system storage").
STORAGE_FULL = Reply(452, "4.3.1", "Error: insufficient system storage")
# AUTH when the backend cannot decide (Postfix's answer when its Dovecot is away).
AUTH_TEMPFAIL = Reply(454, "4.7.0", "Temporary authentication failure")
# AUTH with a mechanism the backend stopped offering since the EHLO (RFC 4954 4).
AUTH_UNSUPPORTED = Reply(504, "5.5.4", "Error: unsupported authentication mechanism")
# After the last reply (221, 421) the input the client has already sent is read and thrown
# away, for a moment, before the socket closes: closing with unread input makes the kernel
# answer with a reset, and a client still writing (a pipelined group, a BDAT chunk) then
# fails its write and may never read that last reply (a TLS client cannot: its TLS layer
# gives up after the failed write). Apache and nginx call this a lingering close.
LINGER_SECONDS = 2.0
LINGER_BYTES = 1 << 20

# Event class -> handler method (design rule 2: one on_<stage> method per event).
HANDLERS = {
    Helo: "on_helo",
    MailFrom: "on_mail_from",
    RcptTo: "on_rcpt_to",
    DataStart: "on_data_start",
    DataChunk: "on_data_chunk",
    DataAborted: "on_data_aborted",
    MessageReceived: "on_message_received",
    AuthRequest: "on_auth_request",
    StartTLS: "on_start_tls",
    ImproperPipelining: "on_improper_pipelining",
    UnknownCommand: "on_unknown_command",
}


# How a session ends, for elemta_smtpd_sessions_total{result}: the client said QUIT;
# it was silent too long; it went away (reset, EOF) or its TLS handshake failed; a
# connection-stage plugin, milter or the pregreet test refused it; the server hung up
# (error limits, a 421); or the worker stopped it (or a bug did: "aborted").
SESSION_ENDINGS = ("quit", "timeout", "lost", "tls_failed", "refused", "dropped",
                   "aborted")


class SessionEnded(Exception):
    """The connection is gone (lost, reset, TLS failure): stop without replying."""


class Session:
    """The glue between one client socket, the protocol core and the worker's services."""

    def __init__(self, server, sock, address, listener, settings):
        self.server = server
        self.sock = sock
        self.client_ip = address[0]
        self.client = "unknown[%s]" % self.client_ip
        self.listener = listener
        # Users log in on the other listeners; the cluster's nodes on handover ones.
        self.authenticator = (server.handover_authenticator if listener.mode == HANDOVER
                              else server.authenticator)
        self.proto = ServerProtocol(settings)
        self.timeouts = server.config.timeouts
        self.tls_info = None
        self.writer = None
        self.write_error = None
        self.queue_id = None
        self._out = bytearray()
        self.plugins = server.plugins
        self.ctx = Context(client_address=self.client_ip, hostname=server.hostname,
                           resolver=server.resolver, listener=listener,
                           trusted=server.policy.client_trusted(self.client_ip),
                           client_port=address[1] if len(address) > 1 else None)
        local = self._local_address()
        if local is not None:
            self.ctx.server_address, self.ctx.server_port = local[0], local[1]
        self.content = None     # the message content, kept only for data/storage plugins
        # A discard or quarantine from a stage before the content: (action, reason,
        # plugin, stage), for the whole session (connection, helo, auth) or this message.
        self.session_verdict = None
        self.message_verdict = None
        # Header fields plugins gave before the content (Result headers at connection ..
        # rcpt), prepended above our Received header: for the session / this message.
        self.session_headers = []
        self.message_headers = []
        self._queued = []       # Contexts of committed messages, for the queue stage
        # This transaction's virtual alias expansions: RCPT address -> its addresses.
        self.expansions = {}
        self.auth_method = None     # the AUTH mechanism that succeeded, for the log
        # This transaction's sender as queued: canonical maps, masquerading applied.
        self.queued_sender = None
        self.header_rewriting = False    # this message's headers are to be rewritten
        # Our Received header and the plugins' fields above it, held back from the spool
        # file until the milters have seen (and maybe edited) them.
        self.pending_prefix = b""
        self._refusal_counted = False    # the pending refusal is counted by restriction
        self.ending = None               # how the session ended (SESSION_ENDINGS)
        self._closing_code = None        # the code of the reply that closes the session
        # Postscreen's pregreet and pipelining tests (elemta.restrictions.protocoltests).
        self.screen = ProtocolTests(server.config.protocol_tests, listener.mode,
                                    self.ctx.trusted, self.client_ip, address[1],
                                    self.ctx.session)
        self.content_filter = None       # this message's header and body checks
        # The milters (elemta.milter), asked after the plugins at each stage.
        self.milters = MilterChain(server.milters, self.ctx, dict(
            server.milter_facts, mailer=lambda address: "local"
            if server.policy.is_local(address) else "smtp")) if server.milters else None

    # ---- the loop -------------------------------------------------------------------

    def run(self):
        # The accept stage first (the connection rate limit counts there): a client
        # it refuses costs no name lookup and no pregreet wait.
        refusal = self._accept_stage()
        if refusal is None:
            self._find_client_name()
        log.info("connect from %s", self.client,
                 extra={"event": "connect", "client": self.client})
        try:
            if self.listener.mode == "smtps":
                self._handshake()
            if refusal is not None:
                self._refuse_connection(refusal.action, refusal.reply,
                                        "plugin %s" % refusal.decided_by)
            elif self.screen.waits():
                # As postscreen runs its DNSBL lookups alongside its greet wait: the
                # connection-stage checks run while the pregreet test waits.
                checks = gevent.spawn(self._connection_checks)
                if self._dropped_pregreeter():
                    checks.kill()
                else:
                    self._greet(checks.get())
            else:
                self._greet(self._connection_checks())
            self._converse()
        except SessionEnded as exc:
            self._ended("lost")
            log.info("lost connection after %s from %s%s", self.proto.last_command, self.client,
                     ": %s" % exc if str(exc) else "")
        finally:
            metrics.per_listener("SESSIONS", self.listener, self.ending or "aborted").inc()
            self._discard_message()
            if self.milters is not None:
                self.milters.close()
            try:
                self.sock.close()
            except OSError:
                pass
            log.info("disconnect from %s", self.client,
                     extra={"event": "disconnect", "client": self.client})
            self._notify_queued()     # messages queued just before the client went away

    def _ended(self, how):
        """Note how the session ends (SESSION_ENDINGS), unless that is known already: a
        refused client that then says QUIT still counts as refused."""
        if self.ending is None:
            self.ending = how

    def _find_client_name(self):
        """Look up the client's verified name (elemta.plugins.peername), waiting at most
        smtpd.peername_timeout: it names the client in the log and the Received header,
        and the plugins see it (ctx.client_name, ctx.client_lookup)."""
        settings = self.server.config.smtpd
        if not settings.peername_lookup or self.server.resolver is None:
            return
        found = None
        with gevent.Timeout(settings.peername_timeout, False):
            found = look_up(self.server.resolver, self.client_ip)
        if found is None:
            found = timed_out(settings.peername_timeout)
        self.ctx.client_lookup = found
        self.ctx.client_name = found.name
        self.client = "%s[%s]" % (found.name, self.client_ip)
        # A name that does not check out is worth a warning, as in Postfix; no PTR name
        # at all is common and says nothing more than unknown[ip].
        if found.name_status != NAME_OK and found.reverse_status != NAME_PERM:
            log.warning("%s: %s", self.client_ip, found.problem)

    def _connection_checks(self):
        """The connection-stage plugins' Outcome, or None when no plugin serves it."""
        if not self.plugins.wants("connection"):
            return None
        return self.plugins.run("connection", self.ctx)

    def _greet(self, outcome):
        """Act on the connection-stage plugins' outcome, ask the milters, then have the
        core queue the greeting: the 220, or the refusal in its place.

        A reject is answered as Postfix's smtpd_client_restrictions answer with
        smtpd_delay_reject = no, and as RFC 5321 3.1 asks: 554 in place of the 220, then
        503 to every command until QUIT (the core's REFUSED state). A tempfail (a failing
        plugin's 451 4.3.0 too) is 421 with the plugin's status and text, and the
        connection closes (RFC 5321 3.8)."""
        if outcome is not None:
            if outcome.reply is not None:
                return self._refuse_connection(outcome.action, outcome.reply,
                                               "plugin %s" % outcome.decided_by)
            self._remember(outcome, "connection")
        if self.milters is not None:
            verdict = self.milters.connect()
            if verdict.refused:
                return self._refuse_connection(verdict.action, verdict.reply,
                                               "milter %s" % verdict.milter)
            self._remember_milter(verdict, "connection")
        self.proto.start()

    def _accept_stage(self):
        """The accept-stage plugins' outcome when they refuse the client, else None
        (anything else they answer is no opinion: see elemta.plugins.api)."""
        if not self.plugins.wants("accept"):
            return None
        outcome = self.plugins.run("accept", self.ctx)
        return outcome if outcome.reply is not None else None

    def _refuse_connection(self, action, reply, who):
        """Queue the refusal of a connection-time plugin or milter in place of the
        greeting; `who` is "plugin NAME" or "milter NAME"."""
        _, status, text = reply
        code = 421 if action == TEMPFAIL else 554
        name = who.split()[-1]
        metrics.count_refusal(name, "connect")
        self._ended("refused")
        log.info("NOQUEUE: reject: CONNECT from %s: %d %s %s; proto=SMTP (%s)",
                 self.client, code, status, text, who,
                 extra=self._refusal("CONNECT", "%d %s %s" % (code, status, text),
                                     who if who.startswith("milter ") else name,
                                     dsn=status))
        self.proto.start_refused(code, status, text, self.client)

    def _dropped_pregreeter(self):
        """The pregreet test: True when the client talked before its turn and is
        dropped (the core then holds the closing reply)."""
        s = self.proto.settings
        drop = self.screen.pregreet(self.sock, ("220-%s %s\r\n" % (s.hostname, s.banner))
                                    .encode("utf-8", "replace"))
        if drop is None:
            return False
        log.info("NOQUEUE: reject: CONNECT from %s: %s; proto=SMTP (restriction pregreet)",
                 self.client, drop, extra=self._refusal("CONNECT", drop, "pregreet"))
        metrics.count_refusal("pregreet", "connect")
        self._ended("refused")
        self._refusal_counted = True
        self.proto.hang_up(drop)
        return True

    def _converse(self):
        proto = self.proto
        while True:
            event = proto.next_event()
            if event is NEED_DATA:
                self._flush()
                data = self._recv()
                if data is not None:
                    proto.receive_data(data)
            elif event is CLOSED:
                self._ended("quit" if self._closing_code == 221 else "dropped")
                self._flush()
                self._linger()
                return
            elif isinstance(event, Reply):
                self._out += event.encode()
                metrics.count_reply(event.code, event.status, proto.last_command)
                if event.close:
                    self._closing_code = event.code
                if not self._refusal_counted:
                    self._count_core_refusal(event)
                self._refusal_counted = False
                limit = str(event.text).partition("Error: ")[2]
                if event.close and event.status == "4.7.0" and limit.startswith("too many"):
                    # The core hung up on a limit (errors, junk commands): say so, as
                    # Postfix logs "too many errors after RCPT from ...". (Not a
                    # connection plugin's own 421 4.7.0, which was logged as a reject.)
                    log.info("%s after %s from %s", limit, proto.last_command, self.client)
            else:
                getattr(self, HANDLERS[type(event)])(event)

    def _recv(self):
        """Bytes from the client; on timeout, queue the 421 and return None."""
        set_timeout(self.sock, self.timeouts.data_block if self.proto.reading_content
                    else self.timeouts.command)
        try:
            data = self.sock.recv(RECV_SIZE)
        except socket.timeout:
            self._ended("timeout")
            log.info("timeout after %s from %s", self.proto.last_command, self.client)
            self.proto.close_with(421, "4.4.2", "Error: timeout exceeded")
            return None
        except (OSError, ssl.SSLError) as exc:
            raise SessionEnded(exc.strerror or str(exc)) from None
        if not data:
            raise SessionEnded()
        return data

    def _flush(self):
        if self._out:
            data, self._out = bytes(self._out), bytearray()
            set_timeout(self.sock, self.timeouts.command)
            try:
                send_all(self.sock, data)
            except (OSError, ssl.SSLError) as exc:
                raise SessionEnded(getattr(exc, "strerror", None) or str(exc)) from None
        self._notify_queued()

    def _linger(self):
        """Say we are done (FIN) and drain the client's input until it closes too, for at
        most LINGER_SECONDS and LINGER_BYTES, so the last reply is not lost to a reset."""
        sock = self.sock
        if self._closing_code == 221 and self.tls_info is None and not self._input_waiting():
            # QUIT answered, nothing unread: closing now sends no reset (now: the clean-up
            # after this may yield, and input arriving meanwhile would make one).
            sock.close()
            return
        try:
            # On a TLS socket this drops TLS first; what is drained is not decrypted.
            sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + LINGER_SECONDS
            drained = 0
            while drained < LINGER_BYTES:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                sock.settimeout(left)
                data = sock.recv(RECV_SIZE)
                if not data:
                    return
                drained += len(data)
        except (OSError, ssl.SSLError):
            return

    def _input_waiting(self):
        """Whether the kernel holds bytes from the client not read yet."""
        try:
            return unread_bytes(self.sock) > 0
        except OSError:
            return True         # cannot tell: linger

    def _notify_queued(self):
        """The queue stage for messages committed so far: after their 250 went out, so
        a slow plugin never delays a reply."""
        while self._queued:
            notify_queued(self.plugins, self._queued.pop(0))

    def _handshake(self):
        """Do the server side of a TLS handshake (after STARTTLS, or at once for smtps)."""
        self.sock.settimeout(self.server.config.tls.handshake_timeout)
        try:
            self.sock = self.server.tls_context.wrap_socket(self.sock, server_side=True)
        except (OSError, ssl.SSLError, ValueError) as exc:
            metrics.TLS_FAILURES.inc()
            self._ended("tls_failed")
            raise SessionEnded("TLS handshake failed: %s" % exc) from None
        metrics.TLS_SESSIONS.labels(self.sock.version() or "unknown").inc()
        self.tls_info = tls.describe(self.sock)
        self.ctx.tls, self.ctx.tls_info = True, self.tls_info
        cipher = self.sock.cipher()
        if cipher:
            self.ctx.tls_protocol = self.sock.version() or cipher[1]
            self.ctx.tls_cipher, self.ctx.tls_bits = cipher[0], cipher[2]
        log.info("TLS connection established from %s: %s", self.client, self.tls_info)

    # ---- events -----------------------------------------------------------------------

    def on_helo(self, event):
        self.ctx.helo = event.name
        self.ctx.esmtp = event.esmtp
        if self.authenticator is not None:
            self.proto.offer_auth_mechanisms(self.authenticator.mechanisms())
        self.ctx.new_transaction()
        if (self._refused_by_plugins("helo", "HELO")
                or self._refused_by_milters(lambda m: m.helo(), "helo", "HELO")):
            # The refused name is not the session's: later checks see the one accepted.
            self.ctx.helo = self.proto.helo_name or ""
            return
        self.proto.accept()

    def on_mail_from(self, event):
        ctx = self.ctx
        ctx.new_transaction()
        self.message_verdict = None
        self.message_headers = []
        ctx.sender = event.transaction.sender
        ctx.declared_size = event.transaction.declared_size or 0
        self.expansions = {}
        if self._refused_by_plugins("mail", "MAIL", sender=ctx.sender, early=True):
            return
        shortage = self.server.room.shortage(event.transaction.declared_size)
        if shortage is not None:
            # Refused before the content is sent, as Postfix does (queue_minfree).
            return self._reject("MAIL", STORAGE_FULL, "queue_minfree", ctx.sender,
                                why=" (%s)" % shortage)
        # A node handing over mail relays senders it already checked when it took them.
        refusal = self.server.sender_logins.check(ctx.sender, self.proto.auth_user) \
            if self.server.sender_logins is not None \
            and self.listener.mode != HANDOVER else None
        if refusal is not None:
            return self._reject("MAIL", refusal, "reject_sender_login_mismatch", ctx.sender)
        refusal, self.queued_sender = self.server.policy.rewrite_sender(ctx.sender)
        if refusal is not None:
            return self._reject("MAIL", refusal.reply, refusal.restriction, ctx.sender)
        if self._refused_by_plugins("mail", "MAIL", sender=ctx.sender, early=False):
            return
        if self.milters is not None:
            # Postfix knows the queue id from MAIL on, and milters ask for it ({i}).
            self.milters.queue_id = new_queue_id()
            if self._refused_by_milters(
                    lambda m: m.mail(ctx.sender, mail_args(event.transaction)), "mail",
                    "MAIL", sender=ctx.sender):
                return
        self.proto.accept()

    def on_rcpt_to(self, event):
        address = event.recipient.address
        ctx = self.ctx
        ctx.recipient = address
        if self._refused_by_plugins("rcpt", "RCPT", event.transaction.sender, address,
                                    early=True):
            return
        if self.screen.refusal() is not None:      # failed an enforced protocol test
            return self._reject("RCPT", self.screen.refusal(), self.screen.failed,
                                event.transaction.sender, address)
        refusal, targets = self.server.policy.check_recipient(
            self.client_ip, self.proto.auth_user, address, event.transaction.smtputf8)
        if refusal is not None:
            return self._reject("RCPT", refusal.reply, refusal.restriction,
                                event.transaction.sender, address)
        if targets is not None:
            # Looked up now, queued at the end of DATA (elemta.addressing.virtual).
            self.expansions[address] = targets
        if self._refused_by_plugins("rcpt", "RCPT", event.transaction.sender, address,
                                    early=False):
            return
        if self._refused_by_milters(lambda m: m.rcpt(address, _rcpt_args(event.recipient)),
                                    "rcpt", "RCPT", event.transaction.sender, address):
            return
        ctx.recipients.append(address)
        self.proto.accept()

    def on_data_start(self, event):
        """DATA or the first BDAT: the data_command plugins (Postfix's
        smtpd_data_restrictions) and the milters may refuse it before any content is
        read; then the queue file is made (the queue_storage check)."""
        txn, proto = event.transaction, self.proto
        command = proto.last_command          # DATA, or BDAT
        self.ctx.recipient = None             # the message's now: ctx.recipients
        if (self._refused_by_plugins(DATA_COMMAND, command, txn.sender)
                or self._refused_by_milters(lambda m: m.data(), "data", command,
                                            txn.sender)):
            return
        self.queue_id = (self.milters.queue_id if self.milters is not None else None) \
            or new_queue_id()
        envelope = Envelope(
            queue_id=self.queue_id, sender=self.queued_sender,
            recipients=expanded_recipients(
                [Recipient(r.address, r.notify, r.orcpt) for r in txn.recipients],
                self.expansions.get),
            arrival=time.time(), body=txn.body, smtputf8=txn.smtputf8, ret=txn.ret,
            envid=txn.envid, requiretls=txn.requiretls, client_address=self.client_ip,
            client_helo=proto.helo_name,
            protocol=protocol_name(proto.esmtp, proto.tls_active, proto.auth_user is not None,
                                   txn.smtputf8),
            auth_user=proto.auth_user)
        header = received_header(proto.helo_name, self.client_ip, self.ctx.client_name,
                                 self.server.hostname,
                                 envelope.protocol, self.queue_id,
                                 [r.address for r in txn.recipients], self.tls_info,
                                 proto.auth_user if self.server.config.smtpd
                                 .sasl_authenticated_header else None)
        self.write_error = None
        # Headers are rewritten (canonical maps, masquerading) only for a client on this
        # host, as Postfix's local_header_rewrite_clients = permit_inet_interfaces:
        # another host's headers are its own business.
        self.header_rewriting = (self.server.policy.rewriter is not None
                                and self.client_ip == self._local_ip())
        self.content = bytearray() if self.header_rewriting or self._wants_content() \
            else None
        # Header fields from the plugins before the content go above our Received
        # header, where Postfix writes its PREPEND actions. With milters they are
        # written with the content: the milters see them first and may edit them.
        prefix = header_block(self.session_headers + self.message_headers) + header
        self.pending_prefix = prefix if self.milters is not None else b""
        try:
            self.writer = self.server.queue.start_message(envelope, self.listener)
            if not self.pending_prefix:
                self.writer.write(prefix)
        except OSError as exc:
            log.error("%s: cannot create queue file: %s", self.queue_id, exc)
            self._discard_message()
            return self._refuse_content(self._storage_reply(exc), "queue_storage", "data")
        self.content_filter = self.server.content_checks.start(
            self.queue_id, "from %s; from=<%s> to=<%s> proto=%s helo=<%s>" % (
                self.client, txn.sender, txn.recipients[0].address,
                "ESMTP" if proto.esmtp else "SMTP", proto.helo_name))
        login = printable(proto.auth_user) if proto.auth_user else None
        log.info("%s: client=%s%s%s", self.queue_id, self.client,
                 ", sasl_method=%s, sasl_username=%s" % (self.auth_method, login)
                 if login else "",
                 ", priority=%d" % envelope.priority if envelope.priority else "",
                 extra={"event": "received", "queue_id": self.queue_id,
                        "client": self.client, "helo": proto.helo_name,
                        "sasl_username": login})
        proto.accept()

    def on_data_chunk(self, event):
        if self.writer is None or self.write_error is not None:
            return
        self._store(self.content_filter.feed(event.data))

    def _store(self, data):
        """Content that passed the header and body checks: to the spool file, or kept
        for the data and storage plugins."""
        if not data:
            return
        if self.content is not None:      # written, edited, after the data stage
            self.content += data
            return
        try:
            self.writer.write(data)
        except OSError as exc:
            self.write_error = exc          # keep reading to the end, then refuse

    def on_data_aborted(self, event):
        self._discard_message()
        if self.milters is not None:
            self.milters.abort()

    def on_message_received(self, event):
        txn, writer = event.transaction, self.writer
        checked = self.content_filter
        self.content_filter = None
        if checked is not None:
            self._store(checked.finish())
        if self.write_error is not None:
            log.error("%s: queue file write error: %s", self.queue_id, self.write_error)
            reply = self._storage_reply(self.write_error)
            self._discard_message()
            return self._refuse_content(reply, "queue_storage")
        if self.screen.refusal() is not None:
            # An enforced protocol test failed after the recipients were accepted (the
            # DATA command pipelined with the content): the message is refused too.
            log.info("%s: reject: END-OF-MESSAGE from %s: %s; from=<%s> (restriction %s)",
                     self.queue_id, self.client, self.screen.refusal(), txn.sender,
                     self.screen.failed, extra=self._refusal(
                         "END-OF-MESSAGE", self.screen.refusal(), self.screen.failed,
                         txn.sender))
            self._discard_message()
            return self._refuse_content(self.screen.refusal(), self.screen.failed)
        if checked is not None and not self._passed_content_checks(checked):
            return
        early = [v for v in (self.session_verdict, self.message_verdict) if v is not None]
        early.sort(key=lambda verdict: verdict[0] != DISCARD)     # a discard outweighs
        early = early[0] if early else None
        if early is not None and early[0] == DISCARD:
            return self._discard(txn, *early[1:])
        hold = early[1:] if early is not None else None      # (reason, plugin, stage)
        if self.content is not None:
            verdict = self._run_content_stages(txn)
            if verdict is None:
                return
            if hold is None and verdict is not True and verdict.quarantine:
                hold = (verdict.quarantine, verdict.quarantined_by, verdict.quarantine_stage)
        # Quarantine: the message enters the queue already on hold, so no delivery worker
        # can claim it between the commit and a later hold. The queue keeps who held it
        # and why, for queue show, the REST API and mailq.
        if hold is not None:
            writer.hold = Hold(hold[1], hold[0], time.time())
        elif checked is not None and checked.hold is not None:
            writer.hold = Hold(checked.hold, checked.hold_reason, time.time())
        try:
            writer.finish()
            self.server.committer.commit(writer)
        except OSError as exc:
            log.error("%s: cannot make message durable: %s", self.queue_id, exc)
            self._discard_message()
            return self._refuse_content(self._storage_reply(exc), "queue_storage")
        self.writer = None
        metrics.MESSAGES_ACCEPTED.inc()
        metrics.ACCEPTED_BYTES.inc(writer.size)
        log_queued(self.queue_id, txn.sender, writer.size, len(writer.envelope.recipients),
                   client=self.client)
        if hold is not None:
            log.info("%s: hold: END-OF-MESSAGE from %s: %s (%s)", self.queue_id,
                     self.client, hold[0], _who(*hold[1:]),
                     extra=self._verdict_facts("hold", hold[0], hold[1], txn.sender))
        self.proto.accept("Ok: queued as %s" % self.queue_id)
        if self.plugins.wants("queue"):
            recipients = [r.address for r in txn.recipients]
            self._queued.append(dataclasses.replace(
                self.ctx, stage="", queue_id=self.queue_id, sender=txn.sender,
                recipients=recipients, recipient=None, message=None, auth_results=[],
                outbound=outbound(recipients, self.server.policy.is_local), state={}))

    def _passed_content_checks(self, checked):
        """Give the header and body checks' verdict (they logged what matched): False
        once the reply is given (refused, discarded); a REDIRECT replaces the
        recipients."""
        if checked.refusal is not None:
            self._discard_message()
            self._refuse_content(*checked.refusal)
            return False
        if checked.discard is not None:
            self._discard_message()
            self.proto.accept("Ok: queued as %s" % self.queue_id)
            return False
        if checked.redirect is not None:
            envelope = dataclasses.replace(self.writer.envelope,
                                           recipients=[Recipient(checked.redirect)])
            try:
                in_thread(self.writer.replace_envelope, envelope)
            except OSError as exc:
                log.error("%s: queue file write error: %s", self.queue_id, exc)
                self._discard_message()
                self._refuse_content(self._storage_reply(exc), "queue_storage")
                return False
        return True

    def _run_content_stages(self, txn):
        """Run the data and storage plugins on the kept content and write it, edited, to
        the spool file. Returns their ContentVerdict, or None once the reply has been
        given (refused, discarded, or the file could not be written), and True when
        the content was kept only to rewrite its headers (no plugin wants it)."""
        ctx, content = self.ctx, bytes(self.content)
        self.content = None
        if self.header_rewriting:
            content = self._rewritten_headers(txn, content)
            if content is None:
                return None
            if not self._wants_content():
                return True if self._write_content(content) else None
        ctx.queue_id = self.queue_id
        ctx.sender = txn.sender
        ctx.recipients = [r.address for r in txn.recipients]
        ctx.outbound = outbound(ctx.recipients, self.server.policy.is_local)
        verdict = run_content_stages(self.plugins, ctx, content, self._milter_filter(txn))
        ctx.new_transaction()             # end of DATA: the next MAIL starts afresh
        if verdict.reply is not None:
            reply = Reply(*verdict.reply)
            log.info("%s: reject: END-OF-MESSAGE from %s: %s; from=<%s> proto=%s "
                     "helo=<%s> (%s)", self.queue_id, self.client, reply,
                     txn.sender, "ESMTP" if self.proto.esmtp else "SMTP",
                     self.proto.helo_name, _who(verdict.decided_by, verdict.stage),
                     extra=self._refusal("END-OF-MESSAGE", reply, verdict.decided_by,
                                         txn.sender))
            self._discard_message()
            self._refuse_content(reply, verdict.decided_by)
            return None
        if verdict.action == DISCARD:
            self._discard(txn, verdict.reason, verdict.decided_by, verdict.stage)
            return None
        return verdict if self._write_content(verdict.content) else None

    def _wants_content(self):
        return wants_content(self.plugins) or self.milters is not None

    def _milter_filter(self, txn):
        """The milters' turn at the end of data (between the data and storage plugins),
        for run_content_stages; their envelope changes go into the spool file, the
        recipients they add through the RCPT address handling (_added_by_milter)."""
        if self.milters is None:
            return None

        def milter_filter(content):
            self.milters.queue_id = self.queue_id
            outcome = self.milters.content(content, self.pending_prefix)
            self.pending_prefix = outcome.prefix
            envelope = dataclasses.replace(self.writer.envelope,
                                           recipients=list(self.writer.envelope.recipients))
            verdict = content_verdict(
                outcome, envelope, ContentVerdict, [r.address for r in txn.recipients],
                lambda address: self.expansions.get(address) or [address],
                lambda address: self._added_by_milter(address, txn.smtputf8))
            if verdict.action == "continue" and outcome.changed_envelope:
                try:
                    in_thread(self.writer.replace_envelope, envelope)
                except OSError as exc:
                    log.error("%s: queue file write error: %s", self.queue_id, exc)
                    verdict.action, verdict.stage = TEMPFAIL, "milter"
                    verdict.decided_by = "queue_storage"
                    verdict.reply = self._storage_reply(exc)
                self.ctx.recipients = [r.address for r in envelope.recipients]
                self.ctx.sender = envelope.sender
            return verdict
        return milter_filter

    def _added_by_milter(self, address, smtputf8):
        """The queue addresses for a recipient a milter adds: canonical maps and virtual
        aliases as for RCPT TO, without the relay guard or the existence check
        (RelayPolicy.added_recipient); [] for one refused for good (logged),
        RecipientLookupError for a table that cannot answer now."""
        refusal, targets = self.server.policy.added_recipient(address, smtputf8)
        if refusal is None:
            return targets or [address]
        reply = refusal.reply
        if reply.code < 500:
            raise RecipientLookupError((reply.code, reply.status, reply.text))
        log.warning("%s: recipient <%s> added by a milter refused: %s", self.queue_id,
                    printable(address), reply)
        return []

    def _write_content(self, content):
        """Write the kept content to the spool file (below the header fields kept for
        the milters); False once refused for it."""
        prefix, self.pending_prefix = self.pending_prefix, b""
        try:
            if prefix:
                self.writer.write(prefix)
            if len(content) > THREADED_WRITE:
                # The file write and its CRC release the GIL: a 30 MB message costs the
                # other sessions nothing while it goes to disk (tests/test_scanning_load).
                in_thread(self.writer.write, content)
            else:
                self.writer.write(content)
        except OSError as exc:
            log.error("%s: queue file write error: %s", self.queue_id, exc)
            self._discard_message()
            self._refuse_content(self._storage_reply(exc), "queue_storage")
            return False
        return True

    def _rewritten_headers(self, txn, content):
        """content with its address headers rewritten (elemta.addressing.headers), or
        None once the message was refused for a table that could not answer."""
        try:
            return rewrite_headers(content, self.server.policy.rewriter)
        except (TableUnavailable, RewriteError) as error:
            log.warning("%s: header rewriting failed: %s", self.queue_id, error)
            reply = Reply(550, "5.1.3", "Error: canonical address too long in a header") \
                if getattr(error, "permanent", False) else \
                Reply(451, "4.3.0", "Error: temporary lookup failure")
        log.info("%s: reject: END-OF-MESSAGE from %s: %s; from=<%s> (restriction "
                 "canonical_maps)", self.queue_id, self.client, reply, txn.sender,
                 extra=self._refusal("END-OF-MESSAGE", reply, "canonical_maps", txn.sender))
        self._discard_message()
        self._refuse_content(reply, "canonical_maps")
        return None

    def _discard(self, txn, reason, plugin, stage):
        """A plugin said discard: the client hears 250 as for any message, nothing is
        queued, and the log says who decided (Postfix logs its DISCARD action alike)."""
        log.info("%s: discard: END-OF-MESSAGE from %s: %s; from=<%s> nrcpt=%d (%s)",
                 self.queue_id, self.client, reason or "discarded", txn.sender,
                 len(txn.recipients), _who(plugin, stage),
                 extra=self._verdict_facts("discard", reason or "discarded", plugin,
                                           txn.sender, nrcpt=len(txn.recipients)))
        self._discard_message()
        self.proto.accept("Ok: queued as %s" % self.queue_id)

    def on_auth_request(self, event):
        """Ask the AUTH backend: 235 as the login name it returns, 535 for wrong
        credentials, 454 4.7.0 when it cannot decide now (Dovecot unreachable: the
        client should try again later, not think its password wrong)."""
        name = printable(event.username)    # the client's: printable, in <> in the log
        result = self.authenticator.authenticate(
            self.client_ip, self._local_ip(), event.mechanism, event.username,
            event.password, self.proto.tls_active)
        attempts = metrics.AUTH_ATTEMPTS
        # The core passes only mechanisms it offers; "other" keeps the label bounded.
        mechanism = event.mechanism if event.mechanism in AUTH_MECHANISMS else "other"
        if result.outcome == authresult.OK:
            attempts.labels(mechanism, "success").inc()
            log.info("%s: AUTH %s succeeded for %s%s", self.client, event.mechanism, name,
                     "" if result.user == event.username
                     else " as %s" % printable(result.user))
            self.ctx.auth_user = result.user
            self.ctx.auth_method = self.auth_method = event.mechanism
            if self._refused_by_plugins("auth", "AUTH"):
                self.ctx.auth_user = self.ctx.auth_method = None
                return
            if self.listener.mode == HANDOVER:
                # A node of the cluster relaying what it already accepted: neither a
                # stranger to screen, rate-limit or greylist nor one of our users to
                # DKIM-sign for (elemta.plugins.api.Context.handover).
                self.ctx.handover = True
            return self.proto.accept_auth(result.user)
        if result.outcome == authresult.TEMPFAIL:
            attempts.labels(mechanism, "tempfail").inc()
            log.warning("%s: SASL %s authentication failed for <%s>: temporary failure: %s",
                        self.client, event.mechanism, name, printable(result.reason))
            return self.proto.reject(AUTH_TEMPFAIL)
        if result.outcome == authresult.UNSUPPORTED:
            attempts.labels(mechanism, "unsupported").inc()
            log.warning("%s: SASL %s authentication refused for <%s>: %s", self.client,
                        event.mechanism, name, printable(result.reason))
            return self.proto.reject(AUTH_UNSUPPORTED)
        attempts.labels(mechanism, "failure").inc()
        log.warning("%s: SASL %s authentication failed for <%s>%s", self.client,
                    event.mechanism, name,
                    ": %s" % printable(result.reason) if result.reason else "")
        self.proto.reject()

    def _local_ip(self):
        """The address the client connected to (Dovecot's lip=), or None."""
        local = self._local_address()
        return local[0] if local is not None else None

    def _local_address(self):
        """(address, port) the client connected to, or None."""
        try:
            local = self.sock.getsockname()
            return (local[0], local[1]) if isinstance(local, tuple) else None
        except (OSError, IndexError, TypeError):
            return None

    def on_improper_pipelining(self, event):
        """Sent ahead where RFC 2920 forbids: the pipelining test decides."""
        drop = self.screen.pipelining(event)
        if drop is None:
            return self.proto.accept()
        log.info("NOQUEUE: reject: %s from %s: %s; proto=%s helo=<%s> (restriction "
                 "pipelining)", event.command, self.client, drop,
                 "ESMTP" if self.proto.esmtp else "SMTP", self.proto.helo_name or "",
                 extra=self._refusal(event.command, drop, "pipelining"))
        self._refuse_content(drop, "pipelining", stage_of_command(event.command))

    def on_unknown_command(self, event):
        """A line that is no command (reported only when there are milters): refused
        either way; a milter's refusal gives the reply, as at Postfix's unknown-command
        stage. Counted as the milter's verdict, not as a restriction's refusal."""
        verdict = self.milters.unknown(event.line) if self.milters is not None else None
        if verdict is None or not verdict.refused:
            return self.proto.accept()
        reply = Reply(*verdict.reply)
        log.info("NOQUEUE: reject: UNKNOWN from %s: %s; proto=%s helo=<%s> (milter %s)",
                 self.client, reply, "ESMTP" if self.proto.esmtp else "SMTP",
                 self.proto.helo_name or "", verdict.milter,
                 extra=self._refusal("UNKNOWN", reply, "milter " + verdict.milter))
        self._refusal_counted = True
        self.proto.reject(reply)

    def on_start_tls(self, event):
        self._flush()
        self._handshake()
        self.proto.tls_started()
        self.ctx.helo = ""                 # RFC 3207 4.2: the client says EHLO again

    # ---- helpers ------------------------------------------------------------------------

    def _refused_by_plugins(self, stage, command, sender=None, recipient=None,
                            early=None):
        """Run the plugins of `stage` (early: only those before or after its core
        checks, as PluginManager.run); if they refuse, reply and return True."""
        if not self.plugins.wants(stage, early):
            return False
        outcome = self.plugins.run(stage, self.ctx, early)
        if outcome.reply is None:
            self._remember(outcome, stage)
            return False
        self._reject(command, Reply(*outcome.reply), outcome.decided_by, sender, recipient,
                     plugin=True, stage=PLUGIN_STAGES[stage])
        return True

    def _refused_by_milters(self, ask, stage, command, sender=None, recipient=None):
        """Ask the milters (ask(chain) gives their Verdict) after the plugins of the
        stage; if they refuse, reply and return True."""
        if self.milters is None:
            return False
        verdict = ask(self.milters)
        if not verdict.refused:
            self._remember_milter(verdict, stage)
            return False
        self._reject(command, Reply(*verdict.reply), verdict.milter, sender, recipient,
                     kind="milter", stage=stage)
        return True

    def _remember_milter(self, verdict, stage):
        """A milter's discard or quarantine before the content, kept as a plugin's."""
        if verdict.action == DISCARD:
            self._remember(_MilterOutcome(True, None, None, verdict.reason,
                                          "milter " + verdict.milter), stage)
        elif verdict.action == "quarantine":
            self._remember(_MilterOutcome(False, verdict.reason or "held by milter",
                                          "milter " + verdict.milter, "", None), stage)

    def _remember(self, outcome, stage):
        """Keep a discard or quarantine given before the content, for the end of DATA:
        from connection, helo and auth for every message of the session, from mail and
        rcpt for this message. A discard outweighs a quarantine; the first of each
        stands. Header fields to add are kept alike (each field once), for the start
        of DATA; header fields to remove are ignored: there is no content yet."""
        headers = self.session_headers if stage in ("connection", "helo", "auth") \
            else self.message_headers
        for field in outcome.headers:
            if field not in headers:
                headers.append(field)
        if outcome.discard:
            verdict = (DISCARD, outcome.reason, outcome.decided_by, stage)
        elif outcome.quarantine:
            verdict = ("quarantine", outcome.quarantine, outcome.quarantined_by, stage)
        else:
            return
        scope = "session_verdict" if stage in ("connection", "helo", "auth") \
            else "message_verdict"
        current = getattr(self, scope)
        if current is None or (current[0] != DISCARD and verdict[0] == DISCARD):
            setattr(self, scope, verdict)
        log.info("NOQUEUE: %s: %s from %s: %s (%s); applies to %s",
                 "discard" if verdict[0] == DISCARD else "hold",
                 "DATA" if stage == DATA_COMMAND else stage.upper(), self.client,
                 verdict[1] or "by policy", _who(verdict[2]),
                 "this session" if scope == "session_verdict" else "this message")

    def _reject(self, command, reply, restriction, sender=None, recipient=None, why="",
                plugin=False, kind=None, stage=None):
        """Refuse the pending command, logged the way Postfix logs a reject, with the
        restriction that refused it (a core check or a plugin) named at the end; counted
        at `stage` (elemta.restrictions.catalogue.STAGES), by default the command's."""
        log.info("NOQUEUE: reject: %s from %s: %s;%s%s proto=%s helo=<%s>%s (%s %s)",
                 command, self.client, reply,
                 " from=<%s>" % sender if sender is not None else "",
                 " to=<%s>" % recipient if recipient is not None else "",
                 "ESMTP" if self.proto.esmtp else "SMTP",
                 self.proto.helo_name or self.ctx.helo, why,   # a refused HELO: its name
                 kind or ("plugin" if plugin else "restriction"), restriction,
                 extra=self._refusal(command, reply,
                                     "milter " + restriction if kind == "milter"
                                     else restriction, sender, recipient,
                                     helo=self.proto.helo_name or self.ctx.helo))
        self._refuse_content(reply, restriction, stage or stage_of_command(command))

    def _refusal(self, command, reply, restriction, sender=None, recipient=None, dsn=None,
                 helo=None):
        """The facts of a refusal's log line, for the JSON log (elemta.util.logjson):
        the text line's parts, as values. A refusal at END-OF-MESSAGE has a queue id."""
        return {"event": "reject", "command": command, "client": self.client,
                "queue_id": self.queue_id if command == "END-OF-MESSAGE" else None,
                "from": sender, "to": recipient, "reason": str(reply),
                "dsn": dsn or getattr(reply, "status", None), "restriction": restriction,
                "proto": "ESMTP" if self.proto.esmtp else "SMTP",
                "helo": helo or self.proto.helo_name or None}

    def _verdict_facts(self, event, reason, decided_by, sender, **more):
        """The JSON log's facts of a hold or discard at END-OF-MESSAGE, as _refusal's."""
        return dict({"event": event, "command": "END-OF-MESSAGE", "client": self.client,
                     "queue_id": self.queue_id, "from": sender, "reason": reason,
                     "restriction": decided_by}, **more)

    def _refuse_content(self, reply, restriction, stage="end_of_data"):
        """Give the refusal `reply` to the pending command and count it for restriction
        (the caller logged it)."""
        metrics.count_refusal(restriction, stage)
        self._refusal_counted = True
        self.proto.reject(reply)

    def _count_core_refusal(self, reply):
        """Count a refusal the protocol core made itself (a size or recipient limit)
        under its restriction's name; other core replies (syntax, sequence) are not
        restrictions."""
        command = self.proto.last_command
        restriction = CORE_REFUSALS.get(metrics.rejection_reason(command, reply.code,
                                                                 reply.status))
        if restriction is not None:
            log.info("NOQUEUE: reject: %s from %s: %s; proto=%s helo=<%s> (restriction %s)",
                     command, self.client, reply, "ESMTP" if self.proto.esmtp else "SMTP",
                     self.proto.helo_name or "", restriction,
                     extra=self._refusal(command, reply, restriction))
            metrics.count_refusal(restriction, stage_of_command(command))

    def _discard_message(self):
        self.content = None
        self.content_filter = None
        if self.writer is not None:
            try:
                self.writer.abort()
            except OSError as exc:
                log.warning("%s: cannot remove partial queue file: %s", self.queue_id, exc)
            self.writer = None

    @staticmethod
    def _storage_reply(exc):
        if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            return STORAGE_FULL
        return Reply(451, "4.3.0", "Error: queue file write error")


def _rcpt_args(recipient):
    """The ESMTP parameters of RCPT TO, as the milter's RCPT command carries them."""
    args = []
    if recipient.notify:
        args.append("NOTIFY=%s" % ",".join(recipient.notify))
    if recipient.orcpt:
        args.append("ORCPT=%s" % printable(recipient.orcpt))
    return args


@dataclasses.dataclass
class _MilterOutcome:
    """A milter's discard or quarantine in the shape _remember reads (a plugin
    Outcome's fields)."""
    discard: bool
    quarantine: object
    quarantined_by: object
    reason: str
    decided_by: object
    headers: tuple = ()


def _who(decided_by, stage=None):
    """Who decided, for the log: "milter NAME" as it is, else "plugin NAME at S stage"."""
    if str(decided_by).startswith("milter "):
        return decided_by
    return "plugin %s%s" % (decided_by, " at %s stage" % stage if stage else "")
