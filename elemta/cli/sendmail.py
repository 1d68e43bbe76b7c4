"""elemta-sendmail: the sendmail(8) command line, installed as /usr/sbin/sendmail.

Runs in the caller's own process (cron, mail, PHP, git send-email), as the caller's user,
with no setuid or setgid bit: it writes each message into spool/maildrop/ (world-writable
and sticky, see elemta.queue.maildrop), which works whether or not the daemon runs, and
wakes the pickup process, which queues it. The sender's identity in the Received trace is
taken by pickup from the file's owner, so no option here can forge it.

    sendmail [options] [--] [recipient ...]     read a message on stdin and send it
      -t            recipients also from To/Cc/Bcc (Resent-* if present); Bcc removed
      -i, -oi       a line with a single dot does not end the input
      -f, -r ADDR   envelope sender ('<>' for none)      -F NAME   full name for From:
      -N LIST       DSN NOTIFY: never or success,failure,delay
      -R full|hdrs  DSN RET      -V ENVID   DSN envelope id      -B 8BITMIME|7BIT
      -C FILE       configuration file (or directory holding elemta.yaml/.toml);
                    default $ELEMTA_CONFIG, then /etc/elemta/elemta.{yaml,toml}, then
                    the built-in defaults (elemta.cli.config_finder)
      -bs           SMTP dialogue on stdin/stdout      -bp   list the queue (mailq)
      -bv           verify the recipients only, queue nothing (the smtpd's RCPT answer:
                    local domains, users and aliases, hosted domains and their
                    tables, virtual aliases expanded: elemta.addressing)
      -bi, -I       check the aliases file (newaliases)
      -q            flush the queue (elemtactl queue flush)
      -o..., -L, -v, -n, -m, -U, -h N, -X FILE, -G, -x, -A...: accepted, ignored

Missing From:, Date: and Message-ID: headers are added, as Postfix's cleanup does for local
mail. Exit status (sysexits.h): 0 sent; 64 usage (bad option, no or bad recipient); 65 bad
message (no recipient in the headers with -t, too large, bad header address); 67 -bv found
an unknown local user (or a remote address, with delivery.default_transport = error); 69
unsupported mode; 75 temporary failure (maildrop not writable);
78 configuration error. See also: elemta.queue.maildrop, elemta.pickup.worker,
elemta.cli.queuecmd (-bp, -q), man/elemta-sendmail.1.
"""

import email.utils
import os
import pwd
import re
import sys
# sysexits(3), as the os module names them (elemta.cli.failure).
from os import EX_DATAERR, EX_NOUSER, EX_OK, EX_TEMPFAIL, EX_UNAVAILABLE, EX_USAGE

from elemta.addressing.normal import normal_domain, split_address
from elemta.addressing.hosted import HostedRecipients
from elemta.addressing.recipients import ROLE
from elemta.addressing.resolve import (LOCAL, RELAY, REMOTE, VIRTUAL, Addressing,
                                       domain_entry)
from elemta.addressing.rewrite import AddressRewriter, RewriteError
from elemta.addressing.virtual import AliasExpansionError
from elemta.maps import TableUnavailable
from elemta.cli.config_finder import config_path, read_config
from elemta.cli.failure import Failure
from elemta.config.schema import parse_default_transport

PROG = "sendmail"

# getopt letters taking an argument (attached or next word), as Postfix's sendmail.
_WITH_ARGUMENT = set("ABCFLNORVXefhpr")
_IGNORED_FLAGS = set("GIUcimnvx")
_HEADER = re.compile(rb"^[\x21-\x39\x3b-\x7e]+:")
_NOTIFY = ("SUCCESS", "FAILURE", "DELAY")
_RECIPIENT_HEADERS = (b"to", b"cc", b"bcc")
_RESENT_HEADERS = (b"resent-to", b"resent-cc", b"resent-bcc")
READ_LINE = 65536


class Options:
    """What the command line asks for."""

    def __init__(self):
        self.mode = "m"              # -b: m send, s SMTP, p list, v verify; q flush
        self.extract = False         # -t
        self.ignore_dots = False     # -i, -oi
        self.sender = None           # -f / -r
        self.full_name = None        # -F
        self.notify = None           # -N
        self.ret = None              # -R
        self.envid = None            # -V
        self.body = None             # -B
        self.config = None           # -C; else config_finder's search
        self.recipients = []


