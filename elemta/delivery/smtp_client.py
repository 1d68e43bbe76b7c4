"""The SMTP client: one connection to one server, for one or more messages, under gevent.

Owned by the delivery worker (`elemta: delivery`); elemta.delivery.mx says which hosts to try,
this module talks to one of them:

    client = SMTPClient("mail.example.org", tls=TLSPolicy("may"))
    try:
        client.connect(host.address, 25, server_name=host.name)
    except SessionError as error:      # refused, timed out, 4xx/5xx greeting, TLS failure
        ...error.try_next_host, error.reply...
    with open_content(qid) as content:
        result = client.send(envelope, content)   # one DeliveryResult
    for item in result.recipients:            # DELIVERED / TEMPORARY / PERMANENT each,
        ...item.outcome, item.reply...        # with the server's code, status and text
    client.send(other_envelope, other_content)   # the same connection, reused
    client.quit()

What it does, RFC by RFC: EHLO with HELO fallback (5321); STARTTLS, opportunistic or mandatory
with certificate checks (3207, TLSPolicy), or checked against TLSA records (DANE, 7672,
elemta.delivery.dane); PIPELINING: MAIL, every RCPT and DATA in one write, replies read in
order (2920); SIZE announced, and a message larger than the server's limit
refused before MAIL (1870); BODY=8BITMIME when the message is 8-bit and the server offers it
(6152; without the offer the bytes go as they are, as Postfix does by default); SMTPUTF8 when
the envelope needs it, and a permanent failure 5.6.7 when the server lacks it (6531); RET,
ENVID, NOTIFY and ORCPT passed on when the server offers DSN (3461); REQUIRETLS passed on,
and a message that asks for it never sent over a session that is not TLS with the host's
certificate verified or whose server does not offer it (8689); the RFC 5321 4.5.3.2
timeouts (Timeouts). The content is streamed from a file object in blocks, never whole in
memory, with every line ending made CRLF and dot-stuffed (elemta.delivery.wire.DataEncoder).

A misbehaving server never raises out of send(): a garbage reply, an overlong line, a closed
connection or a timeout makes the undecided recipients TEMPORARY with a clear local reply, and
the connection unusable. connect() raises only SessionError. An error reading the content
(a corrupt spool file) drops the connection without the final dot, so the server discards the
partial message, and then propagates: that is a local problem, not the server's.

LMTP (RFC 2033) is the same client in another mode, SMTPClient(name, lmtp=True): LHLO
instead of EHLO (no HELO fallback), a unix socket path as well as a TCP address, and after
the final dot one reply per accepted recipient, in RCPT order, each deciding its recipient.

SMTP AUTH (RFC 4954), when given credentials=(user, password) and the server offers AUTH:
PLAIN, or LOGIN when that is all it offers, after STARTTLS. With sasl_require_tls (the
default) a session that is not encrypted is given up before the password is sent; with
SASL_TLS_IF_OFFERED only one whose server offered STARTTLS. Any
failure (no common mechanism, 535, TLS missing) is a temporary SessionError whose reply
quotes the server, as Postfix soft-bounces authentication failures. Without an AUTH offer
the mail goes unauthenticated, as with Postfix.

See also: elemta.delivery.wire (bytes), elemta.delivery.mx (routing), elemta.delivery.sasl
(whose credentials), tests/test_smtp_client.py, tests/test_lmtp.py, tests/test_relay_auth.py.
"""

import base64
import ipaddress
import logging
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from gevent import socket, ssl

from elemta.delivery import dane, deferrals
from elemta.delivery.wire import (DataEncoder, ReplyReader, ServerReply, SMTPProtocolError,
                                  local_reply, orcpt_parameter, parse_ehlo, xtext)
from elemta.tlsrpt import results
from elemta.util.sockets import send_all, set_timeout

log = logging.getLogger("elemta.delivery")

# Per-recipient outcomes.
DELIVERED = "delivered"
TEMPORARY = "temporary"   # try again later (or at the next MX host)
PERMANENT = "permanent"   # bounce

