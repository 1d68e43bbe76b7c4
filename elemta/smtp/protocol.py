"""The SMTP server state machine, sans-IO: bytes in, events and replies out.

Owned by the smtpd worker (elemta.smtpd.session drives it over a gevent socket); sendmail
-bs drives it over stdin/stdout and tests drive it by feeding bytes (tests/protocol_driver).
It imports no socket and no gevent, and never raises on client input: whatever the client
sends, it answers with a well-formed reply.

Every state is named in STATES, and the state changes in one place only, _go(), by one
table, TRANSITIONS (h11's _state.py is the model): state -> {trigger: next state}. The
triggers are the commands, in the states that read commands (the command table _AFTER:
one entry per state and command, the state after success or the reply refusing it
there), and a few events of the core's own (EVENTS: end of content, end of a chunk, a
334, the TLS handshake done, the last reply). What the next input bytes are - a command
line, DATA content, a BDAT chunk, an AUTH response, or the TLS handshake that the driver
does - follows from the state (READERS); it is never kept beside it. Per-command flags,
as Postfix's smtpd_cmd_table has, say what the table cannot: JUNK, RESETS, UTF8,
NEEDS_AUTH, CHUNK_FOLLOWS. A client refused before the greeting (start_refused) is a
state too, REFUSED, where only QUIT is obeyed. With Settings.pipelining_test, a command
line that came with input behind it where RFC 2920 forbids sending ahead is put to the
driver first (ImproperPipelining: postscreen's pipelining test) and obeyed only once
the driver accepts it. With Settings.report_unknown_commands, a line that is no command
is put to the driver too (UnknownCommand: the milters' unknown stage) before it is
refused, and the driver may give the refusal's text.

Usage (see elemta.smtpd.session for the real driver):

    proto = ServerProtocol(settings)
    proto.start()               # or start_refused(...) for a refused client
    proto.receive_data(b"EHLO x\\r\\n")
    while True:
        event = proto.next_event()
        if event is NEED_DATA: ...flush replies, read more, receive_data()...
        elif event is CLOSED: ...close...
        elif isinstance(event, Reply): ...send event.encode()...
        elif event.needs_decision: proto.accept() or proto.reject(reply)
        elif isinstance(event, StartTLS): ...handshake, then proto.tls_started()...
        ...

See also: RFC 5321 (SMTP), 1870 (SIZE), 2920 (PIPELINING), 3030 (CHUNKING), 3207
(STARTTLS), 3461 (DSN), 4954 (AUTH), 6152 (8BITMIME), 6531 (SMTPUTF8), 8689 (REQUIRETLS),
2034/3463 (codes).
"""

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Tuple

from elemta.smtp.address import (AddressError, NonAsciiAddress, parse_params, split_path,
                                 validate_mailbox)
from elemta.smtp.dsn import DsnError, parse_envid, parse_notify, parse_orcpt
from elemta.smtp.events import (CLOSED, NEED_DATA, AuthRequest, DataAborted, DataChunk,
                                DataStart, Helo, ImproperPipelining, MailFrom,
                                MessageReceived, RcptTo, RecipientInfo, StartTLS,
                                Transaction, UnknownCommand)
from elemta.smtp.replies import Reply

# RFC 5321 4.5.3.1.4/4.5.3.1.6 allow 512-octet command lines and 1000-octet text lines;
# ESMTP parameters make commands longer, so commands may use the text-line limit.
MAX_LINE = 1000
# Read at most this much of DATA content per step, so one step never holds a whole
# message in memory however the client sends it.
DATA_STEP = 65536
# The SASL mechanisms this core implements (RFC 4616 PLAIN; LOGIN, the de facto draft),
# in the order offered; an AUTH backend may support fewer (Dovecot's MECH list).
AUTH_MECHANISMS = ("PLAIN", "LOGIN")

# ---- the states ------------------------------------------------------------------------
# Every state the session can be in; each also fixes what the next input bytes are (READERS),
# so there is no second variable saying how to read.
INIT = "init"               # no HELO/EHLO yet (at the start, and again after STARTTLS)
READY = "ready"             # greeted, no transaction
MAIL = "mail"               # MAIL accepted
RCPT = "rcpt"               # at least one RCPT accepted
CHUNKING = "chunking"       # BDAT chunks received, LAST not yet
REFUSED = "refused"         # refused in place of the greeting: only QUIT is obeyed
DATA = "data"               # after the 354: DATA content up to CRLF.CRLF
CHUNK = "chunk"             # a BDAT chunk, kept as message content
SKIP = "skip"               # a refused BDAT chunk, read and thrown away; then READY
SKIP_INIT = "skip-init"     # the same before HELO/EHLO; then INIT
AUTH = "auth"               # after a 334: one AUTH response line
TLS = "tls"                 # after the 220 to STARTTLS: the driver does the handshake
DONE = "done"               # the last reply is queued; nothing more is read
STATES = (INIT, READY, MAIL, RCPT, CHUNKING, REFUSED, DATA, CHUNK, SKIP, SKIP_INIT, AUTH,
          TLS, DONE)

