"""The plugin API: stages, the narrow context a plugin sees, and the verdict it returns.

Used in every process that runs plugins: the smtpd worker (connection .. data, storage,
queue), pickup (data, storage, queue for mail from sendmail) and the delivery worker
(routing, delivery, through elemta.delivery.stages). A plugin is a class:

    class MyPlugin(Plugin):
        name = "myplugin"                 # its key under `plugins:` in the config
        Settings = MySettings             # a dataclass; the config loader builds it

        def init(self, settings): ...     # once per process, after fork
        def close(self): ...
        def on_rcpt(self, ctx):           # one on_<stage> method per stage it serves
            if ctx.recipient.endswith("@spamtrap.example"):
                return Result.reject(550, "5.7.1", "No thanks")
            return None                   # no opinion: default behaviour

An on_<stage> method runs in the worker's event loop, among all its sessions: it waits
through gevent (ctx.resolver for DNS) and hands CPU-heavy work over the message (hashing,
signatures, scanning) to elemta.util.offload.call(function, *args), which runs it in a
helper process, so the other sessions are served meanwhile.

Design rule 6: plugins return a verdict (Result), "no opinion" (None or Result.proceed())
means default behaviour, and the core formats the SMTP reply. A plugin never sees a
socket, the master or the index: only the Context below.

The stages, in the order mail meets them; what the Context holds at each (on top of what
the earlier ones set) and what each result does there. "reject" and "tempfail" carry the
reply (code, enhanced status, text); a plugin that raises or overruns its timeout counts
as tempfail 451 4.3.0, or as no opinion when configured fail_open. ACCEPT skips the later
plugins of the same stage, everywhere. Header fields a result carries (Result.proceed,
accept or quarantine headers=) at connection, helo, auth, mail, rcpt or data_command are
kept by the smtpd and written above its Received header when the message comes (as
Postfix writes a PREPEND from its smtpd restrictions): those of connection, helo and auth
go into every message of the session, those of mail, rcpt and data_command into this
message; a field is written once however often it is given, those of a refused command
are dropped, and `remove` has nothing to act on before the content.

  accept      smtpd, the moment a client connects, before anything is done for it (its
              name is looked up, the pregreet test, the connection stage), so that every
              connection is seen, those refused early included (Postfix's anvil counts
              here). ctx: client_address, listener, trusted, hostname, session; no
              client_name yet. reject / tempfail: as at connection, and nothing more is
              done for the client (no name lookup, no pregreet test, no connection
              stage); other results count as no opinion.
  connection  smtpd, a client connected, before the 220 greeting. ctx: client_address,
              client_name, client_lookup, listener, trusted, tls (smtps only),
              hostname, resolver, session. While the pregreet test waits (protocol_tests.
              greet_wait), this stage runs alongside the wait, as postscreen runs its
              DNSBL lookups: it cannot know yet whether the client talks out of turn.
              reject: 554 in place of the 220, then 503 5.7.0 to every command until
              QUIT (RFC 5321 3.1); tempfail: 421 and the connection closes; discard /
              quarantine: every message of the session is discarded / held.
  helo        smtpd, HELO or EHLO. + ctx.helo. reject/tempfail: the reply to HELO/EHLO;
              discard/quarantine: every later message of the session.
  auth        smtpd, AUTH succeeded. + ctx.auth_user. reject/tempfail: AUTH fails with
              that reply; discard/quarantine: every later message of the session.
  mail        smtpd, MAIL FROM. + ctx.sender. reject/tempfail: the reply to MAIL;
              discard/quarantine: this message.
  rcpt        smtpd, each RCPT TO (after the relay check). + ctx.recipient, ctx.recipients
              (those accepted so far). reject/tempfail: this recipient is refused;
              discard/quarantine: the whole message (as Postfix's DISCARD and HOLD).
  data_command  smtpd, the DATA command (or the first BDAT), before the 354 and before
              any content is read (Postfix's smtpd_data_restrictions). + ctx.recipients
              (those accepted). reject/tempfail: the reply to DATA in place of the 354
              (a first BDAT's chunk is read and thrown away); discard/quarantine: this
              message; header fields go above the Received header, as at rcpt.
  data        smtpd at the end of DATA/BDAT, and pickup for each message from sendmail
              (ctx.local true, no client). + ctx.queue_id, ctx.recipients, ctx.outbound,
              ctx.message (the content as received, before our Received header).
              reject/tempfail: the reply to the end of DATA (pickup: reject puts the
              message on hold for the admin, tempfail leaves it in the maildrop for the
              next scan); discard: 250, then the message is dropped and the log says so;
              quarantine: queued on hold. Headers to add and remove are applied before
              the storage stage. Checks belong here (SPF, DKIM verification, DMARC, ARC
              verification, Authentication-Results).
  storage     the same two places, right after the data stage, on the content as it will
              be written to the spool: ctx.message has the data stage's header edits,
              ctx.auth_results what the data stage found. Same results as data. Whatever
              signs or seals belongs here, so it covers the final content: DKIM signing
              of our users' and local mail, ARC sealing of mail that leaves (outbound).
  queue       the same two places, once the message is durably queued (the smtpd has
              sent its 250). ctx.queue_id, sender, recipients; no message. Notification
              only: any result but continue is logged and ignored.
  routing     delivery worker, per recipient, when recipients are grouped by next hop.
              ctx.queue_id, sender, recipients (the message's), recipient, nexthop (the
              route chosen so far: "smtp:host:port" looks up MX, "smtp:[host]:port",
              "lmtp:[host]:port", "lmtp:unix:/path", "local"). Result.route(nexthop):
              send it there instead; reject: the recipient bounces; tempfail: it waits
              for the next attempt; discard: it counts as delivered ("250 2.0.0 discarded
              by <plugin>"); quarantine: it waits (it is not held mid-delivery).
  delivery    delivery worker, per recipient, just before a group is handed to its
              transport. + ctx.nexthop (the group's), ctx.recipients (the group),
              ctx.message (the spool content, read once per group). Results as at
              routing (route excepted); header edits are ignored (content edits belong
              to storage).

See also: elemta.plugins.manager (loads and calls plugins), elemta.plugins.content (the
data and storage stages over one message), tests/plugins/example (a documented example
installed through its entry point), elemta.plugins.authres (auth results as a header).
"""

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

