"""DANE (RFC 7672) for outbound mail, with a real validating resolver on loopback.

Owned by the test suite. A private NSD (tests/peers/nsd.py) serves zone dane.test, signed
with ldns (tests/peers/dnssec.py), and zone plain.test, unsigned; a private unbound
(tests/peers/unbound.py), whose only trust anchor is dane.test's DS, validates them: its AD
bit is what makes an answer secure, as for Postfix with smtp_dns_support_level = dnssec.
The MX hosts are scripted SMTP servers (tests/peers/sink.py) with STARTTLS and
certificates from test CAs made here (tests/peers/https.py); their TLSA records, at
_<port>._tcp.<mx host>, name those certificates or deliberately something else. The real
`elemta` server delivers through unbound. Needs nsd, unbound and ldnsutils.
See also: elemta.delivery.dane, elemta.delivery.mx, tests/test_mta_sts.py.
"""

import hashlib
import json
import re
import smtplib
import ssl
import tempfile

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from elemta.delivery.dane import DANE_MODE, DANE_ONLY, PEER_CHAIN, TLSA, DANELookup
from elemta.delivery.mx import MXResolver, TemporaryRouteError
from tests.harness import delivery_result
from tests.harness import free_port, submit, wait_for
from tests.peers.dnssec import ldns_available
from tests.peers.https import LoopbackCA
from tests.peers.nsd import nsd_available, private_nsd
from tests.peers.sink import DEFAULT_EXTENSIONS, ScriptedServer
from tests.peers.unbound import UnboundInstance, unbound_available
from tests.test_acme import elemtactl

# MX host name -> its address; each is a scripted server with STARTTLS.
EE = ("mx.ee.dane.test", "127.0.0.41")          # DANE-EE 3 1 1 of its key
EE_BAD = ("mx.eebad.dane.test", "127.0.0.42")   # DANE-EE 3 1 1 of some other key
TA = ("mx.ta.dane.test", "127.0.0.43")          # DANE-TA 2 0 1 of its issuer, its name
TA_NAME = ("mx.taname.dane.test", "127.0.0.44")  # the same CA, a certificate for another name
PKIX = ("mx.pkix.dane.test", "127.0.0.45")      # only a PKIX-EE record: unusable
BOGUS = ("mx.bogus.dane.test", "127.0.0.46")    # TLSA with spoiled signatures
PLAIN = ("mx.plain.test", "127.0.0.47")         # unsigned zone, TLSA that would not match
MX_HOSTS = (EE, EE_BAD, TA, TA_NAME, PKIX, BOGUS, PLAIN)


def spki_sha256(cert_file):
    with open(cert_file, "rb") as pem:
        cert = x509.load_pem_x509_certificate(pem.read())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def cert_sha256(cert_file):
    with open(cert_file, "rb") as pem:
        cert = x509.load_pem_x509_certificate(pem.read())
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


@pytest.fixture(scope="module")
def mx_port():
    return free_port(EE[1])


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    """{MX host name: (cert file the server presents, key file)}, and the DANE-TA CA."""
    workdir = tmp_path_factory.mktemp("dane-pki")
    ee_ca = LoopbackCA(workdir / "ee", "Some CA nobody trusts")
    ta_ca = LoopbackCA(workdir / "ta", "DANE-TA Test CA")
    made = {}
    for name, _ in MX_HOSTS:
        if name in (TA[0], TA_NAME[0]):
            cert, key = ta_ca.issue(TA[0] if name == TA[0] else "wrong.dane.test")
            chain = cert + ".chain"     # RFC 7672 3.1.2: the server sends its TA
            with open(chain, "w") as out:
                out.write(open(cert).read() + open(ta_ca.ca_file).read())
            made[name] = (chain, key)
        else:
            # DANE-EE needs no name and no CA: this one names another host.
            made[name] = ee_ca.issue("not-the-mx.example")
    made["other"] = ee_ca.issue("other.example")
    return made, ta_ca