# What the bytes are in each state: the reader is derived from the state, never kept.
COMMAND_LINE = "command line"
DATA_BODY = "DATA body"
BDAT_CHUNK = "BDAT chunk"
AUTH_LINE = "AUTH response line"
TLS_HANDSHAKE = "TLS handshake"     # the driver's business: the core reads nothing
NOTHING = "nothing"
READERS = {
    INIT: COMMAND_LINE, READY: COMMAND_LINE, MAIL: COMMAND_LINE, RCPT: COMMAND_LINE,
    CHUNKING: COMMAND_LINE, REFUSED: COMMAND_LINE, DATA: DATA_BODY, CHUNK: BDAT_CHUNK,
    SKIP: BDAT_CHUNK, SKIP_INIT: BDAT_CHUNK, AUTH: AUTH_LINE, TLS: TLS_HANDSHAKE,
    DONE: NOTHING,
}
# The ServerProtocol method that reads each kind of bytes (None: the core reads none),
# named here once rather than bound in every session.
_READS = {COMMAND_LINE: "_read_command", DATA_BODY: "_read_data", BDAT_CHUNK: "_read_chunk",
          AUTH_LINE: "_read_auth", TLS_HANDSHAKE: None, NOTHING: None}
# The states that read commands: the columns of the command table.
COMMAND_STATES = (INIT, READY, MAIL, RCPT, CHUNKING, REFUSED)

# ---- per-command flags (Postfix's smtpd_cmd_table flags) --------------------------------
# JUNK: repeatable forever without moving a transaction on, so counted against
#   Settings.junk_command_limit between messages (Postfix's SMTPD_CMD_FLAG_LIMIT set: HELO,
#   EHLO, RSET, NOOP, VRFY, ETRN; ETRN is unknown here, and HELP, an error in Postfix, is
#   answered here, so it is junk too).
JUNK = "junk"
# RESETS: succeeding drops the transaction (and any content begun) before the state moves.
RESETS = "resets"
# UTF8: may carry non-ASCII (SMTPUTF8 addresses, RFC 6531); other commands get 500.
UTF8 = "utf8"
# NEEDS_AUTH: refused with 530 before AUTH on a listener that requires AUTH.
NEEDS_AUTH = "needs-auth"
# CHUNK_FOLLOWS: announces octets that follow at once; even when the command is refused
#   they are read and thrown away (RFC 3030 2), not taken for commands.
CHUNK_FOLLOWS = "chunk-follows"

# ---- why a command is refused where it is out of order --------------------------------
HELO_FIRST = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
BUSY = Reply(503, "5.5.1", "Error: command not allowed during a transaction")
IN_BDAT = Reply(503, "5.5.1", "Error: BDAT transfer in progress")
NESTED = Reply(503, "5.5.1", "Error: nested MAIL command")
NO_VALID = Reply(554, "5.5.1", "Error: no valid recipients")
AFTER_BDAT = Reply(503, "5.5.1", "Error: DATA not allowed after BDAT")
TXN_OPEN = Reply(503, "5.5.1", "Error: MAIL transaction in progress")
UNRECOGNIZED = Reply(500, "5.5.1", "Error: command not recognized")


class _Denied:
    """Stands for the session's own refusal, given to start_refused() (503 5.7.0 naming
    the client, as Postfix answers once access is denied)."""

    def __repr__(self):
        return "DENIED"


DENIED = _Denied()

# The command table: one entry for every (command state, command) pair: the state once
# the command succeeds there (for a command needing the driver's decision: once it is
# accepted), or the reply refusing it there. A command that fails (bad syntax, refused by
# the driver) leaves the state alone.
_AFTER = {
    #            INIT        READY       MAIL        RCPT        CHUNKING    REFUSED
    "EHLO":     (READY,      READY,      READY,      READY,      READY,      DENIED),
    "HELO":     (READY,      READY,      READY,      READY,      READY,      DENIED),
    "MAIL":     (HELO_FIRST, MAIL,       NESTED,     NESTED,     NESTED,     DENIED),
    "RCPT":     (HELO_FIRST, NEED_MAIL,  RCPT,       RCPT,       IN_BDAT,    DENIED),
    "DATA":     (HELO_FIRST, NEED_MAIL,  NO_VALID,   DATA,       AFTER_BDAT, DENIED),
    "BDAT":     (HELO_FIRST, NEED_MAIL,  NO_VALID,   CHUNK,      CHUNK,      DENIED),
    "RSET":     (INIT,       READY,      READY,      READY,      READY,      DENIED),
    "NOOP":     (INIT,       READY,      MAIL,       RCPT,       CHUNKING,   DENIED),
    "HELP":     (INIT,       READY,      MAIL,       RCPT,       CHUNKING,   DENIED),
    "VRFY":     (INIT,       READY,      MAIL,       RCPT,       CHUNKING,   DENIED),
    "QUIT":     (DONE,       DONE,       DONE,       DONE,       DONE,       DONE),
    "STARTTLS": (HELO_FIRST, TLS,        NEED_RCPT,  BUSY,       IN_BDAT,    DENIED),
    "AUTH":     (HELO_FIRST, READY,      TXN_OPEN,   TXN_OPEN,   TXN_OPEN,   DENIED),
}
_FLAGS = {
    "EHLO": (JUNK, RESETS), "HELO": (JUNK, RESETS), "MAIL": (UTF8, NEEDS_AUTH),
    "RCPT": (UTF8,), "DATA": (), "BDAT": (CHUNK_FOLLOWS,), "RSET": (JUNK, RESETS),
    "NOOP": (JUNK,), "HELP": (JUNK,), "VRFY": (JUNK,), "QUIT": (RESETS,), "STARTTLS": (),
    "AUTH": (),
}


@dataclass(frozen=True)
class Command:
    """One command: its verb, its flags, and for each command state what follows there."""
    verb: str
    flags: frozenset
    after: dict         # command state -> next state, or the Reply (or DENIED) refusing it


COMMANDS = {verb: Command(verb, frozenset(_FLAGS[verb]), dict(zip(COMMAND_STATES, after)))
            for verb, after in _AFTER.items()}

