"""TLS-RPT (RFC 8460): TLS session results counted per policy domain, and the reports
read as their recipients get them.

Owned by the test suite. End to end with real peers on loopback, as tests/test_mta_sts.py
sets them up: a private NSD (tests/peers/nsd.py) serves zone rpt.test (MX, _mta-sts and
_smtp._tls TXT records), a loopback HTTPS server with a test CA
(tests/peers/https.py) serves the MTA-STS policies, scripted SMTP servers
(tests/peers/sink.py) are the MX hosts: one with a certificate for its name, one with a
certificate for another name, and a plain one that takes the reports for the rua
address. The real `elemta` delivers, `elemtactl tlsrpt show/send` reads and sends, and
the report is read from the message the rua's server got. Needs nsd.
See also: elemta.tlsrpt, elemta.delivery.tlsreports, elemta.cli.tlsrptcmd.
"""

import email
import email.policy
import gzip
import json
import time

import pytest

from elemta.delivery.tlsreports import due_days
from elemta.tlsrpt.counter import TLSCounter
from elemta.tlsrpt.report import rua_uris
from elemta.tlsrpt.results import (CERTIFICATE_HOST_MISMATCH, STS, STS_POLICY_FETCH_ERROR,
                                   ReportedPolicy)
from elemta.tlsrpt.store import CountStore
from tests.harness import delivery_result as result
from tests.harness import free_port, submit, wait_for
from tests.peers.https import LoopbackCA, PolicyServer
from tests.peers.nsd import nsd_available, private_nsd
from tests.peers.sink import ScriptedServer
from tests.test_acme import elemtactl

WEB = "127.0.0.60"
GOOD_MX = "127.0.0.61"      # certificate for mx.good.rpt.test
BAD_MX = "127.0.0.62"       # certificate for wrong.rpt.test, though it is mx.bad.rpt.test
RUA_MX = "127.0.0.63"       # no TLS: takes the reports for tls-reports@rua.rpt.test
RUA = "tls-reports@rua.rpt.test"

ZONE = "rpt.test"
RECORDS = """
mx.good            A   127.0.0.61
mx.bad             A   127.0.0.62
mx.rua             A   127.0.0.63
rua                MX  10 mx.rua
good               MX  10 mx.good
_mta-sts.good      TXT "v=STSv1; id=1"
mta-sts.good       A   127.0.0.60
_smtp._tls.good    TXT "v=TLSRPTv1; rua=mailto:tls-reports@rua.rpt.test"
testing            MX  10 mx.bad
_mta-sts.testing   TXT "v=STSv1; id=1"
mta-sts.testing    A   127.0.0.60
_smtp._tls.testing TXT "v=TLSRPTv1;rua=https://reports.example/x,mailto:tls-reports@rua.rpt.test"
bad                MX  10 mx.bad
_mta-sts.bad       TXT "v=STSv1; id=1"
mta-sts.bad        A   127.0.0.60
_smtp._tls.bad     TXT "v=TLSRPTv1; rua=mailto:tls-reports@rua.rpt.test"
nopolicy           MX  10 mx.good
_mta-sts.nopolicy  TXT "v=STSv1; id=1"
mta-sts.nopolicy   A   127.0.0.60
_smtp._tls.nopolicy TXT "v=TLSRPTv1; rua=mailto:tls-reports@rua.rpt.test"
"""


def policy(mode, mx):
    return "version: STSv1\r\nmode: %s\r\nmx: %s\r\nmax_age: 86400\r\n" % (mode, mx)


# mta-sts.nopolicy.rpt.test has no policy on the server: its fetch gets a 404.
POLICIES = {"mta-sts.good.rpt.test": policy("enforce", "mx.good.rpt.test"),
            "mta-sts.testing.rpt.test": policy("testing", "mx.bad.rpt.test"),
            "mta-sts.bad.rpt.test": policy("enforce", "mx.bad.rpt.test")}


# -- the parts -------------------------------------------------------------------------

def rua_addresses(records):
    """The mailto: part of rua_uris (its https: part: tests/test_tlsrpt_https.py)."""
    addresses, _, why = rua_uris(records)
    return addresses, why


def test_the_rua_is_the_mailto_addresses_of_exactly_one_record():
    assert rua_addresses(["v=TLSRPTv1; rua=mailto:tls%2Dreports@example.org"]) == \
        (["tls-reports@example.org"], None)
    assert rua_addresses(["v=TLSRPTv1; rua=mailto:a@example.org,mailto:b@example.net"]) == \
        (["a@example.org", "b@example.net"], None)
    assert rua_addresses(["v=spf1 -all", "v=TLSRPTv1;rua=mailto:r@example.org?x=1"]) == \
        (["r@example.org"], None)
    assert rua_addresses(["v=TLSRPTv1; rua=ftp://example.org/r"]) == \
        ([], "no usable mailto: or https: rua (only ftp://example.org/r)")
    assert rua_addresses(["v=TLSRPTv1; rua=mailto:a@b.example", "v=TLSRPTv1; rua=x"]) == \
        ([], "2 v=TLSRPTv1 records")
    assert rua_addresses([]) == ([], "0 v=TLSRPTv1 records")


