"""MTA-STS (RFC 8461) for outbound mail, end to end with real peers on loopback.

Owned by the test suite. A private NSD (tests/peers/nsd.py) serves zone sts.test: each
recipient domain's MX, its _mta-sts TXT record and the address of its mta-sts host; a
loopback HTTPS server (tests/peers/https.py) with a certificate from a test CA made here
serves the policies; scripted SMTP servers (tests/peers/sink.py) with STARTTLS are the MX
hosts, one with a certificate for its MX name from the same CA, one with a certificate
for another name. The real `elemta` server delivers with delivery.mta_sts_ca_file set to
the test CA. Needs nsd.
See also: elemta.delivery.mtasts, elemta.delivery.smtp_transport, tests/test_delivery.py.
"""

import re
import socket

import pytest

from elemta.delivery.mtasts import (MTASTS, PolicyCache, PolicyFetcher, STSPolicy,
                                    STSPolicyError, mx_matches, parse_policy, published_id)
from elemta.delivery.mx import MXResolver
from tests.harness import delivery_result as result
from tests.harness import free_port, submit, wait_for
from tests.peers.https import PolicyServer, LoopbackCA
from tests.peers.nsd import NSDInstance, nsd_available, private_nsd
from tests.peers.sink import ScriptedServer
from tests.test_metrics import labelled, scrape

WEB = "127.0.0.30"          # the policy server of every domain but cached.sts.test
WEB_CACHED = "127.0.0.35"   # cached.sts.test's own, stopped during its test
GOOD_MX = "127.0.0.31"      # certificate for mx.good.sts.test
OTHER_MX = "127.0.0.32"     # certificate for mx.other.sts.test, a host no policy names
BAD_MX = "127.0.0.33"       # certificate for wrong.sts.test, though it is mx.bad.sts.test

ZONE = "sts.test"
RECORDS = """
mx.good           A   127.0.0.31
mx.other          A   127.0.0.32
mx.bad            A   127.0.0.33
enforce           MX  10 mx.good
_mta-sts.enforce  TXT "v=STSv1; id=20240101"
mta-sts.enforce   A   127.0.0.30
mismatch          MX  10 mx.other
_mta-sts.mismatch TXT "v=STSv1; id=1"
mta-sts.mismatch  A   127.0.0.30
badcert           MX  10 mx.bad
_mta-sts.badcert  TXT "v=STSv1; id=1"
mta-sts.badcert   A   127.0.0.30
testing           MX  10 mx.bad
_mta-sts.testing  TXT "v=STSv1; id=1"
mta-sts.testing   A   127.0.0.30
cached            MX  10 mx.good
_mta-sts.cached   TXT "v=STSv1; id=7"
mta-sts.cached    A   127.0.0.35
refresh           MX  10 mx.good
mta-sts.refresh   A   127.0.0.30
"""
# refresh.sts.test's TXT record, whose id its test changes (in an NSD of its own).
REFRESH_TXT = '_mta-sts.refresh TXT "v=STSv1; id=%s"\n'


def policy(mode, *mx):
    return "version: STSv1\r\nmode: %s\r\n%smax_age: 86400\r\n" % (
        mode, "".join("mx: %s\r\n" % m for m in mx))


POLICIES = {"mta-sts.enforce.sts.test": policy("enforce", "*.good.sts.test"),
            "mta-sts.mismatch.sts.test": policy("enforce", "mx.good.sts.test"),
            "mta-sts.badcert.sts.test": policy("enforce", "mx.bad.sts.test"),
            "mta-sts.testing.sts.test": policy("testing", "mx.good.sts.test"),
            "mta-sts.cached.sts.test": policy("enforce", "mx.good.sts.test"),
            "mta-sts.refresh.sts.test": policy("enforce", "mx.other.sts.test")}



# -- the policy language (RFC 8461 3.1, 3.2, 4.1) --------------------------------------

def test_the_txt_record_gives_the_policy_id_only_when_exactly_one_is_valid():
    assert published_id(["v=STSv1; id=20160831085700Z;"]) == "20160831085700Z"
    assert published_id(["v=spf1 -all", "v=STSv1; id=abc"]) == "abc"
    assert published_id(["v=STSv1; id=a", "v=STSv1; id=b"]) is None
    assert published_id(["v=STSv1; id=not-alphanumeric"]) is None
    assert published_id(["v=STSv1;"]) is None
    assert published_id([]) is None


