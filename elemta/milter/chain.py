"""Every milter of one SMTP session (or one local submission), stage by stage.

Owned by the smtpd session (the `smtp` milters, Postfix's smtpd_milters) and pickup (the
`non_smtp` ones, Postfix's non_smtpd_milters); this is the one interface both use:

    chain = MilterChain(milters, ctx, facts)     # ctx: the session's plugin Context
    chain.connect(); chain.helo()                # each gives a Verdict
    chain.mail(sender, args); chain.rcpt(recipient, args); chain.data()
    chain.unknown(line)                          # a command line the SMTP core refuses
    outcome = chain.content(content)             # headers, body, end of message
    chain.abort()                                # RSET, a refused or broken transaction
    chain.close()                                # QUIT to every milter

Each stage goes to the milters in their configured order; the first that refuses
(reject, tempfail, a reply code) or discards decides, and the later ones are not asked,
as in Postfix. A milter that accepts is not asked again for this message (at MAIL, RCPT
and later) or this session (at connect and HELO). At the end of message each milter in
turn gets the header fields and body as the milters before it left them, and its
modifications are applied before the next one's turn (elemta.milter.edits); a
replacement body is spooled to a temporary file past 1 MB while it comes, its line
endings made CRLF chunk by chunk (elemta.milter.client). One larger than
limits.message_size tempfails the message (TOO_LARGE_REPLY, logged naming the milter),
as the queue would not take it from a client either.

A milter that cannot be reached, times out or breaks the protocol is given up for the
rest of the session and its default_action applies (Postfix's milter_default_action):
tempfail (451 4.3.0 to MAIL, RCPT, DATA or the end of data, each logged naming the
milter), reject (550 5.7.1), accept (as if it were not configured) or quarantine (the
message is held). A failure at connect or HELO is answered at the next MAIL, as Postfix
does: the client gets its greeting.

Recipients a milter adds go through the caller's address handling, as Postfix's cleanup
puts them through its own: canonical maps, virtual aliases, the normal form of a hosted
address (content_verdict's `expand`). Like Postfix, a milter may add any recipient, local
or remote, past the relay rules (those bind SMTP clients, and the milter is the admin's
own). A recipient a milter deletes is matched against the addresses the milters were
sent in RCPT (and those added before), local part exactly and domain without case, and
removes what that address became in the queue (its alias targets) and nothing that
another recipient still needs, as Postfix deletes by original recipient. Deleting every
recipient refuses the message (550 5.7.1), so mail is never accepted to go nowhere
unnoticed.

Every verdict that is not "continue" is logged in one line with the queue id (NOQUEUE
before DATA) and the milter's name; the end of message always is. Metrics (elemta.metrics):
elemta_milter_verdicts_total{milter,stage,action},
elemta_milter_failures_total{milter,stage,kind} (kind: elemta.milter.client.KINDS) and
elemta_milter_scan_seconds{milter} (each milter's turn at the content, from the first
header field to its answer at the end of message, for every message it answered).
"""

import logging
import time
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from elemta import metrics
from elemta.addressing.normal import canonical
from elemta.addressing.virtual import original_recipient
from elemta.milter import protocol as p
from elemta.milter.client import CONTINUE as CONTINUE_RESPONSE
from elemta.milter.client import MilterConnection, MilterError
from elemta.milter.edits import HeaderSection, wire_value
from elemta.milter.macros import values_for
from elemta.queue.model import Recipient
from elemta.smtp.address import AddressError, validate_mailbox
from elemta.util.text import printable
from elemta.util.threads import in_thread

log = logging.getLogger("elemta.milter")

CONTINUE, ACCEPT, REJECT, TEMPFAIL = "continue", "accept", "reject", "tempfail"
DISCARD, QUARANTINE = "discard", "quarantine"
# What a milter's bare reject and tempfail say (Postfix's milter8 replies).
REJECT_REPLY = (550, "5.7.1", "Command rejected")
TEMPFAIL_REPLY = (451, "4.7.1", "Service unavailable - try again later")
# A milter that failed, by its default_action.
FAILURE_REPLIES = {TEMPFAIL: (451, "4.3.0", "Temporary local problem, please try again "
                                            "later"),
                   REJECT: (550, "5.7.1", "Service unavailable")}
