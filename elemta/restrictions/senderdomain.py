"""Refusal of a sender domain that cannot receive replies: reject_unknown_sender_domain.

Owned by the smtpd worker (the `unknown_sender_domain` built-in, mail stage). As Postfix:
the sender's domain must have an MX record, or else an A or AAAA record (RFC 5321 5.1's
implicit MX); bounces to it could not be delivered otherwise. Through the plugin
resolver (gevent). Postfix's replies:

    450 4.1.8 <ADDRESS>: Sender address rejected: Domain not found
        no such domain, or neither MX nor address records (reject_code, Postfix's
        unknown_address_reject_code, default 450; 550 gives 550 5.1.8); and, whatever
        reject_code, a DNS failure or timeout: ask again later
    550 5.7.27 <ADDRESS>: Sender address rejected: Domain DOMAIN does not accept mail
        (nullMX)   the domain publishes a null MX (RFC 7505)

The null sender and address literals pass. Clients in mynetworks and those that did
AUTH are not checked (elemta.restrictions.scope).
See also: tests/test_client_checks.py.
"""

import logging

from elemta.plugins.api import Plugin, Result
from elemta.plugins.resolver import TemporaryDNSError
from elemta.plugins.settings import SenderDomainSettings
from elemta.restrictions.replies import refuse
from elemta.restrictions.scope import skip

log = logging.getLogger("elemta.restrictions.senderdomain")

NOT_FOUND, FOUND, NULL_MX, UNAVAILABLE = "not found", "found", "null MX", "unavailable"


def domain_status(resolver, domain):
    """NOT_FOUND, FOUND, NULL_MX or UNAVAILABLE (a DNS failure), and why (for the log)."""
    try:
        mx = resolver.query(domain, "MX")
        if mx.records:
            exchanges = [r.exchange.to_text(omit_final_dot=True) for r in mx.records]
            if len(exchanges) == 1 and exchanges[0] in ("", "."):
                return NULL_MX, ""
            return FOUND, ""
        if mx.nxdomain:
            return NOT_FOUND, ""
        for rdtype in ("A", "AAAA"):
            if resolver.query(domain, rdtype).records:
                return FOUND, ""
    except TemporaryDNSError as error:
        return UNAVAILABLE, error.reason
    return NOT_FOUND, ""


class SenderDomainPlugin(Plugin):
    name = "unknown_sender_domain"
    Settings = SenderDomainSettings
    order = 7            # after the syntax checks and the domain lists

    def init(self, settings):
        self.settings = settings or SenderDomainSettings()

    def on_mail(self, ctx):
        sender = ctx.sender or ""
        domain = sender.rpartition("@")[2].rstrip(".")
        if not domain or domain.startswith("[") or ctx.resolver is None or skip(
                ctx, self.settings):
            return None
        try:
            ascii_domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            ascii_domain = domain
        status, why = domain_status(ctx.resolver, ascii_domain)
        if status == FOUND:
            return None
        if status == NULL_MX:
            return Result.reject(550, "5.7.27", "<%s>: Sender address rejected: Domain %s "
                                 "does not accept mail (nullMX)" % (sender, domain))
        text = "<%s>: Sender address rejected: Domain not found" % sender
        if status == UNAVAILABLE:
            log.warning("%s: MX or address lookup failed: %s", domain, why)
            return Result.tempfail(450, "4.1.8", text)
        return refuse(self.settings.reject_code, "1.8", text)
