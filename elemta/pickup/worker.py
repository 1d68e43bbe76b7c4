"""The pickup process (`elemta: pickup`): moves sendmail's submissions from the maildrop
into the queue, as Postfix's pickup does.

Runs in one child forked by elemta.master (kind "pickup"), as Elemta's user; opens its own
queue after the fork. Its loop, top to bottom:

    scan      list spool/maildrop (every file there is complete: sendmail renames it into
              place only once written and fsync'd); files waiting since before Elemta
              started are found by the first scan
    plugins   when some plugin serves the data or storage stage, the content passes them
              exactly as an authenticated client's message does in the smtpd
              (elemta.plugins.content, ctx.local true; ctx.outbound when some
              recipient is not local, by elemta.addressing.resolve): DKIM signs cron's and mail(1)'s
              mail by sender domain. Nobody is there to hear a refusal, so a reject puts
              the message on hold for the admin, a tempfail leaves the file in the
              maildrop for a later scan (not before PICKUP_RETRY seconds), a discard
              removes it (logged)
    rewrite   bare names in address headers get the mail name (/etc/mailname), then
              canonical maps and masquerading rewrite envelope and headers, then virtual
              aliases expand the recipients, virtual mailbox and relay recipients take
              their normal form (elemta.addressing.rewrite, .headers, .virtual,
              .resolve.queued_address, as the smtpd does): before the plugins, so DKIM
              signs what is queued
    checks    header and body checks and the hop count (elemta.content.checks), as
              Postfix's cleanup applies them to all mail: edits (IGNORE, PREPEND,
              REPLACE) and REDIRECT apply, HOLD holds, DISCARD removes (logged); with
              nobody to refuse it to, a REJECT or too many hops holds the message for
              the admin (as a plugin's reject does), and a table that cannot answer
              leaves it in the maildrop for a later scan
    queue     each file becomes a queued message: a Received header naming the file's
              owner ("from userid 1000": the kernel's word, not the file's), then the
              content; up to PICKUP_BATCH messages made durable by one Queue.commit
    remove    the maildrop files, only after the commit (a crash in between queues a
              message twice, never loses it)
    notify    the queue-stage plugins, one call per message (notification only)
    wake      the delivery workers (elemta.queue.wakeup)
    sleep     until sendmail's datagram on spool/run/pickup.sock, or PICKUP_SCAN seconds

Each message of a batch is a step of its own: pickup beats its heartbeat and lets signals
in between two, and the commit runs in a thread, so a maildrop of ten thousand messages
never looks like a hang to the master.

A file that is not a complete submission (a user's symlink, FIFO, socket, directory,
hard link, unreadable file or junk) or whose envelope breaks a rule (elemta.queue.maildrop:
types, NOTIFY, ORCPT, ENVID, limits.recipients) is logged once and removed; hidden files
(temp files left by a sendmail that died, or anybody's) are removed after a day.
Life cycle: elemta.util.child, as every child's: stops on SIGTERM/SIGQUIT after the
message in hand (what was taken is committed first), reopens logs on SIGUSR1, stops when
the master is gone; a wake socket it cannot bind is a boot failure the master backs off.
See also: elemta.queue.maildrop (the file format), elemta.cli.sendmail (the writer).
"""

import email.utils
import errno
import logging
import os
import time
from types import SimpleNamespace

import gevent
from gevent import socket as gsocket
from gevent.event import Event

from elemta.addressing.resolve import Addressing, queued_address
from elemta.addressing.headers import rewrite_headers
from elemta.addressing.rewrite import AddressRewriter, RewriteError
from elemta.addressing.virtual import (AliasExpansionError, VirtualAliases, expanded_recipients,
                                       original_recipient)
from elemta.content.checks import ContentChecks
from elemta.maps import TableUnavailable
from elemta.milter.chain import (MilterChain, RecipientLookupError, configured,
                                 content_verdict, facts_of)