def parse_args(argv):
    """Postfix-compatible getopt: clustered flags, attached or separate arguments."""
    options = Options()
    words = list(argv)
    while words:
        word = words.pop(0)
        if word == "--":
            break
        if not word.startswith("-") or word == "-":
            words.insert(0, word)
            break
        letters = word[1:]
        while letters:
            letter, letters = letters[0], letters[1:]
            if letter in ("b", "q", "o") or letter in _WITH_ARGUMENT:
                if letter == "q":                       # -q, -q30m, -qRsite: all flush
                    options.mode = "q"
                    break
                value = letters
                if not value and letter not in ("o",):
                    if not words:
                        raise Failure(EX_USAGE, "option -%s requires an argument" % letter)
                    value = words.pop(0)
                elif not value:
                    value = words.pop(0) if words else ""
                _apply(options, letter, value)
                break
            if letter == "t":
                options.extract = True
            elif letter == "I":                         # -I: -bi (newaliases)
                options.mode = "i"
            elif letter == "i":
                options.ignore_dots = True
            elif letter in _IGNORED_FLAGS:
                pass
            else:
                raise Failure(EX_USAGE, "invalid option -- '%s'" % letter)
    options.recipients = words
    return options


def _apply(options, letter, value):
    if letter == "b":
        if value in ("m", "s", "p", "v", "i"):
            options.mode = value
        elif value in ("d", "D", "l", "h", "H", "a"):
            raise Failure(EX_UNAVAILABLE, "-b%s is not supported by Elemta's sendmail "
                                          "(the daemon is `elemta`)" % value)
        else:
            raise Failure(EX_USAGE, "unknown mode -b%s" % value)
    elif letter == "o":
        if value.startswith("i"):
            options.ignore_dots = True          # -oi; every other -oXXX is ignored
    elif letter in "fr":
        options.sender = value
    elif letter == "F":
        options.full_name = value
    elif letter == "C":
        options.config = value
    elif letter == "N":
        words = [w.strip().upper() for w in value.split(",") if w.strip()]
        if words == ["NEVER"]:
            options.notify = ("NEVER",)
        elif words and all(w in _NOTIFY for w in words):
            options.notify = tuple(dict.fromkeys(words))
        else:
            raise Failure(EX_USAGE, "-N: expected never or success,failure,delay: %s"
                          % value)
    elif letter == "R":
        if value.upper() not in ("FULL", "HDRS"):
            raise Failure(EX_USAGE, "-R: expected full or hdrs: %s" % value)
        options.ret = value.upper()
    elif letter == "V":
        if not value or len(value) > 100 or not all("!" <= c <= "~" for c in value):
            raise Failure(EX_USAGE, "-V: an envelope id is 1 to 100 printable characters")
        options.envid = value
    elif letter == "B":
        if value.upper() not in ("8BITMIME", "7BIT"):
            raise Failure(EX_USAGE, "-B: expected 8BITMIME or 7BIT: %s" % value)
        options.body = value.upper()
    # A, L, O, X, e, h, p: accepted and ignored, as Postfix does.


# ---------------------------------------------------------------- configuration

def load_config(given):
    """(the file found, its Config) for -C or else the standard search
    (elemta.cli.config_finder)."""
    path = config_path(given)
    try:
        return path, read_config(path)
    except Failure as failure:
        hint = ""
        if "ermission denied" in str(failure):
            # Every local user runs sendmail: like Postfix's main.cf, the configuration
            # must be world-readable (secrets belong in the files it names, mode 0640).
            hint = " (sendmail runs as the calling user: the configuration must be " \
                   "readable by every user)"
        raise Failure(os.EX_CONFIG, str(failure) + hint)


