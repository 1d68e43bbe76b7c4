"""Greylisting: refuse the first delivery attempt of an unknown (network, sender, recipient).

Owned by the smtpd worker (the `greylist` built-in, rcpt stage). A legitimate MTA retries
after a 4xx and gets through once `delay` seconds have passed; much bulk-sending software
never retries. The triplets live in an LMDB environment shared by every smtpd worker (LMDB
is multi-process safe; each worker opens it after fork, in init()).

    first attempt            -> 451 4.7.1, the triplet is recorded
    again before `delay`     -> 451 4.7.1, with the seconds still to wait
    again after `delay`      -> accepted; the triplet is now known
    again within `expiry`    -> accepted at once (the clock restarts on every use)
    unconfirmed for longer than `retry_window`, or unused for `expiry` -> forgotten

The client is taken by network (/24 for IPv4, /64 for IPv6, as Postgrey does), since big
senders retry from another address of the same farm. Authenticated, mynetworks and local
clients are exempt, as are the `allow_networks` and the sender or recipient domains in
`allow_domains` (a domain also covers its subdomains).

With cluster.store set, the triplets live in the cluster's Valkey/Redis instead
(elemta.sharedstate), so a sender greylisted by one node passes on any other once the
delay is over; while that store is down, this LMDB answers or the recipient gets 451
4.3.0, as cluster.store_failure says.

Writes are not fsync'd (sync=False): a crash may forget the last triplets, which costs a
sender one more retry, while an fsync per RCPT would cost every session.

See also: tests/test_greylist.py, elemta.plugins.api.
"""

import ipaddress
import logging
import os
import struct
import time
from typing import Optional, Tuple

import lmdb

from elemta import metrics
from elemta.addressing.normal import normal_domain
from elemta.plugins.api import Plugin, PluginConfigError, Result
from elemta.plugins.settings import GreylistSettings
from elemta.sharedstate.interface import (TEMPFAIL_CODE, TEMPFAIL_STATUS, TEMPFAIL_TEXT,
                                          Greylist, StoreTempfail)
from elemta.sharedstate.process import shared_greylist

log = logging.getLogger("elemta.plugins.greylist")

# first seen, last seen (both time.time()), times let through.
_RECORD = struct.Struct("!ddI")
# Purge expired triplets after this many new ones (and at start).
PURGE_EVERY = 1000


