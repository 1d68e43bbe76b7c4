"""DNS block and allow lists of client addresses, weighed into one score at connect.

Owned by the smtpd worker (the `dnsbl` built-in, connection stage). As postscreen's
postscreen_dnsbl_sites: every list is asked at once when the client connects (IPv4
octets or IPv6 nibbles reversed, elemta.restrictions.dnslists), each list that answers
with an address its filter accepts adds its weight, and

    score >= threshold            -> 554 5.7.1 Service unavailable; client [ADDRESS]
                                     blocked using LIST (the listing list of greatest
                                     weight), in place of the 220 greeting
    score <= allowlist_threshold  -> (when that is negative) allowed: the later
                                     connection-stage checks are skipped
    otherwise                     -> no opinion

The score is left in ctx.session["dnsbl_score"] for the plugins of later stages.
A list that fails or times out counts as not listing, and is logged. Clients in
mynetworks are not checked (elemta.restrictions.scope); nor is anyone on a listener the
table's `listeners` leaves out. Log lines, as postscreen's "DNSBL rank":

    NOQUEUE: dnsbl: [192.0.2.1] score 4 (listed by zen.example, bl.example)
    WARNING: dnsbl: 1.2.0.192.bl.example: lookup failed (SERVFAIL); not counted

See also: elemta.restrictions.rhsbl (domain lists), tests/test_dnsbl.py.
"""

import logging

from elemta.plugins.api import Plugin, Result
from elemta.plugins.settings import DNSBLSettings
from elemta.restrictions.dnslists import DNSLists, client_query, score
from elemta.restrictions.dnssites import parse_site
from elemta.restrictions.scope import skip

log = logging.getLogger("elemta.restrictions.dnsbl")


class DNSBLPlugin(Plugin):
    name = "dnsbl"
    Settings = DNSBLSettings
    order = 4            # after the cheap checks that need no DNS
    default_timeout = 30.0

    def init(self, settings):
        self.settings = settings = settings or DNSBLSettings()
        self.sites = [parse_site(text) for text in settings.sites]
        self.lists = DNSLists(settings.min_ttl, settings.max_ttl)

    def on_connection(self, ctx):
        if not self.sites or skip(ctx, self.settings) or ctx.resolver is None:
            return None
        queries = [client_query(ctx.client_address, site) for site in self.sites]
        found = self.lists.ask(ctx.resolver, [q for q in queries if q],
                               self.settings.lookup_timeout)
        for query, why in found.failures.items():
            log.warning("dnsbl: %s: lookup failed (%s); not counted", query, why)
        total, top = score(self.sites, queries, found)
        listing = [site.domain for site, query in zip(self.sites, queries)
                   if query and found.listed(site, query)]
        if listing:
            log.info("NOQUEUE: dnsbl: [%s] score %d (listed by %s)", ctx.client_address,
                     total, ", ".join(dict.fromkeys(listing)))
        ctx.session["dnsbl_score"] = total
        if top is not None and total >= self.settings.threshold:
            return Result.reject(554, "5.7.1", "Service unavailable; client [%s] blocked "
                                 "using %s" % (ctx.client_address, top.domain))
        if self.settings.allowlist_threshold < 0 and total <= \
                self.settings.allowlist_threshold:
            log.info("NOQUEUE: dnsbl: [%s] allowed: score %d", ctx.client_address, total)
            return Result.accept()
        return None
