"""REQUIRETLS and TLS-Required: No (RFC 8689), end to end with real peers on loopback.

Owned by the test suite. A client sends to the real `elemta` server over STARTTLS with
REQUIRETLS on MAIL FROM (smtplib); a private NSD (tests/peers/nsd.py) serves zone
rt.test, unsigned: each recipient domain's MX and, for most domains, an MTA-STS policy in
enforce mode served by a loopback HTTPS server (tests/peers/https.py). In an unsigned zone
that policy is what lets REQUIRETLS trust the MX names (RFC 8689 4.2.1); a domain without
one (spoofed.rt.test, whose MX is the secure host) gets nothing sent.
(tests/test_dane.py has the DNSSEC-validated case.) The MX hosts are scripted SMTP servers
(tests/peers/sink.py): one with STARTTLS, a certificate for its MX name from a test CA
and REQUIRETLS; one with TLS but no REQUIRETLS; one that offers REQUIRETLS but no
STARTTLS. Elemta trusts the test CA through delivery.tls_ca_file. Needs nsd.
See also: elemta.delivery.requiretls, elemta.smtp.protocol (REQUIRETLS on receipt).
"""

import io
import re
import smtplib
import ssl

import pytest

from elemta.delivery.requiretls import waives_tls_policy
from tests.harness import free_port, wait_for
from tests.peers.https import LoopbackCA, PolicyServer
from tests.peers.nsd import nsd_available, private_nsd
from tests.peers.sink import DEFAULT_EXTENSIONS, ScriptedServer

WEB = "127.0.0.70"          # the MTA-STS policy server of optout.rt.test
SECURE_MX = "127.0.0.71"    # STARTTLS, a certificate for its name, REQUIRETLS
NOREQ_MX = "127.0.0.72"     # STARTTLS with a valid certificate, no REQUIRETLS
CLEAR_MX = "127.0.0.73"     # REQUIRETLS offered, but no STARTTLS
DOWN_WEB = "127.0.0.74"     # stsdown.rt.test's policy server: nothing listens there

ZONE = "rt.test"
RECORDS = """
mx.secure         A   127.0.0.71
mx.noreq          A   127.0.0.72
mx.clear          A   127.0.0.73
secure            MX  10 mx.secure
noreq             MX  10 mx.noreq
clear             MX  10 mx.clear
optout            MX  10 mx.clear
spoofed           MX  10 mx.secure
testing           MX  10 mx.secure
stsdown           MX  10 mx.secure
_mta-sts.stsdown  TXT "v=STSv1; id=1"
mta-sts.stsdown   A   127.0.0.74
"""
# Each of these domains publishes an MTA-STS policy in enforce mode naming its own MX.
POLICY_DOMAINS = {"secure": "mx.secure", "noreq": "mx.noreq", "clear": "mx.clear",
                  "optout": "mx.clear"}
RECORDS += "".join('_mta-sts.%s TXT "v=STSv1; id=1"\nmta-sts.%s A %s\n' % (d, d, WEB)
                   for d in POLICY_DOMAINS)
POLICIES = {"mta-sts.%s.rt.test" % domain: "version: STSv1\r\nmode: enforce\r\n"
            "mx: %s.rt.test\r\nmax_age: 86400\r\n" % mx
            for domain, mx in POLICY_DOMAINS.items()}
# testing.rt.test's policy names its MX too, but in testing mode: it vouches for nothing.
RECORDS += '_mta-sts.testing TXT "v=STSv1; id=1"\nmta-sts.testing A %s\n' % WEB
POLICIES["mta-sts.testing.rt.test"] = ("version: STSv1\r\nmode: testing\r\n"
                                       "mx: mx.secure.rt.test\r\nmax_age: 86400\r\n")