# The stages, in the order mail meets them (see the module docstring for each one's
# context and results). on_<stage> is the method a plugin defines.
ACCEPT_STAGE = "accept"     # a client connected: before its name lookup and the greeting
CONNECTION = "connection"   # a client connected (before the 220 greeting)
HELO = "helo"               # HELO/EHLO
AUTH = "auth"               # AUTH succeeded (ctx.auth_user is set)
MAIL = "mail"               # MAIL FROM
RCPT = "rcpt"               # RCPT TO, once per recipient (ctx.recipient)
DATA_COMMAND = "data_command"   # the DATA command, before the 354 and the content
DATA = "data"               # the end of the content: ctx.message is complete
STORAGE = "storage"         # the final content, about to be written to the spool
QUEUE = "queue"             # the message is durably queued (notification only)
ROUTING = "routing"         # delivery: choosing the next hop of a recipient
DELIVERY = "delivery"       # delivery: about to hand recipients to their transport
STAGES = (ACCEPT_STAGE, CONNECTION, HELO, AUTH, MAIL, RCPT, DATA_COMMAND, DATA, STORAGE, QUEUE,
          ROUTING, DELIVERY)

# Actions a verdict may carry.
CONTINUE = "continue"       # no objection; later plugins run; default behaviour
ACCEPT = "accept"           # accept now; later plugins of this stage are skipped
REJECT = "reject"           # permanent refusal (5xx)
TEMPFAIL = "tempfail"       # temporary refusal (4xx)
DISCARD = "discard"         # say yes to the client, then drop the message silently
QUARANTINE = "quarantine"   # accept, but the queue puts the message on hold
ACTIONS = (CONTINUE, ACCEPT, REJECT, TEMPFAIL, DISCARD, QUARANTINE)

_STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
_HEADER_NAME = re.compile(r"^[\x21-\x39\x3b-\x7e]+$")   # RFC 5322 ftext
_NEXTHOP = re.compile(r"^(local|(smtp|lmtp):\S+)$")    # checked fully where it is used


class PluginConfigError(ValueError):
    """A plugin setting is wrong; str() names its key path, e.g. plugins.spf.enforce."""


@dataclass(frozen=True)
class Result:
    """A plugin's verdict. Build it with the class methods, not by hand.

    headers: (name, value) pairs to prepend to the message (value unfolded or folded
             with CRLF + whitespace; no final CRLF).
    remove:  (name, value) pairs of existing header fields to delete (exact raw value,
             as Message.headers gives it), e.g. a forged Authentication-Results.
    nexthop: at the routing stage, where to send the recipient instead, in transport-map
             syntax ("smtp:[relay.example]:2525", "lmtp:unix:/run/lmtp", "local").
    """
    action: str = CONTINUE
    code: Optional[int] = None
    status: Optional[str] = None
    text: str = ""
    reason: str = ""
    headers: Tuple[Tuple[str, str], ...] = ()
    remove: Tuple[Tuple[str, str], ...] = ()
    nexthop: Optional[str] = None

    def __post_init__(self):
        if self.action not in ACTIONS:
            raise ValueError("unknown action %r" % (self.action,))
        if self.code is not None:
            first = {REJECT: "5", TEMPFAIL: "4"}.get(self.action)
            if first is None or str(self.code)[0] != first or not 400 <= self.code <= 599:
                raise ValueError("code %r does not fit action %s" % (self.code, self.action))
        if self.status is not None and (not _STATUS.match(self.status)
                                        or self.code is None
                                        or self.status[0] != str(self.code)[0]):
            raise ValueError("enhanced status %r does not fit code %r"
                             % (self.status, self.code))
        if self.nexthop is not None and (self.action != ACCEPT
                                         or not _NEXTHOP.match(self.nexthop)):
            raise ValueError("next hop %r is not kind:destination or local" % (self.nexthop,))
        for name, value in self.headers:
            if not _HEADER_NAME.match(name) or "\n" in value.replace("\r\n ", "").replace(
                    "\r\n\t", ""):
                raise ValueError("malformed header %r" % (name,))

    @classmethod
    def proceed(cls, headers=(), remove=()):
        """No objection, optionally with headers to add or remove."""
        return cls(CONTINUE, headers=tuple(headers), remove=tuple(remove))

    @classmethod
    def accept(cls, headers=()):
        return cls(ACCEPT, headers=tuple(headers))

    @classmethod
    def reject(cls, code=550, status="5.7.1", text="Rejected by policy"):
        return cls(REJECT, code, status, text)

    @classmethod
    def tempfail(cls, code=451, status="4.7.1", text="Try again later"):
        return cls(TEMPFAIL, code, status, text)

    @classmethod
    def discard(cls, reason=""):
        return cls(DISCARD, reason=reason)

    @classmethod
    def quarantine(cls, reason, headers=()):
        """Accept the message but hold it in the queue; reason goes to the log and to
        the queue, which shows who held it (the plugin) and why (elemtactl queue show,
        the REST API, mailq)."""
        return cls(QUARANTINE, reason=reason, headers=tuple(headers))

    @classmethod
    def route(cls, nexthop):
        """Routing stage: send the recipient to this next hop (transport-map syntax,
        e.g. "smtp:[10.0.0.5]:25"); the later routing plugins are skipped."""
        return cls(ACCEPT, nexthop=nexthop)


@dataclass(frozen=True)
class MethodResult:
    """One authentication method's result, as RFC 8601 reports it.

    method: spf, dkim, dmarc, arc, iprev, auth...; result: pass, fail, none, ...
    properties: (ptype.property, value) pairs, e.g. ("smtp.mailfrom", "example.com").
    """
    method: str
    result: str
    reason: str = ""
    properties: Tuple[Tuple[str, str], ...] = ()

    def prop(self, name, default=None):
        for key, value in self.properties:
            if key == name:
                return value
        return default


