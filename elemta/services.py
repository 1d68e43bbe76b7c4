"""The service table: every kind of child the master forks, described once, as Postfix's
master.cf describes its daemons.

Each row says how many children of the kind the configuration asks for, how many
scoreboard slots the kind needs, whether it keeps the listening sockets and root, what
it shares with its siblings, and which function is its main. The master
(elemta.master.Master) reads only this table: no code there names a kind. Entry points
are "module:function" strings, imported in the child after the fork, so the master never
imports a process package (design.md: the master never parses mail).

An entry point is called as main(config, slot, scoreboard, master_pid), plus
listening=[(Listener, socket)] when the row keeps the listeners and shared=... when the
row has a shared table; it returns the exit status (elemta.util.child.GeventChild.run).
See also: elemta.master, elemta.util.child, elemta.cli.elemta (who starts the master).
"""

import importlib
import os
from dataclasses import dataclass
from typing import Callable, Optional


@dataclass(frozen=True)
class Service:
    """One kind of child. The columns, with their master.cf equivalents:

        kind        "service": the name in titles ("elemta: smtpd"), logs and metrics
        count       "maxproc": how many the configuration asks for (0: none)
        slots       (none: Postfix's master counts processes in memory) scoreboard rows
                    the kind needs for the master's whole life, room for two
                    generations of `count` during a reload; counts a reload raises
                    above it wait for a restart
        main        "command + args": "module:function", imported in the child
        listens     "type" inet rather than unix: the child keeps the master's listening
                    sockets (SMTP), and a reload stops the old generation only once the
                    new listening children serve; the others get their copies closed
        privileged  "unpriv" n: the child keeps the master's user (root) instead of
                    becoming master.user (the local agent writes mailboxes as their
                    users, as Postfix's local(8) does)
        holds_leases (none: qmgr learns of a dead delivery agent itself) the child
                    claims queue messages: when one ends, the delivery workers are told
                    at once to free the leases of holders that are gone
        binds       (none: master.cf's inet services all speak their own protocol)
                    config -> (address, port) or None: a TCP socket the master binds for
                    this kind alone (while it is root: port 80 for acme-http, 443 for acme-tls), rebinding
                    it when a reload moves it; the child's main gets it as sock= (None
                    if it could not be bound)
        shared      (none: Postfix uses the anvil service) "module:Class", made in the
                    master before the first fork with one row per scoreboard slot; the
                    child's main gets it as shared=, and clear_row(slot) runs when a
                    slot frees, since the dead child's sessions ended with it
    Postfix's "private" and "chroot" columns have no counterpart: Elemta's private
    sockets live in the spool's run directory, and nothing runs chrooted. "wakeup" is
    the children's own business (elemta.queue.wakeup)."""

    kind: str
    count: Callable[[object], int]
    slots: Callable[[object], int]
    main: str
    listens: bool = False
    privileged: bool = False
    holds_leases: bool = False
    binds: Optional[Callable[[object], Optional["Endpoint"]]] = None
    shared: Optional[str] = None

    def entry_point(self):
        """The child's main function (imports its module: call it in the child only)."""
        return _load(self.main)

    def make_shared(self, rows):
        """The shared table for rows scoreboard slots, or None (in the master)."""
        return _load(self.shared)(rows) if self.shared else None


@dataclass(frozen=True)
class Endpoint:
    """Where a `binds` row's socket listens (elemta.cli.elemta.bind takes it)."""
    address: str
    port: int


def acme_http_endpoint(config):
    acme = config.acme
    return Endpoint(acme.http_address, acme.http_port) if acme_responds(
        config, "http-01") else None


def acme_tls_endpoint(config):
    acme = config.acme
    return Endpoint(acme.tls_address, acme.tls_port) if acme_responds(
        config, "tls-alpn-01") else None


def acme_responds(config, challenge):
    """True when the ACME client is on and answers challenges of this type."""
    return config.acme.enabled and config.acme.challenge == challenge


def smtpd_workers(config):
    """smtpd.workers, or one per CPU when it is 0."""
    return config.smtpd.workers or os.cpu_count() or 1


def _load(name):
    module, _, attribute = name.partition(":")
    return getattr(importlib.import_module(module), attribute)


# Slots are given out in this order (smtpd, api, delivery, pickup, local, showq), the
# layout the master always had, then the ACME client and its two challenge responders.
SERVICES = (
    Service("smtpd", count=smtpd_workers,
            slots=lambda config: 2 * max(smtpd_workers(config), os.cpu_count() or 1),
            main="elemta.smtpd.worker:run_smtpd", listens=True,
            shared="elemta.smtpd.clientcount:ClientCounts"),
    Service("api", count=lambda config: 1 if config.api.enabled else 0,
            slots=lambda config: 2, main="elemta.api.server:run_api"),
    Service("delivery", count=lambda config: config.delivery.workers,
            slots=lambda config: 2 * max(config.delivery.workers, 4),
            main="elemta.delivery.worker:run_delivery", holds_leases=True),
    Service("pickup", count=lambda config: 1, slots=lambda config: 2,
            main="elemta.pickup.worker:run_pickup"),
    Service("local", count=lambda config: 1 if config.delivery.workers else 0,
            slots=lambda config: 2, main="elemta.local.agent:run_local", privileged=True,
            holds_leases=True),
    # Postfix's showq: mailq for users who cannot read the spool (elemta.showq.server).
    Service("showq", count=lambda config: 1, slots=lambda config: 2,
            main="elemta.showq.server:run_showq"),
    # The ACME client and its challenge responder (elemta.acme), HTTP-01 on port 80 or
    # TLS-ALPN-01 on 443 as acme.challenge says: it faces the internet, so it holds no
    # key, only the pending challenges.
    Service("acme", count=lambda config: 1 if config.acme.enabled
            and config.acme.certificates else 0, slots=lambda config: 2,
            main="elemta.acme.worker:run_acme"),
    Service("acme-http", count=lambda config: 1 if acme_responds(config, "http-01") else 0,
            slots=lambda config: 2, main="elemta.acme.http01:run_acme_http",
            binds=acme_http_endpoint),
    Service("acme-tls", count=lambda config: 1 if acme_responds(config, "tls-alpn-01")
            else 0, slots=lambda config: 2, main="elemta.acme.tlsalpn01:run_acme_tls",
            binds=acme_tls_endpoint),
)


def run_child(service, config, listening, slot, scoreboard, master_pid, shared):
    """The main of a forked child of `service` (the master's default run_child): its
    entry point, given the listeners and the shared table only if its row says so."""
    extra = {}
    if service.listens:
        extra["listening"] = listening
    if service.shared:
        extra["shared"] = shared
    if service.binds:
        extra["sock"] = listening[0][1] if listening else None
    return service.entry_point()(config, slot, scoreboard, master_pid, **extra)