@pytest.mark.parametrize("header, waived", [
    (b"TLS-Required: No\r\n", True),
    (b"tls-required:   NO  \r\n", True),
    (b"TLS-Required:\r\n No\r\n", True),               # folded
    (b"TLS-Required: Yes\r\n", False),
    (b"TLS-Required: No way\r\n", False),
    (b"X-TLS-Required: No\r\n", False),
    (b"", False)])
def test_only_a_tls_required_field_saying_no_waives_the_policy(header, waived):
    content = b"From: a@b.test\r\n" + header + b"Subject: s\r\n\r\nTLS-Required: No\r\n"
    assert waives_tls_policy(io.BytesIO(content)) is waived


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return LoopbackCA(tmp_path_factory.mktemp("rt-ca"), "Elemta REQUIRETLS Test CA")


@pytest.fixture(scope="module")
def nsd():
    if nsd_available():
        pytest.skip(nsd_available())
    with private_nsd({ZONE: RECORDS}) as server:
        yield server


@pytest.fixture(scope="module")
def web_port():
    return free_port(WEB)


@pytest.fixture(scope="module")
def web(pki, web_port):
    cert, key = pki.issue(*POLICIES)
    with PolicyServer(WEB, web_port, cert, key, POLICIES) as server:
        yield server


@pytest.fixture(scope="module")
def mx_port():
    return free_port(SECURE_MX)


@pytest.fixture(scope="module")
def mx_hosts(pki, mx_port):
    """The MX hosts: (secure, noreq, clear)."""
    secure_cert = pki.issue("mx.secure.rt.test")
    noreq_cert = pki.issue("mx.noreq.rt.test")
    servers = [
        ScriptedServer(address=SECURE_MX, port=mx_port, cert_file=secure_cert[0],
                       key_file=secure_cert[1],
                       extensions=DEFAULT_EXTENSIONS + ["REQUIRETLS"]),
        ScriptedServer(address=NOREQ_MX, port=mx_port, cert_file=noreq_cert[0],
                       key_file=noreq_cert[1]),
        ScriptedServer(address=CLEAR_MX, port=mx_port,
                       extensions=DEFAULT_EXTENSIONS + ["REQUIRETLS"])]
    for server in servers:
        server.start()
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture
def server(elemta_server, nsd, mx_port, pki, web, web_port, tls_files, tmp_path):
    cert, key = tls_files
    aliases = tmp_path / "aliases"
    aliases.write_text("postmaster: pm@gone.rt.test\nfar: r@noreq.rt.test\n"
                       "lost: x@gone.rt.test\n")
    delivery = {"workers": 1, "mx_port": mx_port, "nameservers": ["127.0.0.1"],
                "dns_port": nsd.port, "min_backoff": 60, "max_backoff": 60,
                "connect_timeout": 2.0, "command_timeout": 5.0, "data_timeout": 5.0,
                "tls_ca_file": pki.ca_file, "mta_sts_ca_file": pki.ca_file,
                "mta_sts_port": web_port, "mta_sts_timeout": 5.0}
    started = elemta_server(delivery=delivery, api={"enabled": False},
                            tls={"cert_file": cert, "key_file": key},
                            local={"aliases_file": str(aliases)})
    wait_for(lambda: "delivery worker started" in started.log())
    return started


def send(server, sender, recipient, requiretls=True, headers=b""):
    """Send over STARTTLS (REQUIRETLS on MAIL FROM when asked); the queue id."""
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.starttls(context=ssl._create_unverified_context())
        client.ehlo()
        assert client.has_extn("requiretls")
        client.sendmail(sender, [recipient],
                        b"From: %s\r\nTo: %s\r\nSubject: rt\r\n%s\r\nsecret body\r\n" % (
                            sender.encode(), recipient.encode(), headers),
                        mail_options=["REQUIRETLS"] if requiretls else [])
    match = wait_for(lambda: re.search(r"(\w+): from=<%s>" % re.escape(sender),
                                       server.log()))
    return match.group(1)


