"""Delivery status notifications (RFC 3464): bounces, delay warnings, success notices.

Owned by the delivery worker (`elemta: delivery`), which calls, after it has recorded the
results they report:

    queue_bounce   recipients that failed for good (5xx, null MX, queue lifetime over);
    queue_delayed  once per message, recipients still waiting after
                   delivery.delay_warning_time (Postfix's delay_warning_time);
    queue_success  recipients delivered that asked NOTIFY=SUCCESS, when the next hop
                   cannot pass the request on (no DSN extension: "relayed") or the
                   delivery was final (local, LMTP: "delivered").

Each notice is a new message from the null sender <> to the original sender, queued like
any other. A message from <> never gets a notice back; when one bounces, its postmaster
gets a copy ("double bounce", as Postfix's notify_classes 2bounce), and a double bounce
that bounces is dropped. Its parts (RFC 3462 multipart/report):

    text/plain               what happened, for a person
    message/delivery-status  Reporting-MTA, Arrival-Date, Original-Envelope-Id, and per
                             recipient Final-Recipient, Original-Recipient, Action, Status,
                             Diagnostic-Code (the remote server's reply), Will-Retry-Until
    text/rfc822-headers      the original headers, or message/rfc822, the whole original
                             message, when the sender asked RET=FULL (failures only)

A notice about a message sent with REQUIRETLS (RFC 8689) returns its headers only, never
its body, and goes with REQUIRETLS itself where the next hop offers it.

DSN NOTIFY is honoured (RFC 3461): NOTIFY=NEVER gets nothing; otherwise a notice is sent
only for the kinds listed (no NOTIFY at all means FAILURE and DELAY).
See also: elemta.delivery.worker, elemta.queue.queue.
"""

import email.utils
import re
import time

from elemta.queue.ids import new_queue_id
from elemta.queue.model import Envelope, Recipient
from elemta.util.text import printable

# Original headers copied into the DSN at most (a DSN must not be a way to amplify).
MAX_ORIGINAL_HEADERS = 64 * 1024
# The whole original message is returned with RET=FULL only up to this size.
MAX_RETURNED_MESSAGE = 1024 * 1024
_REPLY = re.compile(r"^(\d{3})(?: ([245]\.\d{1,3}\.\d{1,3}))?")


# Notice kinds: the DSN Action, and what RFC 3461 NOTIFY word asks for it.
FAILED = "failed"
DELAYED = "delayed"
RELAYED = "relayed"          # delivered to a next hop that cannot pass the DSN request on
DELIVERED = "delivered"      # final delivery (mailbox, LMTP)
_NOTIFY_WORD = {FAILED: "FAILURE", DELAYED: "DELAY", RELAYED: "SUCCESS",
                DELIVERED: "SUCCESS"}
_WORDING = {
    FAILED: ("Undelivered Mail Returned to Sender",
             "Your message could not be delivered to one or more recipients."),
    DELAYED: ("Delayed Mail (still being retried)",
              "Your message could not be delivered yet to the recipients below. "
              "Delivery will be retried; you will be told if it fails for good."),
    RELAYED: ("Successful Mail Delivery Report",
              "Your message was delivered to the destinations below. Other systems "
              "further on may still report errors to you."),
    DELIVERED: ("Successful Mail Delivery Report",
                "Your message was delivered to the mailboxes below."),
}
# envelope.extra marker of a double bounce (a notice to postmaster about a notice).
DOUBLE_BOUNCE = "double_bounce"


def wants_notice(recipient, action):
    """RFC 3461 NOTIFY: no notify given means FAILURE and DELAY."""
    if recipient.notify is None:
        return action in (FAILED, DELAYED)
    return _NOTIFY_WORD[action] in recipient.notify


def wants_failure_notice(recipient):
    return wants_notice(recipient, FAILED)


def status_of(reply, action=FAILED):
    """The RFC 3463 status code of a recorded reply ("550 5.1.1 ..." -> "5.1.1"), or the
    generic one for the action when the reply has none."""
    match = _REPLY.match(reply or "")
    if match and match.group(2):
        return match.group(2)
    return {FAILED: "5.0.0", DELAYED: "4.0.0"}.get(action, "2.0.0")