class SubmissionContext:
    """Who is sending, from where, under which limits."""

    def __init__(self, config):
        self.config = config
        self.spool = config.queue.spool_dir
        self.hostname = config.hostname
        self.origin = config.origin        # Postfix's myorigin: what bare names get
        self.max_size = config.limits.message_size
        # The daemon's own answers to "is it local?" and "does that recipient exist?".
        self.addressing = Addressing.from_config(config)
        self._recipients = None      # made by -bv only: it reads the aliases file
        try:
            entry = pwd.getpwuid(os.getuid())
            self.login, gecos = entry.pw_name, entry.pw_gecos
        except KeyError:
            self.login, gecos = "uid%d" % os.getuid(), ""
        self.gecos = gecos.split(",")[0].strip()

    @property
    def recipients_made(self):
        return self._recipients is not None

    @property
    def recipients(self):
        """The recipient tables the smtpd checks RCPT against (passwd, aliases, the
        hosted domains' tables)."""
        if self._recipients is None:
            self._recipients = HostedRecipients(self.config, self.addressing,
                                                log_name="elemta.sendmail")
        return self._recipients

    def qualify(self, address):
        """user -> user@origin (Postfix's append_at_myorigin)."""
        address = address.strip()
        if address.startswith("<") and address.endswith(">"):
            address = address[1:-1]
        if address and "@" not in address:
            address += "@" + self.origin
        return address


def valid_address(address):
    """None if address is a valid mailbox, else why not."""
    from elemta.smtp.address import AddressError, validate_mailbox
    try:
        validate_mailbox(address, utf8=True)
    except AddressError as exc:
        return str(exc)
    return None


def split_recipients(words, context):
    """Command-line recipients ('a, b' allowed, as sendmail does), qualified and checked."""
    addresses = []
    for _, address in email.utils.getaddresses(words):
        if not address:
            continue
        address = context.qualify(address)
        problem = valid_address(address)
        if problem:
            raise Failure(EX_USAGE, "bad recipient address <%s>: %s" % (address, problem))
        addresses.append(address)
    return addresses


# ---------------------------------------------------------------- the message

class Composer:
    """Streams a message into a sink, line by line, fixing its header block on the way:
    headers are held until they end, then on_headers(headers) may change them (-t takes
    the recipients and drops Bcc); From, Date and Message-ID are added when missing."""

    def __init__(self, sink, context, full_name, sender, extract):
        self.sink = sink
        self.context = context
        self.full_name = full_name
        self.sender = sender
        self.extract = extract
        self.extracted = []          # recipients found in the headers (-t)
        self.bad_header_addresses = []
        self.size = 0
        self._headers = []           # [[name_lower, [raw lines]]]
        self._header_bytes = 0
        self._in_headers = True
        self._first = True
        self._carry = b""

    def feed(self, data):
        """CRLF content in any pieces (the -bs path)."""
        data = self._carry + data
        lines = data.split(b"\r\n")
        self._carry = lines.pop()
        for line in lines:
            self.line(line)

    def line(self, line):
        """One line without its line ending."""
        if self._in_headers:
            if self._first and line.startswith(b"From "):
                self._first = False
                return                               # an mbox separator, as Postfix drops
            self._first = False
            if line[:1] in (b" ", b"\t") and self._headers:
                self._headers[-1][1].append(line)
            elif _HEADER.match(line):
                name = line.split(b":", 1)[0].strip().lower()
                self._headers.append([name, [line]])
            else:
                self._end_headers()
                if line:
                    self._emit(b"")                  # headers end before a non-header line
                self._emit(line)
                return
            self._header_bytes += len(line) + 2
            if self._header_bytes > self.context.max_size:
                raise Failure(EX_DATAERR, "message too large")
            return
        self._emit(line)

    def close(self):
        if self._carry:
            self.line(self._carry)
            self._carry = b""
        if self._in_headers:
            self._end_headers()

    def _emit(self, line):
        self.size += len(line) + 2
        if self.size > self.context.max_size:
            raise Failure(EX_DATAERR, "message too large (limits.message_size is %d bytes)"
                          % self.context.max_size)
        self.sink(line + b"\r\n")

    def _end_headers(self):
        self._in_headers = False
        names = {name for name, _ in self._headers}
        if self.extract:
            wanted = _RESENT_HEADERS if names & set(_RESENT_HEADERS) else _RECIPIENT_HEADERS
            values = [_unfold(lines) for name, lines in self._headers if name in wanted]
            for _, address in email.utils.getaddresses(values):
                if not address:
                    continue
                address = self.context.qualify(address)
                if valid_address(address):
                    self.bad_header_addresses.append(address)
                else:
                    self.extracted.append(address)
            self._headers = [h for h in self._headers if h[0] not in (b"bcc", b"resent-bcc")]
        ctx = self.context
        if b"from" not in names:
            address = self.sender or "%s@%s" % (ctx.login, ctx.origin)
            name = self.full_name if self.full_name is not None else ctx.gecos
            self._headers.append([b"from", [_header("From", email.utils.formataddr(
                (name, address)) if name else address)]])
        if b"date" not in names:
            self._headers.append([b"date", [_header("Date", email.utils.formatdate(
                localtime=True))]])
        if b"message-id" not in names:
            self._headers.append([b"message-id", [_header("Message-ID", email.utils.make_msgid(
                domain=ctx.hostname))]])
        for _, lines in self._headers:
            for line in lines:
                self._emit(line)
        self._headers = []