@pytest.fixture(scope="module")
def dns(certificates, mx_port, tmp_path_factory):
    """(nsd, unbound): the signed and the unsigned zone, and the resolver validating them."""
    for reason in (nsd_available(), unbound_available(), ldns_available()):
        if reason:
            pytest.skip(reason)
    made, ta_ca = certificates
    tlsa = "_%d._tcp.%%s TLSA %%s" % mx_port

    def records(*lines):
        return "\n".join(lines) + "\n"

    secure = []
    for (name, address) in MX_HOSTS[:-1]:
        label = name[:-len(".dane.test")]
        domain = label.split(".", 1)[1]
        secure += ["%s A %s" % (label, address), "%s MX 10 %s" % (domain, label)]
    secure += [
        tlsa % ("mx.ee", "3 1 1 " + spki_sha256(made[EE[0]][0])),
        tlsa % ("mx.eebad", "3 1 1 " + spki_sha256(made["other"][0])),
        tlsa % ("mx.ta", "2 0 1 " + cert_sha256(ta_ca.ca_file)),
        tlsa % ("mx.taname", "2 0 1 " + cert_sha256(ta_ca.ca_file)),
        tlsa % ("mx.pkix", "1 1 1 " + spki_sha256(made[PKIX[0]][0])),
        tlsa % ("mx.bogus", "3 1 1 " + spki_sha256(made[BOGUS[0]][0])),
    ]
    plain = ["mx A %s" % PLAIN[1], "@ MX 10 mx",
             tlsa % ("mx", "3 1 1 " + spki_sha256(made["other"][0]))]
    zones = {"dane.test": records(*secure), "plain.test": records(*plain)}
    with private_nsd(zones, signed={"dane.test": ("_%d._tcp.mx.bogus" % mx_port,)}) as nsd, \
            UnboundInstance(tempfile.mkdtemp(prefix="elemta-unbound-"), nsd) as unbound:
        yield nsd, unbound
    unbound.remove()


# Under load (two pytest-xdist workers on two busy cores) unbound's first validation of
# a name, an elemta start or a TLS handshake with a scripted server can take seconds:
# every wait below is for an event, with a deadline far beyond what a healthy run needs.
EVENT_DEADLINE = 60.0


def resolver_for(dns, dnssec=True):
    return MXResolver(["127.0.0.1"], port=dns[1].port, timeout=10.0, dnssec=dnssec)


def result(server, queue_id, recipient):
    """(status, reply) of the recipient's first delivery, waited for generously."""
    return delivery_result(server, queue_id, recipient, timeout=EVENT_DEADLINE)


# -- the lookups: what the validating resolver vouches for -------------------------------

def test_hosts_of_a_signed_zone_are_secure_and_of_an_unsigned_one_not(dns):
    resolver = resolver_for(dns)
    [ee] = resolver.route("ee.dane.test")
    assert (ee.name, ee.address, ee.secure) == (EE[0], EE[1], True)
    [plain] = resolver.route("plain.test")
    assert (plain.name, plain.secure) == (PLAIN[0], False)
    # Without the DO bit nothing counts as validated, whatever the resolver did.
    assert not resolver_for(dns, dnssec=False).route("ee.dane.test")[0].secure


def test_tlsa_records_come_with_their_security(dns, certificates, mx_port):
    resolver = resolver_for(dns)
    found = resolver.tlsa(EE[0], mx_port)
    assert found.secure
    [record] = [TLSA.from_rdata(rdata) for rdata in found]
    assert (record.usage, record.selector, record.mtype) == (3, 1, 1)
    assert record.data.hex() == spki_sha256(certificates[0][EE[0]][0])
    none = resolver.tlsa(EE[0], mx_port + 1)
    assert list(none) == [] and none.secure      # validated denial: no TLSA there
    assert not resolver.tlsa(PLAIN[0], mx_port).secure