NO_RECIPIENTS = (550, "5.7.1", "Error: no recipients left after content filtering")
# Body work above this size goes to a thread (file reads and bytes.join release the GIL).
THREADED_BYTES = 1 << 20
TOO_LARGE_REPLY = (451, "4.3.4", "Error: message too large after content filtering")

# Stages, as logged and counted.
STAGE_OF = {p.SMFIC_CONNECT: "connect", p.SMFIC_HELO: "helo", p.SMFIC_MAIL: "mail",
            p.SMFIC_RCPT: "rcpt", p.SMFIC_DATA: "data", p.SMFIC_HEADER: "header",
            p.SMFIC_EOH: "eoh", p.SMFIC_BODY: "body", p.SMFIC_BODYEOB: "eom",
            p.SMFIC_UNKNOWN: "unknown"}


@dataclass
class Verdict:
    """The milters' answer to one stage. action: continue, reject, tempfail, discard or
    quarantine (accept is continue to the caller); reply: (code, status, text) of a
    refusal; milter: whose verdict; reason: a discard's or quarantine's reason."""
    action: str = CONTINUE
    reply: Optional[Tuple[int, str, str]] = None
    milter: Optional[str] = None
    reason: str = ""

    @property
    def refused(self):
        return self.action in (REJECT, TEMPFAIL)


@dataclass
class ContentOutcome:
    """The end of message: the verdict (refusal or discard end it), the content and the
    header fields above it as the milters left them, and the envelope changes to
    apply."""
    verdict: Verdict
    content: bytes
    prefix: bytes = b""                 # the header fields above the content, edited
    recipient_edits: List[Tuple[str, str]] = field(default_factory=list)   # in order
    sender: Optional[str] = None
    quarantine: Optional[Tuple[str, str]] = None        # (reason, milter)

    @property
    def changed_envelope(self):
        return bool(self.recipient_edits or self.sender is not None)


class RecipientLookupError(Exception):
    """A recipient a milter added could not be looked up now: the message is refused
    with `reply` (a 4xx), as Postfix's cleanup defers it."""

    def __init__(self, reply):
        super().__init__(reply)
        self.reply = reply


@dataclass(frozen=True)
class MilterSettings:
    """One milter as it runs: its entry of `milters` with the `milter` table's defaults
    filled in (elemta.config.schema MilterEntry, MilterDefaults)."""
    name: str
    socket: str
    default_action: str = TEMPFAIL
    connect_timeout: float = 30.0
    command_timeout: float = 30.0
    content_timeout: float = 300.0
    protocol: int = p.VERSION
    macros: Tuple[Tuple[str, Tuple[str, ...]], ...] = ()
    max_body: int = 0                   # limits.message_size: the largest replacement body

    def macros_for(self, stage):
        """The configured macro names sent at stage (connect, helo, mail, rcpt, data,
        eoh, eom)."""
        return dict(self.macros).get(stage, ())


def configured(config, kind):
    """The MilterSettings of config's milters that run for kind: "smtp" (the smtpd's,
    Postfix's smtpd_milters) or "non_smtp" (pickup's, non_smtpd_milters)."""
    defaults = config.milter
    macros = (("connect", defaults.connect_macros), ("helo", defaults.helo_macros),
              ("mail", defaults.mail_macros), ("rcpt", defaults.rcpt_macros),
              ("data", defaults.data_macros), ("eoh", defaults.end_of_header_macros),
              ("eom", defaults.end_of_data_macros))
    chosen = []
    for entry in config.milters:
        if not getattr(entry, kind):
            continue

        def pick(key, entry=entry):
            value = getattr(entry, key)
            return getattr(defaults, key) if value is None else value
        chosen.append(MilterSettings(
            entry.name or entry.socket, entry.socket, pick("default_action"),
            pick("connect_timeout"), pick("command_timeout"), pick("content_timeout"),
            pick("protocol"), macros, config.limits.message_size))
    return chosen