def _unfold(lines):
    text = b" ".join(l.strip() for l in lines).decode("utf-8", "replace")
    return text.split(":", 1)[1]


def _header(name, value):
    from email.header import Header
    if not value.isascii():
        value = Header(value, "utf-8").encode()
    return ("%s: %s" % (name, value)).encode("ascii")


def read_stdin(composer, ignore_dots, stream=None):
    """Feed stdin to the composer line by line; without -i a lone '.' ends it."""
    stream = stream or sys.stdin.buffer
    pending = b""
    while True:
        piece = stream.readline(READ_LINE)
        if not piece:
            break
        if not piece.endswith(b"\n"):
            pending += piece
            if len(pending) > composer.context.max_size:
                raise Failure(EX_DATAERR, "message too large")
            continue
        line = (pending + piece)[:-1]
        pending = b""
        if line.endswith(b"\r"):
            line = line[:-1]
        if not ignore_dots and line == b".":
            return
        composer.line(line)
    if pending:
        composer.line(pending[:-1] if pending.endswith(b"\r") else pending)


# ---------------------------------------------------------------- the maildrop

def open_maildrop(context):
    from elemta.queue import maildrop
    directory = maildrop.maildrop_dir(context.spool)
    if not os.path.lexists(directory) and os.geteuid() == 0:
        maildrop.prepare(context.spool)      # root before the daemon ever ran
    try:
        return maildrop.MaildropWriter(context.spool)
    except OSError as exc:
        raise Failure(EX_TEMPFAIL, "cannot write to the maildrop %s: %s (has elemta been "
                                   "started once?)" % (directory, exc.strerror or exc))


def envelope_sender(options, context):
    if options.sender is None:
        return "%s@%s" % (context.login, context.origin)
    sender = options.sender.strip()
    if sender in ("<>", ""):
        return ""
    sender = context.qualify(sender)
    problem = valid_address(sender)
    if problem:
        raise Failure(EX_USAGE, "bad sender address <%s>: %s" % (sender, problem))
    return sender


def send(options, context, stdin=None):
    """-bm: read stdin and drop the message into the maildrop."""
    from elemta.queue import maildrop
    from elemta.queue.model import Recipient
    sender = envelope_sender(options, context)
    recipients = split_recipients(options.recipients, context)
    if not recipients and not options.extract:
        raise Failure(EX_USAGE, "no recipients: name them on the command line or use -t")
    writer = open_maildrop(context)
    try:
        composer = Composer(writer.write, context, options.full_name,
                            sender if options.sender is not None else None, options.extract)
        read_stdin(composer, options.ignore_dots, stdin)
        composer.close()
        if composer.bad_header_addresses:
            raise Failure(EX_DATAERR, "bad recipient address in the headers: <%s>"
                          % composer.bad_header_addresses[0])
        recipients = list(dict.fromkeys(recipients + composer.extracted))
        if not recipients:
            raise Failure(EX_DATAERR, "no recipient addresses found in the message headers")
        limit = context.config.limits.recipients
        if len(recipients) > limit:
            # pickup would refuse the file (the limit smtpd applies at RCPT): say it now.
            raise Failure(EX_DATAERR, "too many recipients: %d, limits.recipients is %d"
                          % (len(recipients), limit))
        writer.finish(sender, [Recipient(address, options.notify) for address in recipients],
                      options.ret, options.envid, options.body)
    except BaseException:
        writer.abort()
        raise
    maildrop.notify(context.spool)
    return EX_OK


