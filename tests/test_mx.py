"""MX routing against a real authoritative DNS server (NSD) on loopback.

Covers elemta.delivery.mx: preference order, random order among equal preferences, implicit MX,
null MX, NXDOMAIN, hosts without addresses, CNAMEs, truncated answers over TCP, nameserver
fallback, timeouts, and that lookups never block other greenlets.
"""

import collections
import socket
import threading
import time

import gevent
import pytest

from elemta.delivery.mx import (Host, MXResolver, NoMailHost, NoSuchDomain, NullMX,
                                TemporaryRouteError)
from tests.peers.nsd import nsd_available, private_nsd

ZONE = "route.test"
RECORDS = """
    pref        MX 10 a.hosts
    pref        MX 20 b.hosts
    pref        MX 30 c.hosts
    equal       MX 10 a.hosts
    equal       MX 10 b.hosts
    equal       MX 20 c.hosts
    implicit    A    127.0.0.5
    nullmx      MX 0 .
    dangling    MX 10 missing.hosts
    dangling    MX 20 b.hosts
    allgone     MX 10 missing.hosts
    noaddr      TXT  "exists, but takes no mail"
    viacname    MX 10 alias.hosts
    dual        MX 10 c.hosts
    many        MX 10 big.hosts
    xn--bcher-kva MX 10 b.hosts
    alias.hosts CNAME a.hosts
    a.hosts     A    127.0.0.2
    b.hosts     A    127.0.0.3
    c.hosts     A    127.0.0.4
    c.hosts     AAAA ::1
""" + "".join("    big.hosts A 127.0.1.%d\n" % i for i in range(1, 201))

pytestmark = pytest.mark.skipif(nsd_available() is not None, reason=str(nsd_available()))


@pytest.fixture(scope="module")
def nsd():
    with private_nsd({ZONE: RECORDS}) as server:
        yield server


@pytest.fixture
def resolver(nsd):
    return MXResolver(nameservers=["127.0.0.1"], port=nsd.port, timeout=2.0)


def d(label):
    return "%s.%s" % (label, ZONE)


def test_mx_hosts_come_in_preference_order(resolver):
    hosts = resolver.route(d("pref"))
    assert [(h.preference, h.name, h.address) for h in hosts if ":" not in h.address] == [
        (10, d("a.hosts"), "127.0.0.2"),
        (20, d("b.hosts"), "127.0.0.3"),
        (30, d("c.hosts"), "127.0.0.4")]
    # c.hosts has an AAAA too: it comes with c's other address, after the better MX hosts.
    assert [h.address for h in hosts[2:]] in (["127.0.0.4", "::1"], ["::1", "127.0.0.4"])


def test_equal_preferences_are_tried_in_random_order(resolver):
    firsts = collections.Counter()
    for _ in range(40):
        names = [h.name for h in resolver.route(d("equal"))]
        assert sorted(names[:2]) == [d("a.hosts"), d("b.hosts")]
        assert names[2:] == [d("c.hosts")] * 2
        firsts[names[0]] += 1
    # Binomial(40, 1/2): fewer than 5 of either happens about once in ten million runs.
    assert firsts[d("a.hosts")] >= 5 and firsts[d("b.hosts")] >= 5, firsts


def test_no_mx_means_the_domain_itself(resolver):
    assert resolver.route(d("implicit")) == [Host(d("implicit"), "127.0.0.5", None)]


def test_null_mx_bounces_at_once_with_556(resolver):
    with pytest.raises(NullMX) as caught:
        resolver.route(d("nullmx"))
    assert caught.value.permanent
    assert (caught.value.code, caught.value.status) == (556, "5.1.10")


def test_nxdomain_is_permanent(resolver):
    with pytest.raises(NoSuchDomain) as caught:
        resolver.route(d("nosuchdomain"))
    assert caught.value.permanent and caught.value.status == "5.1.2"


def test_an_mx_host_that_does_not_exist_is_skipped(resolver):
    assert resolver.route(d("dangling")) == [Host(d("b.hosts"), "127.0.0.3", 20)]


def test_no_usable_host_at_all_is_permanent(resolver):
    for domain in (d("allgone"), d("noaddr")):
        with pytest.raises(NoMailHost) as caught:
            resolver.route(domain)
        assert caught.value.permanent and caught.value.status == "5.4.4"


def test_mx_host_behind_a_cname(resolver):
    assert resolver.route(d("viacname")) == [Host(d("alias.hosts"), "127.0.0.2", 10)]


def test_an_internationalised_domain_is_looked_up_by_its_a_label(resolver):
    assert resolver.route("bücher." + ZONE) == [Host(d("b.hosts"), "127.0.0.3", 10)]


