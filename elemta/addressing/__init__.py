"""The addressing layer: which addresses are ours and where they go, one answer for every
process (Postfix keeps the same pieces in src/global: resolve_local.c, deliver_request.c).

Below the process packages: the smtpd, the delivery worker, pickup, the local agent and
the command-line tools (sendmail, sendmail -bv, newaliases) import it; it imports only
config, queue and the standard library, and no process owns it.

    normal          one spelling of an address: domain case, final dot, IDNA (U-labels
                    as A-labels), address literals, needless quotes around a local part;
                    the extension rule (user+ext, each delimiter character)
    resolve         Addressing: the address class (LOCAL, virtual ALIAS, VIRTUAL
                    mailbox, RELAY or REMOTE) by the domain lists; the extension rule;
                    bare names qualified
    recipients      "is this a known local recipient?" (passwd, aliases, postmaster and
                    root): the smtpd's 550 5.1.1 at RCPT and sendmail -bv alike
    hosted          "does this recipient exist?" for every class (virtual alias,
                    mailbox and relay recipient tables too)
    rewrite         canonical maps and masquerading (rewrite.*), before queueing and
                    before virtual alias expansion
    headers         the same rewriting on address headers (sendmail's mail)
    virtual         virtual alias expansion (virtual.alias_maps), before queueing
    aliases         the aliases file: parse (file:line errors), look up, re-read on change
    local_protocol  the JSON-lines requests and replies between delivery workers and the
                    local agent (spool/run/local.sock)

See also: elemta.local (the privileged agent that delivers), elemta.delivery.routing.
"""
