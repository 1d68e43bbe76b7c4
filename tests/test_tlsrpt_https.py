"""TLS-RPT reports POSTed to https: ruas (RFC 8460 3 and 5.4), alongside the mailto: ones.

Owned by the test suite. A private NSD (tests/peers/nsd.py) serves zone rpt2.test: the
_smtp._tls TXT records of the policy domains and the address of the report servers, two
loopback HTTPS servers (tests/peers/https.py): one with a certificate from the CA that
tlsrpt.https_ca_file names, one with a certificate from a CA nobody trusts. The counts
are put in the spool's count store as the delivery workers put them (their counting is
tests/test_tlsrpt.py's business); `elemtactl tlsrpt send` sends, and what the server got
is decompressed and read. Needs nsd.
See also: elemta.tlsrpt.post, elemta.tlsrpt.send, tests/test_tlsrpt.py.
"""

import gzip
import json
import time

import pytest

from elemta.config.loader import load_config
from elemta.delivery.tlsreports import TLSReporting
from elemta.tlsrpt.counter import TLSCounter
from elemta.tlsrpt.post import is_public
from elemta.tlsrpt.report import rua_uris
from elemta.tlsrpt.results import CERTIFICATE_HOST_MISMATCH, STS, ReportedPolicy
from elemta.tlsrpt.send import MAX_POST_ATTEMPTS
from elemta.tlsrpt.store import CountStore
from tests.harness import free_port
from tests.peers.https import LoopbackCA, ReportServer
from tests.peers.nsd import nsd_available, private_nsd
from tests.test_acme import elemtactl

REPORTS = "127.0.0.80"          # reports.rpt2.test: a certificate the CA file vouches for
UNTRUSTED = "127.0.0.81"        # untrusted.rpt2.test: a certificate from another CA
ZONE = "rpt2.test"


def test_the_rua_yields_mailto_addresses_and_https_urls():
    assert rua_uris(["v=TLSRPTv1; rua=https://example.org/r"]) == (
        [], ["https://example.org/r"], None)
    assert rua_uris(["v=TLSRPTv1;rua=mailto:a@example.org,https://r.example:8443/x?y=1"]) \
        == (["a@example.org"], ["https://r.example:8443/x?y=1"], None)
    # Neither plain http nor a URL with a user, a bad port or a space is posted to.
    assert rua_uris(["v=TLSRPTv1; rua=http://example.org/r,https://u@example.org/,"
                     "https://example.org:x/"]) == (
        [], [], "no usable mailto: or https: rua (only http://example.org/r, "
                "https://u@example.org/ (no host, or a user name in it), "
                "https://example.org:x/ (Port could not be cast to integer value as 'x'))")


@pytest.mark.parametrize("address, public", [
    ("192.0.2.80", False), ("10.1.2.3", False), ("172.16.0.1", False),
    ("192.168.1.1", False), ("169.254.169.254", False), ("100.64.0.1", False),
    ("127.0.0.80", False), ("0.0.0.0", False), ("224.0.0.1", False),
    ("240.0.0.1", False), ("::1", False), ("fe80::1", False), ("fd00::1", False),
    ("::ffff:10.0.0.1", False), ("ff02::1", False),
    ("8.8.8.8", True), ("2001:4860:4860::8888", True), ("::ffff:8.8.8.8", True)])
def test_only_global_unicast_addresses_count_as_public(address, public):
    assert is_public(address) is public


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return (LoopbackCA(tmp_path_factory.mktemp("rpt2-ca"), "Elemta TLS-RPT Test CA"),
            LoopbackCA(tmp_path_factory.mktemp("rpt2-other"), "A CA nobody trusts"))


@pytest.fixture(scope="module")
def report_servers(pki):
    trusted, other = pki
    port = free_port(REPORTS)
    with ReportServer(REPORTS, port, *trusted.issue("reports.rpt2.test")) as good, \
            ReportServer(UNTRUSTED, port, *other.issue("untrusted.rpt2.test")) as bad:
        yield good, bad, port


