"""Client, HELO and envelope address checks (issue #15 requirement 4) as clients see them:
the helo_hostname, client_hostname, non_fqdn and unknown_sender_domain restrictions.

Runs `elemta` as a subprocess (tests/conftest.py elemta_server) with its DNS pointed at a
private NSD (tests/peers/nsd.py) serving a reverse zone for 127.0.0.x and the sender
domains; clients connect from several loopback addresses. mynetworks is set to a network
that holds none of them, so they are all checked.
See also: elemta/restrictions/, tests/test_client_name.py.
"""

import smtplib
import socket
import tempfile

import pytest

from tests.harness import free_port
from tests.peers.nsd import NSDInstance, nsd_available

pytestmark = pytest.mark.skipif(nsd_available() is not None, reason=str(nsd_available()))

NOT_US = ["192.0.2.0/24"]

ZONES = {
    # 127.0.0.5 is good.test (confirmed), 127.0.0.6 claims forged.test (whose address
    # is another), 127.0.0.7 has no PTR name.
    "0.0.127.in-addr.arpa": "5 PTR good.test.\n6 PTR forged.test.\n",
    "good.test": "@ A 127.0.0.5\n",
    "forged.test": "@ A 127.0.0.99\n",
    "withmx.test": "@ MX 10 mail\nmail A 192.0.2.25\n",
    "aonly.test": "@ A 192.0.2.26\n",
    "nullmx.test": "@ MX 0 .\n",
    "empty.test": '@ TXT "neither MX nor A"\n',
}


@pytest.fixture(scope="module")
def dns():
    server = NSDInstance(tempfile.mkdtemp(prefix="elemta-checks-nsd-"), ZONES)
    server.start()
    yield {"nameservers": ["127.0.0.1"], "port": server.port, "timeout": 2.0}
    server.stop()
    server.remove()


def client(port, source="127.0.0.1"):
    return smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(source, 0))


def test_helo_names(elemta_server, dns):
    server = elemta_server(relay={"mynetworks": NOT_US}, dns=dns,
                           plugins={"helo_hostname": {"enabled": True}})
    with client(server.port) as smtp:
        assert smtp.ehlo("bad!name") == (
            501, b"5.5.2 <bad!name>: Helo command rejected: Invalid name")
        assert smtp.helo("localhost") == (
            504, b"5.5.2 <localhost>: Helo command rejected: need fully-qualified hostname")
        assert smtp.ehlo("192.0.2.1")[0] == 504           # a bare address is no FQDN
        assert smtp.ehlo("[127.0.0.1]")[0] == 250         # an address literal is fine
        assert smtp.ehlo("client.test")[0] == 250
    log = server.log()
    assert ("NOQUEUE: reject: HELO from unknown[127.0.0.1]: 501 5.5.2 <bad!name>: Helo "
            "command rejected: Invalid name; proto=SMTP helo=<bad!name> "
            "(plugin helo_hostname)") in log
    assert ("NOQUEUE: reject: HELO from unknown[127.0.0.1]: 504 5.5.2 <localhost>: Helo "
            "command rejected: need fully-qualified hostname;") in log


def test_helo_names_of_mynetworks_are_not_checked(elemta_server, dns):
    server = elemta_server(relay={"mynetworks": ["127.0.0.0/8"]}, dns=dns,
                           plugins={"helo_hostname": {"enabled": True}})
    with client(server.port) as smtp:
        assert smtp.ehlo("localhost")[0] == 250


def test_non_fqdn_sender_and_recipient(elemta_server, dns):
    server = elemta_server(relay={"mynetworks": NOT_US,
                                  "local_domains": ["example.test", "intranet"]},
                           dns=dns, plugins={"non_fqdn": {"enabled": True}})
    with client(server.port) as smtp:
        smtp.ehlo("client.test")
        assert smtp.mail("a@localhost") == (
            504, b"5.5.2 <a@localhost>: Sender address rejected: need fully-qualified "
                 b"address")
        assert smtp.mail("")[0] == 250
        assert smtp.rcpt("b@intranet") == (
            504, b"5.5.2 <b@intranet>: Recipient address rejected: need fully-qualified "
                 b"address")
        assert smtp.rcpt("b@example.test")[0] == 250
    assert ("NOQUEUE: reject: RCPT from unknown[127.0.0.1]: 504 5.5.2 <b@intranet>: "
            "Recipient address rejected: need fully-qualified address; from=<> "
            "to=<b@intranet> proto=ESMTP helo=<client.test> (plugin non_fqdn)"
            ) in server.log()