def build_dsn(hostname, envelope, recipients, original, now=None, action=FAILED,
              retry_until=None, to=None, full=False, origin=None):
    """The DSN's bytes (CRLF lines). hostname names the reporting host; the From is
    MAILER-DAEMON at origin (the mail name, default hostname), as Postfix's cleanup
    qualifies it with $myorigin. recipients: the model.Recipients it reports on;
    original: the original headers, or with full the whole message (bytes); action:
    FAILED, DELAYED, RELAYED or DELIVERED; retry_until: time.time() of the last retry
    (DELAYED); to: who it goes to (default: the envelope sender). Envelope values and
    remote replies go in through printable(): none can end a header line or fake the
    MIME boundary, even from a queue file older than the checks at the door."""
    now = time.time() if now is None else now
    subject, summary = _WORDING[action]
    boundary = "%s/%s" % (envelope.queue_id, hostname)
    lines = [
        "From: Mail Delivery System <MAILER-DAEMON@%s>" % (origin or hostname),
        "To: <%s>" % printable(envelope.sender if to is None else to),
        "Subject: %s" % subject,
        "Date: %s" % email.utils.formatdate(now, localtime=False),
        "Message-ID: <%s.dsn@%s>" % (new_queue_id(), hostname),
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        "\tboundary=\"%s\"" % boundary,
        "",
        "This is a MIME-encapsulated message.",
        "",
        "--%s" % boundary,
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        "This is the mail system at host %s." % hostname,
        "",
        summary,
        "",
    ]
    for recipient in recipients:
        lines.append("<%s>: %s" % (printable(recipient.address),
                                   printable(recipient.last_reply or action)))
    lines += ["", "--%s" % boundary,
              "Content-Description: Delivery report",
              "Content-Type: message/delivery-status",
              "",
              "Reporting-MTA: dns; %s" % hostname]
    if envelope.envid:
        lines.append("Original-Envelope-Id: %s" % printable(envelope.envid))
    lines.append("Arrival-Date: %s" % email.utils.formatdate(envelope.arrival,
                                                             localtime=False))
    for recipient in recipients:
        lines.append("")
        lines.append("Final-Recipient: rfc822; %s" % printable(recipient.address))
        if recipient.orcpt:
            lines.append("Original-Recipient: %s" % printable(recipient.orcpt))
        lines += ["Action: %s" % action,
                  "Status: %s" % status_of(recipient.last_reply, action)]
        if recipient.last_reply:
            lines.append("Diagnostic-Code: smtp; %s" % printable(recipient.last_reply))
        if action == DELAYED and retry_until:
            lines.append("Will-Retry-Until: %s" % email.utils.formatdate(retry_until,
                                                                         localtime=False))
    lines += ["", "--%s" % boundary,
              "Content-Description: %s" % ("Undelivered Message" if full
                                           else "Undelivered Message Headers"),
              "Content-Type: %s" % ("message/rfc822" if full else "text/rfc822-headers"),
              "", ""]
    head = "\r\n".join(lines).encode("utf-8", "replace")
    original = original.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if not original.endswith(b"\r\n"):
        original += b"\r\n"
    return head + original + ("\r\n--%s--\r\n" % boundary).encode("ascii")


def read_original(store, envelope, action=FAILED):
    """(the original headers, False), or (the whole message, True) for a failure notice
    when the sender asked RET=FULL and the message is not too big (RFC 3461 4.3: the
    other notices carry the headers) nor sent with REQUIRETLS (whose body must not
    travel where it could not)."""
    full = (action == FAILED and envelope.ret == "FULL" and not envelope.requiretls
            and envelope.size <= MAX_RETURNED_MESSAGE)
    with store.open_content(envelope.queue_id) as content:
        if full:
            return content.read(), True
        lines = []
        size = 0
        for line in content:
            if line in (b"\r\n", b"\n") or size > MAX_ORIGINAL_HEADERS:
                break
            lines.append(line)
            size += len(line)
        return b"".join(lines), False


def queue_bounce(queue, config, envelope, bounced):
    """Queue a DSN to envelope.sender for the bounced recipients that asked for one, or,
    for a message from <>, a double bounce to postmaster. Returns its queue id, or None
    when none is due. Blocking: one commit with its flush."""
    if not envelope.sender:
        if envelope.extra.get(DOUBLE_BOUNCE):
            return None                       # never a notice about a double bounce
        return _queue_notice(queue, config, envelope, bounced, FAILED, to="postmaster",
                             extra={DOUBLE_BOUNCE: True})
    return queue_notice(queue, config, envelope, bounced, FAILED)


def queue_notice(queue, config, envelope, recipients, action, retry_until=None):
    """Queue a DSN of `action` to envelope.sender for those of `recipients` whose NOTIFY
    asks for it. Returns its queue id, or None when none is due (null sender, NOTIFY)."""
    if not envelope.sender:
        return None
    wanted = [r for r in recipients if wants_notice(r, action)]
    if not wanted:
        return None
    return _queue_notice(queue, config, envelope, wanted, action, retry_until=retry_until)


def _queue_notice(queue, config, envelope, recipients, action, to=None, retry_until=None,
                  extra=None):
    original, full = read_original(queue.store, envelope, action)
    hostname = config.hostname
    to = envelope.sender if to is None else to
    content = build_dsn(hostname, envelope, recipients, original, action=action,
                        retry_until=retry_until, to=to, full=full, origin=config.origin)
    dsn = Envelope(queue_id=new_queue_id(), sender="", recipients=[Recipient(to)],
                   arrival=time.time(),
                   body="7BIT" if envelope.body == "7BIT" and not envelope.smtputf8
                   else "8BITMIME",
                   smtputf8=envelope.smtputf8, requiretls=envelope.requiretls,
                   client_address="", client_helo=hostname,
                   protocol="local", extra=dict(extra or {}))
    return queue.add(dsn, [content])