def facts_of(config):
    """The macro facts that do not change: {daemon_name}, v."""
    from elemta import __version__
    return {"daemon_name": config.milter.daemon_name or config.hostname,
            "version": config.milter.macro_v or "Elemta %s" % __version__}


class _Milter:
    """One configured milter's state in this session."""

    def __init__(self, settings):
        self.settings = settings
        self.name = settings.name
        self.connection = None          # MilterConnection while open
        self.failed = None              # its default_action once it failed
        self.failure = None             # what went wrong then, one line
        self.done_session = False       # accepted at connect or HELO
        self.done_message = False       # accepted, or refused the message, at MAIL..
        self.in_message = False         # MAIL was sent, the end of message not yet


class MilterChain:
    """See the module docstring. milters: the MilterSettings to run, in order; ctx: the
    session's plugin Context (read for macros and the CONNECT and HELO data); facts:
    daemon_name, version and mailer(address) for the macros, queue_id set as it is
    known."""

    def __init__(self, milters, ctx, facts, local=False):
        self.milters = [_Milter(settings) for settings in milters]
        self.ctx = ctx
        self.facts = dict(facts)
        self.facts.setdefault("mailer", lambda address: "smtp")
        self.local = local              # pickup: connect as "localhost", no client
        # (reason, milter) of a quarantine before the content: for the session (connect,
        # HELO) and for this message (MAIL on).
        self.session_hold = None
        self.hold = None

    @property
    def queue_id(self):
        return self.facts.get("queue_id")

    @queue_id.setter
    def queue_id(self, value):
        self.facts["queue_id"] = value

    # ---- the SMTP stages -----------------------------------------------------------

    def connect(self):
        for milter in self.milters:
            self._open(milter)
        if self.local:
            data = p.connect("localhost", b"4", 0, "127.0.0.1")
        else:
            address = self.ctx.client_address
            name = self.ctx.client_name
            data = p.connect("[%s]" % address if name in ("", "unknown") else name,
                             b"6" if ":" in address else b"4", self.ctx.client_port or 0,
                             address)
        return self._stage(p.SMFIC_CONNECT, data, session=True)

    def helo(self):
        name = "localhost" if self.local else (self.ctx.helo or "")
        return self._stage(p.SMFIC_HELO, p.helo(name), session=True)

    def mail(self, sender, args=()):
        """MAIL FROM; a milter that failed earlier answers here with its default."""
        self.abort()                    # a transaction left open (RSET, a new MAIL)
        for milter in self.milters:
            milter.done_message = False
        verdict = self._failures("mail")
        if verdict is not None:
            return verdict
        for milter in self._talking():
            milter.in_message = True
        return self._stage(p.SMFIC_MAIL, p.mail(sender, args))

    def rcpt(self, recipient, args=()):
        return self._failures("rcpt") or self._stage(p.SMFIC_RCPT, p.rcpt(recipient, args),
                                                    recipient_only=True)

    def data(self):
        return self._failures("data") or self._stage(p.SMFIC_DATA, p.simple(p.SMFIC_DATA))

    def unknown(self, line):
        """A command line the SMTP core does not know, before it refuses it: a milter's
        reject, tempfail or reply code gives the refusal's text (as Postfix's smtpd
        does); nothing else a milter says changes anything, and a milter that fails here
        answers at the next MAIL. Milters that negotiated SMFIP_NOUNKNOWN, or speak a
        protocol older than version 3, are not asked."""
        verdict = self._stage(p.SMFIC_UNKNOWN, p.unknown(printable(line)), session=True,
                              unknown=True)
        return verdict if verdict.refused else Verdict()

    def content(self, content, prefix=b""):
        # type: (bytes, bytes) -> ContentOutcome
        """Headers, body and end of message to each milter in turn (see the module
        docstring). prefix: the header fields the MTA writes above the content (its
        Received header last), which the milters see first, as Postfix shows them its
        own Received header; the outcome gives both back as the milters left them."""
        outcome = ContentOutcome(Verdict(), content, prefix)
        failure = self._failures("eom")
        if failure is not None:
            outcome.verdict = failure
            return outcome
        if (self.hold or self.session_hold) is not None:
            outcome.quarantine = self.hold or self.session_hold
        talking = self._talking()
        if not talking:
            return outcome
        section = HeaderSection(content, prefix)
        for milter in talking:
            started = time.monotonic()
            try:
                verdict = self._content_of(milter, section, outcome)
            except MilterError as error:
                verdict = self._failed(milter, "eom", error)
            else:
                metrics.MILTER_SECONDS.labels(milter.name).observe(
                    time.monotonic() - started)
            milter.in_message = False
            if verdict.action == QUARANTINE:
                outcome.quarantine = outcome.quarantine or (verdict.reason, milter.name)
            elif verdict.action != CONTINUE:
                outcome.verdict = verdict
                return outcome
        outcome.prefix, pieces = section.split()
        outcome.content = _joined(pieces)
        return outcome

    def local_message(self, sender, recipients, content, prefix=b"", args=()):
        # type: (str, list, bytes, bytes, tuple) -> ContentOutcome
        """Every stage for one whole message, then QUIT (prefix: as for content(); args:
        MAIL's ESMTP parameters): pickup's message from sendmail, and a held message
        scanned again (elemta.plugins.rescan). There is no client to refuse one
        recipient to, so any refusal or discard is the message's."""
        def rcpt(recipient):
            self.ctx.recipient = recipient          # {rcpt_addr} and the others
            try:
                return self.rcpt(recipient)
            finally:
                self.ctx.recipient = None
        try:
            steps = [self.connect, self.helo, lambda: self.mail(sender, args)]
            steps += [lambda r=r: rcpt(r) for r in recipients]
            steps.append(self.data)
            for step in steps:
                verdict = step()
                if verdict.action in (REJECT, TEMPFAIL, DISCARD):
                    return ContentOutcome(verdict, content, prefix)
            return self.content(content, prefix)
        finally:
            self.close()

    def abort(self):
        """ABORT to every milter with a message open; a milter that fails here is
        closed (it would fail the next message anyway)."""
        for milter in self.milters:
            if milter.in_message and milter.connection is not None:
                try:
                    milter.connection.abort()
                except MilterError as error:
                    self._failed(milter, "abort", error)
            milter.in_message = False
        self.hold = None

    def close(self):
        """QUIT to every milter still connected."""
        self.abort()
        for milter in self.milters:
            if milter.connection is not None:
                milter.connection.close()
                milter.connection = None

    # ---- one stage -----------------------------------------------------------------

    def _talking(self):
        return [m for m in self.milters if m.connection is not None and m.failed is None
                and not m.done_session and not m.done_message]

    def _open(self, milter):
        settings = milter.settings
        connection = MilterConnection(milter.name, p.parse_socket(settings.socket),
                                      settings.connect_timeout, settings.command_timeout,
                                      settings.content_timeout, settings.protocol,
                                      settings.max_body)
        try:
            connection.open()
        except MilterError as error:
            connection.close(quit=False)
            self._failed(milter, "connect", error)
            return
        milter.connection = connection

    def _macros(self, milter, command):
        names = milter.connection.negotiated.macros.get(command)
        if names is None:
            names = milter.settings.macros_for(STAGE_OF.get(command, ""))
        return values_for(names, self.ctx, self.facts)

    def _stage(self, command, data, session=False, recipient_only=False, unknown=False):
        stage = STAGE_OF[command]
        for milter in self._talking():
            try:
                response = milter.connection.stage(command, data,
                                                   self._macros(milter, command))
            except MilterError as error:
                verdict = self._failed(milter, stage, error)
                if session and verdict.action in (REJECT, TEMPFAIL):
                    continue            # answered at the next MAIL, as Postfix does
            else:
                if unknown and response.action not in ("reply", REJECT, TEMPFAIL):
                    response = CONTINUE_RESPONSE    # an accept or discard here ends nothing
                verdict = self._judge(milter, stage, response, session, recipient_only)
            if unknown and not verdict.refused:
                continue
            if verdict.action == QUARANTINE:
                if session:
                    self.session_hold = self.session_hold or (verdict.reason, verdict.milter)
                else:
                    self.hold = self.hold or (verdict.reason, verdict.milter)
                continue
            if verdict.action != CONTINUE:
                return verdict
        return Verdict()

    def _judge(self, milter, stage, response, session=False, recipient_only=False):
        """A Response as the caller's Verdict; counts it and logs what is not continue."""
        action, reply = response.action, None
        if action == "reply":
            code = response.reply.code
            action = REJECT if code >= 500 else TEMPFAIL
            reply = (code, response.reply.status or ("5.7.1" if code >= 500 else "4.7.1"),
                     printable(response.reply.text) or REJECT_REPLY[2])
        elif action == REJECT:
            reply = REJECT_REPLY
        elif action == TEMPFAIL:
            reply = TEMPFAIL_REPLY
        metrics.MILTER_VERDICTS.labels(milter.name, stage, action).inc()
        if action == ACCEPT:
            if session:
                milter.done_session = True
            else:
                # Done with this message: nothing left to ABORT either.
                milter.done_message, milter.in_message = True, False
            self._log(milter, stage, "accept")
            return Verdict()
        if action in (CONTINUE, "skip"):
            return Verdict()
        if action in (REJECT, TEMPFAIL) and not recipient_only and not session:
            milter.done_message, milter.in_message = True, False
        self._log(milter, stage, action if reply is None else "%s: %d %s %s" % (
            action, reply[0], reply[1], reply[2]))
        return Verdict(action, reply, milter.name, "discarded by milter %s" % milter.name
                       if action == DISCARD else "")

    def _content_of(self, milter, section, outcome):
        """One milter's turn at the end of message; applies its modifications to
        section (the header fields and body) and outcome, and gives its Verdict."""
        connection = milter.connection
        for name, value in section.pairs:
            response = connection.stage(p.SMFIC_HEADER, p.header(name, wire_value(value)),
                                        None, content=True)
            if response.action != CONTINUE:
                return self._judge(milter, "header", response)
        response = connection.stage(p.SMFIC_EOH, p.simple(p.SMFIC_EOH),
                                    self._macros(milter, p.SMFIC_EOH), content=True)
        if response.action != CONTINUE:
            return self._judge(milter, "eoh", response)
        body = memoryview(section.body)
        for start in range(0, len(body), p.CHUNK_SIZE):
            response = connection.stage(p.SMFIC_BODY, p.body(body[start:start
                                                                  + p.CHUNK_SIZE]),
                                        None, content=True)
            if response.action == "skip":
                break
            if response.action != CONTINUE:
                return self._judge(milter, "body", response)
        response = connection.stage(p.SMFIC_BODYEOB, p.simple(p.SMFIC_BODYEOB),
                                    self._macros(milter, p.SMFIC_BODYEOB), content=True,
                                    eom=True)
        mods = response.modifications
        try:
            if response.action not in (ACCEPT, CONTINUE):
                return self._judge(milter, "eom", response)
            if mods.body_too_large:
                metrics.MILTER_VERDICTS.labels(milter.name, "eom", TEMPFAIL).inc()
                self._log(milter, "eom", "tempfail: %d %s %s (its replacement body of "
                          "%d bytes exceeds limits.message_size, %d)" % (
                              TOO_LARGE_REPLY + (mods.body_size, connection.max_body)))
                return Verdict(TEMPFAIL, TOO_LARGE_REPLY, milter.name)
            changes = self._apply(milter, mods, section, outcome)
            # One verdict a message: a quarantine is counted as that, not as continue too.
            action = QUARANTINE if mods.quarantine is not None else response.action
            metrics.MILTER_VERDICTS.labels(milter.name, "eom", action).inc()
            if mods.quarantine is not None:
                reason = printable(mods.quarantine)
                self._log(milter, "eom", "quarantine: %s%s" % (reason, changes))
                return Verdict(QUARANTINE, None, milter.name, reason)
            self._log(milter, "eom", "%s%s" % (response.action, changes))
            return Verdict()
        finally:
            mods.close()

    def _apply(self, milter, mods, section, outcome):
        """Apply one milter's modifications; a summary for its log line."""
        done = []
        for kind, name, value, index in mods.headers:
            try:
                section.apply(kind, name, value, index)
            except ValueError as error:
                log.warning("%s: milter %s: header edit refused: %s", self._where(),
                            milter.name, error)
                continue
            done.append("%s header %s" % ("delete" if kind == "change" and value == ""
                                           else kind, printable(name)))
        if mods.body is not None:
            # Already CRLF (client.Modifications). A large one is in a temporary file:
            # read in a thread, which releases the GIL, so the loop serves other sessions.
            section.replace_body(in_thread(mods.body.read) if mods.body_size > THREADED_BYTES
                                 else mods.body.read())
            done.append("replace body")
        for what, address, parameters in mods.ignored_parameters:
            # As Postfix's cleanup: the address is used, its parameters are not (a
            # milter's NOTIFY or ORCPT would change what the sender is told).
            log.warning("%s: milter %s: ignoring ESMTP parameters \"%s\" of %s <%s>",
                        self._where(), milter.name, printable(parameters)[:100], what,
                        printable(address))
        for op, address in mods.recipients:
            if op == "add" and not self._valid_address(milter, address, "add recipient"):
                continue
            outcome.recipient_edits.append((op, address))
            done.append("%s rcpt <%s>" % (op, printable(address)))
        if mods.sender is not None and self._valid_address(milter, mods.sender,
                                                           "change sender", empty=True):
            outcome.sender = mods.sender
            done.append("change sender <%s>" % mods.sender)
        return "; " + ", ".join(done) if done else ""

    def _valid_address(self, milter, address, what, empty=False):
        try:
            if address or not empty:
                validate_mailbox(address, utf8=True)
            return True
        except AddressError as error:
            log.warning("%s: milter %s: %s <%s> refused: %s", self._where(), milter.name,
                        what, printable(address), error)
            return False

    # ---- failures ------------------------------------------------------------------

    def _failed(self, milter, stage, error):
        """Give the milter up for this session and apply its default_action."""
        action = milter.settings.default_action
        metrics.MILTER_FAILURES.labels(milter.name, stage, error.kind).inc()
        if milter.connection is not None:
            milter.connection.close(quit=False)
            milter.connection = None
        milter.failed = action
        milter.failure = "milter %s failed at %s: %s" % (milter.name, stage, error)
        milter.in_message = False
        reply = FAILURE_REPLIES.get(action)
        log.warning("%s: milter %s (%s) failed at %s: %s; default_action %s%s",
                    self._where(), milter.name, milter.settings.socket, stage, error,
                    action, ": %d %s" % reply[:2] if reply else "")
        return self._failure_verdict(milter)

    def _failure_verdict(self, milter):
        action = milter.failed
        if action in FAILURE_REPLIES:
            return Verdict(action, FAILURE_REPLIES[action], milter.name)
        if action == QUARANTINE:
            return Verdict(QUARANTINE, None, milter.name,
                           "milter %s unavailable" % milter.name)
        return Verdict()

    def _failures(self, stage):
        """The verdict of the first milter that failed earlier and whose default
        refuses; a quarantine default holds the message; None otherwise."""
        for milter in self.milters:
            if milter.failed is None:
                continue
            verdict = self._failure_verdict(milter)
            if verdict.refused:
                self._log(milter, stage, "unavailable: %d %s %s (default_action %s)"
                          % (verdict.reply + (milter.failed,)))
                return verdict
            if verdict.action == QUARANTINE:
                self.hold = self.hold or (verdict.reason, milter.name)
        return None

    @property
    def failures(self):
        """One line for each milter given up in this session (see _failed)."""
        return [milter.failure for milter in self.milters if milter.failure is not None]

    def _where(self):
        return self.queue_id or "NOQUEUE"

    def _log(self, milter, stage, what):
        client = "local" if self.local else "%s[%s]" % (self.ctx.client_name or "unknown",
                                                       self.ctx.client_address)
        log.info("%s: milter %s: %s from %s: %s", self._where(), milter.name, stage.upper(),
                 client, what)


