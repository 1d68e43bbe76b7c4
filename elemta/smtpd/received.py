"""The Received: trace header Elemta prepends to every message it accepts (RFC 5321 4.4).

Owned by the smtpd worker. The protocol keyword follows RFC 3848 and RFC 6531:
SMTP, ESMTP, then S for TLS and A for AUTH (ESMTPSA), UTF8SMTP... for SMTPUTF8.
"""

import email.utils
import re

_UNSAFE = re.compile(r"[^\x21-\x7e]")


def protocol_name(esmtp, tls, authenticated, smtputf8):
    if smtputf8:
        base = "UTF8SMTP"
    else:
        base = "ESMTP" if esmtp else "SMTP"
    if tls:
        base += "S"
    if authenticated:
        base += "A"
    return base


def received_header(helo, client_ip, hostname, protocol, queue_id, recipients,
                    tls_info=None, now=None):
    """The header as bytes, folded, ending in CRLF."""
    helo = _UNSAFE.sub("?", helo or "unknown")
    lines = ["Received: from %s ([%s])" % (helo, client_ip)]
    if tls_info:
        lines.append("\t(%s)" % tls_info)
    lines.append("\tby %s (Elemta) with %s id %s" % (hostname, protocol, queue_id))
    date = email.utils.formatdate(now, localtime=True)
    if len(recipients) == 1:
        # Naming the one recipient helps tracing; with several it would leak Bcc's.
        lines.append("\tfor <%s>; %s" % (recipients[0], date))
    else:
        lines[-1] += "; " + date
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")
