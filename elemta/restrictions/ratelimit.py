"""Client rate limits, as Postfix's anvil(8) applies them: the `ratelimit` built-in.

Owned by the smtpd worker (accept, mail and rcpt stages). Counts, per time unit
(time_unit, Postfix's anvil_rate_time_unit), the connections, MAIL FROM and RCPT TO
commands of each client address, and the MAIL FROM and RCPT TO commands of each AUTH
login and of each envelope sender (in the queue's normal form, elemta.addressing.normal),
and refuses what goes over a limit:

    connection   421 4.7.0 <host> Error: too many connections from ADDRESS  (closes)
    MAIL FROM    450 4.7.1 Error: too much mail from ADDRESS
    RCPT TO      450 4.7.1 Error: too many recipients from ADDRESS

the texts of Postfix's smtpd (the AUTH login and sender limits, which Postfix leaves to
policy services, say "from user LOGIN" and "from sender ADDRESS"). As in Postfix a
command is counted whether or not it is then accepted, refused ones included, and the
limit-th command in a window is the last one let through. An IPv6 client is counted by
its /64 (elemta.smtpd.clientnet says why); the reply names the address itself. A
client's commands are counted together on every listener (Postfix counts per master.cf
service): submission users behind one address share its allowance with its MX traffic.

Clients in mynetworks (exempt_mynetworks) and in `exceptions` are neither counted nor
limited (Postfix's smtpd_client_event_limit_exceptions, whose default is $mynetworks).

The counts live behind elemta.sharedstate's RateCounter: in LMDB, which every smtpd
worker of the host shares and which outlives a worker, or in the cluster's Valkey/Redis
(cluster.store), where every node counts together; while that store is down, the counts
are this node's or the command gets 451 4.3.0 (421 at connect), as
cluster.store_failure says. The plugin runs first in its
stages (order 1): a client over its allowance costs no DNS lookup or greylist write.

See also: tests/test_ratelimit.py, elemta.smtpd.clientcount (concurrent connections per
client, limits.connections_per_client: Postfix's smtpd_client_connection_count_limit).
"""

import ipaddress
import logging

import lmdb

from elemta.addressing.normal import canonical
from elemta.plugins.api import Plugin, PluginConfigError, Result
from elemta.plugins.settings import RateLimitSettings
from elemta.restrictions.ratecounter import LMDBRateCounter
from elemta.sharedstate.interface import (TEMPFAIL_CODE, TEMPFAIL_STATUS, TEMPFAIL_TEXT,
                                          StoreTempfail)
from elemta.sharedstate.process import shared_rate_counter

log = logging.getLogger("elemta.restrictions.ratelimit")

# An IPv6 client is counted by its network of this prefix (elemta.smtpd.clientnet).
IPV6_PREFIX = 64


def client_key(address):
    """What a client address is counted as: the IPv4 address (an IPv4-mapped IPv6
    address too), the IPv6 /64, or the text itself when it is no address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address or "unknown"
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    if ip.version == 6:
        return str(ipaddress.IPv6Network((ip, IPV6_PREFIX), strict=False))
    return str(ip)


class RateLimitPlugin(Plugin):
    name = "ratelimit"
    Settings = RateLimitSettings
    order = 1       # before everything else of its stages: cheap, and stops floods early
    # Counts every MAIL and RCPT, those the relay guard or a table refuses included, as
    # anvil does: a dictionary attack or relay probe is throttled too.
    before_core_checks = True

    def init(self, settings):
        self.settings = settings = settings or RateLimitSettings()
        self.exceptions = tuple(ipaddress.ip_network(n, strict=False)
                                for n in settings.exceptions)
        try:
            self.counter = shared_rate_counter(
                LMDBRateCounter(settings.database, settings.map_size_mb << 20))
        except (OSError, lmdb.Error) as error:
            raise PluginConfigError("plugins.%s.database: cannot open %s: %s"
                                    % (self.name, settings.database, error)) from None

    def close(self):
        counter = getattr(self, "counter", None)
        if counter is not None:
            counter.close()
            self.counter = None

    def exempt(self, ctx):
        if ctx.local or ctx.handover or (ctx.trusted and self.settings.exempt_mynetworks):
            return True
        try:
            ip = ipaddress.ip_address(ctx.client_address.split("%", 1)[0])
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.exceptions if net.version == ip.version)

    def _over(self, kind, key, limit):
        """Count one event of `kind` for `key`; its count when that is over `limit`."""
        if not limit or not key:
            return None
        count = self.counter.hit("%s\0%s" % (kind, key), 1, self.settings.time_unit)
        return count if count > limit else None

    def _client(self, ctx):
        return "%s[%s]" % (ctx.client_name, ctx.client_address)

    def on_accept(self, ctx):
        """Every connection is counted the moment it arrives, before its name lookup,
        as anvil counts at connect: those the pregreet test or a DNSBL then refuses,
        and those that hang up early, use up the allowance too."""
        s = self.settings
        if not s.connection_rate_limit or self.exempt(ctx):
            return None
        try:
            count = self._over("connect", client_key(ctx.client_address),
                               s.connection_rate_limit)
        except StoreTempfail:
            return Result.tempfail(421, TEMPFAIL_STATUS, TEMPFAIL_TEXT)
        if count is None:
            return None
        log.warning("Connection rate limit exceeded: %d from %s per %ds", count,
                    self._client(ctx), s.time_unit)
        return Result.tempfail(421, "4.7.0", "Error: too many connections from %s"
                               % ctx.client_address)

    def on_mail(self, ctx):
        return self._limit(ctx, "mail", "Message delivery request", "too much mail",
                           (self.settings.message_rate_limit,
                            self.settings.user_message_rate_limit,
                            self.settings.sender_message_rate_limit))

    def on_rcpt(self, ctx):
        return self._limit(ctx, "rcpt", "Recipient address", "too many recipients",
                           (self.settings.recipient_rate_limit,
                            self.settings.user_recipient_rate_limit,
                            self.settings.sender_recipient_rate_limit))

    def _limit(self, ctx, kind, what, text, limits):
        """Count the command for the client, the AUTH login and the sender; refuse with
        450 4.7.1 naming the first whose limit it goes over."""
        if not any(limits) or self.exempt(ctx):
            return None
        # The queue's normal form: one counter for every spelling of one address
        # (domain case, a final dot, IDN, needless quotes); the local part's case is
        # the mailbox's own, as in the queue.
        sender = canonical(ctx.sender) if ctx.sender else ""
        try:
            return self._count(ctx, kind, what, text, limits, sender)
        except StoreTempfail:
            return Result.tempfail(TEMPFAIL_CODE, TEMPFAIL_STATUS, TEMPFAIL_TEXT)

    def _count(self, ctx, kind, what, text, limits, sender):
        client_limit, user_limit, sender_limit = limits
        refusal = None
        for scope, key, shown, limit in (
                ("client", client_key(ctx.client_address), ctx.client_address,
                 client_limit),
                ("user", ctx.auth_user, "user %s" % ctx.auth_user, user_limit),
                ("sender", sender, "sender %s" % sender, sender_limit)):
            count = self._over("%s-%s" % (kind, scope), key, limit)
            if count is not None and refusal is None:
                log.warning("%s rate limit exceeded: %d from %s%s per %ds", what, count,
                            self._client(ctx), "" if scope == "client" else " for " + shown,
                            self.settings.time_unit)
                refusal = Result.tempfail(450, "4.7.1", "Error: %s from %s" % (text, shown))
        return refusal
