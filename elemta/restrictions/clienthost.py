"""Checks of the client's name: reject_unknown_reverse_client_hostname and
reject_unknown_client_hostname.

Owned by the smtpd worker (the `client_hostname` built-in, rcpt stage: like Postfix with
its default smtpd_delay_reject = yes, the refusal comes at RCPT, so the log names the
sender and the recipient). The names were looked up at connect (ctx.client_lookup,
elemta.plugins.peername); with smtpd.peername_lookup off the plugin looks them up once
itself. Postfix's replies:

    450 4.7.1 Client host rejected: cannot find your reverse hostname, [ADDRESS]
        the address has no PTR name (reject_unknown_reverse)
    450 4.7.25 Client host rejected: cannot find your hostname, [ADDRESS]
        no PTR name, or none that resolves back to the address: no forward-confirmed
        reverse DNS (reject_unknown; 4.7.25 is RFC 7372's code for it)

reject_code (Postfix's unknown_client_reject_code) replaces 450 when the name is known to
be missing or wrong; a DNS failure or timeout always gives 450. Clients in mynetworks and
those that did AUTH are not checked (elemta.restrictions.scope).
See also: tests/test_client_checks.py.
"""

from elemta.plugins.api import Plugin
from elemta.plugins.peername import OK, PERM, look_up
from elemta.plugins.settings import ClientHostnameSettings
from elemta.restrictions.replies import refuse
from elemta.restrictions.scope import skip


class ClientHostnamePlugin(Plugin):
    name = "client_hostname"
    Settings = ClientHostnameSettings
    order = 3            # before greylisting (5): a refused client is not recorded

    def init(self, settings):
        self.settings = settings or ClientHostnameSettings()

    def on_rcpt(self, ctx):
        if skip(ctx, self.settings):
            return None
        found = ctx.client_lookup
        if found is None:
            found = ctx.session.get("client_hostname")
            if found is None and ctx.resolver is not None:
                found = ctx.session["client_hostname"] = look_up(ctx.resolver,
                                                                 ctx.client_address)
            if found is None:
                return None
        settings = self.settings
        if settings.reject_unknown_reverse and found.reverse_status != OK:
            code = settings.reject_code if found.reverse_status == PERM else 450
            return refuse(code, "7.1", "Client host rejected: cannot find your reverse "
                          "hostname, [%s]" % ctx.client_address)
        if settings.reject_unknown and found.name_status != OK:
            code = settings.reject_code if found.name_status == PERM else 450
            return refuse(code, "7.25", "Client host rejected: cannot find your "
                          "hostname, [%s]" % ctx.client_address)
        return None