def result(server, queue_id, recipient, timeout=15):
    """(status, reply) of the recipient's first delivery line."""
    pattern = r"%s: to=<%s>, relay=\S+, delay=\S+, dsn=\S+, status=(\w+) \((.*)\)" % (
        queue_id, re.escape(recipient))
    return wait_for(lambda: re.search(pattern, server.log()), timeout).groups()


def received(sink, recipient):
    return [m for m in sink.messages if m.rcpts == ["RCPT TO:<%s>" % recipient]]


def bounce_for(server, queue_id):
    """(envelope, content) of the DSN queued about queue_id."""
    def find():
        for other in server.queued_ids():
            try:
                envelope, content = server.message(other)
            except FileNotFoundError:       # delivered meanwhile
                continue
            if envelope.sender == "" and queue_id.encode() in content:
                return envelope, content
        return None
    return wait_for(find)


def test_requiretls_on_a_cleartext_session_is_refused(server):
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.ehlo()
        assert not client.has_extn("requiretls")
        assert client.mail("c@client.test", ["REQUIRETLS"]) == (
            530, b"5.7.10 REQUIRETLS support required: start TLS first")
    assert server.queued_ids() == []


def test_a_requiretls_message_is_queued_with_it_and_relayed_with_it(server, mx_hosts):
    """secure.rt.test's zone is unsigned, but its MTA-STS policy (enforce) names its MX
    host: RFC 8689 4.2.1 lets that vouch for the MX name the certificate is checked for."""
    secure = mx_hosts[0]
    queue_id = send(server, "s@client.test", "r@secure.rt.test")
    assert result(server, queue_id, "r@secure.rt.test")[0] == "sent"
    [message] = received(secure, "r@secure.rt.test")
    assert message.mail.endswith(" REQUIRETLS")
    [session] = [s for s in secure.sessions if message in s.messages]
    assert session.tls
    assert re.search(r"%s: REQUIRETLS: TLS with mx.secure.rt.test\[127.0.0.71\]:\d+ "
                     r"verified, REQUIRETLS offered" % queue_id, server.log())


def test_the_queue_record_carries_requiretls(server):
    """Mail that must wait (its domain's name server refuses to answer) keeps its
    record: REQUIRETLS for the message that asked for it, not for the other."""
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.starttls(context=ssl._create_unverified_context())
        client.ehlo()
        client.sendmail("q@client.test", ["x@elsewhere.test"], b"Subject: q\r\n\r\nx\r\n",
                        mail_options=["REQUIRETLS"])
        client.sendmail("p@client.test", ["x@elsewhere.test"], b"Subject: p\r\n\r\nx\r\n")
    wait_for(lambda: len(server.queued_ids()) == 2)
    flags = {envelope.sender: envelope.requiretls
             for envelope, _ in map(server.message, server.queued_ids())}
    assert flags == {"q@client.test": True, "p@client.test": False}


@pytest.mark.parametrize("domain, status, why", [
    # RFC 8689 4.2.1: 5.7.30 where REQUIRETLS is not offered, 5.7.10 where TLS is not.
    ("noreq", "5.7.30", r"host mx.noreq.rt.test\[127.0.0.72\]:\d+ did not offer "
                        r"REQUIRETLS"),
    ("clear", "5.7.10", r"TLS is required, but was not offered by host "
                        r"mx.clear.rt.test\[127.0.0.73\]:\d+")])
def test_without_requiretls_or_tls_at_the_next_hop_the_message_bounces(
        server, mx_hosts, domain, status, why):
    recipient = "r@%s.rt.test" % domain
    sink = mx_hosts[1 if domain == "noreq" else 2]
    queue_id = send(server, "b-%s@client.test" % domain, recipient)
    outcome, reply = result(server, queue_id, recipient)
    assert outcome == "bounced"
    assert re.match(r"550 %s REQUIRETLS support required: "
                    r"(MTA-STS policy of %s.rt.test \(enforce\): )?%s" % (
                        re.escape(status), domain, why), reply), reply
    assert received(sink, recipient) == []
    assert all(m.content.find(b"secret body") < 0 for m in sink.messages)
    envelope, content = bounce_for(server, queue_id)
    assert envelope.requiretls and envelope.recipients[0].address == (
        "b-%s@client.test" % domain)
    assert b"Status: " + status.encode() in content
    assert b"Content-Type: text/rfc822-headers" in content
    assert b"secret body" not in content          # RFC 8689: the body is not returned