def test_a_policy_parses_and_a_broken_one_says_what_is_wrong():
    parsed = parse_policy("version: STSv1\nmode: enforce\nmx: mail.example.org\n"
                          "mx: *.example.net\nmax_age: 604800\n", "example.org", "x", 100.0)
    assert parsed == STSPolicy("example.org", "x", "enforce",
                            ("mail.example.org", "*.example.net"), 604800, 100.0)
    assert parsed.expires == 604900.0
    with pytest.raises(STSPolicyError, match="mode is 'strict'"):
        parse_policy("version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n", "d", "x", 0)
    with pytest.raises(STSPolicyError, match="no mx line"):
        parse_policy("version: STSv1\nmode: enforce\nmax_age: 1\n", "d", "x", 0)
    with pytest.raises(STSPolicyError, match="max_age"):
        parse_policy("version: STSv1\nmode: none\nmax_age: soon\n", "d", "x", 0)
    # A year at most (RFC 8461 3.2), whatever the policy says.
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 9999999999\n", "d", "x",
                        0).max_age == 31557600


def test_a_wildcard_mx_pattern_matches_exactly_one_label():
    assert mx_matches("*.example.net", "mx1.Example.NET.")
    assert not mx_matches("*.example.net", "example.net")
    assert not mx_matches("*.example.net", "a.mx1.example.net")
    assert mx_matches("mail.example.org", "MAIL.example.org")
    assert not mx_matches("mail.example.org", "mail2.example.org")


# -- delivery under a policy, end to end -------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return LoopbackCA(tmp_path_factory.mktemp("sts-ca"))


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
    cert, key = pki.issue(*[name for name in POLICIES if "cached" not in name])
    with PolicyServer(WEB, web_port, cert, key, POLICIES) as server:
        yield server


@pytest.fixture(scope="module")
def mx_port():
    return free_port(GOOD_MX)


@pytest.fixture(scope="module")
def mx_hosts(pki, mx_port):
    """The MX hosts, each with STARTTLS: (good, other, bad)."""
    servers = []
    for address, name in ((GOOD_MX, "mx.good.sts.test"), (OTHER_MX, "mx.other.sts.test"),
                          (BAD_MX, "wrong.sts.test")):
        cert, key = pki.issue(name)
        servers.append(ScriptedServer(address=address, port=mx_port, cert_file=cert,
                                      key_file=key).start())
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture
def start(elemta_server, nsd, mx_port, pki, web_port):
    def starter(api_port=None, **delivery):
        settings = {"workers": 1, "mx_port": mx_port, "nameservers": ["127.0.0.1"],
                    "dns_port": nsd.port, "min_backoff": 60, "max_backoff": 60,
                    "connect_timeout": 2.0, "command_timeout": 5.0, "data_timeout": 5.0,
                    "mta_sts_ca_file": pki.ca_file, "mta_sts_port": web_port,
                    "mta_sts_timeout": 5.0}
        settings.update(delivery)
        api = {"enabled": False}
        if api_port is not None:        # to read the metrics
            api = {"enabled": True, "port": api_port}
        server = elemta_server(delivery=settings, api=api)
        wait_for(lambda: "delivery worker started" in server.log())
        return server
    return starter


def test_a_failed_txt_lookup_is_told_apart_from_no_record(nsd, pki, web_port, tmp_path):
    """RFC 8461 treats both as no policy, but REQUIRETLS defers on the first (it may not
    trust the MX without the policy, and must not bounce on a passing failure): a name
    server that never answers leaves the policy unknown; NXDOMAIN is known to be none."""
    def lookup(port, domain):
        resolver = MXResolver(["127.0.0.1"], port=port, timeout=1.0, attempts=1)
        fetcher = PolicyFetcher(resolver, pki.ca_file, web_port, 5.0)
        return MTASTS(resolver, PolicyCache(str(tmp_path)), fetcher).lookup(domain)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))        # bound, so queries are dropped, not refused
        found = lookup(silent.getsockname()[1], "enforce.sts.test")
    assert found.policy is None
    assert found.unknown.startswith("the MTA-STS TXT lookup for enforce.sts.test failed"), \
        found.unknown
    found = lookup(nsd.port, "absent.sts.test")
    assert found.policy is None and found.unknown is None


def received_by(server, recipient):
    """The sessions of a scripted server that carried mail for recipient."""
    return [s for s in server.sessions for m in s.messages
            if m.rcpts == ["RCPT TO:<%s>" % recipient]]


@pytest.mark.usefixtures("web")
def test_enforce_with_a_named_mx_and_a_valid_certificate_delivers_over_tls(start, mx_hosts):
    good = mx_hosts[0]
    server = start()
    queue_id = submit(server, "e@client.test", "r@enforce.sts.test")
    assert result(server, queue_id, "r@enforce.sts.test")[0] == "sent"
    [session] = received_by(good, "r@enforce.sts.test")
    assert session.tls
    log = server.log()
    assert "MTA-STS policy of enforce.sts.test fetched: mode enforce, id 20240101" in log
    assert re.search(r"%s: MTA-STS policy of enforce.sts.test \(enforce\): TLS with "
                     r"mx.good.sts.test\[127.0.0.31\]:\d+ verified" % queue_id, log)


