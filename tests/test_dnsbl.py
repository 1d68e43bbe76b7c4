"""DNS block and allow lists (the dnsbl and rhsbl restrictions) as clients see them.

Runs `elemta` as a subprocess (tests/conftest.py elemta_server) with its DNS pointed at
a private NSD (tests/peers/nsd.py) serving test lists; clients connect from several
loopback addresses (127.0.0.0/8 is all loopback) and from ::1, each listed differently.
mynetworks is set to a network that holds none of them.
See also: elemta/restrictions/dnsbl.py, elemta/restrictions/rhsbl.py,
elemta/restrictions/dnslists.py.
"""

import smtplib
import socket
import tempfile
import time

import dns.message
import pytest

from elemta.restrictions.dnslists import client_query
from elemta.restrictions.dnssites import parse_site
from tests.harness import free_port, wait_for
from tests.peers.nsd import NSDInstance, nsd_available

pytestmark = pytest.mark.skipif(nsd_available() is not None, reason=str(nsd_available()))

NOT_US = ["192.0.2.0/24"]      # mynetworks without the loopback clients
V6_LOOPBACK = client_query("::1", parse_site("bl.test")).rsplit(".bl.test", 1)[0]

# The lists. 127.0.0.2: bl.test. 127.0.0.3: bl.test with an answer its filter refuses,
# and low.test. 127.0.0.4: bl.test and the allow list wl.test. 127.0.0.5: low.test and
# low2.test. ::1: bl.test. broken.test is not served (NSD refuses: a DNS failure).
ZONES = {
    "bl.test": ("2.0.0.127 A 127.0.0.2\n3.0.0.127 A 127.0.0.20\n"
                "4.0.0.127 A 127.0.0.4\n%s A 127.0.0.3\n" % V6_LOOPBACK),
    "low.test": "3.0.0.127 A 127.0.0.2\n5.0.0.127 A 127.0.0.2\n",
    "low2.test": "5.0.0.127 A 127.0.0.2\n",
    "wl.test": "4.0.0.127 A 127.0.0.2\n",
    "dbl.test": ("spam.example A 127.0.1.2\nspam.example TXT \"see https://dbl.test/\"\n"
                 "clean.example TXT \"not an A record\"\n"),
    "hbl.test": "bad.example A 127.0.0.2\n",
}
SITES = ["bl.test=127.0.0.[2..11]*2", "low.test", "low2.test", "wl.test*-5",
         "broken.test"]


@pytest.fixture(scope="module")
def nsd():
    server = NSDInstance(tempfile.mkdtemp(prefix="elemta-dnsbl-nsd-"), ZONES)
    server.start()
    yield server
    server.stop()
    server.remove()


def dns_of(nsd):
    return {"nameservers": ["127.0.0.1"], "port": nsd.port, "timeout": 2.0}


def greeting(port, source, host="127.0.0.1"):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.bind((source, 0))
        sock.connect((host, port))
        return sock.makefile("rb").readline()


def test_client_lists_are_weighed_into_one_score(elemta_server, nsd):
    port6 = free_port("::1")
    server = elemta_server(
        relay={"mynetworks": NOT_US}, dns=dns_of(nsd),
        listeners=[{"mode": "smtp"}, {"mode": "smtp", "address": "::1", "port": port6}],
        plugins={"dnsbl": {"enabled": True, "sites": SITES, "threshold": 2,
                           "allowlist_threshold": -3}})
    # Listed by bl.test, weight 2: refused in place of the greeting.
    assert greeting(server.port, "127.0.0.2") == (
        b"554 5.7.1 mx.test Service unavailable; client [127.0.0.2] blocked using "
        b"bl.test\r\n")
    # bl.test's answer is outside its filter; low.test alone weighs 1: accepted.
    assert greeting(server.port, "127.0.0.3").startswith(b"220 mx.test ")
    # bl.test (2) and the allow list wl.test (-5): -3, allowed.
    assert greeting(server.port, "127.0.0.4").startswith(b"220 mx.test ")
    # Two lists of weight 1 reach the threshold together; the reply names one.
    assert greeting(server.port, "127.0.0.5") == (
        b"554 5.7.1 mx.test Service unavailable; client [127.0.0.5] blocked using "
        b"low.test\r\n")
    # IPv6: the client's 32 nibbles reversed.
    assert greeting(port6, "::1", host="::1") == (
        b"554 5.7.1 mx.test Service unavailable; client [::1] blocked using bl.test\r\n")
    # Not listed anywhere; the list that fails counts for nothing.
    assert greeting(server.port, "127.0.0.6").startswith(b"220 mx.test ")
    log = server.log()
    assert ("NOQUEUE: reject: CONNECT from unknown[127.0.0.2]: 554 5.7.1 Service "
            "unavailable; client [127.0.0.2] blocked using bl.test; proto=SMTP "
            "(plugin dnsbl)") in log
    assert "NOQUEUE: dnsbl: [127.0.0.5] score 2 (listed by low.test, low2.test)" in log
    assert "NOQUEUE: dnsbl: [127.0.0.4] allowed: score -3" in log
    assert "NOQUEUE: reject: CONNECT from unknown[::1]: 554 5.7.1" in log
    assert "reject: CONNECT from unknown[127.0.0.3]" not in log
    assert "warning: dnsbl: 6.0.0.127.broken.test: lookup failed" in log