def test_tls_required_no_sends_despite_the_domains_mta_sts_policy(server, mx_hosts):
    """optout.rt.test's MTA-STS policy (enforce) wants TLS that its MX lacks: a message
    without the field is deferred, one with "TLS-Required: No" goes in clear."""
    clear = mx_hosts[2]
    kept = send(server, "k@client.test", "k@optout.rt.test", requiretls=False)
    status, reply = result(server, kept, "k@optout.rt.test")
    assert status == "deferred" and "MTA-STS policy of optout.rt.test" in reply, reply
    waived = send(server, "w@client.test", "w@optout.rt.test", requiretls=False,
                  headers=b"TLS-Required: No\r\n")
    assert result(server, waived, "w@optout.rt.test")[0] == "sent"
    [message] = received(clear, "w@optout.rt.test")
    assert b"TLS-Required: No" in message.content
    assert not [s for s in clear.sessions if message in s.messages][0].tls
    assert ("%s: TLS-Required: No: the MTA-STS policy of optout.rt.test is not applied"
            % waived) in server.log()
    assert received(clear, "k@optout.rt.test") == []


def test_an_mx_answer_nobody_vouches_for_is_not_trusted(server, mx_hosts):
    """spoofed.rt.test (unsigned zone, no MTA-STS policy) names mx.secure.rt.test as its
    MX: a valid certificate for that name, REQUIRETLS offered. But whoever can forge the
    MX answer chooses that name, so RFC 8689 4.2.1 does not count it: the message bounces
    with 5.7.10 before any connection, and the bounce says why."""
    secure = mx_hosts[0]
    queue_id = send(server, "sp@client.test", "r@spoofed.rt.test")
    status, reply = result(server, queue_id, "r@spoofed.rt.test")
    assert status == "bounced"
    assert reply == ("550 5.7.10 REQUIRETLS support required: the MX lookup of "
                     "spoofed.rt.test was not DNSSEC-validated (DNSSEC lookups are off: "
                     "see delivery.dane) and the domain has no MTA-STS policy in enforce "
                     "mode, so its MX host names cannot be trusted (RFC 8689 4.2.1)"), reply
    assert received(secure, "r@spoofed.rt.test") == []
    _, content = bounce_for(server, queue_id)
    assert b"Status: 5.7.10" in content
    assert b"not DNSSEC-validated" in content
    # Without REQUIRETLS the same domain gets its mail (opportunistic TLS).
    plain = send(server, "sp2@client.test", "r2@spoofed.rt.test", requiretls=False)
    assert result(server, plain, "r2@spoofed.rt.test")[0] == "sent"


def test_a_testing_mode_policy_does_not_vouch_for_the_mx(server, mx_hosts):
    """testing.rt.test (unsigned zone) publishes an MTA-STS policy naming its MX, whose
    certificate is valid and which offers REQUIRETLS; but the policy is in testing mode,
    which only reports (RFC 8461 5), so nothing vouches for the MX name (RFC 8689 4.2.1):
    the message bounces and never reaches that host."""
    secure = mx_hosts[0]
    queue_id = send(server, "tm@client.test", "r@testing.rt.test")
    status, reply = result(server, queue_id, "r@testing.rt.test")
    assert status == "bounced", reply
    assert reply.startswith("550 5.7.10 REQUIRETLS support required: the MX lookup of "
                            "testing.rt.test was not DNSSEC-validated"), reply
    assert "(its policy is in testing mode)" in reply, reply
    assert received(secure, "r@testing.rt.test") == []