def _joined(pieces):
    # type: (List) -> bytes
    """The content from HeaderSection.split()'s pieces. bytes.join releases the GIL for
    a large join of bytes objects, so in a thread it leaves the event loop free; a body
    still a view of the received content (only its header fields edited) is copied
    once, here."""
    if len(pieces) == 1:
        return pieces[0]
    if all(isinstance(piece, bytes) for piece in pieces) and \
            sum(len(piece) for piece in pieces) > THREADED_BYTES:
        return in_thread(b"".join, pieces)
    return b"".join(pieces)


def content_verdict(outcome, envelope, verdict_class, told=(), queued_as=None,
                    expand=None):
    """A ContentOutcome as the content stages' verdict (elemta.plugins.content
    ContentVerdict, passed as verdict_class), with its envelope changes applied to
    `envelope` (an elemta.queue.model.Envelope, changed in place). A message the
    milters left with no recipient is refused with NO_RECIPIENTS.

    The caller's address handling (see the module docstring): told, the addresses the
    milters were sent in RCPT; queued_as(address), the queue addresses one of them
    became (default: itself); expand(address), the queue addresses for one a milter
    adds, [] for one refused (the caller logs why), RecipientLookupError when a table
    cannot answer now (default: itself)."""
    verdict = outcome.verdict
    result = verdict_class(CONTINUE, outcome.content)
    if outcome.quarantine is not None:
        result.quarantine, result.quarantined_by = outcome.quarantine
        result.quarantine_stage = "milter"
        result.quarantined_by = "milter %s" % result.quarantined_by
    if verdict.action != CONTINUE:
        result.action, result.stage = verdict.action, "milter"
        result.decided_by = "milter %s" % verdict.milter
        result.reply, result.reason = verdict.reply, verdict.reason
        return result
    if outcome.changed_envelope:
        try:
            recipients = _edited_recipients(envelope.recipients, outcome.recipient_edits,
                                            told, queued_as or _itself,
                                            expand or _itself)
        except RecipientLookupError as error:
            result.action, result.stage = TEMPFAIL, "milter"
            result.decided_by = "milters"
            result.reply = error.reply
            return result
        if not recipients:
            result.action, result.stage = REJECT, "milter"
            result.decided_by = "milters"
            result.reply = NO_RECIPIENTS
            return result
        envelope.recipients = recipients
        if outcome.sender is not None:
            envelope.sender = outcome.sender
    return result