@pytest.fixture(scope="module")
def nsd(report_servers):
    if nsd_available():
        pytest.skip(nsd_available())
    port = report_servers[2]
    records = "\n".join([
        "reports A %s" % REPORTS,
        "untrusted A %s" % UNTRUSTED,
        '_smtp._tls.both TXT "v=TLSRPTv1; rua=mailto:tls@rua.rpt2.test,'
        'https://reports.rpt2.test:%d/v1/both"' % port,
        '_smtp._tls.refused TXT "v=TLSRPTv1; rua=https://reports.rpt2.test:%d/v1/refused"'
        % port,
        '_smtp._tls.untrusted TXT "v=TLSRPTv1; rua=https://untrusted.rpt2.test:%d/v1/x"'
        % port,
        # Probes of the sender's own network (SSRF), refused unless allowed.
        '_smtp._tls.private TXT "v=TLSRPTv1; rua=https://reports.rpt2.test/v1/private"',
        '_smtp._tls.literal TXT "v=TLSRPTv1; rua=https://[::ffff:%s]/v1/literal"' % REPORTS,
        '_smtp._tls.port TXT "v=TLSRPTv1; rua=https://reports.rpt2.test:%d/v1/port"'
        % port]) + "\n"
    with private_nsd({ZONE: records}) as server:
        yield server


def count_sessions(spool, domains):
    """A success and a failure for each domain's MTA-STS policy, today, as the delivery
    workers count them."""
    counter = TLSCounter()
    for domain in domains:
        policy = ReportedPolicy(STS, domain, ("version: STSv1", "mode: enforce"),
                                ("mx.%s" % domain,))
        counter.success(policy)
        counter.failure(policy, CERTIFICATE_HOST_MISMATCH, "mx.%s" % domain, "192.0.2.7",
                        "certificate verify failed")
    store = CountStore(spool)
    try:
        store.add(counter.take())
    finally:
        store.close()


def posted_reports(server, path):
    """The reports POSTed to path: (headers, the decompressed JSON)."""
    return [(headers, json.loads(gzip.decompress(body)))
            for where, headers, body in server.posts if where == path]


def test_reports_are_posted_to_https_ruas_alongside_mailto_and_failures_retried(
        elemta_server, nsd, report_servers, pki):
    good, untrusted, port = report_servers
    good.status["/v1/refused"] = 503
    server = elemta_server(
        # Deadlines a loaded machine cannot run out: no test waits for them.
        delivery={"workers": 0, "nameservers": ["127.0.0.1"], "dns_port": nsd.port,
                  "dns_timeout": 20.0},
        tlsrpt={"enabled": True, "organization": "Elemta Test", "sender": "tlsrpt@mx.test",
                "https_ca_file": pki[0].ca_file, "https_timeout": 60.0,
                # The report servers are on loopback, on ports other than 443.
                "https_allow_private": True},
        api={"enabled": False})
    domains = ["both.rpt2.test", "refused.rpt2.test", "untrusted.rpt2.test"]
    count_sessions(server.spool, domains)

    sent = elemtactl(server, "tlsrpt", "send", "--date", "today")
    assert sent.returncode == 0, sent.stderr
    today = time.strftime("%Y-%m-%d", time.gmtime())
    lines = sent.stdout.splitlines()
    both_id = "%s.both.rpt2.test@mx.test" % today
    assert len(lines) == 4, sent.stdout
    assert lines[0].startswith("both.rpt2.test: report %s for %s queued to "
                               "tls@rua.rpt2.test (maildrop file " % (both_id, today)), lines
    assert lines[1] == ("both.rpt2.test: report %s for %s posted to "
                        "https://reports.rpt2.test:%d/v1/both (200 OK)"
                        % (both_id, today, port)), lines
    assert lines[2] == (
        "refused.rpt2.test: report %s.refused.rpt2.test@mx.test for %s not posted to "
        "https://reports.rpt2.test:%d/v1/refused: https://reports.rpt2.test:%d/v1/refused "
        "(%s) answered 503 Service Unavailable; attempt 1 of %d, the next on the next run"
        % (today, today, port, port, REPORTS, MAX_POST_ATTEMPTS)), lines
    assert lines[3].startswith(
        "untrusted.rpt2.test: report %s.untrusted.rpt2.test@mx.test for %s not posted to "
        "https://untrusted.rpt2.test:%d/v1/x: " % (today, today, port))
    assert "(%s): TLS failed: unable to get local issuer certificate" % UNTRUSTED in lines[3]
    assert untrusted.posts == []        # the certificate failed: nothing was sent

    # What the https: rua got: the gzipped JSON, as the mail's attachment carries it.
    [(headers, report)] = posted_reports(good, "/v1/both")
    assert headers["Content-Type"] == "application/tlsrpt+gzip"
    assert headers["Host"] == "reports.rpt2.test:%d" % port
    assert report["organization-name"] == "Elemta Test"
    assert report["report-id"] == both_id
    assert report["date-range"] == {"start-datetime": today + "T00:00:00Z",
                                    "end-datetime": today + "T23:59:59Z"}
    [entry] = report["policies"]
    assert entry["policy"]["policy-domain"] == "both.rpt2.test"
    assert entry["summary"] == {"total-successful-session-count": 1,
                                "total-failure-session-count": 1}
    assert entry["failure-details"][0]["result-type"] == CERTIFICATE_HOST_MISMATCH

    # The delivery workers' next report run posts the refused one again; now it is taken.
    good.status["/v1/refused"] = 201
    config = load_config(server.config_path)
    store = CountStore(server.spool)
    try:
        reporting = TLSReporting(config, TLSCounter(), store, "test worker")
        reporting.send_due()
        [(_, report)] = posted_reports(good, "/v1/refused")[1:]
        assert report["policies"][0]["policy"]["policy-domain"] == "refused.rpt2.test"
        assert len(posted_reports(good, "/v1/refused")) == 2
        # The untrusted one stays pending until it has failed MAX_POST_ATTEMPTS times.
        pending = store.pending_posts()
        assert [(day, post["domain"], post["attempts"]) for day, post in pending] == [
            (today, "untrusted.rpt2.test", 2)]
        for _ in range(MAX_POST_ATTEMPTS - 2):
            reporting.send_due()
        assert store.pending_posts() == []
        reporting.send_due()
        assert len(posted_reports(good, "/v1/refused")) == 2      # not posted again
        assert len(posted_reports(good, "/v1/both")) == 1
    finally:
        store.close()
    assert untrusted.posts == []