# TLS levels, as Postfix's smtp_tls_security_level.
TLS_NONE = "none"         # never STARTTLS
TLS_MAY = "may"           # STARTTLS when offered, certificate not checked; plaintext otherwise
TLS_ENCRYPT = "encrypt"   # STARTTLS required, certificate not checked
TLS_VERIFY = "verify"     # STARTTLS required, certificate chain checked against the CAs
TLS_SECURE = "secure"     # as verify, and the certificate must name the MX host
TLS_DANE = "dane"         # STARTTLS required, a TLSA record must match (elemta.delivery.dane)
TLS_LEVELS = (TLS_NONE, TLS_MAY, TLS_ENCRYPT, TLS_VERIFY, TLS_SECURE, TLS_DANE)

# sasl_require_tls: the password in clear only to a server that does not offer STARTTLS
# (a node's handover listener without a certificate); one that offered it and then
# refused it, or a STARTTLS skipped by tls_level none, gets no password.
SASL_TLS_IF_OFFERED = "if-offered"

# Content is read and sent in blocks of this size: memory per delivery stays bounded.
CONTENT_BLOCK = 64 * 1024
# RFC 2920 lets the client send many commands at once, but the server's replies must fit in
# the socket buffers while we are still writing; in groups of this many that always holds.
PIPELINE_GROUP = 100
_CONTROL = frozenset(chr(c) for c in range(32)) | {"\x7f"}


@dataclass(frozen=True)
class Timeouts:
    """Seconds each step may take (RFC 5321 4.5.3.2 minimums; Postfix's names in brackets)."""
    connect: float = 30.0     # TCP connect [smtp_connect_timeout]
    greeting: float = 300.0   # 4.5.3.2.1 initial 220 [smtp_helo_timeout]
    helo: float = 300.0       # EHLO/HELO, STARTTLS and the TLS handshake [smtp_helo_timeout]
    mail: float = 300.0       # 4.5.3.2.2 MAIL [smtp_mail_timeout]
    rcpt: float = 300.0       # 4.5.3.2.3 RCPT [smtp_rcpt_timeout]
    data: float = 120.0       # 4.5.3.2.4 DATA initiation [smtp_data_init_timeout]
    data_block: float = 180.0  # 4.5.3.2.5 each block of content [smtp_data_xfer_timeout]
    data_done: float = 600.0  # 4.5.3.2.6 reply to the final dot [smtp_data_done_timeout]
    rset: float = 20.0        # [smtp_rset_timeout]
    quit: float = 300.0       # [smtp_quit_timeout]