def verify(options, context, stdin=None):
    """-bv: say whether each recipient looks deliverable; queue nothing."""
    words = list(options.recipients)
    if options.extract:
        composer = Composer(lambda data: None, context, None, None, True)
        read_stdin(composer, options.ignore_dots, stdin)
        composer.close()
        words += composer.extracted + composer.bad_header_addresses
    if not words:
        raise Failure(EX_USAGE, "no recipients to verify")
    status = EX_OK
    for _, address in email.utils.getaddresses(words):
        address = context.qualify(address)
        problem = valid_address(address)
        if problem:
            print("%s... invalid address: %s" % (address, problem))
            status = max(status, EX_DATAERR)
            continue
        line, code = verdict(context, address)
        print(line)
        status = max(status, code)
    aliases = context.recipients.local.aliases if context.recipients_made else None
    if aliases is not None and aliases.error:
        print("elemta-sendmail: warning: %s: aliases were not looked at" % aliases.error,
              file=sys.stderr)
    return status


# -bv's words for the hosted classes (an address of a virtual alias domain is either
# expanded or unknown).
HOSTED_WORDS = {VIRTUAL: "virtual mailbox", RELAY: "relay"}


def verdict(context, address):
    """(-bv's line, exit status) for one valid address: the smtpd's answer to RCPT,
    after the canonical maps (rewrite.*), which come first there too."""
    rewriter = AddressRewriter.from_config(context.config, context.addressing)
    if rewriter is not None:
        try:
            target = rewriter.recipient(address)
        except (TableUnavailable, RewriteError) as error:
            return "%s... deferred: canonical map lookup failed: %s" % (address, error), \
                EX_TEMPFAIL
        if target != address:
            line, code = verdict_of_canonical(context, target)
            return "%s... canonical address %s\n%s" % (address, target, line), code
    return verdict_of_canonical(context, address)


def remote_bounce(delivery, domain):
    """The reply remote mail to domain bounces with (delivery.default_transport = error,
    no delivery.transport entry for it: elemta.delivery.routing's rule), or None."""
    bounce = parse_default_transport(delivery.default_transport)
    table = {normal_domain(entry.domain): True for entry in delivery.transport}
    if bounce is None or domain_entry(table, normal_domain(domain)):
        return None
    return bounce


def verdict_of_canonical(context, address):
    """verdict() for an address the canonical maps have had their say on."""
    local, domain = split_address(address)
    try:
        resolved = context.recipients.resolve(address)
    except TableUnavailable as error:
        return "%s... deferred: lookup failed: %s" % (address, error), EX_TEMPFAIL
    except AliasExpansionError as error:
        return "%s... deferred: alias expansion error: %s" % (address, error), EX_TEMPFAIL
    if resolved.targets is not None and not resolved.known and resolved.kind != LOCAL:
        return "%s... undeliverable: virtual alias of %s: User unknown in %s" % (
            address, resolved.targets[0], resolved.table_name), EX_NOUSER
    if resolved.targets is not None:
        return "%s... deliverable: virtual alias of %s" % (
            address, ", ".join(resolved.targets)), EX_OK
    if resolved.kind == REMOTE:
        bounce = remote_bounce(context.config.delivery, domain)
        if bounce:
            return "%s... undeliverable: %s" % (address, bounce), EX_NOUSER
        return "%s... deliverable: remote domain %s" % (address, domain), EX_OK
    if resolved.kind != LOCAL:
        if not resolved.known:
            return "%s... undeliverable: User unknown in %s" % (
                address, resolved.table_name), EX_NOUSER
        return "%s... deliverable: %s domain %s" % (address, HOSTED_WORDS[resolved.kind],
                                                    domain), EX_OK
    if resolved.found is None:
        return "%s... undeliverable: no such local user %s" % (address, local), EX_NOUSER
    kind, name = resolved.found
    if kind == ROLE:
        return "%s... deliverable: local role address" % address, EX_OK
    return "%s... deliverable: local %s %s" % (address, kind, name), EX_OK


# ---------------------------------------------------------------- -bs