def test_address_families_and_preference(nsd):
    ipv4_only = MXResolver(["127.0.0.1"], port=nsd.port, families=("ipv4",))
    assert [h.address for h in ipv4_only.route(d("dual"))] == ["127.0.0.4"]
    ipv6_first = MXResolver(["127.0.0.1"], port=nsd.port, address_preference="ipv6")
    assert [h.address for h in ipv6_first.route(d("dual"))] == ["::1", "127.0.0.4"]


def test_a_truncated_answer_is_asked_again_over_tcp(resolver):
    addresses = {h.address for h in resolver.route(d("many"))}
    assert addresses == {"127.0.1.%d" % i for i in range(1, 201)}


def test_address_literals_need_no_dns():
    resolver = MXResolver(nameservers=["127.0.0.1"], port=9)
    assert resolver.route("[192.0.2.7]") == [Host("[192.0.2.7]", "192.0.2.7")]
    assert resolver.route("[IPv6:2001:db8::1]")[0].address == "2001:db8::1"


def test_a_zone_the_server_does_not_serve_is_a_temporary_failure(resolver):
    # NSD answers REFUSED for zones it is not authoritative for.
    with pytest.raises(TemporaryRouteError) as caught:
        resolver.route("example.invalid")
    assert not caught.value.permanent and caught.value.status == "4.4.3"
    assert "REFUSED" in str(caught.value)


def test_the_next_nameserver_answers_when_the_first_is_down(nsd):
    # Nothing listens on 127.0.0.9: the port-unreachable error moves on at once.
    resolver = MXResolver(nameservers=["127.0.0.9", "127.0.0.1"], port=nsd.port, timeout=2.0)
    started = time.monotonic()
    assert resolver.route(d("implicit"))[0].address == "127.0.0.5"
    assert time.monotonic() - started < 1.0


@pytest.fixture
def silent_port():
    """A UDP port that takes queries and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))
        yield sink.getsockname()[1]


def test_a_server_that_never_answers_is_a_temporary_failure(silent_port):
    resolver = MXResolver(nameservers=["127.0.0.1"], port=silent_port, timeout=0.3, attempts=2)
    started = time.monotonic()
    with pytest.raises(TemporaryRouteError) as caught:
        resolver.route("example.test")
    elapsed = time.monotonic() - started
    assert not caught.value.permanent and "timed out" in str(caught.value)
    assert 0.55 < elapsed < 1.5


class SlowProxy:
    """A UDP relay in front of NSD that holds every answer back for `delay` seconds,
    in native threads so that it runs whatever the test's gevent loop does."""

    def __init__(self, upstream_port, delay):
        self.upstream = ("127.0.0.1", upstream_port)
        self.delay = delay
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.queries = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                query, client = self.sock.recvfrom(65535)
            except OSError:
                return
            self.queries += 1
            threading.Thread(target=self._answer, args=(query, client), daemon=True).start()

    def _answer(self, query, client):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as upstream:
            upstream.settimeout(2)
            upstream.sendto(query, self.upstream)
            answer = upstream.recv(65535)
        time.sleep(self.delay)
        try:
            self.sock.sendto(answer, client)
        except OSError:
            pass

    def close(self):
        self.sock.close()


def test_slow_lookups_do_not_block_other_greenlets(nsd):
    proxy = SlowProxy(nsd.port, delay=0.3)
    resolver = MXResolver(nameservers=["127.0.0.1"], port=proxy.port, timeout=2.0)
    ticks = []

    def ticker():
        while True:
            ticks.append(time.monotonic())
            gevent.sleep(0.01)

    clock = gevent.spawn(ticker)
    try:
        started = time.monotonic()
        lookups = [gevent.spawn(resolver.route, d("implicit")),
                   gevent.spawn(resolver.route, d("pref"))]
        gevent.joinall(lookups, raise_error=True)
        elapsed = time.monotonic() - started
    finally:
        clock.kill()
        proxy.close()
    assert lookups[0].value[0].address == "127.0.0.5"
    assert [h.address for h in lookups[1].value][:2] == ["127.0.0.2", "127.0.0.3"]
    # implicit: A + AAAA in a row (0.6 s); pref: MX, then its hosts' lookups in parallel
    # (about 0.9 s). In series, the two routes would take 1.5 s or more.
    assert proxy.queries >= 9
    assert elapsed < 1.3, elapsed
    # The other greenlet kept its 10 ms beat all along: no gap of a whole delay.
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    assert len(ticks) > elapsed / 0.02 and max(gaps) < 0.15, max(gaps)