def test_unknown_sender_domain(elemta_server, dns):
    server = elemta_server(relay={"mynetworks": NOT_US}, dns=dns,
                           plugins={"unknown_sender_domain": {"enabled": True}})
    with client(server.port) as smtp:
        smtp.ehlo("client.test")
        for sender in ("a@withmx.test", "a@aonly.test", ""):
            assert smtp.mail(sender)[0] == 250, sender
            smtp.rset()
        # Postfix's unknown_address_reject_code default, 450: no records, no domain.
        assert smtp.mail("a@empty.test") == (
            450, b"4.1.8 <a@empty.test>: Sender address rejected: Domain not found")
        assert smtp.mail("a@ghost.empty.test") == (
            450, b"4.1.8 <a@ghost.empty.test>: Sender address rejected: Domain not found")
        assert smtp.mail("a@nullmx.test") == (
            550, b"5.7.27 <a@nullmx.test>: Sender address rejected: Domain nullmx.test "
                 b"does not accept mail (nullMX)")
        # A zone nobody serves: NSD refuses, a DNS failure, so try again later.
        assert smtp.mail("a@unserved.example") == (
            450, b"4.1.8 <a@unserved.example>: Sender address rejected: Domain not found")
        # An internationalized domain (asked as its A-label); the reply stays ASCII.
        assert smtp.mail("a@b\u00fccher.example", ["SMTPUTF8"]) == (
            450, b"4.1.8 <a@b?cher.example>: Sender address rejected: Domain not found")
    log = server.log()
    assert ("NOQUEUE: reject: MAIL from unknown[127.0.0.1]: 450 4.1.8 <a@empty.test>: "
            "Sender address rejected: Domain not found; from=<a@empty.test> proto=ESMTP "
            "helo=<client.test> (plugin unknown_sender_domain)") in log
    assert "unserved.example: MX or address lookup failed: " in log
    assert "b\u00fccher.example: MX or address lookup failed: " in log


def test_unknown_sender_domain_with_reject_code_550(elemta_server, dns):
    server = elemta_server(relay={"mynetworks": NOT_US}, dns=dns,
                           plugins={"unknown_sender_domain": {"enabled": True,
                                                              "reject_code": 550}})
    with client(server.port) as smtp:
        smtp.ehlo("client.test")
        assert smtp.mail("a@empty.test") == (
            550, b"5.1.8 <a@empty.test>: Sender address rejected: Domain not found")
        assert smtp.mail("a@ghost.empty.test") == (
            550, b"5.1.8 <a@ghost.empty.test>: Sender address rejected: Domain not found")
        # A DNS failure stays a 450 whatever the code.
        assert smtp.mail("a@unserved.example") == (
            450, b"4.1.8 <a@unserved.example>: Sender address rejected: Domain not found")


def rcpt_from(port, source):
    with client(port, source) as smtp:
        smtp.ehlo("client.test")
        assert smtp.mail("a@withmx.test")[0] == 250
        return smtp.rcpt("b@example.test")


def test_client_hostnames_per_listener(elemta_server, dns):
    checked = free_port()
    server = elemta_server(
        relay={"mynetworks": NOT_US}, dns=dns,
        listeners=[{"mode": "smtp"}, {"mode": "smtp", "port": checked}],
        plugins={"client_hostname": {"enabled": True, "reject_unknown_reverse": True,
                                     "listeners": ["127.0.0.1:%d" % checked]}})
    assert rcpt_from(checked, "127.0.0.5")[0] == 250
    assert rcpt_from(checked, "127.0.0.6") == (
        450, b"4.7.25 Client host rejected: cannot find your hostname, [127.0.0.6]")
    assert rcpt_from(checked, "127.0.0.7") == (
        450, b"4.7.1 Client host rejected: cannot find your reverse hostname, [127.0.0.7]")
    assert rcpt_from(server.port, "127.0.0.6")[0] == 250      # another listener
    assert ("NOQUEUE: reject: RCPT from unknown[127.0.0.6]: 450 4.7.25 Client host "
            "rejected: cannot find your hostname, [127.0.0.6]; from=<a@withmx.test> "
            "to=<b@example.test> proto=ESMTP helo=<client.test> "
            "(plugin client_hostname)") in server.log()


def test_client_hostnames_without_the_connect_lookup(elemta_server, dns):
    server = elemta_server(
        relay={"mynetworks": NOT_US}, dns=dns, smtpd={"peername_lookup": False},
        plugins={"client_hostname": {"enabled": True, "reject_code": 550}})
    assert rcpt_from(server.port, "127.0.0.5")[0] == 250
    assert rcpt_from(server.port, "127.0.0.6") == (
        550, b"5.7.25 Client host rejected: cannot find your hostname, [127.0.0.6]")


def test_client_hostnames_not_found_in_time_are_deferred_not_refused(elemta_server):
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)   # reads, never answers
    silent.bind(("127.0.0.1", 0))
    try:
        server = elemta_server(
            relay={"mynetworks": NOT_US}, smtpd={"peername_timeout": 0.3},
            dns={"nameservers": ["127.0.0.1"], "port": silent.getsockname()[1],
                 "timeout": 5.0},
            plugins={"client_hostname": {"enabled": True, "reject_unknown_reverse": True,
                                         "reject_code": 550}})
        # A DNS failure is no proof: 450 whatever reject_code says.
        assert rcpt_from(server.port, "127.0.0.5") == (
            450, b"4.7.1 Client host rejected: cannot find your reverse hostname, "
                 b"[127.0.0.5]")
    finally:
        silent.close()