def test_counts_add_up_on_disk_and_only_one_claim_of_a_day_wins(tmp_path):
    now = 1700000000.0                         # 2023-11-14 22:13:20 UTC
    counter = TLSCounter(clock=lambda: now)
    sts = ReportedPolicy(STS, "example.org", ("version: STSv1",), ("mx.example.org",))
    counter.success(sts)
    counter.success(sts)
    counter.failure(sts, CERTIFICATE_HOST_MISMATCH, "mx.example.org", "192.0.2.1", "why")
    store = CountStore(str(tmp_path))
    try:
        store.add(counter.take())
        assert not counter.pending
        counter.failure(sts, CERTIFICATE_HOST_MISMATCH, "mx.example.org", "192.0.2.1",
                        "why")
        store.add(counter.take())
        [entry] = store.counts("2023-11-14")
        assert (entry["success"], entry["failure"]) == (2, 2)
        assert entry["policy"]["policy-domain"] == "example.org"
        assert list(entry["details"].values()) == [2]
        assert store.days() == ["2023-11-14"]
        assert store.claim("2023-11-14", "worker 1", now)
        assert not store.claim("2023-11-14", "worker 2", now)
        assert store.claimed("2023-11-14")["by"] == "worker 1"
        assert store.claim("2023-11-14", "elemtactl", now, force=True)
        assert store.prune("2023-11-15") == 1 and store.days() == []
    finally:
        store.close()


def test_a_day_is_reported_after_send_hour_the_next_day():
    days = ["2023-11-13", "2023-11-14"]
    # 2023-11-15 00:30 UTC: send_hour 1 has not come; send_hour 0 has, for the 14th.
    assert due_days(days, 1700008200.0, 1) == ["2023-11-13"]
    assert due_days(days, 1700008200.0, 0) == days


# -- end to end ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return LoopbackCA(tmp_path_factory.mktemp("tlsrpt-ca"))


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
    cert, key = pki.issue(*(list(POLICIES) + ["mta-sts.nopolicy.rpt.test"]))
    with PolicyServer(WEB, web_port, cert, key, POLICIES) as server:
        yield server


@pytest.fixture(scope="module")
def mx_port():
    return free_port(GOOD_MX)


@pytest.fixture(scope="module")
def mx_hosts(pki, mx_port):
    """(good, bad, rua) MX hosts; the first two with STARTTLS."""
    servers = []
    for address, name in ((GOOD_MX, "mx.good.rpt.test"), (BAD_MX, "wrong.rpt.test"),
                          (RUA_MX, None)):
        cert, key = pki.issue(name) if name else (None, None)
        servers.append(ScriptedServer(address=address, port=mx_port, cert_file=cert,
                                      key_file=key).start())
    yield servers
    for server in servers:
        server.stop()


