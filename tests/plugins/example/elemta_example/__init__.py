"""The documented example of an Elemta plugin: refuse some senders, tag everything else.

Runs inside the smtpd worker, called by elemta.plugins.manager. What a plugin is:

- a subclass of elemta.plugins.api.Plugin, registered in the entry-point group
  `elemta.plugins` (see ../setup.cfg); the entry point's name is the plugin's name and
  its key under `plugins:` in the config;
- an optional Settings dataclass: the config mapping is checked against it, and a wrong
  key or type is reported as plugins.example.<key> before the server starts. The manager
  itself handles `enabled`, `timeout` (seconds per call) and `fail_open`;
- init(settings) once per worker process, close() at exit;
- one on_<stage>(ctx) method per stage served (connection, helo, auth, mail, rcpt, data,
  queue, routing, delivery, storage), returning a Result or None for "no opinion".

A plugin must never block: wait only through gevent (ctx.resolver for DNS). If it raises
or overruns its timeout, the client gets 451 4.3.0 and the log names the plugin.
"""

from dataclasses import dataclass
from typing import Tuple

from elemta.plugins.api import Plugin, Result


@dataclass(frozen=True)
class ExampleSettings:
    blocked_senders: Tuple[str, ...] = ()     # envelope senders to refuse at MAIL FROM
    tag_header: str = "X-Example-Plugin"      # added to every message accepted


class ExamplePlugin(Plugin):
    Settings = ExampleSettings

    def init(self, settings):
        self.settings = settings
        self.blocked = {address.lower() for address in settings.blocked_senders}
        self.seen = 0

    def on_mail(self, ctx):
        if (ctx.sender or "").lower() in self.blocked:
            return Result.reject(550, "5.7.1", "Sender <%s> is not welcome here" % ctx.sender)
        return None

    def on_data(self, ctx):
        self.seen += 1
        return Result.proceed(headers=[(self.settings.tag_header,
                                        "message %d seen by %s" % (self.seen, self.name))])