def test_a_bogus_tlsa_answer_is_a_temporary_failure(dns, mx_port):
    with pytest.raises(TemporaryRouteError, match="SERVFAIL"):
        resolver_for(dns).tlsa(BOGUS[0], mx_port)
    assert "validation failure <_%d._tcp.mx.bogus.dane.test. TLSA IN>" % mx_port \
        in dns[1].read_log()



def test_what_dane_and_dane_only_make_of_each_kind_of_host(dns, mx_port):
    """RFC 7672 2.2, host by host; dane-only refuses wherever DANE cannot authenticate."""
    lookup = DANELookup(resolver_for(dns))
    ee = lookup.tls_for(EE[0], True, mx_port, DANE_ONLY)
    assert [str(record) for record in ee.records] == ["DANE-EE 3 1 1"]
    pkix = lookup.tls_for(PKIX[0], True, mx_port, DANE_MODE)
    assert pkix.encrypt and not pkix.records and pkix.refusal is None
    assert lookup.tls_for(PKIX[0], True, mx_port, DANE_ONLY).refusal == (
        "only unusable TLSA records for mx.pkix.dane.test (PKIX-EE 1 1 1) "
        "(delivery.tls_policy dane-only)")
    none = lookup.tls_for(EE[0], True, mx_port + 1, DANE_MODE)
    assert (none.records, none.encrypt, none.refusal) == ((), False, None)
    assert lookup.tls_for(EE[0], True, mx_port + 1, DANE_ONLY).refusal == (
        "no TLSA records for _%d._tcp.mx.ee.dane.test (delivery.tls_policy dane-only)"
        % (mx_port + 1))
    # An insecure host's TLSA records are not even asked for.
    plain = lookup.tls_for(PLAIN[0], False, mx_port, DANE_MODE)
    assert (plain.records, plain.encrypt, plain.refusal) == ((), False, None)

# -- delivery under DANE, end to end ------------------------------------------------------

@pytest.fixture(scope="module")
def mx_hosts(certificates, mx_port):
    """{MX host name: its scripted server}, each offering STARTTLS with its certificate,
    and REQUIRETLS (RFC 8689) after it."""
    made, _ = certificates
    servers = {name: ScriptedServer(address=address, port=mx_port, cert_file=made[name][0],
                                    key_file=made[name][1],
                                    extensions=DEFAULT_EXTENSIONS + ["REQUIRETLS"]).start()
               for name, address in MX_HOSTS}
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture
def start(elemta_server, dns, mx_port, mx_hosts, tls_files):
    def starter(tlsrpt=None, **delivery):
        settings = {"workers": 1, "mx_port": mx_port, "nameservers": ["127.0.0.1"],
                    "dns_port": dns[1].port, "min_backoff": 60, "max_backoff": 60,
                    # No test waits for these to run out: they only must not cut
                    # a session a loaded machine is slow to serve.
                    "connect_timeout": 30.0, "command_timeout": 30.0,
                    "data_timeout": 30.0, "mta_sts": False, "dane": True}
        settings.update(delivery)
        # STARTTLS inbound: the REQUIRETLS tests submit over it.
        server = elemta_server(delivery=settings, api={"enabled": False},
                               tlsrpt=tlsrpt or {},
                               tls={"cert_file": tls_files[0], "key_file": tls_files[1]})
        wait_for(lambda: "delivery worker started" in server.log(),
                 timeout=EVENT_DEADLINE)
        return server
    return starter


def received(mx_hosts, host, recipient):
    """The sessions of host's server that carried mail for recipient."""
    return [s for s in mx_hosts[host[0]].sessions for m in s.messages
            if m.rcpts == ["RCPT TO:<%s>" % recipient]]


def test_a_dane_ee_match_is_delivered_and_logged_as_verified(start, mx_hosts, mx_port):
    server = start()
    queue_id = submit(server, "dane@client.test", "r@ee.dane.test")
    assert result(server, queue_id, "r@ee.dane.test")[0] == "sent"
    [session] = received(mx_hosts, EE, "r@ee.dane.test")
    assert session.tls
    assert re.search(r"%s: DANE: Verified TLS connection established to "
                     r"mx.ee.dane.test\[127.0.0.41\]:%d \(TLSv1.[23], TLSA DANE-EE 3 1 1 "
                     r"matched\)" % (queue_id, mx_port), server.log())