def test_sessions_are_counted_and_the_reports_reach_the_rua(
        elemta_server, nsd, web, mx_hosts, mx_port, pki, web_port):
    rua_server = mx_hosts[2]
    server = elemta_server(
        delivery={"workers": 1, "mx_port": mx_port, "nameservers": ["127.0.0.1"],
                  "dns_port": nsd.port, "min_backoff": 3600, "max_backoff": 3600,
                  "connect_timeout": 2.0, "command_timeout": 5.0, "data_timeout": 5.0,
                  "mta_sts_ca_file": pki.ca_file, "mta_sts_port": web_port,
                  "mta_sts_timeout": 5.0},
        tlsrpt={"enabled": True, "organization": "Elemta Test",
                "sender": "tlsrpt@mx.test"},
        api={"enabled": False})
    wait_for(lambda: "delivery worker started" in server.log())
    # enforce, valid: one session verified.
    good = submit(server, "g@client.test", "r@good.rpt.test")
    assert result(server, good, "r@good.rpt.test")[0] == "sent"
    # testing, the certificate names another host: a failure, delivered all the same.
    testing = submit(server, "t@client.test", "r@testing.rpt.test")
    assert result(server, testing, "r@testing.rpt.test")[0] == "sent"
    # enforce, the same certificate: a failure, the mail deferred.
    bad = submit(server, "b@client.test", "r@bad.rpt.test")
    assert result(server, bad, "r@bad.rpt.test")[0] == "deferred"
    # A policy announced but not to be had (404): a fetch error; delivered without it.
    nopolicy = submit(server, "n@client.test", "r@nopolicy.rpt.test")
    assert result(server, nopolicy, "r@nopolicy.rpt.test")[0] == "sent"

    def shown():
        out = elemtactl(server, "tlsrpt", "show").stdout
        return out if "sts nopolicy.rpt.test: 0 successful, 1 failed" in out else None
    shown = wait_for(shown)
    assert "sts good.rpt.test: 1 successful, 0 failed" in shown
    assert "sts bad.rpt.test: 0 successful, 1 failed" in shown
    assert ("    certificate-host-mismatch mx.bad.rpt.test[127.0.0.62]: 1 (TLS handshake "
            "with mx.bad.rpt.test[127.0.0.62]") in shown
    assert ": not sent yet" in shown

    sent = elemtactl(server, "tlsrpt", "send", "--date", "today")
    assert sent.returncode == 0, sent.stderr
    lines = sorted(sent.stdout.splitlines())
    # testing.rpt.test's rua has an https: URL too, whose host has no address here.
    [unposted] = [line for line in lines if " not posted to " in line]
    assert unposted.startswith("testing.rpt.test: report ") and (
        "not posted to https://reports.example/x: no address for reports.example"
        in unposted), unposted
    lines.remove(unposted)
    assert len(lines) == 4 and all(" queued to %s " % RUA in line for line in lines), lines
    assert lines[0].startswith("bad.rpt.test: report ")

    def reports():
        found = [m for s in rua_server.sessions for m in s.messages]
        return found if len(found) == 4 else None
    messages = {}
    for message in wait_for(reports, timeout=30):
        assert message.rcpts == ["RCPT TO:<%s>" % RUA]
        assert message.mail.startswith("MAIL FROM:<tlsrpt@mx.test>")
        parsed = email.message_from_bytes(message.content, policy=email.policy.default)
        messages[parsed["TLS-Report-Domain"]] = parsed
    assert sorted(messages) == ["bad.rpt.test", "good.rpt.test", "nopolicy.rpt.test",
                                "testing.rpt.test"]
    today = time.strftime("%Y-%m-%d", time.gmtime())

    def report_of(domain):
        parsed = messages[domain]
        assert parsed.get_content_type() == "multipart/report"
        assert parsed.get_param("report-type") == "tlsrpt"
        assert parsed["TLS-Report-Submitter"] == "mx.test"
        assert parsed["TLS-Required"] == "No"
        assert parsed["Subject"] == ("Report Domain: %s Submitter: mx.test Report-ID: "
                                     "<%s.%s@mx.test>" % (domain, today, domain))
        text, attachment = parsed.get_payload()
        assert text.get_content_type() == "text/plain"
        assert attachment.get_content_type() == "application/tlsrpt+gzip"
        assert attachment.get_content_disposition() == "attachment"
        assert attachment.get_filename().startswith("mx.test!%s!" % domain)
        assert attachment.get_filename().endswith(".json.gz")
        report = json.loads(gzip.decompress(attachment.get_payload(decode=True)))
        assert report["organization-name"] == "Elemta Test"
        assert report["contact-info"] == "tlsrpt@mx.test"
        assert report["report-id"] == "%s.%s@mx.test" % (today, domain)
        assert report["date-range"] == {"start-datetime": today + "T00:00:00Z",
                                        "end-datetime": today + "T23:59:59Z"}
        [entry] = report["policies"]
        return entry

    good_entry = report_of("good.rpt.test")
    assert good_entry["policy"] == {
        "policy-type": "sts", "policy-domain": "good.rpt.test",
        "policy-string": ["version: STSv1", "mode: enforce", "mx: mx.good.rpt.test",
                          "max_age: 86400"],
        "mx-host": ["mx.good.rpt.test"]}
    assert good_entry["summary"] == {"total-successful-session-count": 1,
                                     "total-failure-session-count": 0}
    assert good_entry["failure-details"] == []
    for domain, mode in (("testing.rpt.test", "testing"), ("bad.rpt.test", "enforce")):
        entry = report_of(domain)
        assert entry["policy"]["policy-string"][1] == "mode: " + mode
        assert entry["summary"] == {"total-successful-session-count": 0,
                                    "total-failure-session-count": 1}
        [detail] = entry["failure-details"]
        assert detail["result-type"] == CERTIFICATE_HOST_MISMATCH
        assert detail["receiving-mx-hostname"] == "mx.bad.rpt.test"
        assert detail["receiving-ip"] == BAD_MX
        assert detail["failed-session-count"] == 1
        assert "certificate verify failed" in detail["failure-reason-code"]
    entry = report_of("nopolicy.rpt.test")
    assert entry["policy"] == {"policy-type": "sts", "policy-domain": "nopolicy.rpt.test",
                               "policy-string": []}
    [detail] = entry["failure-details"]
    assert detail["result-type"] == STS_POLICY_FETCH_ERROR
    assert "answered 404" in detail["failure-reason-code"]
    # The day is marked as sent by hand: the daily run leaves it be.
    assert "%s: reports sent by elemtactl" % today in elemtactl(
        server, "tlsrpt", "show", "--date", "today").stdout