from elemta.plugins.api import DATA, DISCARD, QUEUE, REJECT, STORAGE, Context
from elemta.plugins.content import (ContentVerdict, notify_queued, outbound,
                                    run_content_stages, wants_content)
from elemta.plugins.manager import PluginManager
from elemta.plugins.resolver import Resolver
from elemta.queue import maildrop, wakeup
from elemta.queue.ids import new_queue_id
from elemta.queue.model import Hold, Recipient
from elemta.queue.priority import SENDMAIL_LISTENER
from elemta.queue.queue import Queue, log_queued
from elemta.util.child import BootError, GeventChild
from elemta.util.text import printable
from elemta.util.threads import in_thread

log = logging.getLogger("elemta.pickup")

# Seconds between scans when no datagram comes (the fallback for a lost wake-up).
PICKUP_SCAN = 5.0
# Messages made durable by one commit.
PICKUP_BATCH = 100
# A hidden temp file older than this belongs to a sendmail that died.
STALE_TEMP = 86400.0
# Seconds before a submission a plugin tempfailed is tried again.
PICKUP_RETRY = 60.0


def received_header(uid, hostname, queue_id, recipients, now=None):
    """The trace header for a local submission: who (by uid), where, which queue id."""
    lines = ["Received: from userid %d" % uid,
             "\tby %s (Elemta) with %s id %s" % (hostname, maildrop.PROTOCOL, queue_id)]
    date = email.utils.formatdate(now, localtime=True)
    if len(recipients) == 1:
        lines.append("\tfor <%s>; %s" % (recipients[0], date))
    else:
        lines[-1] += ";"
        lines.append("\t" + date)
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


class Deferred(Exception):
    """A plugin tempfailed a submission, or its virtual aliases could not be expanded
    now (a table down, a loop the admin must fix): it stays in the maildrop for a later
    scan."""


