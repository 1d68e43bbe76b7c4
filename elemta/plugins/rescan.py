"""Scanning a held message again: `elemtactl queue release --rescan` and the REST API's
release with ?rescan=true.

Owned by whichever process the admin asks (elemtactl's own process, the api process).
A release alone sends a held message on as it is: it was scanned when it came in, and
delivery runs no content plugin. A rescan asks the content scanners again first, because
their signatures may have changed since or the hold may have been a scanner's mistake:
the enabled plugins with Plugin.scans_content (clamav, rspamd), then the configured
milters that ran for the message when it came in (its `smtp` milters, or `non_smtp`
ones for mail from sendmail), as the data stage and the milters ran then. The first
that would not let the message pass decides:

    nothing found           released, due now, the reason forgotten
    quarantine              stays on hold, held by that scanner ("clamav", "milter NAME")
                            for its new reason
    reject or discard       stays on hold, held by that scanner for "would reject: 554
                            5.7.1 ..." (the message was accepted: refusing it now would
                            bounce it, and a queue never drops mail silently)
    tempfail or a failure   stays on hold as it was; the outcome says why (a scanner or
                            milter down or timed out, whatever its default_action says,
                            Rspamd's greylist or soft reject, a milter's tempfail), so the
                            admin can try again

Header edits a scanner or milter asks for (Rspamd's X-Spam headers, a DKIM signature, a
replaced body) are not made: the content is queued and stays byte for byte as it is. The
scanners see the content as stored, our Received header included, and the envelope as
queued; the session is rebuilt from it for the plugins' context and the milters'
conversation and macros (client address and HELO, authenticated user, queue id, sender
and MAIL parameters, recipients; the client's name, port and TLS were not stored, so
the milters see the client as "[address]" and no TLS macros). Only held messages are
rescanned; the scan runs in this process, through gevent sockets under each plugin's and
milter's timeouts, one message at a time.
See also: elemta.queue.queue (release, rehold), elemta.plugins.api (scans_content),
elemta.milter.chain (local_message), man/elemtactl.8 (queue release).
"""

import time
from typing import Iterable, Iterator, Optional, Tuple

from elemta.milter import chain as milter_chain
from elemta.plugins.api import DATA, DISCARD, REJECT, TEMPFAIL, Context, Message
from elemta.plugins.manager import PluginManager
from elemta.queue.model import HOLD, Hold
from elemta.queue.queue import (NO_SUCH_MESSAGE, NOT_HELD, RELEASED, RESCANNED_CLEAN,
                                NoSuchMessage)
from elemta.queue.store import CorruptSpoolFile

LEFT_ON_HOLD = "rescan failed: left on hold as it was"   # + ": why"
NO_SCANNERS = ("no content scanner is enabled (plugins with scans_content: clamav, "
               "rspamd) and no milter runs for this message")


