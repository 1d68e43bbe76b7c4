"""Address headers rewritten as the envelope is (elemta.addressing.rewrite): sender headers
(From, Sender, Reply-To, Resent-From...) as senders, recipient headers (To, Cc, Bcc,
Resent-To...) as recipients. Postfix's cleanup does this for mail from local clients
only (local_header_rewrite_clients = permit_inet_interfaces); so does Elemta: sendmail's
mail (pickup) and SMTP clients connecting from the address they connect to (this host),
before the plugins, so a DKIM signature covers the rewritten headers.

A bare name in those headers ("From: root (Cron Daemon)", as cron writes it) first gets
the mail name, as Postfix's append_at_myorigin does for local mail: root@ORIGIN, ORIGIN
being smtpd.origin, by default the first line of /etc/mailname.

Each address is replaced where it stands, nothing else in the header changes (display
names, comments, folding): inside its angle brackets when it has them, else where it
stands alone. A header that is not UTF-8 or holds no address is left as it is.
See also: elemta.pickup.worker (the caller).
"""

import email.utils
import re

from elemta.config.schema import HEADER_RECIPIENT, HEADER_SENDER
from elemta.smtp.address import AddressError, validate_mailbox

SENDER_HEADERS = frozenset(("from", "sender", "reply-to", "errors-to", "return-receipt-to",
                            "resent-from", "resent-sender", "resent-reply-to"))
RECIPIENT_HEADERS = frozenset(("to", "cc", "bcc", "apparently-to", "resent-to",
                               "resent-cc", "resent-bcc"))
_END_OF_HEADERS = re.compile(rb"\r?\n\r?\n")
_FIELD_START = re.compile(rb"^(?=[^ \t])", re.M)
# Characters an address can hold next to where it is cut out.
_BEFORE = r"(?<![\w.!#$%&'*+/=?^`{|}~@-])"
_AFTER = r"(?![\w.@-])"


def _no_change(address, where):
    return address


def rewrite_headers(content, rewriter=None, qualify=None):
    """content (bytes) with its address headers rewritten by rewriter (an
    AddressRewriter, or None) and bare names qualified by qualify(name) -> address (or
    None: left bare); raises what the rewriter raises (TableUnavailable,
    RewriteError)."""
    sender = rewriter.sender if rewriter is not None else _no_change
    recipient = rewriter.recipient if rewriter is not None else _no_change
    match = _END_OF_HEADERS.search(content)
    if match is None:
        head, rest = content, b""
    else:
        head, rest = content[:match.start()], content[match.start():]
    fields = [f for f in _FIELD_START.split(head) if f]
    changed = False
    for index, field in enumerate(fields):
        name = field.split(b":", 1)[0].strip().lower().decode("ascii", "replace")
        if name in SENDER_HEADERS:
            rewrite, where = sender, HEADER_SENDER
        elif name in RECIPIENT_HEADERS:
            rewrite, where = recipient, HEADER_RECIPIENT
        else:
            continue
        try:
            text = field.decode("utf-8")
        except UnicodeDecodeError:
            continue
        name_part, _, value = text.partition(":")
        unfolded = re.sub(r"\r?\n[ \t]", " ", value)
        new_value = value
        for _, address in email.utils.getaddresses([unfolded]):
            if not address or address.startswith("@"):
                continue
            target = address
            if "@" not in target:
                if qualify is None:
                    continue
                target = qualify(target)
                try:
                    validate_mailbox(target, utf8=True)
                except AddressError:
                    continue            # a phrase, not a name: left as written
            target = rewrite(target, where)
            if target != address:
                new_value = _replace(new_value, address, target)
        if new_value != value:
            fields[index] = (name_part + ":" + new_value).encode("utf-8")
            changed = True
    return b"".join(fields) + rest if changed else content


def _replace(value, address, target):
    """value with address replaced by target: within <> where it is so written, else
    each time it stands alone (not inside a longer address)."""
    bracketed = "<%s>" % address
    if bracketed in value:
        return value.replace(bracketed, "<%s>" % target)
    return re.sub(_BEFORE + re.escape(address) + _AFTER, lambda _m: target, value)
