"""The content stages over one message (data, then storage) and the queue notification:
the same code for every way mail enters the queue.

Called by the smtpd session at the end of DATA/BDAT and by pickup for each message from
sendmail (ctx.local true, no client), so mail from both passes the same plugins: an
authenticated client's message and a cron job's are DKIM-signed alike. The order:

    data      checks and verdicts on the content as received; its header edits are applied
    (filters) the caller's content filters, the milters (elemta.milter), as Postfix runs
              them after its own restrictions: their edits are applied
    storage   on the content as it will be written to the spool (signing and sealing);
              its header edits are applied
    (the caller writes the content after its Received header and commits it)
    queue     notification that the message is queued; verdicts are logged and ignored

A reject, tempfail or discard at data ends it there (storage does not run). A quarantine
at either stage is remembered and the message is queued on hold. The caller turns the
verdict into its answer: the smtpd replies to the client; pickup, which has nobody to
answer, holds a rejected message for the admin and leaves a tempfailed one in the maildrop.
See also: elemta.plugins.api (the stages), elemta.smtpd.session, elemta.pickup.worker.
"""

import logging
from dataclasses import dataclass
from typing import Optional, Tuple

from elemta.plugins.api import CONTINUE, DATA, DISCARD, QUEUE, STORAGE, Message
from elemta.plugins.manager import apply_header_edits

log = logging.getLogger("elemta.plugins")

# Between the data and storage stages: the caller's content filters (the milters).
FILTERS = "filters"


@dataclass
class ContentVerdict:
    """What the data and storage stages made of one message.

    action: CONTINUE (queue `content`), REJECT, TEMPFAIL or DISCARD.
    stage / decided_by / reply / reason: who refused or discarded it, and how.
    quarantine / quarantined_by / quarantine_stage: set when the message is to be queued
    on hold (the reason, the plugin, the stage).
    """
    action: str
    content: bytes
    stage: Optional[str] = None
    decided_by: Optional[str] = None
    reply: Optional[Tuple[int, str, str]] = None
    reason: str = ""
    quarantine: Optional[str] = None
    quarantined_by: Optional[str] = None
    quarantine_stage: Optional[str] = None


def wants_content(plugins):
    """True when some plugin reads the content (so the caller must keep it in memory)."""
    return plugins.wants(DATA) or plugins.wants(STORAGE)


def outbound(recipients, is_local):
    """True when some recipient's mail leaves this server (is_local(address) false)."""
    return any(not is_local(address) for address in recipients)


def run_content_stages(plugins, ctx, content, filters=None):
    # type: (object, object, bytes, object) -> ContentVerdict
    """Run data then storage over `content` (the message without our Received header).

    ctx must carry the connection facts and the envelope (queue_id, sender, recipients,
    outbound); ctx.message is set here. filters, when given, is called between the two
    stages with the content as the data stage left it and gives a ContentVerdict of its
    own (the milters: elemta.milter, through the smtpd and pickup), whose content the
    storage stage then sees. Never raises for a plugin's sake."""
    verdict = ContentVerdict(CONTINUE, content)
    for stage in (DATA, FILTERS, STORAGE):
        if stage == FILTERS:
            if filters is not None and not _merged(verdict, filters(verdict.content)):
                return verdict
            continue
        if not plugins.wants(stage):
            continue
        ctx.recipient = None
        ctx.message = Message(verdict.content)
        outcome = plugins.run(stage, ctx)
        if outcome.quarantine and verdict.quarantine is None:
            verdict.quarantine = outcome.quarantine
            verdict.quarantined_by = outcome.quarantined_by
            verdict.quarantine_stage = stage
        if outcome.refused or outcome.discard:
            verdict.action = DISCARD if outcome.discard else outcome.action
            verdict.stage, verdict.decided_by = stage, outcome.decided_by
            verdict.reply, verdict.reason = outcome.reply, outcome.reason
            return verdict
        if outcome.headers or outcome.remove:
            verdict.content = apply_header_edits(verdict.content, outcome.headers,
                                                 outcome.remove)
    return verdict


def _merged(verdict, filtered):
    """Take the filters' ContentVerdict into verdict; False when it ends the message
    (refused or discarded)."""
    if filtered.quarantine and verdict.quarantine is None:
        verdict.quarantine = filtered.quarantine
        verdict.quarantined_by = filtered.quarantined_by
        verdict.quarantine_stage = filtered.quarantine_stage
    if filtered.action != CONTINUE:
        verdict.action, verdict.stage = filtered.action, filtered.stage
        verdict.decided_by, verdict.reply = filtered.decided_by, filtered.reply
        verdict.reason = filtered.reason
        return False
    verdict.content = filtered.content
    return True


def notify_queued(plugins, ctx):
    """The queue stage for a message just committed (ctx.queue_id, sender, recipients).
    Notification only: a verdict other than continue is logged and ignored."""
    if not plugins.wants(QUEUE):
        return
    ctx.message = None
    outcome = plugins.run(QUEUE, ctx)
    if outcome.action != CONTINUE or outcome.quarantine:
        log.warning("%s: plugin %s answered %s at the queue stage: ignored (the message "
                    "is already queued; the queue stage is a notification)", ctx.queue_id,
                    outcome.decided_by or outcome.quarantined_by,
                    "quarantine" if outcome.action == CONTINUE else outcome.action)