def client_network(address, prefix_v4=24, prefix_v6=64):
    """The network a client address is greylisted as, e.g. "192.0.2.0/24"."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address or "unknown"
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = prefix_v4 if ip.version == 4 else prefix_v6
    return str(ipaddress.ip_network("%s/%d" % (ip, prefix), strict=False))


class GreylistStore(Greylist):
    """The triplet database. One per process (LMDB allows one environment per path)."""

    def __init__(self, path, delay=300, retry_window=2 * 86400, expiry=35 * 86400,
                 map_size=64 << 20):
        os.makedirs(path, mode=0o750, exist_ok=True)
        self.env = lmdb.open(path, map_size=map_size, subdir=True, sync=False,
                             metasync=False, max_dbs=0)
        self.delay, self.retry_window, self.expiry = delay, retry_window, expiry
        self._new_since_purge = 0

    def close(self):
        self.env.close()

    def check(self, network, sender, recipient, now=None):
        # type: (str, str, str, Optional[float]) -> Tuple[bool, float]
        """(let through?, seconds still to wait). Records the attempt."""
        now = time.time() if now is None else now
        key = ("%s\0%s\0%s" % (network, sender.lower(), recipient.lower())).encode(
            "utf-8", "surrogateescape")[:500]   # LMDB keys are at most 511 bytes
        with self.env.begin(write=True) as txn:
            raw = txn.get(key)
            first, last, passes = _RECORD.unpack(raw) if raw and len(raw) == _RECORD.size \
                else (now, now, -1)
            if passes > 0 and now - last > self.expiry:
                passes = -1                        # forgotten: start again
            if passes == 0 and now - first > self.retry_window:
                passes = -1                        # never came back in time: start again
            if passes < 0:
                txn.put(key, _RECORD.pack(now, now, 0))
                self._new_since_purge += 1
                waited = 0.0
            elif passes > 0 or now - first >= self.delay:
                txn.put(key, _RECORD.pack(first, now, passes + 1))
                return True, 0.0
            else:
                waited = now - first
        if self._new_since_purge >= PURGE_EVERY:
            self.purge(now)
        return False, max(1.0, self.delay - waited)

    def purge(self, now=None):
        """Delete the triplets no longer worth keeping; returns how many."""
        now = time.time() if now is None else now
        doomed = []
        with self.env.begin() as txn:
            for key, raw in txn.cursor():
                if len(raw) != _RECORD.size:
                    doomed.append(key)
                    continue
                first, last, passes = _RECORD.unpack(raw)
                if (passes > 0 and now - last > self.expiry) or (
                        passes == 0 and now - first > self.retry_window):
                    doomed.append(key)
        with self.env.begin(write=True) as txn:
            for key in doomed:
                txn.delete(key)
        self._new_since_purge = 0
        return len(doomed)

    def count(self):
        return self.env.stat()["entries"]


class GreylistPlugin(Plugin):
    name = "greylist"
    Settings = GreylistSettings
    order = 5      # before the DNS-heavy checks: a greylisted client costs nothing more

    def init(self, settings):
        self.settings = settings = settings or GreylistSettings()
        self.allow_networks = tuple(ipaddress.ip_network(n, strict=False)
                                    for n in settings.allow_networks)
        self.allow_domains = tuple(normal_domain(d) for d in settings.allow_domains)
        try:
            local = GreylistStore(settings.database, settings.delay,
                                  settings.retry_window, settings.expiry,
                                  settings.map_size_mb << 20)
        except (OSError, lmdb.Error) as error:
            raise PluginConfigError("plugins.%s.database: cannot open %s: %s"
                                    % (self.name, settings.database, error)) from None
        local.purge()
        self.store = shared_greylist(local)

    def close(self):
        store = getattr(self, "store", None)
        if store is not None:
            store.close()
            self.store = None

    def exempt(self, ctx):
        if ctx.checked_elsewhere:
            return True
        try:
            ip = ipaddress.ip_address(ctx.client_address)
            if ip.version == 6 and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
        except ValueError:
            ip = None
        if ip is not None and any(ip in net for net in self.allow_networks
                                  if net.version == ip.version):
            return True
        for address in (ctx.sender or "", ctx.recipient or ""):
            domain = normal_domain(address.rpartition("@")[2])
            if domain and any(domain == d or domain.endswith("." + d)
                              for d in self.allow_domains):
                return True
        return False

    def on_rcpt(self, ctx):
        if self.exempt(ctx):
            metrics.GREYLIST.labels("exempt").inc()
            return None
        network = client_network(ctx.client_address, self.settings.ipv4_prefix,
                                 self.settings.ipv6_prefix)
        try:
            passed, wait = self.store.check(network, ctx.sender or "",
                                            ctx.recipient or "")
        except StoreTempfail:
            metrics.GREYLIST.labels("tempfail").inc()
            return Result.tempfail(TEMPFAIL_CODE, TEMPFAIL_STATUS, TEMPFAIL_TEXT)
        metrics.GREYLIST.labels("pass" if passed else "defer").inc()
        if passed:
            return None
        log.info("%s: greylisted: client=[%s] network=%s from=<%s> to=<%s>, retry in %ds",
                 ctx.queue_id or "NOQUEUE", ctx.client_address, network, ctx.sender or "",
                 ctx.recipient or "", wait)
        return Result.tempfail(451, "4.7.1", "Greylisted, please try again in %d seconds"
                               % wait)