def test_a_dane_ee_mismatch_is_deferred_and_nothing_sent(start, mx_hosts, mx_port):
    server = start()
    queue_id = submit(server, "dane@client.test", "r@eebad.dane.test")
    status, reply = result(server, queue_id, "r@eebad.dane.test")
    assert status == "deferred"
    assert reply == ("451 4.7.5 DANE: certificate of mx.eebad.dane.test[127.0.0.42]:%d not "
                     "verified: no TLSA record matches the certificate chain "
                     "(DANE-EE 3 1 1)" % mx_port)
    assert received(mx_hosts, EE_BAD, "r@eebad.dane.test") == []


def test_with_dane_off_the_tlsa_records_are_not_looked_at(start, mx_hosts):
    server = start(dane=False)
    queue_id = submit(server, "dane@client.test", "off@eebad.dane.test")
    assert result(server, queue_id, "off@eebad.dane.test")[0] == "sent"
    assert received(mx_hosts, EE_BAD, "off@eebad.dane.test")[0].tls
    assert "DANE" not in server.log()


@pytest.mark.skipif(not PEER_CHAIN, reason="DANE-TA needs the peer's chain (Python 3.10+)")
def test_a_dane_ta_match_with_the_mx_name_is_delivered(start, mx_hosts, mx_port):
    server = start()
    queue_id = submit(server, "dane@client.test", "r@ta.dane.test")
    assert result(server, queue_id, "r@ta.dane.test")[0] == "sent"
    assert received(mx_hosts, TA, "r@ta.dane.test")[0].tls
    assert re.search(r"%s: DANE: Verified TLS connection established to "
                     r"mx.ta.dane.test\[127.0.0.43\]:%d \(TLSv1.[23], TLSA DANE-TA 2 0 1 "
                     r"matched\)" % (queue_id, mx_port), server.log())


@pytest.mark.skipif(not PEER_CHAIN, reason="DANE-TA needs the peer's chain (Python 3.10+)")
def test_a_dane_ta_chain_for_another_name_is_deferred(start, mx_hosts, mx_port):
    server = start()
    queue_id = submit(server, "dane@client.test", "r@taname.dane.test")
    status, reply = result(server, queue_id, "r@taname.dane.test")
    assert status == "deferred"
    assert reply == ("451 4.7.5 DANE: certificate of mx.taname.dane.test[127.0.0.44]:%d not "
                     "verified: DANE-TA 2 0 1: the certificate names wrong.dane.test, not "
                     "mx.taname.dane.test" % mx_port)
    assert received(mx_hosts, TA_NAME, "r@taname.dane.test") == []


def test_only_unusable_tlsa_records_mean_tls_without_authentication(start, mx_hosts):
    """RFC 7672 2.2: a PKIX-EE record is unusable for SMTP; the host must still encrypt."""
    server = start()
    queue_id = submit(server, "dane@client.test", "r@pkix.dane.test")
    assert result(server, queue_id, "r@pkix.dane.test")[0] == "sent"
    assert received(mx_hosts, PKIX, "r@pkix.dane.test")[0].tls
    assert ("%s: DANE: only unusable TLSA records for mx.pkix.dane.test (PKIX-EE 1 1 1): "
            "TLS required, certificate not checked (RFC 7672 2.2)" % queue_id) in server.log()


def test_a_failed_tlsa_lookup_defers(start, mx_hosts, mx_port):
    server = start()
    queue_id = submit(server, "dane@client.test", "r@bogus.dane.test")
    status, reply = result(server, queue_id, "r@bogus.dane.test")
    assert status == "deferred"
    assert reply.startswith("451 4.7.5 DANE: TLSA lookup for _%d._tcp.mx.bogus.dane.test "
                            "failed: TLSA lookup failed (127.0.0.1: SERVFAIL" % mx_port), reply
    assert mx_hosts[BOGUS[0]].sessions == []


