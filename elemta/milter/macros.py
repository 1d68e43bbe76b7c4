"""The macro values a milter may ask for, as Postfix fills them in.

Owned by no process (elemta.milter.client sends them). A macro is named as Postfix and
Sendmail write it: one letter bare (j, i, _, v), longer names in braces ({auth_authen});
a name may be configured either way, and is sent as configured. A macro with no value at
this point (no AUTH, no TLS) is left out, as Postfix leaves it out. Values come from the
plugin Context of the session (elemta.plugins.api.Context) plus the few facts it does not
hold (the queue id, the daemon name).

Postfix's default lists (milter_*_macros), which elemta.config.schema copies:
    connect  j {daemon_name} {daemon_addr} v _
    helo     {tls_version} {cipher} {cipher_bits} {cert_subject} {cert_issuer}
    mail     i {auth_type} {auth_authen} {auth_author} {mail_addr} {mail_host} {mail_mailer}
    rcpt     i {rcpt_addr} {rcpt_host} {rcpt_mailer}
    data, end of header, end of message: i
"""

from elemta.util.text import printable


def bare(name):
    """"{auth_authen}" -> "auth_authen"; "j" -> "j"."""
    return name[1:-1] if name.startswith("{") and name.endswith("}") else name


def _domain(address):
    return address.rpartition("@")[2] if address and "@" in address else ""


def value_of(name, ctx, facts):
    """The value of macro `name` for the session `ctx` (a plugin Context) and `facts`
    (a dict: queue_id, daemon_name, version, mailer(address) -> transport name), or None
    when it has none now."""
    key = bare(name)
    tls = ctx.tls and ctx.tls_protocol
    values = {
        "j": ctx.hostname,
        "_": "%s [%s]" % (ctx.client_name or "unknown", ctx.client_address or "127.0.0.1"),
        "v": facts.get("version"),
        "daemon_name": facts.get("daemon_name"),
        "daemon_addr": ctx.server_address or None,
        "daemon_port": str(ctx.server_port) if ctx.server_port else None,
        "client_addr": ctx.client_address or "127.0.0.1",
        "client_name": ctx.client_name or "unknown",
        "client_ptr": ctx.client_name or "unknown",
        "client_port": str(ctx.client_port) if ctx.client_port else None,
        "if_addr": ctx.server_address or None,
        "if_name": ctx.hostname,
        "i": facts.get("queue_id"),
        "tls_version": ctx.tls_protocol if tls else None,
        "cipher": ctx.tls_cipher if tls else None,
        "cipher_bits": str(ctx.tls_bits) if tls and ctx.tls_bits else None,
        # A node's hand-over login is no user's: a milter (OpenDKIM) must not sign for it.
        "auth_type": ctx.auth_method if ctx.auth_user and not ctx.handover else None,
        "auth_authen": ctx.auth_user if not ctx.handover else None,
        "mail_addr": ctx.sender if ctx.sender is not None else None,
        "mail_host": _domain(ctx.sender) or None,
        "mail_mailer": facts["mailer"](ctx.sender) if ctx.sender else None,
        "rcpt_addr": ctx.recipient,
        "rcpt_host": _domain(ctx.recipient) or None,
        "rcpt_mailer": facts["mailer"](ctx.recipient) if ctx.recipient else None,
    }
    value = values.get(key)
    if value is None:
        return None
    # Envelope data is checked by the protocol core already; this is the last guard
    # that no control character reaches a milter (which may write it into a header).
    return printable(str(value))


def values_for(names, ctx, facts):
    """[(name, value)] of the macros in `names` that have a value now."""
    pairs = []
    for name in names:
        value = value_of(name, ctx, facts)
        if value is not None:
            pairs.append((name, value))
    return pairs