def test_a_policy_that_cannot_be_fetched_defers_instead_of_bouncing(server, mx_hosts):
    """stsdown.rt.test (unsigned zone) publishes an MTA-STS TXT record, but its policy
    server is down: whether a policy would vouch for the MX cannot be found out yet, so
    the message waits in the queue (4.7.10) for a later try instead of bouncing on a
    passing failure, and nothing goes to the MX meanwhile."""
    secure = mx_hosts[0]
    queue_id = send(server, "sd@client.test", "r@stsdown.rt.test")
    status, reply = result(server, queue_id, "r@stsdown.rt.test")
    assert status == "deferred", reply
    assert reply.startswith("451 4.7.10 REQUIRETLS: the MX lookup of stsdown.rt.test was "
                            "not DNSSEC-validated and the MTA-STS policy of "
                            "stsdown.rt.test could not be fetched"), reply
    assert queue_id in server.queued_ids()
    envelope, _ = server.message(queue_id)
    assert [r.address for r in envelope.recipients] == ["r@stsdown.rt.test"]
    assert received(secure, "r@stsdown.rt.test") == []
    assert "%s: to=<r@stsdown.rt.test>" % queue_id in server.log()
    assert not re.search(r"%s: .*status=bounced" % queue_id, server.log())


def test_a_forwarded_copy_keeps_requiretls(server, mx_hosts):
    """A local alias sends far@example.test on to r@noreq.rt.test, whose MX offers no
    REQUIRETLS: the forwarded copy keeps the sender's REQUIRETLS (RFC 8689 4.1), so it
    bounces with 5.7.30 instead of going to a host that would not honour it."""
    noreq = mx_hosts[1]
    queue_id = send(server, "fw@client.test", "far@example.test")
    status, reply = result(server, queue_id, "far@example.test")
    assert status == "sent" and reply.startswith("250 2.0.0 forwarded as "), reply
    copy_id = reply.split()[-1]
    status, reply = result(server, copy_id, "r@noreq.rt.test")
    assert status == "bounced"
    assert re.match(r"550 5\.7\.30 REQUIRETLS support required: host "
                    r"mx\.noreq\.rt\.test\[127\.0\.0\.72\]:\d+ did not offer "
                    r"REQUIRETLS", reply), reply
    assert received(noreq, "r@noreq.rt.test") == []
    dsn, content = bounce_for(server, copy_id)
    assert dsn.requiretls and dsn.recipients[0].address == "fw@client.test"
    assert b"Status: 5.7.30" in content


def test_a_forwarded_double_bounce_stays_one(server):
    """A notice from <> to lost@ (aliased to a domain that does not exist) bounces: the
    double bounce goes to postmaster, aliased to that domain too. Its forwarded copy is
    still a double bounce, so its own failure makes no notice: without the mark each
    failure would make another, for ever."""
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.sendmail("", ["lost@example.test"], b"Subject: a notice\r\n\r\nx\r\n")

    def failed_copy_to(address):
        for queue_id in server.queued_ids():
            try:
                envelope, _ = server.message(queue_id)
            except FileNotFoundError:       # delivered meanwhile
                continue
            if [r.address for r in envelope.recipients] == [address]:
                return queue_id, envelope
        return None
    copy_id, copy = wait_for(lambda: failed_copy_to("pm@gone.rt.test"), timeout=30)
    assert copy.sender == "" and copy.extra == {"double_bounce": True}
    status, reply = result(server, copy_id, "pm@gone.rt.test")
    assert status == "bounced" and "5.1.2" in reply, reply
    # The queue settles with the two failed copies alone (the double bounce itself was
    # delivered, forwarded, and is gone); had the copy's failure made another double
    # bounce, each would add a failed copy, for ever.
    first_id, _ = failed_copy_to("x@gone.rt.test")
    wait_for(lambda: server.queued_ids() == sorted([first_id, copy_id]), timeout=30)