class Message:
    """Read access to a message's header fields and body (the content only, as received).

    headers is a list of (name, value) where value is the raw text after the colon,
    folding kept, decoded as UTF-8 with surrogateescape so bytes survive a round trip.
    """

    def __init__(self, raw):
        # type: (bytes) -> None
        self.raw = bytes(raw)
        self.headers = []  # type: List[Tuple[str, str]]
        self.body_offset = _split_headers(self.raw, self.headers)

    @property
    def body(self):
        return self.raw[self.body_offset:]

    def get_all(self, name):
        name = name.lower()
        return [value for key, value in self.headers if key.lower() == name]

    def get(self, name, default=None):
        values = self.get_all(name)
        return values[0] if values else default


def _split_headers(raw, out):
    """Fill out with (name, value) pairs; return the body offset. Tolerates LF-only
    endings and lines that are not header fields (they end the header section, as in
    RFC 5322 a line without a colon cannot be a header field)."""
    pos, end = 0, len(raw)
    name, value = None, []
    while pos < end:
        nl = raw.find(b"\n", pos)
        line_end = end if nl < 0 else nl + 1
        line = raw[pos:line_end]
        stripped = line.rstrip(b"\r\n")
        if not stripped:                      # the blank line: the body follows
            pos = line_end
            break
        if line[:1] in (b" ", b"\t") and name is not None:
            value.append(line)
        else:
            colon = stripped.find(b":")
            if colon <= 0 or not _HEADER_NAME.match(stripped[:colon].decode("latin-1")):
                break                         # not a header field: body starts here
            if name is not None:
                out.append(_header_pair(name, value))
            name, value = stripped[:colon], [line[colon + 1:]]
        pos = line_end
    if name is not None:
        out.append(_header_pair(name, value))
    return pos


def _header_pair(name, parts):
    value = b"".join(parts)
    if value.endswith(b"\r\n"):
        value = value[:-2]
    elif value.endswith(b"\n"):
        value = value[:-1]
    return (name.decode("ascii", "replace"), value.decode("utf-8", "surrogateescape"))


@dataclass
class Context:
    """What a plugin may know about the mail in hand. Filled in by the calling process.

    Per connection: client_*, helo, esmtp, tls*, auth_user, auth_method, trusted, local,
    handover,
    server_address, server_port, session.
    Per transaction (reset by new_transaction): sender, declared_size, recipients,
    recipient, queue_id, message, outbound, auth_results, state.
    Delivery (routing, delivery stages): nexthop.
    resolver: an elemta.plugins.resolver.Resolver (DNS that never blocks the event loop).
    hostname: this server's name; the default authserv-id.
    client_name: the client's forward-confirmed reverse name, or "unknown";
    client_lookup: the elemta.plugins.peername.PeerName it came from (reverse name and
    statuses), None when the smtpd made no lookup (smtpd.peername_lookup off, pickup).
    listener: the elemta.config.schema.Listener the client connected to (mode, address,
    port), so a check can apply to some listeners only; None outside the smtpd.
    """
    client_address: str = ""
    client_name: str = "unknown"
    client_lookup: Any = None
    listener: Any = None
    helo: str = ""
    tls: bool = False
    tls_info: Optional[str] = None
    auth_user: Optional[str] = None
    trusted: bool = False          # the client is in mynetworks
    local: bool = False            # submitted on this host (sendmail, pickup)
    # A node of the cluster handing over a drained node's queue (handover listener, after
    # its AUTH): not our users' mail, but mail the origin node already checked, signed
    # (or not) and stamped with its Authentication-Results; see checked_elsewhere.
    handover: bool = False
    hostname: str = "localhost"
    resolver: Any = None
    stage: str = ""
    sender: Optional[str] = None
    recipients: List[str] = field(default_factory=list)
    recipient: Optional[str] = None
    queue_id: Optional[str] = None
    message: Optional[Message] = None
    outbound: bool = False         # some recipient is not in a local domain: mail that leaves
    nexthop: Optional[str] = None  # routing/delivery: "smtp:[host]:port", "local", ...
    auth_results: List[MethodResult] = field(default_factory=list)
    session: Dict[str, Any] = field(default_factory=dict)  # plugins' per-connection notes
    state: Dict[str, Any] = field(default_factory=dict)    # plugins' per-transaction notes
    # What Postfix's policy protocol tells a policy server (elemta.restrictions.
    # policy_service); set by the smtpd session, left empty by pickup.
    esmtp: bool = False                  # the client said EHLO
    client_port: Optional[int] = None
    server_address: str = ""             # the address the client connected to
    server_port: Optional[int] = None
    auth_method: Optional[str] = None    # the AUTH mechanism that succeeded
    tls_protocol: Optional[str] = None   # "TLSv1.3"
    tls_cipher: Optional[str] = None     # "TLS_AES_256_GCM_SHA384"
    tls_bits: Optional[int] = None
    declared_size: int = 0               # MAIL FROM SIZE=, 0 when not given (per transaction)

    @property
    def authenticated_or_local(self):
        """Mail from our own users: AUTH, mynetworks or local submission. Never a node's
        hand-over: its login is the cluster's, not a user's, and what it carries may be a
        stranger's mail (a spoofed From: of our domain must not leave DKIM-signed)."""
        if self.handover:
            return False
        return self.auth_user is not None or self.trusted or self.local

    @property
    def checked_elsewhere(self):
        """Mail the inbound checks leave alone: our users' own, or a node's hand-over
        (the drained node ran SPF, DKIM, DMARC, ARC, greylisting and the restrictions
        when it accepted the message)."""
        return self.handover or self.authenticated_or_local

    def new_transaction(self):
        """RSET, a new MAIL FROM, or end of DATA: forget the envelope and the results."""
        self.sender = None
        self.recipients = []
        self.recipient = None
        self.queue_id = None
        self.message = None
        self.outbound = False
        self.auth_results = []
        self.state = {}
        self.declared_size = 0

    def results_for(self, method):
        return [r for r in self.auth_results if r.method == method]


