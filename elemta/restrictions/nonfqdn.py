"""Refusal of envelope addresses whose domain is not fully qualified: reject_non_fqdn_sender
and reject_non_fqdn_recipient.

Owned by the smtpd worker (the `non_fqdn` built-in, mail and rcpt stages). A domain
without a dot, or one that is not a valid host name (as Postfix's
reject_non_fqdn_address), gets Postfix's reply:

    504 5.5.2 <user@host>: Sender address rejected: need fully-qualified address
    504 5.5.2 <user@host>: Recipient address rejected: need fully-qualified address

The null sender and address literals (user@[192.0.2.1]) pass. Clients in mynetworks and
those that did AUTH are not checked (elemta.restrictions.scope): local programs often
send as user@host.
See also: tests/test_client_checks.py.
"""

from elemta.plugins.api import Plugin, Result
from elemta.plugins.peername import valid_hostname
from elemta.plugins.settings import NonFQDNSettings
from elemta.restrictions.scope import skip


def fully_qualified(address):
    """False when the address's domain is not a fully qualified domain name."""
    domain = address.rpartition("@")[2]
    if domain.startswith("[") and domain.endswith("]"):
        return True
    return "." in domain.rstrip(".") and (valid_hostname(domain) or not domain.isascii())


class NonFQDNPlugin(Plugin):
    name = "non_fqdn"
    Settings = NonFQDNSettings
    order = 2            # syntax only: early

    def init(self, settings):
        self.settings = settings or NonFQDNSettings()

    def on_mail(self, ctx):
        sender = ctx.sender or ""
        if not self.settings.reject_non_fqdn_sender or not sender or skip(
                ctx, self.settings) or fully_qualified(sender):
            return None
        return Result.reject(504, "5.5.2", "<%s>: Sender address rejected: need "
                             "fully-qualified address" % sender)

    def on_rcpt(self, ctx):
        recipient = ctx.recipient or ""
        if not self.settings.reject_non_fqdn_recipient or "@" not in recipient or skip(
                ctx, self.settings) or fully_qualified(recipient):
            return None
        return Result.reject(504, "5.5.2", "<%s>: Recipient address rejected: need "
                             "fully-qualified address" % recipient)