# What moves the state besides a command (h11's event-triggered transitions).
REFUSE = "refuse"               # start_refused() with a 5xx: the session stays, refused
CLOSE = "close"                 # the last reply (221, 421, a 4xx refusal at the start)
CHALLENGE = "challenge"         # a 334 (from READY only: a response line moves back)
RESPONSE = "response"           # the AUTH response line was read
TLS_DONE = "tls-done"           # tls_started(): the handshake succeeded
SKIP_CHUNK = "skip-chunk"       # BDAT refused: its chunk is still read, into nothing
CHUNK_END = "chunk-end"         # the last octet of a BDAT chunk that is not LAST
CONTENT_END = "content-end"     # CRLF.CRLF, or the end of the LAST chunk
EVENTS = {
    INIT: {REFUSE: REFUSED, SKIP_CHUNK: SKIP_INIT, CLOSE: DONE},
    READY: {CHALLENGE: AUTH, SKIP_CHUNK: SKIP, CLOSE: DONE},
    MAIL: {SKIP_CHUNK: SKIP, CLOSE: DONE},
    RCPT: {SKIP_CHUNK: SKIP, CLOSE: DONE},
    CHUNKING: {SKIP_CHUNK: SKIP, CLOSE: DONE},
    REFUSED: {CLOSE: DONE},
    DATA: {CONTENT_END: READY, CLOSE: DONE},
    CHUNK: {CHUNK_END: CHUNKING, CONTENT_END: READY, CLOSE: DONE},
    SKIP: {CHUNK_END: READY, CLOSE: DONE},
    SKIP_INIT: {CHUNK_END: INIT, CLOSE: DONE},
    AUTH: {RESPONSE: READY, CLOSE: DONE},
    TLS: {TLS_DONE: INIT, CLOSE: DONE},
    DONE: {CLOSE: DONE},
}

# The whole table: state -> {command or event: the next state, or a refusal}.
TRANSITIONS = {state: dict(EVENTS[state]) for state in STATES}
for _c in COMMANDS.values():
    for _state, _after in _c.after.items():
        TRANSITIONS[_state][_c.verb] = _after
del _c, _state, _after

_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_BDAT_ARG = re.compile(r"^(\d{1,10})(?: +(LAST))? *$", re.IGNORECASE)
_BARE = re.compile(rb"\r\n|\r|\n")
_TOO_LONG = object()


@dataclass(frozen=True)
class Settings:
    """What one listener's sessions may do; built by the smtpd from the Config."""
    hostname: str
    banner: str = "ESMTP Elemta"
    max_message_size: int = 31457280
    max_recipients: int = 1000
    max_errors: int = 20
    junk_command_limit: int = 100         # JUNK commands per session, between messages
    bare_line_endings: str = "reject"     # or "normalize"
    undeclared_8bit: str = "reject"       # or "accept"
    starttls_available: bool = False      # a certificate is configured
    implicit_tls: bool = False            # smtps: the session starts inside TLS
    auth_available: bool = False          # an AUTH backend is configured
    auth_mechanisms: Tuple[str, ...] = AUTH_MECHANISMS   # at first; offer_auth_mechanisms
    auth_plaintext: bool = False          # AUTH offered without TLS
    auth_required: bool = False           # submission/smtps: MAIL needs AUTH first
    pipelining_test: bool = False         # report ImproperPipelining (postscreen's test)
    report_unknown_commands: bool = False  # report UnknownCommand (the milters ask for it)


class ContentChecker:
    """Watches message content for bare CR/LF, NUL and 8-bit bytes; normalizes if asked.

    Segments must arrive in order. A CR at the end of one segment is held back until the
    next shows whether an LF follows it, so CRLF split across BDAT chunks is not "bare".
    """

    def __init__(self, normalize):
        self.normalize = normalize
        self.bare = False
        self.nul = False
        self.eight_bit = False
        self._held_cr = False

    def feed(self, segment):
        if self._held_cr:
            segment = b"\r" + segment
            self._held_cr = False
        if segment.endswith(b"\r"):
            segment = segment[:-1]
            self._held_cr = True
        crlf = segment.count(b"\r\n")
        if segment.count(b"\n") != crlf or segment.count(b"\r") != crlf:
            self.bare = True
            if self.normalize:
                segment = _BARE.sub(b"\r\n", segment)
        if b"\0" in segment:
            self.nul = True
        if not self.eight_bit and not segment.isascii():
            self.eight_bit = True
        return segment

    def close(self):
        """End of content: a CR still held back was bare."""
        if self._held_cr:
            self._held_cr = False
            self.bare = True
            return b"\r\n" if self.normalize else b""
        return b""


