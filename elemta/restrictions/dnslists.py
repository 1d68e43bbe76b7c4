"""Asking DNS lists, all at once, with their answers cached for their TTL.

Owned by the smtpd worker, used by the DNS list restrictions (elemta.restrictions.dnsbl
for client addresses, elemta.restrictions.rhsbl for domains). Every list is asked in its
own greenlet through the plugin resolver (gevent sockets), so ten lists cost the time of
the slowest, not the sum, and a session waiting on them never holds up the others. A list
that fails (SERVFAIL, REFUSED, timeout) or has not answered by the deadline counts as not
listing: a DNS failure is not a listing (Postfix and postscreen agree); it is reported
so the caller can log it.

Answers (listed or not) are cached per query name for their DNS TTL, held between
min_ttl and max_ttl (postscreen_dnsbl_min_ttl, postscreen_dnsbl_max_ttl); failures are
not cached. The cache is a VerdictCache (elemta.sharedstate): per worker and bounded
(MemoryVerdictCache, MAX_ENTRIES; the oldest go first), and with cluster.store set
backed by the cluster's Valkey/Redis too, so one node's lookup serves every node.

    lists = DNSLists(min_ttl=60, max_ttl=3600)
    found = lists.ask(resolver, ["2.0.0.127.zen.example", ...], timeout=10)
    found.answers["2.0.0.127.zen.example"]   # ["127.0.0.4"], or [] when not listed
    found.failures                           # {query name: why}

See also: elemta.restrictions.dnssites (entries and filters), tests/test_dnsbl.py.
"""

import ipaddress
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List

import gevent

from elemta.plugins.resolver import TemporaryDNSError
from elemta.sharedstate.interface import VerdictCache
from elemta.sharedstate.process import shared_verdict_cache

# Query names cached per worker at most; the oldest are dropped beyond it.
MAX_ENTRIES = 100000


def client_query(address, site):
    """The name to ask `site` about a client address: its octets reversed (IPv4) or its
    32 nibbles reversed (IPv6), then the list's domain. None for no address."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    reverse = ip.reverse_pointer        # "4.3.2.1.in-addr.arpa", "b.a.9.8....ip6.arpa"
    return reverse.rsplit(".", 2)[0] + "." + site.domain


def domain_query(name, site):
    """The name to ask `site` about a domain (of an address, or a HELO name), or None
    when there is nothing to ask: an address literal, a name ending in digits (an IP
    address; lists refuse those, and Postfix skips them), a malformed name."""
    domain = name.rpartition("@")[2].rstrip(".").lower()
    if not domain or domain.startswith("[") or domain.rpartition(".")[2].isdigit():
        return None
    query = domain + "." + site.domain
    if len(query) > 253 or any(not 0 < len(label) < 64 for label in query.split(".")):
        return None
    return query


@dataclass
class Found:
    """What the lists said. answers: query name -> A record addresses ([]: not listed);
    failures: query name -> why it counts as not listed."""
    answers: Dict[str, List[str]] = field(default_factory=dict)
    failures: Dict[str, str] = field(default_factory=dict)

    def listed(self, site, query):
        return site.matches(self.answers.get(query) or ())


class MemoryVerdictCache(VerdictCache):
    """Answers per query name in this worker's memory, each until its TTL ends."""

    def __init__(self, min_ttl=60):
        self.min_ttl = min_ttl          # how long an answer read from elsewhere is kept
        self._cache = OrderedDict()  # type: OrderedDict

    def get_many(self, queries):
        now = time.monotonic()
        found = {}
        for query in queries:
            cached = self._cache.get(query)
            if cached is not None and cached[0] > now:
                found[query] = cached[1]
        return found

    def put(self, query, addresses, ttl):
        self._cache[query] = (time.monotonic() + ttl, addresses)
        self._cache.move_to_end(query)
        while len(self._cache) > MAX_ENTRIES:
            self._cache.popitem(last=False)


class DNSLists:
    """The answer cache and the parallel asking."""

    def __init__(self, min_ttl=60, max_ttl=3600):
        self.min_ttl, self.max_ttl = min_ttl, max_ttl
        self.cache = shared_verdict_cache(MemoryVerdictCache(min_ttl))

    def ask(self, resolver, queries, timeout):
        """Ask every query name (A records) at once; wait at most `timeout` seconds."""
        found, pending = Found(), {}
        names = list(dict.fromkeys(queries))          # each name once, in order
        found.answers.update(self.cache.get_many(names))
        for query in names:
            if query not in found.answers:
                pending[query] = gevent.spawn(self._one, resolver, query)
        try:
            if pending:
                gevent.joinall(list(pending.values()), timeout=timeout)
        finally:            # also when the plugin's own timeout cuts the wait short
            gevent.killall([g for g in pending.values() if not g.ready()], block=False)
        for query, greenlet in pending.items():
            if greenlet.exception is not None and not isinstance(
                    greenlet.exception, gevent.GreenletExit):
                found.failures[query] = "%s: %s" % (type(greenlet.exception).__name__,
                                                    greenlet.exception)
            elif not greenlet.successful():
                found.failures[query] = "no answer within %gs" % timeout
            elif isinstance(greenlet.value, str):
                found.failures[query] = greenlet.value
            else:
                addresses, ttl = greenlet.value
                found.answers[query] = addresses
                self._remember(query, addresses, ttl)
        return found

    @staticmethod
    def _one(resolver, query):
        """(addresses, ttl), or the reason the list gave no usable answer."""
        try:
            answer = resolver.query(query, "A")
        except TemporaryDNSError as error:
            return error.reason
        addresses = [record.address for record in answer.records
                     if hasattr(record, "address")]
        return addresses, answer.ttl

    def _remember(self, query, addresses, ttl):
        ttl = min(max(ttl, self.min_ttl), self.max_ttl)
        if ttl > 0:
            self.cache.put(query, addresses, ttl)


def score(sites, queries, found):
    """(total weight of the sites that list, the listing site of greatest weight or
    None). sites[i] was asked queries[i]."""
    total, top = 0, None
    for site, query in zip(sites, queries):
        if query is not None and found.listed(site, query):
            total += site.weight
            if site.weight > 0 and (top is None or site.weight > top.weight):
                top = site
    return total, top