def test_answers_are_cached_for_their_ttl(elemta_server, tmp_path):
    own = NSDInstance(str(tmp_path / "nsd"), {"bl.test": "2.0.0.127 A 127.0.0.2\n"})
    own.start()
    try:
        server = elemta_server(relay={"mynetworks": NOT_US}, dns=dns_of(own),
                               smtpd={"peername_lookup": False},
                               plugins={"dnsbl": {"enabled": True, "sites": ["bl.test"]}})
        assert greeting(server.port, "127.0.0.2").startswith(b"554 5.7.1 ")
    finally:
        own.stop()
    # The list's server is gone: the cached answer (TTL 60 s) still refuses the client.
    assert greeting(server.port, "127.0.0.2").startswith(b"554 5.7.1 ")
    assert "lookup failed" not in server.log()
    # A client never asked about is not in the cache: its lookup fails, it is let in.
    assert greeting(server.port, "127.0.0.9").startswith(b"220 ")
    assert "warning: dnsbl: 9.0.0.127.bl.test: lookup failed" in server.log()


def test_mynetworks_and_other_listeners_are_not_checked(elemta_server, nsd):
    checked = free_port()
    server = elemta_server(
        relay={"mynetworks": ["127.0.0.2/32"]}, dns=dns_of(nsd),
        listeners=[{"mode": "smtp"}, {"mode": "smtp", "port": checked}],
        plugins={"dnsbl": {"enabled": True, "sites": SITES,
                           "listeners": ["127.0.0.1:%d" % checked]}})
    assert greeting(server.port, "127.0.0.5").startswith(b"220 ")
    assert greeting(checked, "127.0.0.5").startswith(b"554 5.7.1 ")
    assert greeting(checked, "127.0.0.2").startswith(b"220 ")     # mynetworks


def test_silent_lists_delay_the_greeting_only_by_the_lookup_timeout(elemta_server):
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)   # reads, never answers
    silent.bind(("127.0.0.1", 0))
    try:
        server = elemta_server(
            relay={"mynetworks": NOT_US}, smtpd={"peername_lookup": False},
            dns={"nameservers": ["127.0.0.1"], "port": silent.getsockname()[1],
                 "timeout": 5.0},
            plugins={"dnsbl": {"enabled": True, "sites": ["a.test", "b.test", "c.test"],
                               "lookup_timeout": 0.5}})
        started = time.monotonic()
        assert greeting(server.port, "127.0.0.2").startswith(b"220 ")
        assert time.monotonic() - started < 1.5       # the three lists in parallel
        log = wait_for(lambda: "c.test: lookup failed" in server.log() and server.log())
        assert "warning: dnsbl: 2.0.0.127.a.test: lookup failed (no answer within " \
               "0.5s); not counted" in log
    finally:
        silent.close()