def test_an_insecure_mx_gets_opportunistic_tls(start, mx_hosts):
    """plain.test is unsigned: its TLSA record (which would not match) is not used."""
    server = start()
    queue_id = submit(server, "dane@client.test", "r@plain.test")
    assert result(server, queue_id, "r@plain.test")[0] == "sent"
    assert received(mx_hosts, PLAIN, "r@plain.test")[0].tls
    assert "DANE:" not in server.log()


def test_dane_only_defers_mail_for_an_insecure_mx(start, mx_hosts):
    server = start(dane=False, tls_policy=[{"domain": "plain.test", "level": "dane-only"}])
    queue_id = submit(server, "dane@client.test", "only@plain.test")
    status, reply = result(server, queue_id, "only@plain.test")
    assert status == "deferred"
    assert reply == ("451 4.7.5 DANE: the MX or address records of mx.plain.test are not "
                     "DNSSEC-signed (delivery.tls_policy dane-only)")
    assert received(mx_hosts, PLAIN, "only@plain.test") == []


def test_a_tls_policy_entry_of_level_dane_applies_dane_where_delivery_dane_is_off(
        start, mx_hosts, mx_port):
    """delivery.dane off: eebad.dane.test's entry (level dane) has its TLSA records
    checked, so the mismatch defers; ee.dane.test's has its match verified; a domain
    without an entry (pkix.dane.test) goes as without DANE."""
    server = start(dane=False, tls_policy=[{"domain": "eebad.dane.test", "level": "dane"},
                                           {"domain": "ee.dane.test", "level": "dane"}])
    held = submit(server, "lvl1@client.test", "lvl@eebad.dane.test")
    status, reply = result(server, held, "lvl@eebad.dane.test")
    assert status == "deferred"
    assert reply.startswith("451 4.7.5 DANE: certificate of mx.eebad.dane.test"), reply
    assert received(mx_hosts, EE_BAD, "lvl@eebad.dane.test") == []
    sent = submit(server, "lvl2@client.test", "lvl@ee.dane.test")
    assert result(server, sent, "lvl@ee.dane.test")[0] == "sent"
    assert "%s: DANE: Verified TLS connection established to mx.ee.dane.test" % sent \
        in server.log()
    plain = submit(server, "lvl3@client.test", "lvl@pkix.dane.test")
    assert result(server, plain, "lvl@pkix.dane.test")[0] == "sent"
    assert "%s: DANE" % plain not in server.log()


def test_dane_sessions_are_counted_for_tls_reporting_per_mx_host(start, mx_port,
                                                                  certificates):
    """RFC 8460 4.4: a DANE policy's domain is the MX host (the TLSA base domain), its
    policy-string the TLSA records; a match is a success, a mismatch tlsa-invalid, a
    bogus TLSA answer dnssec-invalid."""
    server = start(tlsrpt={"enabled": True})
    for label, status in (("ee", "sent"), ("eebad", "deferred"), ("bogus", "deferred")):
        recipient = "r@%s.dane.test" % label
        # A sender of its own each: submit() finds the queue id by the sender.
        queue_id = submit(server, "rpt-%s@client.test" % label, recipient)
        assert result(server, queue_id, recipient)[0] == status

    def reports():
        shown = elemtactl(server, "tlsrpt", "show", "--json", "--date", "today").stdout
        found = {r["policies"][0]["policy"]["policy-domain"]: r["policies"][0]
                 for r in map(json.loads, shown.splitlines())}
        return found if len(found) == 3 else None
    found = wait_for(reports, timeout=EVENT_DEADLINE)
    made, _ = certificates
    assert found[EE[0]]["policy"] == {
        "policy-type": "tlsa", "policy-domain": EE[0], "mx-host": [EE[0]],
        "policy-string": ["3 1 1 " + spki_sha256(made[EE[0]][0])]}
    assert found[EE[0]]["summary"] == {"total-successful-session-count": 1,
                                       "total-failure-session-count": 0}
    for host, kind in ((EE_BAD, "tlsa-invalid"), (BOGUS, "dnssec-invalid")):
        assert found[host[0]]["summary"] == {"total-successful-session-count": 0,
                                             "total-failure-session-count": 1}
        [detail] = found[host[0]]["failure-details"]
        assert (detail["result-type"], detail["receiving-mx-hostname"],
                detail["receiving-ip"]) == (kind, host[0], host[1])
    assert found[BOGUS[0]]["policy"]["policy-string"] == []