class Plugin:
    """Base class. Subclasses set name, optionally Settings and order, and define
    on_<stage>(ctx) methods returning a Result or None.

    Settings is a frozen dataclass of the plugin's own settings (enabled, timeout and
    fail_open are the manager's: elemta.plugins.settings.PluginCommon). The config loader
    builds it from the plugin's table, field types str, int, float, bool, Optional,
    Tuple[X, ...] and nested dataclasses, so a wrong key or type is reported with the
    file's line before anything starts; a validate(path) method adds checks across
    fields, raising PluginConfigError("<path>.<key>: what is wrong")."""
    name = ""
    Settings = None  # type: Optional[type]
    # Lower runs first within a stage: authentication checks before the policies that
    # read their results (DMARC), and the Authentication-Results writer last.
    order = 50
    # True: called before the smtpd's core checks of the stage (the relay guard, the
    # recipient tables, the storage check), so it sees what they refuse too, as
    # Postfix's anvil counts a client's every MAIL and RCPT before its restrictions.
    # Such a plugin can refuse but not let anything past a core check: ACCEPT from it
    # skips only the other early plugins.
    before_core_checks = False
    # Seconds one call may take unless the config sets `timeout`.
    default_timeout = 10.0
    # True for a plugin that scans the content (a virus or spam scanner: clamav, rspamd,
    # a milter): `elemtactl queue release --rescan` runs its on_data again over a held
    # message (elemta.plugins.rescan). Checks of how the mail came (SPF, DKIM, DMARC)
    # are not scanners: what they judged cannot change while the message waits.
    scans_content = False

    def init(self, settings):
        """Called once per process (after fork) with the Settings instance the config
        loader built from the plugin's table (None when the plugin has no Settings)."""
        self.settings = settings

    def close(self):
        """Release files, databases, sockets. Called at worker exit and on reload."""

    def stages(self):
        return served_stages(self)


def served_stages(plugin):
    """The stages a plugin (class or instance) serves: its on_<stage> methods."""
    return tuple(stage for stage in STAGES if callable(getattr(plugin, "on_" + stage, None)))