def smtp_dialogue(options, context, stdin_fd=0, stdout_fd=1):
    """-bs: the SMTP server core on stdin/stdout; each message goes to the maildrop."""
    from elemta.queue import maildrop
    from elemta.queue.model import Recipient
    from elemta.smtp.events import (CLOSED, NEED_DATA, AuthRequest, DataAborted,
                                    DataChunk, DataStart, Helo, MailFrom, MessageReceived,
                                    RcptTo)
    from elemta.smtp.protocol import ServerProtocol, Settings
    from elemta.smtp.replies import Reply
    settings = Settings(hostname=context.hostname, banner="ESMTP Elemta (sendmail -bs)",
                        max_message_size=context.max_size,
                        max_recipients=context.config.limits.recipients,
                        bare_line_endings="normalize", undeclared_8bit="accept")
    proto = ServerProtocol(settings)
    proto.start()
    writer = composer = None
    out = bytearray()
    try:
        while True:
            event = proto.next_event()
            if event is NEED_DATA:
                _write_all(stdout_fd, out)
                out.clear()
                data = os.read(stdin_fd, 65536)
                if not data:
                    return EX_OK                 # the client went away
                proto.receive_data(data)
            elif event is CLOSED:
                _write_all(stdout_fd, out)
                return EX_OK
            elif isinstance(event, Reply):
                out += event.encode()
            elif isinstance(event, (Helo, MailFrom, RcptTo)):
                proto.accept()
            elif isinstance(event, DataStart):
                try:
                    writer = open_maildrop(context)
                except Failure as failure:
                    print("%s: %s" % (PROG, failure), file=sys.stderr)
                    proto.reject(Reply(451, "4.3.0", "Error: maildrop write error"))
                    continue
                composer = Composer(writer.write, context, options.full_name,
                                    event.transaction.sender or None, False)
                proto.accept()
            elif isinstance(event, DataChunk):
                if composer is not None:
                    try:
                        composer.feed(event.data)
                    except Failure:
                        pass                    # reported at the end of the data
            elif isinstance(event, DataAborted):
                if writer is not None:
                    writer.abort()
                writer = composer = None
            elif isinstance(event, MessageReceived):
                txn = event.transaction
                try:
                    composer.close()
                    if composer.size > context.max_size:
                        raise Failure(EX_DATAERR, "message too large")
                    name = writer.finish(
                        txn.sender, [Recipient(r.address, r.notify, r.orcpt)
                                     for r in txn.recipients],
                        txn.ret, txn.envid, txn.body)
                except (Failure, OSError) as exc:
                    writer.abort()
                    writer = composer = None
                    proto.reject(Reply(552, "5.3.4", "Error: message too large")
                                 if isinstance(exc, Failure)
                                 else Reply(451, "4.3.0", "Error: maildrop write error"))
                    continue
                writer = composer = None
                maildrop.notify(context.spool)
                proto.accept("Ok: queued in the maildrop as %s" % name)
            elif isinstance(event, AuthRequest):
                proto.reject()
            else:
                proto.reject()
    finally:
        if writer is not None:
            writer.abort()


def _write_all(fd, data):
    view = memoryview(bytes(data))
    while view:
        view = view[os.write(fd, view):]


# ---------------------------------------------------------------- main

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        options = parse_args(argv)
        if options.mode == "p":
            from elemta.cli.queuecmd import mailq_main
            return mailq_main(["--config", options.config] if options.config else [])
        if options.mode == "i":                 # -bi, -I: newaliases
            from elemta.cli.newaliases import main as newaliases_main
            path = load_config(options.config)[0] if options.config else None
            return newaliases_main(["--config", path] if path else [])
        if options.mode == "q":
            from elemta.cli.elemtactl import main as elemtactl_main
            return elemtactl_main(["queue", "flush"]
                                  + (["--config", options.config] if options.config else []))
        _, config = load_config(options.config)
        context = SubmissionContext(config)
        if options.mode == "s":
            return smtp_dialogue(options, context)
        if options.mode == "v":
            return verify(options, context)
        return send(options, context)
    except Failure as failure:
        print("%s: %s" % (PROG, failure), file=sys.stderr)
        return failure.code
    except KeyboardInterrupt:
        return EX_TEMPFAIL
    except OSError as exc:
        print("%s: %s" % (PROG, exc), file=sys.stderr)
        return EX_TEMPFAIL


if __name__ == "__main__":
    sys.exit(main())
