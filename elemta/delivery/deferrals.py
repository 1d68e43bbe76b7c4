"""Why a recipient's delivery was deferred, as one word from a fixed set: the reason label
of elemta_delivery_deferrals_total (elemta.conf(5) and the metrics section of elemta(8)
list them), so a dashboard shows what holds mail up without parsing reply texts.

Owned by the delivery worker. The SMTP client (elemta.delivery.smtp_client) names the
reason where it makes or reads the reply that ends a session or a recipient: its own
replies by what went wrong (connect, timeout, lost_connection, protocol, tls, auth), the
next hop's replies by the stage that got them (greeting, helo, mail, rcpt, data,
end_of_data). The SMTP transport adds dns and policy (MTA-STS, DANE, REQUIRETLS); the
worker adds lookup, local, plugin and internal. Anything else is other. Concurrency
limits make a delivery wait for a connection, never defer it, so they have no reason
here.
See also: elemta.delivery.worker (which counts them), elemta.metrics.
"""

DNS = "dns"                        # no MX or address record answer yet (SERVFAIL, timeout)
CONNECT = "connect"                # the connection refused or the host unreachable
TIMEOUT = "timeout"                # connecting or the conversation timed out
LOST_CONNECTION = "lost_connection"
PROTOCOL = "protocol"              # garbage, or a reply that does not fit the command
TLS = "tls"                        # STARTTLS not offered or refused, a failed handshake
POLICY = "policy"                  # MTA-STS, DANE or REQUIRETLS would not let it go
AUTH = "auth"                      # SMTP AUTH to the next hop failed or impossible
GREETING = "greeting"              # the next hop's 4xx (or 5xx) greeting
HELO = "helo"                      # its refusal of EHLO/HELO/LHLO
MAIL = "mail"                      # its 4xx to MAIL FROM
RCPT = "rcpt"                      # its 4xx to RCPT TO
DATA = "data"                      # its 4xx to DATA
END_OF_DATA = "end_of_data"        # its 4xx after the message was sent
LOOKUP = "lookup"                  # a table (domains, transport) could not answer
LOCAL = "local"                    # local delivery (the local agent, a mailbox) deferred
PLUGIN = "plugin"                  # a delivery-stage plugin said tempfail
INTERNAL = "internal"              # Elemta could not go on (a bounce not queued, ...)
OTHER = "other"

REASONS = (DNS, CONNECT, TIMEOUT, LOST_CONNECTION, PROTOCOL, TLS, POLICY, AUTH, GREETING,
           HELO, MAIL, RCPT, DATA, END_OF_DATA, LOOKUP, LOCAL, PLUGIN, INTERNAL, OTHER)

# What the SMTP client calls each command (its `what`), as a stage.
_STAGES = {"the initial server greeting": GREETING, "EHLO": HELO, "HELO": HELO,
           "LHLO": HELO, "STARTTLS": TLS, "AUTH": AUTH, "MAIL FROM": MAIL,
           "RCPT TO": RCPT, "DATA": DATA, "message content": END_OF_DATA}


def stage_of(what):
    """The reason for a next hop's reply to command `what` (smtp_client's name for it)."""
    if what.startswith("end of DATA"):          # LMTP's "end of DATA for <rcpt>" too
        return END_OF_DATA
    return _STAGES.get(what, OTHER)


def known(reason):
    """reason if it is one of REASONS, else OTHER: the label set stays bounded."""
    return reason if reason in REASONS else OTHER