@pytest.mark.usefixtures("web")
def test_enforce_defers_mail_for_an_mx_the_policy_does_not_name(start, mx_hosts):
    other = mx_hosts[1]
    api_port = free_port()
    server = start(api_port=api_port)
    queue_id = submit(server, "m@client.test", "r@mismatch.sts.test")
    status, reply = result(server, queue_id, "r@mismatch.sts.test")
    assert status == "deferred"
    assert reply == ("451 4.7.5 MX host mx.other.sts.test not named by the MTA-STS policy "
                     "of mismatch.sts.test (enforce): mx mx.good.sts.test")
    assert received_by(other, "r@mismatch.sts.test") == []
    # Counted as a policy deferral (not a TLS or connection problem).
    wait_for(lambda: labelled(scrape(api_port)[0], "elemta_delivery_deferrals_total")
             == {("remote", "policy", "smtp"): 1})


@pytest.mark.usefixtures("web")
def test_enforce_defers_mail_when_the_certificate_does_not_name_the_mx(start, mx_hosts):
    bad = mx_hosts[2]
    api_port = free_port()
    server = start(api_port=api_port)
    queue_id = submit(server, "b@client.test", "r@badcert.sts.test")
    status, reply = result(server, queue_id, "r@badcert.sts.test")
    assert status == "deferred"
    assert reply.startswith("451 4.7.5 MTA-STS policy of badcert.sts.test (enforce): TLS "
                            "handshake with mx.bad.sts.test[127.0.0.33]"), reply
    assert "certificate verify failed" in reply and "mx.bad.sts.test" in reply, reply
    assert received_by(bad, "r@badcert.sts.test") == []
    # The policy refused what "may" would have sent: a policy deferral.
    wait_for(lambda: labelled(scrape(api_port)[0], "elemta_delivery_deferrals_total")
             == {("remote", "policy", "smtp"): 1})


@pytest.mark.usefixtures("web")
def test_testing_mode_delivers_and_logs_what_enforce_would_have_refused(start, mx_hosts):
    bad = mx_hosts[2]
    server = start()
    queue_id = submit(server, "t@client.test", "r@testing.sts.test")
    assert result(server, queue_id, "r@testing.sts.test")[0] == "sent"
    assert len(received_by(bad, "r@testing.sts.test")) == 1
    log = server.log()
    assert ("%s: MX host mx.bad.sts.test not named by the MTA-STS policy of "
            "testing.sts.test (testing): mx mx.good.sts.test; delivering anyway "
            "(testing mode)" % queue_id) in log
    assert re.search(r"%s: MTA-STS policy of testing.sts.test \(testing\): TLS handshake "
                     r"with mx.bad.sts.test\[127.0.0.33\]:\d+ failed: certificate verify "
                     r"failed.*; delivering without it \(testing mode\)" % queue_id, log)


def test_a_cached_policy_outlives_its_server_and_a_restart(start, mx_hosts, pki, web_port):
    """The policy server answers once; the policy, cached under the spool with its
    max_age, keeps applying for the next message and after Elemta restarts."""
    good = mx_hosts[0]
    cert, key = pki.issue("mta-sts.cached.sts.test")
    web = PolicyServer(WEB_CACHED, web_port, cert, key, POLICIES).__enter__()
    try:
        server = start()
        first = submit(server, "c1@client.test", "r1@cached.sts.test")
        assert result(server, first, "r1@cached.sts.test")[0] == "sent"
    finally:
        web.stop()
    assert web.fetches == ["mta-sts.cached.sts.test"]
    second = submit(server, "c2@client.test", "r2@cached.sts.test")
    assert result(server, second, "r2@cached.sts.test")[0] == "sent"
    server.stop()
    server.start()
    third = submit(server, "c3@client.test", "r3@cached.sts.test")
    assert result(server, third, "r3@cached.sts.test")[0] == "sent"
    log = server.log()
    # The second went over the first's session, parked for mail under the same policy;
    # the third, after the restart, over a new session verified as the policy says.
    [session] = received_by(good, "r1@cached.sts.test")
    assert session.tls and received_by(good, "r2@cached.sts.test") == [session]
    assert re.search(r"%s: MTA-STS policy of cached.sts.test \(enforce\): TLS with "
                     r"mx.good.sts.test\[127.0.0.31\]:\d+ verified" % third, log)
    assert received_by(good, "r3@cached.sts.test")[0].tls
    assert log.count("MTA-STS policy of cached.sts.test fetched") == 1
    assert "not fetched" not in log