@dataclass(frozen=True)
class TLSPolicy:
    """When to use STARTTLS and what to check (see TLS_LEVELS). ca_file/ca_path name the
    trusted CAs for verify and secure (the system's store when both are None); tlsa, the
    usable TLSA records (elemta.delivery.dane.TLSA) level dane checks the server with."""
    level: str = TLS_MAY
    ca_file: Optional[str] = None
    ca_path: Optional[str] = None
    tlsa: Tuple[object, ...] = ()

    def __post_init__(self):
        if self.level not in TLS_LEVELS:
            raise ValueError("TLS level must be one of %s, not %r" % (", ".join(TLS_LEVELS),
                                                                    self.level))

    @property
    def mandatory(self):
        return self.level in (TLS_ENCRYPT, TLS_VERIFY, TLS_SECURE, TLS_DANE)

    @property
    def authenticates_host(self):
        """True when a session under this policy has authenticated the server: its
        certificate verified for the host's name (secure), or matched by the host's
        DNSSEC-validated TLSA records (dane; a session whose records do not match fails
        at STARTTLS). Either is what REQUIRETLS asks of every hop (RFC 8689 4.2.1)."""
        return self.level in (TLS_SECURE, TLS_DANE)

    def context(self):
        """The client SSLContext for this policy."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if self.level in (TLS_VERIFY, TLS_SECURE):
            context.verify_mode = ssl.CERT_REQUIRED
            context.check_hostname = self.level == TLS_SECURE
            if self.ca_file or self.ca_path:
                context.load_verify_locations(cafile=self.ca_file, capath=self.ca_path)
            else:
                context.load_default_certs()
        else:
            # Opportunistic and encrypt-only TLS protect against passive listeners only;
            # DANE checks the certificate against TLSA records after the handshake.
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


@dataclass
class RecipientResult:
    """What happened to one recipient: outcome (DELIVERED, TEMPORARY, PERMANENT) and the
    reply that decided it (the server's, or one of ours with reply.local set); reason:
    why, as an elemta.delivery.deferrals word (None for a reply to no command)."""
    recipient: object            # the elemta.queue.model.Recipient passed in
    outcome: str
    reply: ServerReply
    reason: Optional[str] = None

    @property
    def address(self):
        return self.recipient.address

    @property
    def code(self):
        return self.reply.code

    @property
    def status(self):
        return self.reply.status

    @property
    def text(self):
        return self.reply.text


@dataclass
class DeliveryResult:
    """The outcome of one message on one connection.

    dsn_passed:     the server offered DSN, so NOTIFY/ORCPT went on with the message (when
                    False, a NOTIFY=SUCCESS recipient needs a "relayed" DSN from us).
    try_next_host:  nothing was delivered and the failure was the session's (421, lost
                    connection, MAIL refused with 4xx) before the message was handed over:
                    the next MX host may do better for the TEMPORARY recipients.
    """
    recipients: List[RecipientResult] = field(default_factory=list)
    dsn_passed: bool = False
    try_next_host: bool = False

    def with_outcome(self, outcome):
        return [item for item in self.recipients if item.outcome == outcome]

    @property
    def delivered(self):
        return self.with_outcome(DELIVERED)

    @property
    def temporary(self):
        return self.with_outcome(TEMPORARY)

    @property
    def permanent(self):
        return self.with_outcome(PERMANENT)


class SessionError(Exception):
    """connect() found no usable session. reply: the server's (bad greeting, EHLO refused)
    or ours (refused, timed out, TLS). try_next_host: another MX host may do better;
    tls_failure: TLS went wrong (a worker may retry this host without TLS at level "may");
    tls_result: then, what went wrong as an RFC 8460 result type (elemta.tlsrpt.results);
    reason: why, as an elemta.delivery.deferrals word (tls for a TLS failure)."""

    def __init__(self, reply, try_next_host=True, tls_failure=False, tls_result=None,
                 reason=None):
        super().__init__(str(reply))
        self.reply = reply
        self.try_next_host = try_next_host
        self.tls_failure = tls_failure or tls_result is not None
        self.tls_result = tls_result
        self.reason = reason or (deferrals.TLS if self.tls_failure else deferrals.OTHER)

    @property
    def permanent(self):
        return self.reply.permanent


class _Broken(Exception):
    """The session is over (lost, timed out, garbage, 421); reply says why, reason as an
    elemta.delivery.deferrals word."""

    def __init__(self, reply, reason):
        super().__init__(str(reply))
        self.reply = reply
        self.reason = reason


def outcome_of(reply):
    """DELIVERED for 2xx, PERMANENT for 5xx, TEMPORARY otherwise."""
    if 200 <= reply.code < 300:
        return DELIVERED
    return PERMANENT if reply.permanent else TEMPORARY


class SMTPClient:
    """One SMTP connection (see the module docstring).

    helo_name:       our host name in EHLO/HELO (LHLO).
    timeouts:        Timeouts; tls: TLSPolicy.
    source_address:  local IP address to connect from (Postfix's smtp_bind_address).
    lmtp:            speak LMTP (RFC 2033) instead of SMTP.
    credentials:     (user, password) for SMTP AUTH, or None.
    sasl_require_tls: authenticate only inside TLS (see the module docstring).
    """

    def __init__(self, helo_name, timeouts=None, tls=None, source_address=None, lmtp=False,
                 credentials=None, sasl_require_tls=True):
        # type: (str, Optional[Timeouts], Optional[TLSPolicy], Optional[str], bool, Optional[Tuple[str, str]], bool) -> None
        self.helo_name = helo_name
        self.timeouts = timeouts or Timeouts()
        self.tls = tls or TLSPolicy()
        self.source_address = source_address
        self.lmtp = lmtp
        self.credentials = credentials
        self.sasl_require_tls = sasl_require_tls
        self.authenticated = None  # the SASL mechanism used, once AUTH succeeded
        self.sock = None
        self.peer = ""
        self.greeting = None       # type: Optional[ServerReply]
        self.extensions = {}       # EHLO keyword -> parameters; {} after HELO
        self.tls_version = None    # "TLSv1.3" once STARTTLS succeeded
        self.tls_verified = None   # at level dane: the TLSA record that matched
        self._reader = ReplyReader()
        self._server_name = None
        self._need_rset = False
        self._dot_sent = False     # in send(): the message was handed over (maybe delivered)

    @property
    def usable(self):
        """True while the connection can take another message."""
        return self.sock is not None

    # -- the session ----------------------------------------------------------------------

    def connect(self, address, port=25, server_name=None):
        """Connect, read the greeting, EHLO (or HELO), STARTTLS as the policy says, then
        AUTH when there are credentials. server_name is the MX host name: for logs, SNI and
        TLS level "secure". An address starting with "/" is a unix socket (port unused;
        the peer is logged as server_name[path], as Postfix's lmtp does).
        Raises SessionError; returns self."""
        self._server_name = server_name or address
        unix = address.startswith("/")
        if unix:
            self.peer = "%s[%s]" % (server_name, address) if server_name else address
        else:
            self.peer = "%s[%s]:%d" % (self._server_name, address, port)
        try:
            self.sock = self._open_socket(address, port, unix)
        except socket.timeout:
            raise SessionError(local_reply(451, "4.4.1", "connect to %s: timed out"
                                           % self.peer), reason=deferrals.TIMEOUT)
        except OSError as error:
            raise SessionError(local_reply(451, "4.4.1", "connect to %s: %s"
                                           % (self.peer, error.strerror or error)),
                               reason=deferrals.CONNECT)
        self._reader = ReplyReader()
        try:
            self._open_session()
        except SessionError:
            self.close()
            raise
        except _Broken as broken:
            self.close()
            raise SessionError(broken.reply, reason=broken.reason)
        return self

    def _open_socket(self, address, port, unix):
        if unix:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(self.timeouts.connect)
                sock.connect(address)
            except BaseException:
                sock.close()
                raise
            return sock
        source = (self.source_address, 0) if self.source_address else None
        sock = socket.create_connection((address, port), self.timeouts.connect,
                                        source_address=source)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _open_session(self):
        self.greeting = self._read("the initial server greeting", self.timeouts.greeting)
        if self.greeting.code != 220:
            self._quit_quietly()
            raise SessionError(self.greeting, reason=deferrals.GREETING)
        self._hello()
        self._secure()
        self._authenticate()

    def _secure(self):
        if self.tls.level == TLS_NONE:
            return
        if "STARTTLS" not in self.extensions:
            if self.tls.mandatory:
                self._quit_quietly()
                raise SessionError(local_reply(451, "4.7.4", "TLS is required, but was not "
                                               "offered by host %s" % self.peer),
                                   tls_result=results.STARTTLS_NOT_SUPPORTED)
            return
        self._starttls()
        self._hello()

    def _hello(self):
        verb = "LHLO" if self.lmtp else "EHLO"
        reply = self._command("%s %s" % (verb, self.helo_name), verb, self.timeouts.helo)
        if reply.code == 250:
            self.extensions = parse_ehlo(reply)
            return
        if self.lmtp or not reply.permanent:
            self._quit_quietly()
            raise SessionError(reply, reason=deferrals.HELO)
        # RFC 5321 4.1.4: an old server that does not know EHLO gets HELO.
        reply = self._command("HELO %s" % self.helo_name, "HELO", self.timeouts.helo)
        if reply.code != 250:
            self._quit_quietly()
            raise SessionError(reply, reason=deferrals.HELO)
        self.extensions = {}

    def _starttls(self):
        reply = self._command("STARTTLS", "STARTTLS", self.timeouts.helo)
        if reply.code != 220:
            if self.tls.mandatory:
                self._quit_quietly()
                raise SessionError(local_reply(451, "4.7.5", "STARTTLS refused by %s: %s"
                                               % (self.peer, reply)),
                                   tls_result=results.STARTTLS_NOT_SUPPORTED)
            return   # Opportunistic: carry on in plaintext.
        if self._reader.buffered:
            # Anything sent before the handshake would be read as if it came over TLS
            # (the response-injection attack of CVE-2011-0411, seen from the client side).
            raise SessionError(local_reply(451, "4.7.5", "%s sent data after its STARTTLS "
                                           "reply" % self.peer),
                               tls_result=results.VALIDATION_FAILURE)
        try:
            self.sock.settimeout(self.timeouts.helo)
            self.sock = self.tls.context().wrap_socket(self.sock,
                                                       server_hostname=self._sni_name())
        except (ssl.SSLError, ssl.CertificateError, OSError, ValueError) as error:
            raise SessionError(local_reply(451, "4.7.5", "TLS handshake with %s failed: %s"
                                           % (self.peer, _describe(error))),
                               tls_result=results.result_of_handshake(error))
        if self.tls.level == TLS_DANE:
            try:
                self.tls_verified = dane.verify(dane.peer_chain(self.sock),
                                                self._server_name, self.tls.tlsa)
            except dane.DANEError as error:
                raise SessionError(local_reply(451, "4.7.5", "DANE: certificate of %s not "
                                               "verified: %s" % (self.peer, error)),
                                   tls_result=results.TLSA_INVALID, reason=deferrals.POLICY)
        self.tls_version = self.sock.version()
        self._reader = ReplyReader()

    def _authenticate(self):
        """SMTP AUTH (RFC 4954) with the credentials, when the server offers it."""
        if self.credentials is None:
            return
        mechanisms = _auth_mechanisms(self.extensions)
        if not mechanisms:
            log.debug("%s offers no AUTH; sending without authentication", self.peer)
            return
        offered = "STARTTLS" in self.extensions
        if self.tls_version is None and (
                self.sasl_require_tls is True
                or (self.sasl_require_tls == SASL_TLS_IF_OFFERED and offered)):
            # Checked before any AUTH command: the password never leaves in clear.
            if self.tls.level == TLS_NONE:
                why = "delivery.tls_level is none"
            elif offered:
                why = "it refused STARTTLS"
            else:
                why = "it did not offer STARTTLS"
            self._quit_quietly()
            raise SessionError(local_reply(
                451, "4.7.0", "not authenticating to %s over an unencrypted session (%s; "
                "%s)" % (self.peer, why, "delivery.sasl_require_tls is set"
                         if self.sasl_require_tls is True else "it offered STARTTLS")),
                reason=deferrals.AUTH)
        user, password = self.credentials
        if "PLAIN" in mechanisms:
            mechanism = "PLAIN"
            token = _b64(b"\0" + user.encode("utf-8") + b"\0" + password.encode("utf-8"))
            reply = self._command("AUTH PLAIN " + token, "AUTH", self.timeouts.helo)
            if reply.code == 334:    # a server that wants the response on its own line
                reply = self._command(token, "AUTH", self.timeouts.helo)
        elif "LOGIN" in mechanisms:
            mechanism = "LOGIN"
            reply = self._command("AUTH LOGIN", "AUTH", self.timeouts.helo)
            for secret in (user, password):
                if reply.code != 334:
                    break
                reply = self._command(_b64(secret.encode("utf-8")), "AUTH",
                                      self.timeouts.helo)
        else:
            self._quit_quietly()
            raise SessionError(local_reply(
                451, "4.7.0", "SASL authentication to %s impossible: it offers %s, Elemta "
                "speaks PLAIN and LOGIN" % (self.peer, " ".join(sorted(mechanisms)))),
                reason=deferrals.AUTH)
        if reply.code == 334:
            # A challenge we have no answer for: cancel the exchange (RFC 4954 4).
            reply = self._command("*", "AUTH", self.timeouts.helo)
        if reply.code != 235:
            self._quit_quietly()
            status = "4" + reply.status[1:] if reply.status else "4.7.0"
            raise SessionError(local_reply(454, status, "SASL authentication failed; server "
                                           "%s said: %s" % (self.peer, reply)),
                               reason=deferrals.AUTH)
        self.authenticated = mechanism
        log.debug("%s: authenticated as %s with %s", self.peer, user, mechanism)

    def _sni_name(self):
        """The name sent as SNI and checked at level secure; None for an IP address."""
        try:
            ipaddress.ip_address(self._server_name)
            return None
        except ValueError:
            return self._server_name

    def reset(self):
        """RSET: end any transaction; True if the server is still there to take mail."""
        if not self.usable:
            return False
        try:
            reply = self._command("RSET", "RSET", self.timeouts.rset)
        except _Broken:
            self.close()
            return False
        self._need_rset = reply.code != 250
        return reply.code == 250

    def quit(self):
        """QUIT politely, then close. Never raises."""
        self._quit_quietly()
        self.close()

    def close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.quit()

    def _quit_quietly(self):
        if self.sock is None:
            return
        try:
            self._command("QUIT", "QUIT", self.timeouts.quit)
        except _Broken:
            pass

    # -- one message ----------------------------------------------------------------------

    def send(self, envelope, content, recipients=None):
        # type: (object, object, Optional[Sequence[object]]) -> DeliveryResult
        """Send one message (an elemta.queue.model.Envelope and a binary file object over its
        content) to `recipients` (default: all of the envelope's) in one transaction."""
        todo = list(envelope.recipients if recipients is None else recipients)
        result = DeliveryResult(dsn_passed="DSN" in self.extensions)
        if not self.usable:
            return self._decide(result, todo, local_reply(451, "4.4.2", "not connected to %s"
                                                          % (self.peer or "a server")),
                                deferrals.LOST_CONNECTION)
        refusal = self._refusal(envelope, todo)
        if refusal is not None:
            return self._decide(result, todo, refusal)
        decided = {}    # recipient index -> RecipientResult
        self._dot_sent = False
        try:
            if self._need_rset and not self.reset():
                raise _Broken(local_reply(451, "4.4.2", "%s did not take RSET" % self.peer),
                              deferrals.PROTOCOL)
            self._transaction(envelope, content, todo, decided)
        except _Broken as broken:
            self.close()
            undecided = [i for i in range(len(todo)) if i not in decided]
            for i in undecided:
                decided[i] = RecipientResult(todo[i], outcome_of(broken.reply), broken.reply,
                                             broken.reason)
            result.try_next_host = not self._dot_sent and len(undecided) == len(todo)
        result.recipients = [decided[i] for i in range(len(todo))]
        return result

    def _decide(self, result, todo, reply, reason=None):
        result.recipients = [RecipientResult(r, outcome_of(reply), reply, reason)
                             for r in todo]
        return result

    def _refusal(self, envelope, todo):
        """A local reply refusing the message before any command, or None."""
        for address in [envelope.sender] + [r.address for r in todo]:
            if _CONTROL.intersection(address) or len(address) > 1000:
                return local_reply(553, "5.1.3", "bad address syntax: %r" % address[:80])
        if envelope.requiretls and envelope.sender and not self.lmtp:
            refusal = self.requiretls_refusal()
            if refusal is not None:
                return refusal
        if self._needs_smtputf8(envelope, todo) and "SMTPUTF8" not in self.extensions:
            return local_reply(550, "5.6.7", "SMTPUTF8 is required, but was not offered by "
                               "host %s" % self.peer)
        limit = self.extensions.get("SIZE", "")
        if limit.isdigit() and 0 < int(limit) < envelope.size:
            return local_reply(552, "5.3.4", "message size %d exceeds size limit %s of "
                               "server %s" % (envelope.size, limit, self.peer))
        return None

    def requiretls_refusal(self):
        """Why this session may not carry a REQUIRETLS message (RFC 8689 4.2.1: TLS, the
        server authenticated by PKIX for the host's name or by DANE, REQUIRETLS offered
        after STARTTLS), as the reply that bounces it; None when it may. 4.2.1 asks
        for 5.7.30 where REQUIRETLS is not offered, 5.7.10 where TLS cannot be had or
        the server not authenticated."""
        if self.tls_version is None:
            why = "no TLS with host %s" % self.peer
        elif not self.tls.authenticates_host:
            why = ("the certificate of host %s was verified neither for its name nor by "
                   "DANE" % self.peer)
        elif "REQUIRETLS" not in self.extensions:
            return local_reply(550, "5.7.30", "REQUIRETLS support required: host %s did "
                               "not offer REQUIRETLS" % self.peer)
        else:
            return None
        return local_reply(550, "5.7.10", "REQUIRETLS support required: %s" % why)

    @staticmethod
    def _needs_smtputf8(envelope, todo):
        if envelope.smtputf8:
            return True
        return not all(address.isascii() for address in
                       [envelope.sender] + [r.address for r in todo])

    def _transaction(self, envelope, content, todo, decided):
        """MAIL, RCPTs, DATA and the content; fills decided (by recipient index)."""
        utf8 = self._needs_smtputf8(envelope, todo)
        commands = [(self._mail_command(envelope, utf8), "MAIL FROM", self.timeouts.mail)]
        commands += [(self._rcpt_command(r, utf8), "RCPT TO", self.timeouts.rcpt) for r in todo]
        commands.append(("DATA", "DATA", self.timeouts.data))
        self._need_rset = True
        if "PIPELINING" in self.extensions:
            replies = self._pipeline(commands, utf8)
        else:
            replies = self._lockstep(commands, utf8)
        mail_reply, rcpt_replies = replies[0], replies[1:1 + len(todo)]
        data_reply = replies[1 + len(todo)] if len(replies) > 1 + len(todo) else None
        accepted = []
        for i, recipient in enumerate(todo):
            if mail_reply.code // 100 != 2:
                reply, stage = mail_reply, deferrals.MAIL
            else:
                reply, stage = rcpt_replies[i], deferrals.RCPT
            if reply.code // 100 == 2:
                accepted.append(i)
            else:
                decided[i] = RecipientResult(recipient, outcome_of(reply), reply, stage)
        if data_reply is None:
            return
        if data_reply.code != 354:
            for i in accepted:
                decided[i] = RecipientResult(todo[i], outcome_of(data_reply), data_reply,
                                             deferrals.DATA)
            return
        if not accepted:
            # RFC 2920 3.1: DATA got 354 although no recipient was accepted: send nothing.
            self._send(b".\r\n", "end of DATA", self.timeouts.data_block)
            if self.lmtp:
                # RFC 2033 4.2 says 503 to DATA here; how many replies follow is anyone's
                # guess, so this connection cannot be trusted with another message.
                self.close()
                return
            self._read("end of DATA", self.timeouts.data_done)
            return
        self._send_content(content)
        self._dot_sent = True
        if self.lmtp:
            self._lmtp_replies(todo, accepted, decided)
            return
        final = self._read("end of DATA", self.timeouts.data_done)
        self._need_rset = False
        for i in accepted:
            decided[i] = RecipientResult(todo[i], outcome_of(final), final,
                                         deferrals.END_OF_DATA)
        if final.code == 421:
            raise _Broken(final, deferrals.END_OF_DATA)

    def _lmtp_replies(self, todo, accepted, decided):
        """RFC 2033 4.2: after the final dot, one reply per accepted RCPT, in their order;
        each decides its own recipient (a lost connection leaves the rest TEMPORARY)."""
        for i in accepted:
            reply = self._read("end of DATA for <%s>" % todo[i].address,
                               self.timeouts.data_done)
            decided[i] = RecipientResult(todo[i], outcome_of(reply), reply,
                                         deferrals.END_OF_DATA)
            if reply.code == 421:
                raise _Broken(reply, deferrals.END_OF_DATA)
        self._need_rset = False

    def _mail_command(self, envelope, utf8):
        params = []
        if "SIZE" in self.extensions and envelope.size > 0:
            params.append("SIZE=%d" % envelope.size)
        if envelope.body == "8BITMIME" and "8BITMIME" in self.extensions:
            params.append("BODY=8BITMIME")
        if utf8:
            params.append("SMTPUTF8")
        if "DSN" in self.extensions:
            if envelope.ret:
                params.append("RET=%s" % envelope.ret)
            if envelope.envid:
                params.append("ENVID=%s" % xtext(envelope.envid))
        if envelope.requiretls and self.tls_version and "REQUIRETLS" in self.extensions:
            params.append("REQUIRETLS")
        return "MAIL FROM:<%s>%s" % (envelope.sender, "".join(" " + p for p in params))

    def _rcpt_command(self, recipient, utf8):
        params = []
        if "DSN" in self.extensions:
            if recipient.notify:
                params.append("NOTIFY=%s" % ",".join(recipient.notify))
            if recipient.orcpt:
                orcpt = orcpt_parameter(recipient.orcpt, utf8)
                if orcpt:
                    params.append("ORCPT=%s" % orcpt)
        return "RCPT TO:<%s>%s" % (recipient.address, "".join(" " + p for p in params))

    def _pipeline(self, commands, utf8):
        """RFC 2920: write the commands in groups, read their replies in order."""
        replies = []
        for start in range(0, len(commands), PIPELINE_GROUP):
            group = commands[start:start + PIPELINE_GROUP]
            wire = "".join(line + "\r\n" for line, _, _ in group)
            self._send(wire.encode("utf-8" if utf8 else "ascii"), group[0][1], group[0][2])
            for _, what, timeout in group:
                replies.append(self._read_in_transaction(what, timeout))
        return replies

    def _lockstep(self, commands, utf8):
        """One command, one reply; stop after a refused MAIL, skip DATA when no RCPT passed."""
        replies = []
        for line, what, timeout in commands:
            if what == "DATA" and not any(r.code // 100 == 2 for r in replies[1:]):
                break
            replies.append(self._command(line, what, timeout, utf8))
            self._check_sequence(what, replies[-1])
            if what == "MAIL FROM" and replies[0].code // 100 != 2:
                break
        return replies

    def _read_in_transaction(self, what, timeout):
        reply = self._read(what, timeout)
        self._check_sequence(what, reply)
        return reply

    def _check_sequence(self, what, reply):
        if reply.code == 421:
            raise _Broken(reply, deferrals.stage_of(what))
        # Positive replies: 354 (or another 3xx) to DATA only, 2xx to everything else.
        if reply.positive and reply.code // 100 != (3 if what == "DATA" else 2):
            raise _Broken(local_reply(451, "4.5.0", "unexpected reply to %s from %s: %s"
                                      % (what, self.peer, reply)), deferrals.PROTOCOL)

    def _send_content(self, content):
        encoder = DataEncoder()
        try:
            block = content.read(CONTENT_BLOCK)
            while True:
                following = content.read(CONTENT_BLOCK) if block else b""
                out = encoder.encode(block)
                if not following:
                    # The last block and the final dot in one write.
                    self._send(out + encoder.finish(), "message content",
                               self.timeouts.data_block)
                    return
                if out:
                    self._send(out, "message content", self.timeouts.data_block)
                block = following
        except _Broken:
            raise
        except Exception:
            # Our content is unreadable: hang up without the dot, so nothing half is kept.
            self.close()
            raise

    # -- bytes ----------------------------------------------------------------------------

    def _command(self, line, what, timeout, utf8=False):
        self._send((line + "\r\n").encode("utf-8" if utf8 else "ascii"), what, timeout)
        return self._read(what, timeout)

    def _send(self, data, what, timeout):
        if self.sock is None:
            raise _Broken(local_reply(451, "4.4.2", "not connected to %s" % self.peer),
                          deferrals.LOST_CONNECTION)
        try:
            set_timeout(self.sock, timeout)
            send_all(self.sock, data)
        except socket.timeout:
            raise _Broken(local_reply(451, "4.4.2", "conversation with %s timed out while "
                                      "sending %s" % (self.peer, what)), deferrals.TIMEOUT)
        except OSError as error:
            raise _Broken(local_reply(451, "4.4.2", "lost connection with %s while sending "
                                      "%s (%s)" % (self.peer, what, _describe(error))),
                          deferrals.LOST_CONNECTION)

    def _read(self, what, timeout):
        """The next whole reply, within timeout seconds in all."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                reply = self._reader.next_reply()
            except SMTPProtocolError as error:
                raise _Broken(local_reply(451, "4.5.0", "%s answered %s with garbage: %s"
                                          % (self.peer, what, error)), deferrals.PROTOCOL)
            if reply is not None:
                log.debug("%s: %s -> %s", self.peer, what, reply)
                return reply
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise socket.timeout("timed out")
                self.sock.settimeout(remaining)
                data = self.sock.recv(CONTENT_BLOCK)
            except socket.timeout:
                raise _Broken(local_reply(451, "4.4.2", "conversation with %s timed out "
                                          "while receiving the reply to %s" % (self.peer, what)),
                              deferrals.TIMEOUT)
            except OSError as error:
                raise _Broken(local_reply(451, "4.4.2", "lost connection with %s while "
                                          "receiving the reply to %s (%s)"
                                          % (self.peer, what, _describe(error))),
                              deferrals.LOST_CONNECTION)
            if not data:
                raise _Broken(local_reply(451, "4.4.2", "lost connection with %s while "
                                          "receiving the reply to %s" % (self.peer, what)),
                              deferrals.LOST_CONNECTION)
            self._reader.feed(data)


def _auth_mechanisms(extensions):
    """The SASL mechanisms an EHLO reply offers ("AUTH PLAIN LOGIN" or the old "AUTH=...")."""
    mechanisms = set()
    for keyword, params in extensions.items():
        if keyword == "AUTH":
            mechanisms.update(params.upper().split())
        elif keyword.startswith("AUTH="):
            mechanisms.update((keyword[5:] + " " + params).upper().split())
    return mechanisms


def _b64(data):
    return base64.b64encode(data).decode("ascii")


def _describe(error):
    if getattr(error, "verify_message", None):
        return "certificate verify failed: %s" % error.verify_message
    if isinstance(error, ssl.SSLError):
        return getattr(error, "reason", None) or str(error)
    return getattr(error, "strerror", None) or str(error) or type(error).__name__
