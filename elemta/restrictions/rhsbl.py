"""DNS block lists of domains (RHSBL): the HELO name at HELO, the sender's domain at MAIL.

Owned by the smtpd worker (the `rhsbl` built-in, helo and mail stages). As Postfix's
reject_rhsbl_helo and reject_rhsbl_sender: the domain is asked of every list at once
(DOMAIN.LIST, elemta.restrictions.dnslists), each list that answers with an address its
filter accepts adds its weight (1 unless the entry says *N), and a score that reaches
`threshold` (1: any listing) is refused with Postfix's default_rbl_reply, the listing's
TXT record (if any) as the reason:

    554 5.7.1 Service unavailable; Helo command [NAME] blocked using LIST[; REASON]
    554 5.7.1 Service unavailable; Sender address [ADDRESS] blocked using LIST[; REASON]

Nothing is asked for the null sender, address literals, or names that end in digits. A
list that fails or times out counts as not listing, and is logged. Clients in
mynetworks and those that did AUTH are not checked (elemta.restrictions.scope).
See also: elemta.restrictions.dnsbl (client address lists), tests/test_dnsbl.py.
"""

import logging

from elemta.plugins.api import Plugin, Result
from elemta.plugins.resolver import TemporaryDNSError
from elemta.plugins.settings import RHSBLSettings
from elemta.restrictions.dnslists import DNSLists, domain_query, score
from elemta.restrictions.dnssites import parse_site
from elemta.restrictions.scope import skip

log = logging.getLogger("elemta.restrictions.rhsbl")

# Longest TXT reason quoted in a reply (Postfix: RBL_TXT_LIMIT, 500).
MAX_REASON = 500


class RHSBLPlugin(Plugin):
    name = "rhsbl"
    Settings = RHSBLSettings
    order = 6            # after the syntax and client checks, before SPF (10)
    default_timeout = 30.0

    def init(self, settings):
        self.settings = settings = settings or RHSBLSettings()
        self.sender_sites = [parse_site(text) for text in settings.sender_sites]
        self.helo_sites = [parse_site(text) for text in settings.helo_sites]
        self.lists = DNSLists(settings.min_ttl, settings.max_ttl)

    def stages(self):
        """helo and mail only when their lists are set: `elemtactl restrictions` then
        shows this plugin where it really checks something."""
        settings = getattr(self, "settings", None) or RHSBLSettings()
        return tuple(stage for stage in super().stages()
                     if stage not in ("helo", "mail")
                     or (settings.helo_sites if stage == "helo" else settings.sender_sites))

    def on_helo(self, ctx):
        return self._check(ctx, self.helo_sites, ctx.helo, "Helo command")

    def on_mail(self, ctx):
        return self._check(ctx, self.sender_sites, ctx.sender or "", "Sender address")

    def _check(self, ctx, sites, what, reply_class):
        if not sites or not what or skip(ctx, self.settings) or ctx.resolver is None:
            return None
        queries = [domain_query(what, site) for site in sites]
        if not any(queries):
            return None
        found = self.lists.ask(ctx.resolver, [q for q in queries if q],
                               self.settings.lookup_timeout)
        for query, why in found.failures.items():
            log.warning("rhsbl: %s: lookup failed (%s); not counted", query, why)
        total, top = score(sites, queries, found)
        if top is not None and total >= self.settings.threshold:
            reason = self._reason(ctx.resolver, queries[sites.index(top)])
            return Result.reject(554, "5.7.1", "Service unavailable; %s [%s] blocked "
                                 "using %s%s" % (reply_class, what, top.domain,
                                                 "; " + reason if reason else ""))
        return None

    @staticmethod
    def _reason(resolver, query):
        """The list's TXT record for the listing (Postfix's $rbl_reason), printable and
        at most MAX_REASON long; "" when there is none or it cannot be had."""
        try:
            texts = resolver.txt(query)
        except TemporaryDNSError:
            return ""
        reason = " / ".join(text.decode("utf-8", "replace") for text in texts)
        return "".join(ch if " " <= ch <= "~" else "?" for ch in reason)[:MAX_REASON]
