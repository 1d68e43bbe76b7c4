"""The Received: trace header Elemta prepends to every message it accepts (RFC 5321 4.4).

Owned by the smtpd worker. The protocol keyword follows RFC 3848 and RFC 6531:
SMTP, ESMTP, then S for TLS and A for AUTH (ESMTPSA), UTF8SMTP... for SMTPUTF8.
With smtpd.sasl_authenticated_header the AUTH login name follows the TLS comment as
"(Authenticated sender: LOGIN)", Postfix's words. A login name comes from the client
(credentials file) or from Dovecot's user= (checked by elemta.smtpd.dovecot_auth), so it
is written as a comment can hold it whatever it holds: printable ASCII only (anything
else becomes "?"), and "(", ")" and "\\" as quoted pairs, so it can neither end the
comment nor the header.
"""

import email.utils
import re
import time

_UNSAFE = re.compile(r"[^\x21-\x7e]")
_COMMENT_SPECIALS = re.compile(r"([()\\])")
# (second, its RFC 5322 date in local time): formatdate once a second, not per message.
_last_date = (None, "")


def comment_text(text):
    """text made safe inside an RFC 5322 comment: printable ASCII, specials quoted."""
    return _COMMENT_SPECIALS.sub(r"\\\1", _UNSAFE.sub("?", text))


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


def _date(now):
    """email.utils.formatdate(now, localtime=True), whose text changes once a second."""
    global _last_date
    second, text = _last_date
    if int(now) != second:
        text = email.utils.formatdate(now, localtime=True)
        _last_date = (int(now), text)
    return text


def received_header(helo, client_ip, client_name, hostname, protocol, queue_id,
                    recipients, tls_info=None, auth_user=None, now=None):
    """The header as bytes, folded, ending in CRLF. client_name: the client's verified
    name (forward-confirmed reverse DNS, elemta.plugins.peername), written before its
    address as Postfix does, "from HELO (NAME [IP])", and "unknown" when there is none
    (not looked up, or not confirmed): "from HELO (unknown [IP])"."""
    helo = _UNSAFE.sub("?", helo or "unknown")
    name = _UNSAFE.sub("?", client_name or "unknown")
    lines = ["Received: from %s (%s [%s])" % (helo, name, client_ip)]
    if tls_info:
        lines.append("\t(%s)" % tls_info)
    if auth_user:
        lines.append("\t(Authenticated sender: %s)" % comment_text(auth_user))
    lines.append("\tby %s (Elemta) with %s id %s" % (hostname, protocol, queue_id))
    date = _date(time.time() if now is None else now)
    if len(recipients) == 1:
        # Naming the one recipient helps tracing; with several it would leak Bcc's.
        lines.append("\tfor <%s>; %s" % (recipients[0], date))
    else:
        lines[-1] += "; " + date
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")
