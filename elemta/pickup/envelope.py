"""The envelope of a maildrop submission, every field checked: pickup's door.

Owned by the pickup process (elemta.pickup.worker). sendmail runs as any local user, so
the JSON envelope of a maildrop file is untrusted input, as a client's MAIL and RCPT
are: the same rules apply (elemta.smtp.address for addresses, elemta.smtp.dsn for
NOTIFY, ORCPT and ENVID) and the same limit (limits.recipients, which smtpd enforces at
RCPT). Anything wrong - a field of the wrong type, an unknown NOTIFY word, an ORCPT or
ENVID with a control character, too many recipients - makes the whole submission bad:
BadSubmission names the field and why, pickup logs that once and removes the file.

The fields, as elemta.cli.sendmail (envelope_dict) writes them; others are ignored:

    sender      string: "" (the null sender) or a mailbox
    recipients  1..limits.recipients objects {"address": mailbox,
                "notify": null or list of words, "orcpt": null or "addr-type;address"}
    ret         null, "FULL" or "HDRS"
    envid       null or the decoded ENVID
    body        "7BIT" or "8BITMIME" (default "7BIT")
    smtputf8    true or false (default false); non-ASCII addresses need true

See also: elemta.queue.maildrop (the file format).
"""

from elemta.queue.maildrop import BadSubmission
from elemta.queue.model import Envelope, Recipient
from elemta.smtp.address import AddressError, validate_mailbox
from elemta.smtp.dsn import DsnError, check_envid, check_notify, check_orcpt

PROTOCOL = "local"


class _Bad(ValueError):
    """One field's problem; str() is the reason."""


def envelope_for(data, uid, queue_id, arrival, max_recipients):
    """The queue Envelope of a submission's envelope dict; raises BadSubmission."""
    try:
        return _envelope(data, uid, queue_id, arrival, max_recipients)
    except (_Bad, DsnError) as exc:
        raise BadSubmission("bad envelope: %s" % exc) from None


def _envelope(data, uid, queue_id, arrival, max_recipients):
    if not isinstance(data, dict):
        raise _Bad("not a JSON object")
    smtputf8 = data.get("smtputf8", False)
    if not isinstance(smtputf8, bool):
        raise _Bad("smtputf8 must be true or false, not %s" % _shown(smtputf8))
    sender = data.get("sender", "")
    if not isinstance(sender, str):
        raise _Bad("sender must be a string, not %s" % _shown(sender))
    if sender:
        _check_address(sender, smtputf8, "sender")
    items = data.get("recipients")
    if not isinstance(items, list) or not items:
        raise _Bad("recipients must be a non-empty list, not %s" % _shown(items))
    if len(items) > max_recipients:
        # The limit smtpd applies at RCPT (452 4.5.3): a local user gets no more.
        raise _Bad("%d recipients, more than limits.recipients (%d)"
                   % (len(items), max_recipients))
    recipients = [_recipient(item, position, smtputf8)
                  for position, item in enumerate(items)]
    ret = data.get("ret")
    if ret not in (None, "FULL", "HDRS"):
        raise _Bad("ret must be null, FULL or HDRS, not %s" % _shown(ret))
    envid = data.get("envid")
    if envid is not None:
        check_envid(envid)
    body = data.get("body", "7BIT")
    if body not in ("7BIT", "8BITMIME"):
        raise _Bad("body must be 7BIT or 8BITMIME, not %s" % _shown(body))
    return Envelope(queue_id=queue_id, sender=sender, recipients=recipients,
                    arrival=arrival, body=body, smtputf8=smtputf8, ret=ret, envid=envid,
                    client_address="", client_helo="", protocol=PROTOCOL,
                    extra={"uid": uid})


def _recipient(item, position, smtputf8):
    where = "recipient %d" % position
    if not isinstance(item, dict):
        raise _Bad("%s: not a JSON object: %s" % (where, _shown(item)))
    address = item.get("address")
    if not isinstance(address, str):
        raise _Bad("%s: address must be a string, not %s" % (where, _shown(address)))
    _check_address(address, smtputf8, where)
    notify, orcpt = item.get("notify"), item.get("orcpt")
    try:
        if notify is not None:
            notify = check_notify(notify)
        if orcpt is not None:
            check_orcpt(orcpt)
    except DsnError as exc:
        raise _Bad("%s: %s" % (where, exc)) from None
    return Recipient(address, notify or None, orcpt)


def _check_address(address, smtputf8, what):
    try:
        validate_mailbox(address, utf8=smtputf8)
    except AddressError as exc:
        raise _Bad("%s %s: %s" % (what, _shown(address), exc)) from None


def _shown(value):
    """A value for the log line: short, its control characters escaped (repr)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