class Rescanner:
    """The enabled content scanners and milters of a configuration, ready to judge held
    messages.

        with Rescanner.of(config) as rescanner:
            for queue_id, outcome in rescanner.rescan(queue, ids): ...

    milters: {"smtp": [MilterSettings], "non_smtp": [...]} (elemta.milter.chain
    configured), facts: the milters' fixed macro facts (chain.facts_of)."""

    def __init__(self, configured, hostname="localhost", known=None, milters=None,
                 facts=None):
        self.manager = PluginManager(configured, known=known, stages=(DATA,),
                                     scanners_only=True)
        self.hostname = hostname
        self.milters = dict(milters or {})
        self.facts = dict(facts or {})

    @classmethod
    def of(cls, config):
        """The Rescanner of a loaded elemta.config Config."""
        milters = {kind: milter_chain.configured(config, kind)
                   for kind in ("smtp", "non_smtp")}
        return cls(config.plugins.to_run(), config.hostname, milters=milters,
                   facts=milter_chain.facts_of(config))

    @property
    def names(self):
        return self.manager.names

    def __enter__(self):
        self.manager.start()
        return self

    def __exit__(self, *exc):
        self.manager.close()

    def milters_for(self, record):
        """The milters that ran for this message when it came in: the smtp ones for mail
        from an SMTP client, the non_smtp ones for mail from sendmail."""
        local = not record.envelope.client_address
        return self.milters.get("non_smtp" if local else "smtp", [])

    def judge(self, record, content: bytes) -> Tuple[Optional[Hold], Optional[str]]:
        """(a Hold when the message is to stay held, or None when clean; why the scan
        could not decide, or None)."""
        envelope = record.envelope
        recipients = [r.address for r in envelope.recipients]
        ctx = Context(client_address=envelope.client_address, helo=envelope.client_helo,
                      auth_user=envelope.auth_user, local=not envelope.client_address,
                      hostname=self.hostname, queue_id=record.queue_id,
                      sender=envelope.sender, recipients=recipients,
                      message=Message(content))
        if self.manager.names:
            hold, problem = self._plugins_judge(ctx)
            if hold is not None or problem is not None:
                return hold, problem
        milters = self.milters_for(record)
        if milters:
            ctx.message = None
            return self._milters_judge(milters, ctx, record, content)
        return None, None

    def _plugins_judge(self, ctx):
        outcome = self.manager.run(DATA, ctx)
        now = time.time()
        if outcome.action == TEMPFAIL:
            return None, "%s %s %s (plugin %s)" % (outcome.reply + (outcome.decided_by,))
        if outcome.action == REJECT:
            return Hold(outcome.decided_by, "would reject: %d %s %s" % outcome.reply,
                        now), None
        if outcome.discard:
            return Hold(outcome.decided_by, "would discard: %s" % (
                outcome.reason or "discarded"), now), None
        if outcome.quarantine:
            return Hold(outcome.quarantined_by, outcome.quarantine, now), None
        return None, None

    def _milters_judge(self, milters, ctx, record, content):
        """The milters' conversation for the stored message, from connect to the end of
        message and QUIT, as elemta.milter.chain holds it for pickup; their verdict by
        the table of the module docstring. A milter that failed leaves the message as
        it was whatever its default_action: a rescan judges, it does not guess."""
        envelope = record.envelope
        facts = dict(self.facts, queue_id=record.queue_id)
        chain = milter_chain.MilterChain(milters, ctx, facts,
                                         local=not envelope.client_address)
        outcome = chain.local_message(envelope.sender,
                                      [r.address for r in envelope.recipients], content,
                                      args=milter_chain.mail_args(envelope))
        if chain.failures:
            return None, "; ".join(chain.failures)
        verdict, now = outcome.verdict, time.time()
        who = "milter %s" % verdict.milter
        if verdict.action == TEMPFAIL:
            return None, "%d %s %s (%s)" % (verdict.reply + (who,))
        if verdict.action == REJECT:
            return Hold(who, "would reject: %d %s %s" % verdict.reply, now), None
        if verdict.action == DISCARD:
            return Hold(who, "would discard: %s" % (verdict.reason or "discarded"),
                        now), None
        if outcome.quarantine is not None:
            reason, milter = outcome.quarantine
            return Hold("milter %s" % milter, reason, now), None
        return None, None

    def rescan(self, queue, queue_ids: Iterable[str]) -> Iterator[Tuple[str, str]]:
        """Rescan each held message and release it or keep it held (see the module
        docstring). queue: an elemta.queue.queue.Queue. Yields (queue_id, outcome)."""
        for queue_id in queue_ids:
            record = queue.get(queue_id)
            if record is None:
                yield queue_id, NO_SUCH_MESSAGE
                continue
            if record.state != HOLD:
                yield queue_id, NOT_HELD
                continue
            if not (self.manager.names or self.milters_for(record)):
                yield queue_id, "%s: %s" % (LEFT_ON_HOLD, NO_SCANNERS)
                continue
            try:
                record, content = queue.open_message(queue_id)
                with content:
                    data = content.read()      # bounded by limits.message_size at entry
            except NoSuchMessage:
                yield queue_id, NO_SUCH_MESSAGE
                continue
            except (CorruptSpoolFile, OSError) as error:
                yield queue_id, "%s: %s" % (LEFT_ON_HOLD, error)
                continue
            hold, problem = self.judge(record, data)
            if problem is not None:
                yield queue_id, "%s: %s" % (LEFT_ON_HOLD, problem)
            elif hold is None:
                for _, outcome in queue.release([queue_id]):
                    yield queue_id, RESCANNED_CLEAN if outcome == RELEASED else outcome
            else:
                yield from queue.rehold([queue_id], hold)