def test_a_rua_in_the_senders_own_network_gets_no_post(elemta_server, nsd, report_servers,
                                                       pki):
    """Whoever runs a domain's DNS picks its rua: one that resolves to loopback, an IP
    literal of one (here IPv4-mapped), or a port other than 443 could make Elemta probe
    its own network. With tlsrpt.https_allow_private off (the default) nothing is
    posted, the output (the delivery workers log the same lines) says why, and it is not
    retried."""
    good, _, port = report_servers
    server = elemta_server(
        delivery={"workers": 0, "nameservers": ["127.0.0.1"], "dns_port": nsd.port,
                  "dns_timeout": 20.0},
        tlsrpt={"enabled": True, "sender": "tlsrpt@mx.test",
                "https_ca_file": pki[0].ca_file, "https_timeout": 60.0},
        api={"enabled": False})
    domains = ["private.rpt2.test", "literal.rpt2.test", "port.rpt2.test"]
    count_sessions(server.spool, domains)
    sent = elemtactl(server, "tlsrpt", "send", "--date", "today")
    assert sent.returncode == 0, sent.stderr
    today = time.strftime("%Y-%m-%d", time.gmtime())
    lines = sorted(sent.stdout.splitlines())
    report = "%s: report %s.%s@mx.test for %s not posted to %s: refused: "
    assert lines == [
        (report % ("literal.rpt2.test", today, "literal.rpt2.test", today,
                   "https://[::ffff:%s]/v1/literal" % REPORTS)
         + "::ffff:%s is not a global address (::ffff:7f00:50; "
           "tlsrpt.https_allow_private is off)" % REPORTS),
        (report % ("port.rpt2.test", today, "port.rpt2.test", today,
                   "https://reports.rpt2.test:%d/v1/port" % port)
         + "port %d is not 443 (tlsrpt.https_allow_private is off)" % port),
        (report % ("private.rpt2.test", today, "private.rpt2.test", today,
                   "https://reports.rpt2.test/v1/private")
         + "reports.rpt2.test is not a global address (%s; tlsrpt.https_allow_private "
           "is off)" % REPORTS)], sent.stdout
    assert [where for where, _, _ in good.posts
            if where.split("/")[-1] in ("private", "literal", "port")] == []
    # Refused is final: the delivery workers' next run does not try again.
    store = CountStore(server.spool)
    try:
        assert store.pending_posts() == []
    finally:
        store.close()