class SilentList:
    """A DNS server on loopback that reads the queries and never answers."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(15)
        self.asked = []

    def wait_for_query(self, name):
        """Read queries until one for `name` came (others come from other clients)."""
        while name not in self.asked:
            query = dns.message.from_wire(self.sock.recv(512))
            self.asked.append(str(query.question[0].name))


def waiting_server(elemta_server, silent, action, lookup_timeout, mynetworks=NOT_US):
    """A server that holds every greeting back 30 s for the pregreet test and asks the
    silent list at connect."""
    return elemta_server(
        relay={"mynetworks": mynetworks}, smtpd={"peername_lookup": False, "workers": 1},
        dns={"nameservers": ["127.0.0.1"], "port": silent.sock.getsockname()[1],
             "timeout": 5.0},
        protocol_tests={"greet_wait": 30, "greet_action": action},
        plugins={"dnsbl": {"enabled": True, "sites": ["a.test"],
                           "lookup_timeout": lookup_timeout}})


def test_the_lookups_run_while_the_pregreet_test_waits(elemta_server):
    """As postscreen: the DNSBL query goes out while the greeting's last line is held
    back for the pregreet test (greet_wait), not after the wait. The list here never
    answers; its query is seen arriving long before the 30 s wait could end."""
    silent = SilentList()
    with silent.sock:
        server = waiting_server(elemta_server, silent, "ignore", lookup_timeout=1.0)
        with socket.create_connection(("127.0.0.1", server.port), timeout=10,
                                      source_address=("127.0.0.2", 0)) as client:
            replies = client.makefile("rb")
            assert replies.readline().startswith(b"220-")       # the wait has begun
            silent.wait_for_query("2.0.0.127.a.test.")
            client.sendall(b"QUIT\r\n")                     # ends the wait (ignored)
            assert replies.readline().startswith(b"220 ")
            assert replies.readline().startswith(b"221 ")
        log = wait_for(lambda: "a.test: lookup failed" in server.log() and server.log())
        assert "PREGREET 6 after " in log
        server.stop()
        # A client dropped for talking during the wait: its lookup, still pending, is
        # abandoned; the worker serves on (127.0.0.4, in mynetworks, has no wait).
        server = waiting_server(elemta_server, silent, "drop", lookup_timeout=20.0,
                                mynetworks=NOT_US + ["127.0.0.4/32"])
        with socket.create_connection(("127.0.0.1", server.port), timeout=10,
                                      source_address=("127.0.0.3", 0)) as client:
            replies = client.makefile("rb")
            assert replies.readline().startswith(b"220-")
            silent.wait_for_query("3.0.0.127.a.test.")
            client.sendall(b"EHLO bot.test\r\n")
            assert replies.read() == b"521 5.5.1 Protocol error\r\n"
        with smtplib.SMTP("127.0.0.1", server.port, timeout=60,
                          source_address=("127.0.0.4", 0)) as patient:
            assert patient.noop()[0] == 250
        log = server.log()
        assert "reject: CONNECT from unknown[127.0.0.3]: 521 5.5.1" in log
        assert "Traceback" not in log and "3.0.0.127.a.test: lookup failed" not in log


def test_sender_and_helo_domain_lists(elemta_server, nsd):
    server = elemta_server(
        relay={"mynetworks": NOT_US}, dns=dns_of(nsd),
        plugins={"rhsbl": {"enabled": True, "sender_sites": ["dbl.test=127.0.1.[2..99]"],
                           "helo_sites": ["hbl.test"]}})
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as smtp:
        assert smtp.ehlo("bad.example") == (
            554, b"5.7.1 Service unavailable; Helo command [bad.example] blocked using "
                 b"hbl.test")
        assert smtp.ehlo("client.test")[0] == 250
        assert smtp.mail("a@spam.example") == (
            554, b"5.7.1 Service unavailable; Sender address [a@spam.example] blocked "
                 b"using dbl.test; see https://dbl.test/")
        assert smtp.mail("a@clean.example")[0] == 250
        smtp.rset()
        assert smtp.mail("")[0] == 250
    log = server.log()
    assert ("NOQUEUE: reject: MAIL from unknown[127.0.0.1]: 554 5.7.1 Service "
            "unavailable; Sender address [a@spam.example] blocked using dbl.test; see "
            "https://dbl.test/; from=<a@spam.example> proto=ESMTP helo=<client.test> "
            "(plugin rhsbl)") in log
    assert ("NOQUEUE: reject: HELO from unknown[127.0.0.1]: 554 5.7.1 Service "
            "unavailable; Helo command [bad.example] blocked using hbl.test;") in log


def load_error(path, text):
    from elemta.config.errors import ConfigError
    from elemta.config.loader import load_config
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    return str(caught.value).splitlines()


def test_a_bad_list_entry_is_refused_with_file_line_and_key(tmp_path):
    path = tmp_path / "elemta.yaml"
    lines = load_error(path, "plugins:\n  dnsbl:\n    enabled: true\n"
                             "    sites: [ok.example, \"zen.example=127.0.0.[2..300]*3\"]\n"
                             "  rhsbl:\n    helo_sites: [\"dbl.example*x\"]\n")
    assert lines[0].startswith(
        "%s:4: plugins.dnsbl.sites[1]: 'zen.example=127.0.0.[2..300]*3': '[2..300]' is "
        "not an octet" % path), lines
    assert lines[1].startswith("%s:6: plugins.rhsbl.helo_sites[0]: 'dbl.example*x': the "
                               "weight after * must be a whole number" % path), lines
    lines = load_error(path, "plugins:\n  rhsbl:\n    enabled: true\n    min_ttl: 600\n"
                             "    max_ttl: 60\n")
    assert lines[0].startswith("%s:5: plugins.rhsbl.max_ttl: less than min_ttl (600)"
                               % path), lines