def _itself(address):
    return [address]


def _edited_recipients(recipients, edits, told, queued_as, expand):
    """The queue's Recipients after the milters' adds and deletes, in their order (see
    content_verdict). Each address the milters know (told in RCPT, or added) is a source
    of queue addresses; a delete drops its source, and a queue recipient goes only when
    no source left still leads to it, so a delete removes exactly what that address
    brought and a recipient the milters never knew of (a REDIRECT's) stays."""
    sources = {}                        # canonical(address) -> (address, queue addresses)
    for address in told:
        sources.setdefault(canonical(address), (address, list(queued_as(address))))
    before = {target for _, targets in sources.values() for target in targets}
    added = []                          # new Recipients, in the milters' order
    for op, address in edits:
        key = canonical(address)
        if op == "delete":
            sources.pop(key, None)
        elif key not in sources:
            sources[key] = (address, list(expand(address)))
    live = {target for _, targets in sources.values() for target in targets}
    kept = [r for r in recipients if r.address not in before or r.address in live]
    known = {r.address.lower() for r in kept}
    for address, targets in sources.values():
        for target in targets:
            if target not in before and target.lower() not in known:
                known.add(target.lower())
                added.append(Recipient(target, None, None if target == address
                                       else original_recipient(address)))
    return kept + added


def mail_args(transaction):
    """The ESMTP parameters of MAIL FROM, as the milter's MAIL command carries them;
    transaction: the SMTP core's, or a queued Envelope (which has no declared SIZE)."""
    args = []
    if getattr(transaction, "declared_size", None):
        args.append("SIZE=%d" % transaction.declared_size)
    if transaction.body and transaction.body != "7BIT":
        args.append("BODY=%s" % transaction.body)
    if transaction.smtputf8:
        args.append("SMTPUTF8")
    if transaction.ret:
        args.append("RET=%s" % transaction.ret)
    if transaction.envid:
        args.append("ENVID=%s" % printable(transaction.envid))
    if transaction.requiretls:
        args.append("REQUIRETLS")
    return args