# -- REQUIRETLS (RFC 8689 4.2.1): a DANE-authenticated hop is as good as a PKIX one -------

def submit_requiretls(server, sender, recipient):
    """Submit over STARTTLS with REQUIRETLS on MAIL FROM; the queue id."""
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.starttls(context=ssl._create_unverified_context())
        client.ehlo()
        client.sendmail(sender, [recipient], b"Subject: rt\r\n\r\nsecret body\r\n",
                        mail_options=["REQUIRETLS"])
    return wait_for(lambda: re.search(r"(\w+): from=<%s>" % re.escape(sender),
                                      server.log()), timeout=EVENT_DEADLINE).group(1)


@pytest.mark.parametrize("host", [EE] + ([TA] if PEER_CHAIN else []),
                         ids=lambda host: host[0].split(".")[1])
def test_a_requiretls_message_goes_to_a_dane_authenticated_mx(start, mx_hosts, mx_port,
                                                               host):
    """Neither MX certificate chains to a CA the delivery trusts (DANE-EE's names
    another host altogether): only the TLSA records vouch for it, and that suffices."""
    server = start()
    domain = host[0].split(".", 1)[1]
    recipient = "rt@" + domain
    queue_id = submit_requiretls(server, "rt-%s@client.test" % domain.split(".")[0],
                                 recipient)
    status, reply = result(server, queue_id, recipient)
    assert status == "sent", reply
    [session] = received(mx_hosts, host, recipient)
    assert session.tls
    assert session.messages[-1].mail.endswith(" REQUIRETLS")
    log = server.log()
    assert "%s: DANE: Verified TLS connection established to %s" % (queue_id, host[0]) \
        in log
    assert re.search(r"%s: REQUIRETLS: TLS with %s\[%s\]:%d verified, REQUIRETLS offered"
                     % (queue_id, re.escape(host[0]), host[1], mx_port), log)


@pytest.mark.parametrize("host, why", [
    # Unsigned zone and no MTA-STS policy: nothing vouches for the MX name (RFC 8689
    # 4.2.1), so no host is even tried (its certificate is not trusted for it either).
    (PLAIN, "the MX lookup of plain.test was not DNSSEC-validated and the domain has no "
            "MTA-STS policy in enforce mode, so its MX host names cannot be trusted"),
    # DANE applies but its records are unusable: encrypted, nobody authenticated.
    (PKIX, "the certificate of host mx.pkix.dane.test[127.0.0.45]:%d was verified "
           "neither for its name nor by DANE")], ids=["insecure", "unusable-tlsa"])
def test_a_requiretls_message_bounces_where_neither_dane_nor_pkix_vouch(
        start, mx_hosts, mx_port, host, why):
    server = start()
    recipient = "rt-bounce@" + host[0].split(".", 1)[1]
    queue_id = submit_requiretls(server, "rtb-%s@client.test" % host[0].split(".")[1],
                                 recipient)
    status, reply = result(server, queue_id, recipient)
    assert status == "bounced", reply
    # 5.7.10, not 5.7.30: no host could be reached over TLS that was verified (RFC 8689
    # 4.2.1); 5.7.30 is for a host that does not offer REQUIRETLS.
    assert reply.startswith("550 5.7.10 REQUIRETLS support required: ")
    assert why.replace("%d", str(mx_port)) in reply, reply
    assert received(mx_hosts, host, recipient) == []
