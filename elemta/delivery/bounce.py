"""Bounces: RFC 3464 delivery status notifications for recipients that failed for good.

Owned by the delivery worker (`elemta: delivery`), which calls queue_bounce() after it has
recorded bounced recipients (5xx, null MX, queue lifetime over). The DSN is a new message
from the null sender <> to the original sender, queued like any other (so it is delivered,
retried and, if it bounces in turn, never bounced again: the worker sends no DSN for a
message from <>). Its parts (RFC 3462 multipart/report):

    text/plain               what happened, for a person
    message/delivery-status  Reporting-MTA, Arrival-Date, Original-Envelope-Id, and per
                             recipient Final-Recipient, Original-Recipient, Action: failed,
                             Status, Diagnostic-Code (the remote server's reply)
    text/rfc822-headers      the original headers, or message/rfc822, the whole original
                             message, when the sender asked RET=FULL

DSN NOTIFY is honoured (RFC 3461): a recipient with NOTIFY=NEVER, or a NOTIFY list without
FAILURE, gets no DSN. See also: elemta.delivery.worker, elemta.queue.queue.
"""

import email.utils
import re
import time

from elemta.queue.ids import new_queue_id
from elemta.queue.model import Envelope, Recipient

# Original headers copied into the DSN at most (a DSN must not be a way to amplify).
MAX_ORIGINAL_HEADERS = 64 * 1024
# The whole original message is returned with RET=FULL only up to this size.
MAX_RETURNED_MESSAGE = 1024 * 1024
_REPLY = re.compile(r"^(\d{3})(?: ([245]\.\d{1,3}\.\d{1,3}))?")


def wants_failure_notice(recipient):
    """RFC 3461 NOTIFY: no notify given means FAILURE and DELAY."""
    return recipient.notify is None or "FAILURE" in recipient.notify


def status_of(reply):
    """The RFC 3463 status code of a recorded reply ("550 5.1.1 ..." -> "5.1.1")."""
    match = _REPLY.match(reply or "")
    if match and match.group(2):
        return match.group(2)
    return "5.0.0"


def build_dsn(hostname, envelope, recipients, original, now=None):
    """The DSN's bytes (CRLF lines). recipients: the bounced model.Recipients; original:
    the original headers, or the whole message with RET=FULL (bytes)."""
    now = time.time() if now is None else now
    boundary = "%s/%s" % (envelope.queue_id, hostname)
    lines = [
        "From: Mail Delivery System <MAILER-DAEMON@%s>" % hostname,
        "To: <%s>" % envelope.sender,
        "Subject: Undelivered Mail Returned to Sender",
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
        "Your message could not be delivered to one or more recipients.",
        "",
    ]
    for recipient in recipients:
        lines.append("<%s>: %s" % (recipient.address, recipient.last_reply or "failed"))
    lines += ["", "--%s" % boundary,
              "Content-Description: Delivery report",
              "Content-Type: message/delivery-status",
              "",
              "Reporting-MTA: dns; %s" % hostname]
    if envelope.envid:
        lines.append("Original-Envelope-Id: %s" % envelope.envid)
    lines.append("Arrival-Date: %s" % email.utils.formatdate(envelope.arrival,
                                                             localtime=False))
    for recipient in recipients:
        lines.append("")
        lines.append("Final-Recipient: rfc822; %s" % recipient.address)
        if recipient.orcpt:
            lines.append("Original-Recipient: %s" % recipient.orcpt)
        lines += ["Action: failed",
                  "Status: %s" % status_of(recipient.last_reply),
                  "Diagnostic-Code: smtp; %s" % (recipient.last_reply or "failed")]
    full = envelope.ret == "FULL"
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


def read_original(store, envelope):
    """The original headers, or the whole message when RET=FULL and it is not too big."""
    full = envelope.ret == "FULL" and envelope.size <= MAX_RETURNED_MESSAGE
    with store.open_content(envelope.queue_id) as content:
        if full:
            return content.read()
        lines = []
        size = 0
        for line in content:
            if line in (b"\r\n", b"\n") or size > MAX_ORIGINAL_HEADERS:
                break
            lines.append(line)
            size += len(line)
        return b"".join(lines)


def queue_bounce(queue, config, envelope, bounced):
    """Queue a DSN to envelope.sender for the bounced recipients that asked for one.
    Returns its queue id, or None when none is due (null sender, NOTIFY). Blocking: one
    commit with its flush."""
    if not envelope.sender:
        return None
    recipients = [r for r in bounced if wants_failure_notice(r)]
    if not recipients:
        return None
    original = read_original(queue.store, envelope)
    hostname = config.hostname
    content = build_dsn(hostname, envelope, recipients, original)
    dsn = Envelope(queue_id=new_queue_id(), sender="",
                   recipients=[Recipient(envelope.sender)], arrival=time.time(),
                   body="7BIT" if envelope.body == "7BIT" and not envelope.smtputf8
                   else "8BITMIME",
                   smtputf8=envelope.smtputf8, client_address="", client_helo=hostname,
                   protocol="local")
    writer = queue.start_message(dsn)
    try:
        writer.write(content)
        writer.finish()
        queue.commit([writer])
    except BaseException:
        writer.abort()
        raise
    return dsn.queue_id