class ServerProtocol:
    """One SMTP session's protocol state. Feed bytes; pull events; answer decisions.

    The state (self.state, one of STATES) changes only in _go(), by the TRANSITIONS table;
    what the next input bytes are follows from it (READERS)."""

    def __init__(self, settings):
        self.settings = settings
        self._state = INIT
        self.helo_name = None
        self.esmtp = False
        self.tls_active = settings.implicit_tls
        self.auth_user = None
        self.transaction = None
        self.errors = 0
        self.junk_commands = 0          # JUNK commands since the start or the last message
        self.last_command = "CONNECT"   # for "lost connection after X" log lines
        self._buf = bytearray()
        # Events and replies not yet taken: a few at a time, so a list (a deque's first
        # block alone is 600 bytes, times every idle session).
        self._out = []
        self._pending = None            # (event, on_accept, on_reject) awaiting a decision
        self._denial = None             # REFUSED: the reply to every line but QUIT
        self._discarding_line = False   # the rest of a too long line is being skipped
        self._pipelining_test = settings.pipelining_test    # off once it has reported
        # DATA / BDAT
        self._data_bol = True
        self._checker = None
        self._over_size = False
        self._bdat_left = 0
        self._bdat_last = False
        self._bdat_error = None         # SKIP, SKIP_INIT: the reply once the chunk is read
        # AUTH dialogue
        self._auth_step = None
        self.auth_mechanisms = settings.auth_mechanisms

    # ---- the driver's side ------------------------------------------------------------

    def start(self):
        """Queue the 220 greeting; call once before the first next_event()."""
        s = self.settings
        self._send(220, None, "%s %s" % (s.hostname, s.banner))

    def start_refused(self, code, status, text, client):
        """In place of start(): the client is refused before the greeting (a connection
        verdict). A 4xx closes at once (RFC 5321 3.8). A 5xx replaces the 220 and leaves
        the session REFUSED: QUIT is obeyed, every other line gets 503 5.7.0 naming
        `client` until too many errors (RFC 5321 3.1; Postfix with smtpd_delay_reject=no).
        """
        text = "%s %s" % (self.settings.hostname, text)
        if code < 500:
            return self._send(code, status, text, close=True)
        self._denial = Reply(503, "5.7.0", "Error: access denied for %s" % client)
        self._go(REFUSE)
        self._send(code, status, text)

    def receive_data(self, data):
        """Hand the core bytes read from the client."""
        if _READS[READERS[self._state]] is not None:
            self._buf += data

    def next_event(self):
        """The next event, NEED_DATA when input is exhausted, or CLOSED."""
        while True:
            if self._out:
                return self._out.pop(0)
            if self._pending is not None:
                raise RuntimeError("answer %r with accept() or reject() first"
                                   % (self._pending[0],))
            if self._state == DONE:
                return CLOSED
            reader = _READS[READERS[self._state]]
            if reader is None or not getattr(self, reader)():
                return NEED_DATA

    def accept(self, text=None):
        """Say yes to the pending decision; text replaces the default reply text."""
        event, on_accept, _ = self._take_pending()
        on_accept(text)

    def reject(self, reply=None):
        """Say no to the pending decision with this reply (or the decision's default)."""
        event, _, on_reject = self._take_pending()
        on_reject(reply)

    def accept_auth(self, user, text=None):
        """Say yes to the pending AUTH; `user` is the login name the backend vouches for
        (Dovecot's canonical user=), recorded in place of the name the client typed."""
        event = self._pending[0] if self._pending else None
        if not isinstance(event, AuthRequest):
            raise RuntimeError("accept_auth() with no AUTH pending")
        self.accept(text)
        self.auth_user = user

    def offer_auth_mechanisms(self, mechanisms):
        """The AUTH mechanisms to offer from now on (EHLO, AUTH): those of `mechanisms`
        this core implements, in its order (the backend may support fewer)."""
        self.auth_mechanisms = tuple(m for m in AUTH_MECHANISMS if m in mechanisms)

    def tls_started(self):
        """The TLS handshake after STARTTLS succeeded: start afresh (RFC 3207 4.2)."""
        self._go(TLS_DONE)
        self.tls_active = True
        self.helo_name = None
        self.esmtp = False
        self.auth_user = None

    def hang_up(self, reply):
        """End the session with `reply` as the last one, as it is (a protocol test's
        521 5.5.1; ImproperPipelining refused), from any state, before start() too."""
        self._abort_transaction("session refused")
        self._send(reply.code, reply.status, reply.text, close=True)

    def close_with(self, code, status, text):
        """End the session from the driver's side (timeout, shutdown): the last reply."""
        self._abort_transaction("session closed")
        self._send(code, status, "%s %s" % (self.settings.hostname, text), close=True)

    @property
    def state(self):
        """Where the session is: one of STATES."""
        return self._state

    @property
    def reading(self):
        """What the next input bytes are: COMMAND_LINE, DATA_BODY, BDAT_CHUNK, AUTH_LINE,
        TLS_HANDSHAKE (the driver's to read) or NOTHING."""
        return READERS[self._state]

    @property
    def reading_content(self):
        """True while DATA or BDAT content is being read (the data timeout applies)."""
        return READERS[self._state] in (DATA_BODY, BDAT_CHUNK)

    @property
    def closed(self):
        return self._state == DONE

    @property
    def data_in_progress(self):
        return self.transaction is not None and self.transaction.data_started

    # ---- plumbing -----------------------------------------------------------------------

    def _go(self, trigger):
        """Move by the table on a command (that succeeded) or an event: the only place the
        state changes. A trigger the table has no state for here is a bug in this module."""
        after = TRANSITIONS[self._state].get(trigger)
        if not isinstance(after, str):
            raise RuntimeError("no transition from %s on %s" % (self._state, trigger))
        command = COMMANDS.get(trigger)
        if command is not None and RESETS in command.flags:
            self._abort_transaction(trigger)
        self._state = after
        if _READS[READERS[after]] is None:
            # A state that reads nothing keeps nothing: what was pipelined after STARTTLS
            # came in plaintext and must not be obeyed after the handshake (CVE-2011-0411).
            self._buf.clear()

    def _refusal(self, verb):
        """The reply refusing verb in this state, or None if the table allows it here."""
        after = TRANSITIONS[self._state][verb]
        if after is DENIED:
            return self._denial
        return after if isinstance(after, Reply) else None

    def _take_pending(self):
        if self._pending is None:
            raise RuntimeError("no decision is pending")
        pending, self._pending = self._pending, None
        return pending

    def _decide(self, event, on_accept, on_reject):
        self._out.append(event)
        self._pending = (event, on_accept, on_reject)

    def _send(self, code, status, text, close=False):
        self._out.append(Reply(code, status, text, close))
        if close:
            return self._go(CLOSE)
        if code >= 400:
            self.errors += 1
            if self.errors >= self.settings.max_errors:
                self._abort_transaction("too many errors")
                self._send(421, "4.7.0", "%s Error: too many errors"
                           % self.settings.hostname, close=True)

    def _send_reply(self, reply):
        self._send(reply.code, reply.status, reply.text, reply.close)

    def _abort_transaction(self, reason):
        """Drop the transaction and any content begun; the caller moves the state."""
        if self.transaction is not None and self.transaction.data_started:
            self._out.append(DataAborted(reason))
        self.transaction = None

    # ---- reading commands -----------------------------------------------------------------

    def _read_line(self):
        """One line without its CRLF (bytes), _TOO_LONG, or None if incomplete."""
        buf = self._buf
        lf = buf.find(b"\n")
        if self._discarding_line:
            if lf < 0:
                buf.clear()
                return None
            del buf[:lf + 1]
            self._discarding_line = False
            return _TOO_LONG
        if lf < 0:
            if len(buf) > MAX_LINE:
                # Drain to the end of the line before replying, without buffering it.
                buf.clear()
                self._discarding_line = True
            return None
        line = bytes(buf[:lf + 1])
        del buf[:lf + 1]
        if len(line) > MAX_LINE:
            return _TOO_LONG
        return line[:-2] if line.endswith(b"\r\n") else line[:-1]

    def _read_command(self):
        raw = self._read_line()
        if raw is None:
            return False
        if self._pipelining_test and self._buf and raw is not _TOO_LONG:
            verb = raw.split(b" ", 1)[0].upper()
            if not self.esmtp or verb == b"DATA":
                # More input came with this line, where the client may not send ahead
                # (ImproperPipelining): the driver decides before the command is obeyed.
                self._pipelining_test = False
                self._decide(ImproperPipelining(verb.decode("ascii", "replace"),
                                                bytes(self._buf[:100])),
                             lambda text: self._handle_command(raw), self.hang_up)
                return True
        self._handle_command(raw)
        return True

    def _handle_command(self, raw):
        verb, arg, problem = self._parse_command(raw)
        if self._state == REFUSED:
            return self._while_refused(verb, arg, problem)
        if verb is not None:
            self.last_command = verb if verb in COMMANDS else "UNKNOWN"
        if problem is UNRECOGNIZED and verb and self.settings.report_unknown_commands:
            # Refused all the same; the driver only chooses the reply (Postfix's smtpd
            # shows the line to its milters, whose refusal replaces its own).
            return self._decide(UnknownCommand(raw.decode("utf-8")),
                                lambda text: self._send_reply(problem),
                                lambda reply: self._send_reply(reply or problem))
        if problem is not None:
            return self._send_reply(problem)
        command = COMMANDS[verb]
        if JUNK in command.flags:
            self.junk_commands += 1
            if self.junk_commands > self.settings.junk_command_limit:
                # Postfix starts counting errors here; we close at once, naming why.
                self._abort_transaction("too many junk commands")
                return self._send(421, "4.7.0", "%s Error: too many junk commands"
                                  % self.settings.hostname, close=True)
        refusal = self._refusal(verb)
        if refusal is not None and CHUNK_FOLLOWS not in command.flags:
            return self._send_reply(refusal)
        if (NEEDS_AUTH in command.flags and self.settings.auth_required
                and self.auth_user is None):
            return self._send(530, "5.7.0", "Error: authentication required")
        getattr(self, "smtp_" + verb)(arg)

    def _parse_command(self, raw):
        """(verb, argument, None) for a command line, else (verb or None, None, the Reply
        refusing the line): None as the verb when the line is not even a command."""
        if raw is _TOO_LONG:
            return None, None, Reply(500, "5.5.2", "Error: line too long")
        if b"\0" in raw:
            return None, None, Reply(500, "5.5.2", "Error: NUL character in command")
        if _CONTROL.search(raw):
            return None, None, Reply(500, "5.5.2", "Error: control character in command")
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None, None, Reply(500, "5.5.2", "Error: command is not valid UTF-8")
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        if verb not in COMMANDS:
            return verb, None, UNRECOGNIZED
        if not line.isascii() and UTF8 not in COMMANDS[verb].flags:
            return verb, None, Reply(500, "5.5.2", "Error: non-ASCII characters in command")
        return verb, arg.strip(" "), None

    def _while_refused(self, verb, arg, problem):
        """REFUSED: QUIT is obeyed; every other line, a command or not, gets the denial.
        Nothing here counts as a command (last_command stays CONNECT), so no reply is
        taken for the refusal of a message."""
        if problem is not None or self._refusal(verb) is not None:
            return self._send_reply(self._denial)
        getattr(self, "smtp_" + verb)(arg)

    # ---- commands: one method per verb (design rule 2) --------------------------------------

    def smtp_EHLO(self, arg):
        """EHLO domain: start an ESMTP session and list the extensions."""
        self._helo(arg, esmtp=True)

    def smtp_HELO(self, arg):
        """HELO domain: start a plain SMTP session."""
        self._helo(arg, esmtp=False)

    def _helo(self, arg, esmtp):
        verb = "EHLO" if esmtp else "HELO"
        if not arg:
            return self._send(501, "5.5.4", "Syntax: %s hostname" % verb)
        name = arg.split()[0]

        def on_accept(text):
            self.helo_name, self.esmtp = name, esmtp
            self._go(verb)
            if esmtp:
                self._send(250, None, [self.settings.hostname] + self._extensions())
            else:
                self._send(250, None, self.settings.hostname)

        self._decide(Helo(name, esmtp), on_accept, self._rejecter(
            550, "5.7.1", "Error: %s rejected" % verb))

    def _extensions(self):
        s = self.settings
        ext = ["PIPELINING", "SIZE %d" % s.max_message_size]
        if s.starttls_available and not self.tls_active:
            ext.append("STARTTLS")
        if self._auth_offered():
            ext.append("AUTH " + " ".join(self.auth_mechanisms))
        ext += ["ENHANCEDSTATUSCODES", "8BITMIME", "DSN", "SMTPUTF8", "CHUNKING"]
        if self.tls_active:
            ext.append("REQUIRETLS")    # RFC 8689 2: offered only inside TLS
        return ext

    def _auth_offered(self):
        s = self.settings
        return (s.auth_available and self.auth_user is None and bool(self.auth_mechanisms)
                and (self.tls_active or s.auth_plaintext))

    def smtp_MAIL(self, arg):
        """MAIL FROM:<sender> [SIZE= BODY= SMTPUTF8 RET= ENVID= AUTH= REQUIRETLS]."""
        parsed = self._path_and_params(arg, "FROM")
        if parsed is None:
            return
        path, params = parsed
        txn = Transaction(sender="")
        for key, value in params.items():
            problem = self._mail_param(txn, key, value)
            if problem:
                return self._send(*problem)
        if path:
            try:
                txn.sender = validate_mailbox(path, utf8=txn.smtputf8)
            except NonAsciiAddress as exc:
                return self._send(553, "5.6.7", "Error: %s" % exc)
            except AddressError as exc:
                return self._send(501, "5.1.7", "Bad sender address syntax: %s" % exc)

        def on_accept(text):
            self.transaction = txn
            self._go("MAIL")
            self._send(250, "2.1.0", text or "Ok")

        self._decide(MailFrom(txn), on_accept, self._rejecter(
            550, "5.7.1", "Error: sender rejected"))

    def _path_and_params(self, arg, keyword):
        """(path, {PARAM: value}) of MAIL FROM:/RCPT TO:, or None after a syntax reply."""
        try:
            path, params_text = split_path(arg, keyword)
            params = parse_params(params_text)
        except AddressError as exc:
            self._send(501, "5.5.4", "Syntax error: %s" % exc)
            return None
        if params and not self.esmtp:
            self._send(555, "5.5.4", "Error: parameters need EHLO, not HELO")
            return None
        return path, params

    def _mail_param(self, txn, key, value):
        """Apply one MAIL parameter; return a reply tuple if it is wrong."""
        if key == "SIZE":
            if value is None or not value.isdigit() or len(value) > 20:
                return 501, "5.5.4", "Syntax error in SIZE parameter"
            txn.declared_size = int(value)
            if txn.declared_size > self.settings.max_message_size:
                return 552, "5.3.4", "Message size exceeds fixed limit of %d bytes" % (
                    self.settings.max_message_size)
        elif key == "BODY":
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                return 501, "5.5.4", "Error: BODY must be 7BIT or 8BITMIME"
            txn.body = value.upper()
        elif key == "SMTPUTF8":
            if value is not None:
                return 501, "5.5.4", "Error: SMTPUTF8 takes no value"
            txn.smtputf8 = True
        elif key == "RET":
            if value is None or value.upper() not in ("FULL", "HDRS"):
                return 501, "5.5.4", "Error: RET must be FULL or HDRS"
            txn.ret = value.upper()
        elif key == "ENVID":
            # RFC 3461 4.4; never a control character, whatever xtext can spell (dsn.py).
            try:
                txn.envid = parse_envid(value)
            except DsnError as exc:
                return 501, "5.5.4", "Error: %s" % exc
        elif key == "AUTH":
            # RFC 4954 5: accepted and not trusted; we never relay an AUTH= we did not verify.
            if value is None:
                return 501, "5.5.4", "Error: AUTH parameter needs a value"
        elif key == "REQUIRETLS":
            # RFC 8689 2: only over TLS, and then the message must stay inside TLS.
            if value is not None:
                return 501, "5.5.4", "Error: REQUIRETLS takes no value"
            if not self.tls_active:
                return 530, "5.7.10", "REQUIRETLS support required: start TLS first"
            txn.requiretls = True
        else:
            return 555, "5.5.4", "Error: unsupported MAIL parameter %s" % key
        return None

    def smtp_RCPT(self, arg):
        """RCPT TO:<recipient> [NOTIFY= ORCPT=]."""
        txn = self.transaction
        parsed = self._path_and_params(arg, "TO")
        if parsed is None:
            return
        path, params = parsed
        if path.lower() == "postmaster":
            address = "postmaster"     # RFC 5321 4.5.1: must be accepted without a domain
        else:
            try:
                address = validate_mailbox(path, utf8=txn.smtputf8)
            except NonAsciiAddress as exc:
                return self._send(553, "5.6.7", "Error: %s" % exc)
            except AddressError as exc:
                return self._send(501, "5.1.3", "Bad recipient address syntax: %s" % exc)
        rcpt = RecipientInfo(address)
        for key, value in params.items():
            problem = self._rcpt_param(rcpt, key, value, txn.smtputf8)
            if problem:
                return self._send(*problem)
        if len(txn.recipients) >= self.settings.max_recipients:
            return self._send(452, "4.5.3", "Error: too many recipients")

        def on_accept(text):
            txn.recipients.append(rcpt)
            self._go("RCPT")
            self._send(250, "2.1.5", text or "Ok")

        self._decide(RcptTo(txn, rcpt), on_accept, self._rejecter(
            550, "5.1.1", "Error: recipient rejected"))

    def _rcpt_param(self, rcpt, key, value, utf8):
        """Apply one RCPT parameter (RFC 3461); return a reply tuple if it is wrong. ORCPT
        never keeps a control character, whatever xtext can spell (elemta.smtp.dsn)."""
        try:
            if key == "NOTIFY":
                rcpt.notify = parse_notify(value)
            elif key == "ORCPT":
                rcpt.orcpt = parse_orcpt(value, utf8)
            else:
                return 555, "5.5.4", "Error: unsupported RCPT parameter %s" % key
        except DsnError as exc:
            return 501, "5.5.4", "Error: %s" % exc
        return None

    def smtp_DATA(self, arg):
        """DATA: the content follows, ended by CRLF.CRLF."""
        if arg:
            return self._send(501, "5.5.4", "Syntax: DATA")
        txn = self.transaction

        def on_accept(text):
            txn.data_started = True
            self._data_bol = True
            self._over_size = False
            self._checker = ContentChecker(self.settings.bare_line_endings == "normalize")
            self._go("DATA")
            self._send(354, None, text or "End data with <CR><LF>.<CR><LF>")

        self._decide(DataStart(txn), on_accept, self._rejecter(
            451, "4.3.0", "Error: queue file write error"))

    def smtp_BDAT(self, arg):
        """BDAT size [LAST]: exactly size octets of content follow (RFC 3030)."""
        match = _BDAT_ARG.match(arg)
        if not match:
            # Without a size the chunk cannot be skipped; what follows is read as commands.
            return self._send(501, "5.5.4", "Syntax: BDAT size [LAST]")
        self._bdat_left = int(match.group(1))
        self._bdat_last = match.group(2) is not None
        # RFC 3030 2: the chunk is read and thrown away even when it is refused.
        self._bdat_error = self._refusal("BDAT")
        if self._bdat_error is not None:
            return self._go(SKIP_CHUNK)
        txn = self.transaction
        if txn.data_size + self._bdat_left > self.settings.max_message_size:
            self._bdat_error = Reply(552, "5.3.4", "Message size exceeds fixed limit of %d "
                                     "bytes" % self.settings.max_message_size)
            return self._go(SKIP_CHUNK)
        if txn.data_started:
            return self._go("BDAT")

        def on_accept(text):
            txn.data_started = True
            self._checker = ContentChecker(self.settings.bare_line_endings == "normalize")
            self._go("BDAT")

        def on_reject(reply):
            self._bdat_error = reply or Reply(451, "4.3.0", "Error: queue file write error")
            self._go(SKIP_CHUNK)

        self._decide(DataStart(txn), on_accept, on_reject)

    def smtp_RSET(self, arg):
        """RSET: drop the transaction."""
        if arg:
            return self._send(501, "5.5.4", "Syntax: RSET")
        self._go("RSET")
        self._send(250, "2.0.0", "Ok")

    def smtp_NOOP(self, arg):
        """NOOP: nothing (any argument is ignored, RFC 5321 4.1.1.9)."""
        self._go("NOOP")
        self._send(250, "2.0.0", "Ok")

    def smtp_HELP(self, arg):
        """HELP: the commands we know."""
        self._go("HELP")
        self._send(214, "2.0.0", ["Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT "
                                  "VRFY HELP STARTTLS AUTH", "See RFC 5321"])

    def smtp_VRFY(self, arg):
        """VRFY: never reveals who exists (252, RFC 5321 3.5.3)."""
        if not arg:
            return self._send(501, "5.5.4", "Syntax: VRFY address")
        self._go("VRFY")
        self._send(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt "
                                 "delivery")

    def smtp_QUIT(self, arg):
        """QUIT: say goodbye and close."""
        self._go("QUIT")
        self._send(221, "2.0.0", "Bye", close=True)

    def smtp_STARTTLS(self, arg):
        """STARTTLS: switch to TLS (RFC 3207)."""
        if arg:
            return self._send(501, "5.5.4", "Syntax: STARTTLS")
        if self.tls_active:
            return self._send(554, "5.5.1", "Error: TLS already active")
        if not self.settings.starttls_available:
            return self._send(502, "5.5.1", "Error: command not implemented")
        self._go("STARTTLS")      # drops what was pipelined after it (CVE-2011-0411)
        self._send(220, "2.0.0", "Ready to start TLS")
        self._out.append(StartTLS())

    def smtp_AUTH(self, arg):
        """AUTH PLAIN|LOGIN [initial-response] (RFC 4954)."""
        s = self.settings
        if not s.auth_available:
            return self._send(503, "5.5.1", "Error: authentication not enabled")
        if self.auth_user is not None:
            return self._send(503, "5.5.1", "Error: already authenticated")
        if not (self.tls_active or s.auth_plaintext):
            return self._send(538, "5.7.11", "Encryption required for requested "
                                             "authentication mechanism")
        parts = arg.split()
        if not parts or len(parts) > 2:
            return self._send(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
        mechanism = parts[0].upper()
        initial = parts[1] if len(parts) == 2 else None
        if mechanism not in self.auth_mechanisms:
            return self._send(504, "5.5.4", "Error: unsupported authentication mechanism")
        self._auth_step = (mechanism, None)
        if initial is None:
            self._go(CHALLENGE)
            self._send(334, None, "" if mechanism == "PLAIN" else "VXNlcm5hbWU6")
            return
        decoded = self._b64(initial, initial=True)
        if decoded is not None:
            self._auth_response(decoded)

    def _b64(self, text, initial=False):
        """Decode a base64 AUTH response, or reply 501 and return None."""
        if initial and text == "=":
            return b""
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            self._auth_step = None
            self._send(501, "5.5.2", "Error: cannot decode AUTH response (bad base64)")
            return None

    def _read_auth(self):
        raw = self._read_line()
        if raw is None:
            return False
        self._go(RESPONSE)
        if raw is _TOO_LONG or not raw.isascii():
            self._auth_step = None
            self._send(501, "5.5.2", "Error: malformed AUTH response")
            return True
        text = raw.decode("ascii").strip()
        if text == "*":
            self._auth_step = None
            self._send(501, "5.0.0", "Authentication cancelled")
            return True
        decoded = self._b64(text)
        if decoded is not None:
            self._auth_response(decoded)
        return True

    def _auth_response(self, data):
        mechanism, username = self._auth_step
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            self._auth_step = None
            return self._send(501, "5.5.2", "Error: AUTH response is not valid UTF-8")
        if mechanism == "LOGIN" and username is None:
            self._auth_step = ("LOGIN", text)
            self._go(CHALLENGE)
            return self._send(334, None, "UGFzc3dvcmQ6")
        self._auth_step = None
        if mechanism == "LOGIN":
            authzid, password = "", text
        else:
            fields = text.split("\0")
            if len(fields) != 3 or not fields[1]:
                return self._send(501, "5.5.2", "Error: malformed PLAIN response")
            authzid, username, password = fields
            if authzid and authzid != username:
                return self._send(535, "5.7.8", "Error: authentication failed: "
                                                "authorization identity refused")

        def on_accept(text):
            self.auth_user = username
            self._go("AUTH")
            self._send(235, "2.7.0", text or "Authentication successful")

        self._decide(AuthRequest(mechanism, username, password, authzid), on_accept,
                     self._rejecter(535, "5.7.8", "Error: authentication failed"))

    def _rejecter(self, code, status, text):
        """An on_reject callback that sends the given reply or this default."""
        def on_reject(reply):
            self._send_reply(reply or Reply(code, status, text))
        return on_reject

    # ---- message content ----------------------------------------------------------------

    def _read_data(self):
        """One step of DATA: content up to the next possible terminator, or the end."""
        buf = self._buf
        if not buf:
            return False
        if self._data_bol:
            if buf[:3] == b".\r\n":
                del buf[:3]
                self._end_of_content()
                return True
            if len(buf) < 3 and b".\r\n".startswith(bytes(buf)):
                return False
            if buf[:1] == b".":
                del buf[:1]                 # dot-stuffing, RFC 5321 4.5.2
            self._data_bol = False
        # DATA ends only at CRLF.CRLF: a lone LF or CR never ends a line here, so
        # "\n.\n", "\r.\r" and friends stay content (and are refused or fixed as bare).
        j = buf.find(b"\r\n.", 0, DATA_STEP)
        if j >= 0:
            end = j + 2
            self._data_bol = True
        else:
            end = min(len(buf), DATA_STEP)
            # Keep back a CR or CRLF that may start "\r\n." in the next read.
            if buf[end - 1:end] == b"\r":
                end -= 1
            elif buf[end - 2:end] == b"\r\n":
                end -= 2
            if end <= 0:
                return False
        segment = bytes(buf[:end])
        del buf[:end]
        self._content(segment)
        return True

    def _read_chunk(self):
        """One step of a BDAT chunk: exactly the announced octets, then the reply. In
        CHUNK they are content; in SKIP and SKIP_INIT they are thrown away."""
        if self._bdat_left:
            if not self._buf:
                return False
            take = min(self._bdat_left, len(self._buf), DATA_STEP)
            segment = bytes(self._buf[:take])
            del self._buf[:take]
            self._bdat_left -= take
            if self._state == CHUNK:
                self._content(segment)
            return True
        if self._state != CHUNK:
            self._go(CHUNK_END)
            self._abort_transaction("BDAT refused")
            self._send_reply(self._bdat_error)
        elif self._bdat_last:
            self._end_of_content()
        else:
            self._go(CHUNK_END)
            self._send(250, "2.0.0", "%d octets received" % self.transaction.data_size)
        return True

    def _content(self, segment):
        txn = self.transaction
        segment = self._checker.feed(segment)
        if self._over_size or not segment:
            return
        txn.data_size += len(segment)
        if txn.data_size > self.settings.max_message_size:
            self._over_size = True        # keep reading to the end, storing nothing more
            return
        self._out.append(DataChunk(segment))

    def _end_of_content(self):
        self._go(CONTENT_END)
        txn, checker, s = self.transaction, self._checker, self.settings
        tail = checker.close()
        if tail and not self._over_size:
            txn.data_size += len(tail)
            self._out.append(DataChunk(tail))
        problem = None
        if self._over_size or txn.data_size > s.max_message_size:
            problem = (552, "5.3.4", "Error: message exceeds fixed limit of %d bytes"
                       % s.max_message_size)
        elif checker.bare and s.bare_line_endings == "reject":
            problem = (550, "5.5.2", "Error: bare <CR> or <LF> in message data; lines "
                                     "must end with <CR><LF> (RFC 5321 2.3.8)")
        elif checker.nul:
            problem = (550, "5.6.0", "Error: NUL character in message data")
        elif (checker.eight_bit and txn.body == "7BIT" and not txn.smtputf8
              and s.undeclared_8bit == "reject"):
            problem = (554, "5.6.1", "Error: 8-bit message data without BODY=8BITMIME")
        if problem:
            self._abort_transaction("content refused")
            return self._send(*problem)
        if checker.eight_bit and txn.body == "7BIT":
            txn.body = "8BITMIME"       # accepted undeclared 8-bit: say so downstream

        def finish(reply):
            self.transaction = None
            if reply.code == 250:
                self.junk_commands = 0    # a message was taken: as Postfix, start afresh
            self._send_reply(reply)

        self._decide(MessageReceived(txn),
                     lambda text: finish(Reply(250, "2.0.0", text or "Ok")),
                     lambda reply: finish(reply or Reply(451, "4.3.0",
                                                         "Error: queue file write error")))