class PickupWorker(GeventChild):
    """The one pickup process (see the module docstring)."""

    kind = "pickup"

    def __init__(self, config, slot, scoreboard, master_pid):
        super().__init__(config, slot, scoreboard, master_pid)
        self.spool = config.queue.spool_dir
        self.hostname = config.hostname
        self.max_size = config.limits.message_size
        self.max_recipients = config.limits.recipients
        self.queue = None
        self.plugins = None
        self.resolver = None
        self.wake_socket = None
        # Which recipients are ours: the smtpd's and the router's own answer.
        self.addressing = Addressing.from_config(config)
        # Expanded before queueing, as the smtpd does (elemta.addressing.virtual).
        self.virtual_aliases = VirtualAliases.from_config(config, self.addressing)
        self.rewriter = AddressRewriter.from_config(config, self.addressing)
        self.content_checks = ContentChecks(config.content)
        # Postfix's non_smtpd_milters: asked between the data and storage plugins.
        self.milters = configured(config, "non_smtp")
        self.milter_facts = facts_of(config)
        self._deferred = {}          # maildrop name -> time.monotonic() of the next try
        self._stuck = set()          # names of bad entries that could not be removed
        self._wake = Event()         # sendmail's datagram came, or a stop
        self._last_temp_sweep = 0.0

    # ---- the life cycle (elemta.util.child) ---------------------------------------------

    def boot(self):
        self.queue = Queue.from_config(self.config.queue)
        self.start_plugins()
        try:
            maildrop.prepare(self.spool)     # the master did it; this repairs a lost mode
        except OSError as exc:
            log.warning("cannot check the maildrop's permissions: %s", exc)
        path = maildrop.socket_path(self.spool)
        try:
            self.wake_socket = wakeup.bind_path(path, gsocket)
            os.chmod(path, 0o666)        # any user's sendmail may wake us
        except OSError as exc:
            raise BootError("cannot listen on %s: %s" % (path, exc.strerror or exc)) \
                from None
        self.own_socket_file(path)
        log.info("pickup started (maildrop %s)", maildrop.maildrop_dir(self.spool))

    def start_plugins(self):
        """The plugins of the stages pickup runs (data, storage, queue), after the fork.
        A plugin that cannot start is logged and answers 451 4.3.0 (elemta.plugins.manager):
        its messages wait in the maildrop, and pickup keeps running."""
        dns = self.config.dns
        self.resolver = Resolver(nameservers=list(dns.nameservers) or None, port=dns.port,
                                 timeout=dns.timeout)
        self.plugins = PluginManager(self.config.plugins.to_run(),
                                     stages=(DATA, STORAGE, QUEUE)).start()

    def serve(self):
        """Scan, then wait for sendmail's datagram or PICKUP_SCAN seconds; again."""
        listener = gevent.spawn(self._listen)
        try:
            while not self.stopping.is_set():
                # Cleared before the scan: a datagram that comes during it is kept, and
                # the next scan follows at once.
                self._wake.clear()
                self.scan()
                self._wake.wait(PICKUP_SCAN)
        finally:
            listener.kill()

    def on_stop(self):
        """SIGTERM, SIGQUIT: stop after the message in hand."""
        self._wake.set()

    def shut_down(self):
        if self.wake_socket is not None:
            self.wake_socket.close()
        self.plugins.close()
        self.queue.close()

    def _listen(self):
        """Many datagrams, one wake-up."""
        while True:
            self.wake_socket.recv(64)
            self._wake.set()

    # ---- the loop -----------------------------------------------------------------------

    def scan(self):
        """Queue everything waiting in the maildrop; returns how many were queued."""
        try:
            names = maildrop.iter_names(self.spool)
        except OSError as exc:
            log.error("cannot list the maildrop: %s", exc)
            return 0
        present = set(names)
        self._deferred = {n: t for n, t in self._deferred.items() if n in present}
        self._stuck &= present
        queued = 0
        for start in range(0, len(names), PICKUP_BATCH):
            if self.stopping.is_set():
                break
            queued += self._queue_batch(names[start:start + PICKUP_BATCH])
        self._sweep_temp_files()
        return queued

    def _queue_batch(self, names):
        directory = maildrop.maildrop_dir(self.spool)
        taken = []                   # (path, writer, uid, hold): hold a model.Hold or None
        now = time.monotonic()
        for name in names:
            if self.stopping.is_set():
                break                # what was taken is committed: stop after it
            # Each message is one piece of a batch that may be long (a maildrop of ten
            # thousand): beat, and let a signal or the master's absence be noticed.
            self.progress()
            if self._deferred.get(name, 0.0) > now or name in self._stuck:
                continue
            self._deferred.pop(name, None)
            path = os.path.join(directory, name)
            try:
                spooled = self._spool(path)
            except FileNotFoundError:
                continue
            except maildrop.BadSubmission as exc:
                self._remove_bad(name, path, exc)
                continue
            except Deferred as exc:
                log.info("maildrop: %s: %s; tried again in %ds", printable(name), exc,
                         PICKUP_RETRY)
                self._deferred[name] = now + PICKUP_RETRY
                continue
            except OSError as exc:
                # A full spool clears as a whole: try again at the next scan, not later.
                wait = PICKUP_SCAN if exc.errno in (errno.ENOSPC, errno.EDQUOT) \
                    else PICKUP_RETRY
                log.error("maildrop: %s: %s; tried again in %ds", printable(name), exc, wait)
                self._deferred[name] = now + wait
                continue
            if spooled is None:                 # discarded by a plugin (logged)
                _unlink(path)
                continue
            taken.append((path,) + spooled)
        if not taken:
            return 0
        try:
            # In a thread: a flush of many files takes a while, and the heartbeat goes on.
            in_thread(self.queue.commit, [writer for _, writer, _, _ in taken])
        except OSError as exc:
            log.error("queue commit of %d submission(s) failed: %s; they stay in the "
                      "maildrop", len(taken), exc)
            for _, writer, _, _ in taken:
                writer.abort()
            return 0
        for path, writer, uid, hold in taken:
            _unlink(path)
            envelope = writer.envelope
            sender = printable(envelope.sender)
            log.info("%s: uid=%d from=<%s>", writer.queue_id, uid, sender,
                     extra={"event": "received", "queue_id": writer.queue_id, "uid": uid,
                            "from": sender})
            log_queued(writer.queue_id, envelope.sender, writer.size, len(envelope.recipients),
                       ", priority=%d" % envelope.priority if envelope.priority else "")
            if hold is not None:
                log.info("%s: hold: %s", writer.queue_id, hold.reason,
                         extra={"event": "hold", "queue_id": writer.queue_id,
                                "reason": hold.reason})
        wakeup.notify(self.spool)
        for _, writer, _, _ in taken:
            notify_queued(self.plugins, self._context(writer.envelope))
        return len(taken)

    def _context(self, envelope):
        """What plugins know of a local submission: no client, ctx.local true."""
        recipients = [r.address for r in envelope.recipients]
        return Context(client_address="", client_name="localhost", hostname=self.hostname,
                       resolver=self.resolver, local=True, queue_id=envelope.queue_id,
                       sender=envelope.sender, recipients=recipients,
                       outbound=outbound(recipients, self.addressing.is_local))

    def _judge(self, envelope, content, above):
        """Run the data and storage plugins on the content. Returns (content, hold) with
        hold a Hold (its reason the log line) when the message is to be queued on hold;
        None when a plugin discarded it; raises Deferred when a plugin tempfailed it.
        above: [the header fields above the content], as the milters leave them."""
        ctx = self._context(envelope)
        verdict = run_content_stages(self.plugins, ctx, content,
                                     self._milter_filter(envelope, ctx, above))
        queue_id, who = envelope.queue_id, _who(verdict.decided_by, verdict.stage)
        if verdict.action == DISCARD:
            log.info("%s: discard: local mail from=<%s> nrcpt=%d: %s (%s)", queue_id,
                     envelope.sender, len(envelope.recipients),
                     verdict.reason or "discarded", who,
                     extra={"event": "discard", "queue_id": queue_id,
                            "from": envelope.sender, "nrcpt": len(envelope.recipients),
                            "reason": verdict.reason or "discarded",
                            "restriction": verdict.decided_by})
            return None
        if verdict.action == REJECT:
            # Nobody to refuse it to: keep it for the admin rather than lose it.
            return content, Hold(verdict.decided_by, "%d %s %s (%s); held for the admin"
                                 % (verdict.reply + (who,)), time.time())
        if verdict.reply is not None:
            raise Deferred("%d %s %s (%s)" % (verdict.reply + (who,)))
        if verdict.quarantine:
            return verdict.content, Hold(
                str(verdict.quarantined_by), "%s (%s)" % (
                    verdict.quarantine, _who(verdict.quarantined_by, verdict.quarantine_stage)),
                time.time())
        return verdict.content, None

    def _milter_filter(self, envelope, ctx, above):
        """The non_smtp milters over one submission, for run_content_stages: every
        stage from connect ("localhost") to the end of message, our Received header
        (above[0]) shown first; their envelope changes go into `envelope`, their edits
        of the Received header into above[0]."""
        if not self.milters:
            return None

        def milter_filter(content):
            chain = MilterChain(self.milters, ctx, dict(
                self.milter_facts, queue_id=envelope.queue_id,
                mailer=lambda address: "local" if self.addressing.is_local(address)
                else "smtp"), local=True)
            told = [r.address for r in envelope.recipients]
            outcome = chain.local_message(envelope.sender, told, content, above[0])
            above[0] = outcome.prefix
            return content_verdict(outcome, envelope, ContentVerdict, told,
                                   expand=self._added_by_milter)
        return milter_filter

    def _added_by_milter(self, address):
        """The queue addresses for a recipient a non_smtp milter adds: canonical maps,
        virtual aliases and the normal form, as sendmail's own recipients get
        (content_verdict's expand); [] for one refused for good (logged)."""
        try:
            if self.rewriter is not None:
                address = self.rewriter.recipient(address)
            probe = SimpleNamespace(recipients=[Recipient(address)], smtputf8=True)
            refused = self._expand(probe)
        except TableUnavailable as error:
            raise RecipientLookupError((451, "4.3.0", "canonical map lookup failed: %s"
                                        % error))
        except (RewriteError, Deferred) as error:
            raise RecipientLookupError((451, "4.3.0", str(error)))
        if refused is not None:
            log.warning("recipient <%s> added by a milter refused: %s", printable(address),
                        refused)
            return []
        return [r.address for r in probe.recipients]

    def _spool(self, path):
        """One maildrop file written to a finished queue SpoolWriter: (writer, uid, hold)
        with hold a Hold when it is to be queued on hold, or None when a plugin
        discarded it; raises Deferred when a plugin tempfailed it."""
        submission = maildrop.read_submission(path)
        try:
            if submission.content_length > self.max_size:
                raise maildrop.BadSubmission("%s: %d bytes, more than limits.message_size"
                                             % (path, submission.content_length))
            queue_id = new_queue_id()
            envelope = submission.queue_envelope(queue_id, time.time(), self.max_recipients)
            # Bounded by limits.message_size (checked above).
            content = self._rewrite(envelope, b"".join(submission.iter_content()))
            unexpandable = self._expand(envelope)
            checked = self._check(envelope, content)
            if checked is None:
                return None
            content, hold = checked
            if unexpandable is not None:
                hold = Hold("virtual_alias_maps", unexpandable, time.time())
            # Our Received header, in a list the milters may edit it in (they see it
            # first, as Postfix's non_smtpd_milters see Postfix's).
            above = [received_header(submission.uid, self.hostname, queue_id,
                                     [r.address for r in envelope.recipients])]
            if wants_content(self.plugins) or self.milters:
                judged = self._judge(envelope, content, above)
                if judged is None:
                    return None
                content, judged_hold = judged
                hold = hold or judged_hold
            blocks = [content]
            writer = self.queue.start_message(envelope, SENDMAIL_LISTENER)
            try:
                writer.write(above[0])
                for block in blocks:
                    writer.write(block)
                writer.hold = hold
                writer.finish()
            except BaseException:
                writer.abort()
                raise
            envelope.size = writer.size
            return writer, submission.uid, hold
        finally:
            submission.close()

    def _check(self, envelope, content):
        """The header and body checks (and hop count) of a submission: (content as
        edited, Hold or None), or None when DISCARDed (logged); raises
        Deferred when a table cannot answer. A REDIRECT replaces envelope's
        recipients."""
        checks = self.content_checks.start(envelope.queue_id, "from local; from=<%s> to=<%s>"
                                           % (envelope.sender,
                                              envelope.recipients[0].address
                                              if envelope.recipients else ""))
        edited = checks.feed(content) + checks.finish()
        refusal = checks.refusal
        if refusal is not None:         # held as it came (what was written stopped)
            if refusal.reply.code < 500:
                raise Deferred("%s (restriction %s)" % (refusal.reply, refusal.restriction))
            return content, Hold(refusal.restriction, "%s (restriction %s); held for the "
                                 "admin" % (refusal.reply, refusal.restriction), time.time())
        if checks.discard is not None:
            return None
        if checks.redirect is not None:
            envelope.recipients = [Recipient(checks.redirect)]
        return edited, (Hold(checks.hold, checks.hold_reason, time.time()) if checks.hold
                        else None)

    def _rewrite(self, envelope, content):
        """Bare names in the address headers qualified with the mail name, canonical
        maps and masquerading on the envelope and those headers, before the virtual
        aliases and the plugins (a DKIM signature covers the rewritten headers): the
        content rewritten; raises Deferred."""
        rewriter = self.rewriter
        if rewriter is None:
            return rewrite_headers(content, None, self.addressing.qualify)
        try:
            envelope.sender = rewriter.sender(envelope.sender)
            recipients = []
            for recipient in envelope.recipients:
                target = rewriter.recipient(recipient.address)
                if target != recipient.address:
                    recipient = Recipient(target, recipient.notify, recipient.orcpt or
                                          original_recipient(recipient.address))
                recipients.append(recipient)
            envelope.recipients = recipients
            return rewrite_headers(content, rewriter, self.addressing.qualify)
        except TableUnavailable as error:
            raise Deferred("canonical map lookup failed: %s" % error)
        except RewriteError as error:
            raise Deferred("4.3.0 %s" % error)

    def _expand(self, envelope):
        """envelope's recipients with their virtual aliases expanded, each address
        once, a virtual mailbox or relay recipient in its normal form (as the smtpd
        queues them, elemta.addressing.resolve.queued_address). An address that needs
        SMTPUTF8 gets it for the message (Postfix's smtputf8_autodetect_classes has
        sendmail). Returns None, or the hold log line for an error retrying cannot
        mend (an alias result too long): nobody is there to refuse it to, so the
        message waits on hold, unexpanded, for the admin. Raises Deferred."""
        def targets_of(address):
            if self.virtual_aliases is not None:
                targets = self.virtual_aliases.expand(address)
                if targets is not None:
                    return targets
            queued = queued_address(address, self.addressing.classify(address))
            return [queued] if queued != address else None
        try:
            envelope.recipients = expanded_recipients(envelope.recipients, targets_of)
        except TableUnavailable as error:
            raise Deferred("virtual alias or domain lookup failed: %s" % error)
        except AliasExpansionError as error:
            if error.permanent:
                return "%s %s Alias expansion error: %s; held for the admin" % (
                    error.code, error.status, error)
            raise Deferred("4.6.0 Alias expansion error: %s" % error)
        if not all(r.address.isascii() for r in envelope.recipients):
            envelope.smtputf8 = True
        return None

    def _remove_bad(self, name, path, reason):
        """One log line for a bad submission, and it is gone. One that cannot be removed
        (a user's directory with files in it) is named once and then left alone, so
        every scan does not log it again."""
        problem = _remove(path)
        if problem is None:
            log.warning("maildrop: removing a bad submission: %s", printable(str(reason)))
            return
        log.error("maildrop: a bad submission: %s; cannot remove it (%s): ignored until "
                  "it is removed by hand", printable(str(reason)), problem)
        self._stuck.add(name)

    def _sweep_temp_files(self):
        now = time.time()
        if now - self._last_temp_sweep < 3600:
            return
        self._last_temp_sweep = now
        try:
            hidden = maildrop.iter_hidden(self.spool)
        except OSError:
            return
        for path in hidden:
            try:
                if now - os.lstat(path).st_mtime <= STALE_TEMP:
                    continue
            except OSError:
                continue
            if _remove(path) is None:
                log.warning("maildrop: removed %s, a day old: left by a sendmail that died, "
                            "or not sendmail's", printable(path))


def _unlink(path):
    problem = _remove(path)
    if problem is not None:
        log.error("maildrop: cannot remove %s: %s", printable(path), problem)


def _remove(path):
    """Remove a maildrop entry, an empty directory too (any user may make one in the
    1733 maildrop); None when it is gone, else why not."""
    try:
        os.unlink(path)
        return None
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        pass
    except OSError as exc:
        return exc.strerror or str(exc)
    try:
        os.rmdir(path)
        return None
    except FileNotFoundError:
        return None
    except OSError as exc:
        return exc.strerror or str(exc)


def run_pickup(config, slot, scoreboard, master_pid):
    """The main of the pickup child (its entry in elemta.services)."""
    return PickupWorker(config, slot, scoreboard, master_pid).run()


def _who(decided_by, stage):
    """Who decided, for the log: "milter NAME" as it is, else "plugin NAME at S stage"."""
    if str(decided_by).startswith("milter"):
        return decided_by
    return "plugin %s at %s stage" % (decided_by, stage)
