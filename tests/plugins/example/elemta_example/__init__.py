"""The documented example of an Elemta plugin: refuse some clients and senders, tag the
mail it lets in, send a partner's mail to its own server, and note what was queued.

Runs in every Elemta process that asks plugins (the smtpd workers, pickup, the delivery
workers), called by elemta.plugins.manager. What a plugin is:

- a subclass of elemta.plugins.api.Plugin, registered in the entry-point group
  `elemta.plugins` (see ../setup.cfg); the entry point's name is the plugin's name and
  its key under `plugins:` in the config;
- an optional Settings dataclass (fields of str, int, float, bool, Optional, Tuple[X, ...]
  or nested dataclasses): the config loader builds it from the plugin's table, and a
  wrong key or type is reported as FILE:LINE: plugins.example.<key> before the server
  starts (a validate(path) method adds the plugin's own checks). The manager itself
  handles `enabled`, `timeout` (seconds per call) and `fail_open`;
- init(settings) once per worker process, after the fork; close() at exit. If init()
  raises, the worker keeps running: the plugin's stages answer 451 4.3.0 (or, fail_open,
  the plugin is left out) and init() is tried again later;
- one on_<stage>(ctx) method per stage served, returning a Result or None for "no
  opinion". The stages, where they run, and what their results do (the full table,
  with each stage's context, is in elemta.plugins.api):

    connection  smtpd, before the greeting    reject: 554 greeting; tempfail: 421
    helo        smtpd, HELO/EHLO              reject/tempfail: the reply to it
    auth        smtpd, after AUTH succeeded   reject/tempfail: AUTH fails
    mail        smtpd, MAIL FROM              reject/tempfail: the reply to it
    rcpt        smtpd, each RCPT TO           reject/tempfail: that recipient refused
    data_command  smtpd, DATA, before the 354 reject/tempfail: the reply to DATA
    data        smtpd and pickup, content     reject/tempfail: the reply to the end of
                                              DATA; discard: 250 and dropped;
                                              quarantine: queued on hold; headers
    storage     smtpd and pickup, the final   as data; where signing belongs
                content before the spool
    queue       smtpd and pickup, queued      notification only: verdicts ignored
    routing     delivery, each recipient      Result.route(nexthop); reject: bounce;
                                              tempfail: wait; discard: counted as sent
    delivery    delivery, before sending      as routing, without route

  A discard or quarantine at connection, helo or auth applies to every message of the
  session; at mail, rcpt or data_command, to the message.

A plugin must never block: wait only through gevent (ctx.resolver for DNS). If it raises
or overruns its timeout, the stage answers 451 4.3.0 and the log names the plugin.
"""

import ipaddress
import logging
from dataclasses import dataclass
from typing import Tuple

from elemta.plugins.api import Plugin, PluginConfigError, Result

log = logging.getLogger("elemta.plugins.example")


@dataclass(frozen=True)
class ExampleSettings:
    blocked_networks: Tuple[str, ...] = ()    # clients refused before the greeting
    blocked_senders: Tuple[str, ...] = ()     # envelope senders to refuse at MAIL FROM
    tag_header: str = "X-Example-Plugin"      # added to every message accepted
    routes: Tuple[str, ...] = ()              # "domain=nexthop", e.g.
                                              # "partner.example=smtp:[10.0.0.5]:25"

    def validate(self, path):
        for i, network in enumerate(self.blocked_networks):
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise PluginConfigError("%s.blocked_networks[%d]: %r is not a network"
                                        % (path, i, network)) from None
        for i, route in enumerate(self.routes):
            domain, equals, nexthop = route.partition("=")
            if not (domain and equals and nexthop):
                raise PluginConfigError("%s.routes[%d]: %r is not domain=nexthop"
                                        % (path, i, route))


class ExamplePlugin(Plugin):
    Settings = ExampleSettings

    def init(self, settings):
        self.settings = settings
        self.networks = [ipaddress.ip_network(n, strict=False)
                         for n in settings.blocked_networks]
        self.blocked = {address.lower() for address in settings.blocked_senders}
        self.routes = dict(route.lower().split("=", 1) for route in settings.routes)
        self.seen = 0

    def on_connection(self, ctx):
        """Refuse listed networks before they say a word."""
        try:
            client = ipaddress.ip_address(ctx.client_address)
        except ValueError:
            return None
        if any(client in network for network in self.networks):
            return Result.reject(554, "5.7.1", "Client host rejected: blocked network")
        return None

    def on_mail(self, ctx):
        if (ctx.sender or "").lower() in self.blocked:
            return Result.reject(550, "5.7.1", "Sender <%s> is not welcome here" % ctx.sender)
        return None

    def on_data(self, ctx):
        self.seen += 1
        return Result.proceed(headers=[(self.settings.tag_header,
                                        "message %d seen by %s" % (self.seen, self.name))])

    def on_queue(self, ctx):
        """A notification: what it returns is ignored."""
        log.info("%s: queued for %d recipient(s)", ctx.queue_id, len(ctx.recipients))

    def on_routing(self, ctx):
        domain = (ctx.recipient or "").rpartition("@")[2].lower()
        nexthop = self.routes.get(domain)
        return Result.route(nexthop) if nexthop else None
