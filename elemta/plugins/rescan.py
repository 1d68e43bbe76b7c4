"""Scanning a held message again: `elemtactl queue release --rescan` and the REST API's
release with ?rescan=true.

Owned by whichever process the admin asks (elemtactl's own process, the api process).
A release alone sends a held message on as it is: it was scanned when it came in, and
delivery runs no content plugin. A rescan asks the content scanners again first (the
enabled plugins with Plugin.scans_content: clamav and rspamd; milters are not asked
again, so a message a milter held is released as it is), because their signatures may
have changed since or the hold may have been a scanner's mistake:

    nothing found           released, due now, the reason forgotten
    quarantine              stays on hold, held by that scanner for its new reason
    reject or discard       stays on hold, held by that scanner for "would reject: 554
                            5.7.1 ..." (the message was accepted: refusing it now would
                            bounce it, and a queue never drops mail silently)
    tempfail or a failure   stays on hold as it was; the outcome says why (a scanner
                            down, Rspamd's greylist or soft reject), so the admin can try
                            again

Header edits a scanner asks for (Rspamd's X-Spam headers, a rewritten Subject) are not
made: the content is queued and stays byte for byte as it is. The scanners see the
content as stored, our Received header included, and the envelope as queued; the data
stage's context is rebuilt from it (client address and HELO, authenticated user, queue
id, sender, recipients). Only held messages are rescanned; the scan runs in this process,
through gevent sockets under each plugin's timeout, one message at a time.
See also: elemta.queue.queue (release, rehold), elemta.plugins.api (scans_content),
man/elemtactl.8 (queue release).
"""

import time
from typing import Iterable, Iterator, Optional, Tuple

from elemta.plugins.api import DATA, REJECT, TEMPFAIL, Context, Message
from elemta.plugins.manager import PluginManager
from elemta.queue.model import HOLD, Hold
from elemta.queue.queue import (NO_SUCH_MESSAGE, NOT_HELD, RELEASED, RESCANNED_CLEAN,
                                NoSuchMessage)
from elemta.queue.store import CorruptSpoolFile

LEFT_ON_HOLD = "rescan failed: left on hold as it was"   # + ": why"
NO_SCANNERS = "no content scanner is enabled (plugins with scans_content: clamav, rspamd)"


class Rescanner:
    """The enabled content scanners of a configuration, ready to judge held messages.

        with Rescanner(config.plugins.to_run(), hostname) as rescanner:
            for queue_id, outcome in rescanner.rescan(queue, ids): ...
    """

    def __init__(self, configured, hostname="localhost", known=None):
        self.manager = PluginManager(configured, known=known, stages=(DATA,),
                                     scanners_only=True)
        self.hostname = hostname

    @property
    def names(self):
        return self.manager.names

    def __enter__(self):
        self.manager.start()
        return self

    def __exit__(self, *exc):
        self.manager.close()

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
            if not self.manager.names:
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