@pytest.mark.usefixtures("web")
def test_a_tls_policy_entry_turns_mta_sts_off_for_its_domain(start, mx_hosts):
    """delivery.tls_policy's explicit level wins over the domain's policy (mta_sts on)."""
    other = mx_hosts[1]
    server = start(tls_policy=[{"domain": "mismatch.sts.test", "level": "may"}])
    queue_id = submit(server, "p@client.test", "r@mismatch.sts.test")
    assert result(server, queue_id, "r@mismatch.sts.test")[0] == "sent"
    assert len(received_by(other, "r@mismatch.sts.test")) == 1
    assert "MTA-STS policy of mismatch" not in server.log()


@pytest.mark.usefixtures("web")
def test_a_policy_server_whose_certificate_is_not_trusted_gives_no_policy(
        start, mx_hosts, tmp_path):
    """RFC 8461 3.3: the policy counts only over HTTPS with a valid certificate; without
    one the domain has no policy in force, and its mail goes as without MTA-STS."""
    other = mx_hosts[1]
    stranger = LoopbackCA(tmp_path / "other-ca", "Some Other CA")
    server = start(mta_sts_ca_file=stranger.ca_file)
    queue_id = submit(server, "u@client.test", "u@mismatch.sts.test")
    assert result(server, queue_id, "u@mismatch.sts.test")[0] == "sent"
    assert len(received_by(other, "u@mismatch.sts.test")) == 1
    assert re.search(r"MTA-STS policy of mismatch.sts.test \(id 1\) not fetched: "
                     r"https://mta-sts.mismatch.sts.test/.well-known/mta-sts.txt "
                     r"\(127.0.0.30\): TLS failed: unable to get local issuer certificate",
                     server.log()), server.log()


@pytest.mark.usefixtures("web")
def test_a_tls_policy_entry_of_level_mta_sts_applies_the_policy_where_mta_sts_is_off(
        start, mx_hosts):
    """delivery.mta_sts off: only the domain whose tls_policy entry says mta-sts gets its
    policy enforced (deferred: its MX is not named); another goes as without it."""
    other, bad = mx_hosts[1], mx_hosts[2]
    server = start(mta_sts=False,
                   tls_policy=[{"domain": "mismatch.sts.test", "level": "mta-sts"}])
    held = submit(server, "l1@client.test", "lvl@mismatch.sts.test")
    status, reply = result(server, held, "lvl@mismatch.sts.test")
    assert status == "deferred"
    assert reply == ("451 4.7.5 MX host mx.other.sts.test not named by the MTA-STS policy "
                     "of mismatch.sts.test (enforce): mx mx.good.sts.test")
    assert received_by(other, "lvl@mismatch.sts.test") == []
    free = submit(server, "l2@client.test", "lvl@badcert.sts.test")
    assert result(server, free, "lvl@badcert.sts.test")[0] == "sent"
    assert len(received_by(bad, "lvl@badcert.sts.test")) == 1
    assert "MTA-STS policy of badcert" not in server.log()


def test_a_new_policy_id_is_fetched_and_the_same_id_is_not(start, mx_hosts, web, nsd,
                                                          tmp_path):
    """refresh.sts.test first publishes (id 1) a policy that names another MX: its mail is
    deferred. Its owner fixes the policy file but not the id: the cached policy still
    applies and nothing is fetched. Then the TXT record says id 2: the next message has
    the policy fetched again (RFC 8461 5.1) and goes to its MX."""
    good = mx_hosts[0]
    own = NSDInstance(tmp_path / "nsd1", {ZONE: RECORDS + REFRESH_TXT % 1}).start()
    try:
        server = start(dns_port=own.port)
        first = submit(server, "f1@client.test", "r1@refresh.sts.test")
        status, reply = result(server, first, "r1@refresh.sts.test")
        assert status == "deferred" and "not named by the MTA-STS policy of " \
            "refresh.sts.test" in reply, reply
        assert web.fetches.count("mta-sts.refresh.sts.test") == 1

        web.policies["mta-sts.refresh.sts.test"] = policy("enforce", "mx.good.sts.test")
        second = submit(server, "f2@client.test", "r2@refresh.sts.test")
        assert result(server, second, "r2@refresh.sts.test")[0] == "deferred"
        assert web.fetches.count("mta-sts.refresh.sts.test") == 1     # id unchanged

        own.stop()
        own = NSDInstance(tmp_path / "nsd2", {ZONE: RECORDS + REFRESH_TXT % 2},
                          port=own.port).start()
        third = submit(server, "f3@client.test", "r3@refresh.sts.test")
        assert result(server, third, "r3@refresh.sts.test")[0] == "sent"
        assert received_by(good, "r3@refresh.sts.test")[0].tls
        assert web.fetches.count("mta-sts.refresh.sts.test") == 2
        assert "MTA-STS policy of refresh.sts.test fetched: mode enforce, id 2, " \
            "max_age 86400, mx mx.good.sts.test" in server.log()
    finally:
        own.stop()
        web.policies["mta-sts.refresh.sts.test"] = POLICIES["mta-sts.refresh.sts.test"]
