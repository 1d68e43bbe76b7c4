"""What the sender asked of TLS (RFC 8689): REQUIRETLS, and the TLS-Required: No field.

Owned by the delivery worker (`elemta: delivery`); elemta.delivery.smtp_transport asks
these before it opens sessions for a message:

    requires_tls(envelope)   the message came with REQUIRETLS on MAIL FROM and has a
                             sender: every session for it must be TLS with the server's
                             certificate verified for the MX name (PKIX) or by the MX
                             host's TLSA records (DANE, RFC 7672), and the server must
                             offer REQUIRETLS after STARTTLS (4.2.1); routed by MX,
                             the MX answer must be DNSSEC-validated or the domain's
                             MTA-STS policy enforced (smtp_transport's untrusted_mx).
                             A notice from <>
                             only passes REQUIRETLS on where it can (4.2.1 asks the rest
                             of messages with a return path).
    RequireTLSSessions       opens those sessions: a host that fails any of it is left
                             (the message is never sent to it), the next MX host tried,
                             and when none will do the recipients bounce (4.2.1):
                             5.7.30 for a host that does not offer REQUIRETLS,
                             5.7.10 for TLS not had or not verified.
    waives_tls_policy(...)   the header section says "TLS-Required: No" (RFC 8689 3):
                             the sender asks that the recipient's TLS policies (MTA-STS)
                             be ignored; a message with REQUIRETLS ignores the field.

See also: elemta.delivery.smtp_client (REQUIRETLS on MAIL FROM, and its own last check),
tests/test_requiretls.py.
"""

import logging

from elemta.delivery import deferrals
from elemta.delivery.smtp_client import SessionError
from elemta.delivery.wire import local_reply

log = logging.getLogger("elemta.delivery")

# The header section is read this far at most for the TLS-Required field.
MAX_HEADER_BYTES = 256 * 1024
_FIELD = b"tls-required:"


def requires_tls(envelope):
    """True when every hop of envelope's message must meet REQUIRETLS (RFC 8689 4.2.1)."""
    return envelope.requiretls and bool(envelope.sender)


def waives_tls_policy(content):
    """True when the header section of content (a binary file object at its start) has
    a TLS-Required field whose value is No (RFC 8689 3; folding and case allowed)."""
    value, size = None, 0
    for line in iter(lambda: content.readline(8192), b""):
        size += len(line)
        if line in (b"\r\n", b"\n") or size > MAX_HEADER_BYTES:
            break
        if value is not None and line[:1] in (b" ", b"\t"):
            value += line           # the field folded onto this line
            continue
        if value is not None:
            break
        if line[:len(_FIELD)].lower() == _FIELD:
            value = line[len(_FIELD):]
    return value is not None and b"".join(value.split()).lower() == b"no"


class RequireTLSSessions:
    """Opens the sessions of one REQUIRETLS delivery (see the module docstring); connect
    has the signature of smtp_transport's connect hook. inner, when given, opens the
    session first (an MTA-STS delivery's connect)."""

    def __init__(self, queue_id, inner=None):
        self.queue_id = queue_id
        self.inner = inner

    def connect(self, client, address, port, name, new_client):
        try:
            if self.inner is None:
                client.connect(address, port, server_name=name)
            else:
                client = self.inner(client, address, port, name, new_client)
        except SessionError as error:
            # TLS not negotiated or not verified: 5.7.10 (RFC 8689 4.2.1).
            if not error.tls_failure:
                raise
            raise SessionError(local_reply(550, "5.7.10", "REQUIRETLS support required: "
                                           "%s" % error.reply.text), tls_failure=True,
                               tls_result=error.tls_result, reason=deferrals.POLICY)
        refusal = client.requiretls_refusal()
        if refusal is not None:
            client.quit()
            raise SessionError(refusal, reason=deferrals.POLICY)
        log.info("%s: REQUIRETLS: TLS with %s verified, REQUIRETLS offered (%s)",
                 self.queue_id, client.peer, client.tls_version)
        return client
