"""DMARC: policies served by a real NSD, alignment, p/sp/pct, and the plugin end to end.

Covers elemta.plugins.dmarc: discovery at the From domain then at its organizational
domain (from the Public Suffix List shipped offline: example.co.uk, not co.uk), relaxed and
strict alignment of SPF and DKIM identifiers, sp= for subdomains, pct= sampling, invalid and
duplicate records, DNS failures; and the spf + dkim + dmarc + authres plugins together:
reject with 550 5.7.1, quarantine (hold), nothing enforced for our own users.
"""

import socket
import tempfile

import pytest

from elemta.plugins.api import Context, Message
from elemta.plugins.dkim import Signer, SigningKey, generate_key
from elemta.plugins.dmarc import (DMARCResult, PolicyError, aligned, evaluate, find_policy,
                                  organizational_domain, parse_policy)
from elemta.plugins.manager import PluginManager, apply_header_edits
from elemta.plugins.resolver import Resolver, TemporaryDNSError
from tests.peers.nsd import NSDInstance, nsd_available

pytestmark = pytest.mark.skipif(nsd_available() is not None, reason=str(nsd_available()))


@pytest.fixture(scope="module")
def key(tmp_path_factory):
    return generate_key("reject.com", "sel", str(tmp_path_factory.mktemp("dmarc") / "k.key"))


@pytest.fixture(scope="module")
def nsd(key):
    zones = {
        "com": "\n".join([
            '_dmarc.reject.com. TXT "v=DMARC1; p=reject; sp=quarantine; '
            'rua=mailto:dmarc@reject.com"',
            'reject.com. TXT "v=spf1 ip4:192.0.2.1 -all"',
            key.zone_line,
            '_dmarc.sub.reject.com. TXT "v=DMARC1; p=none"',
            '_dmarc.strict.com. TXT "v=DMARC1; p=reject; adkim=s; aspf=s"',
            '_dmarc.half.com. TXT "v=DMARC1; p=reject; pct=50"',
            '_dmarc.none.com. TXT "v=DMARC1; p=none"',
            '_dmarc.double.com. TXT "v=DMARC1; p=none"',
            '_dmarc.double.com. TXT "v=DMARC1; p=reject"',
            '_dmarc.broken.com. TXT "v=DMARC1; p=maybe"',
            '_dmarc.notdmarc.com. TXT "v=spf1 -all"',
            '_dmarc.quarantine.com. TXT "v=DMARC1; p=quarantine"',
            'quarantine.com. TXT "v=spf1 ip4:192.0.2.1 -all"',
        ]) + "\n",
        "net": "",
        "uk": '_dmarc.example.co.uk. TXT "v=DMARC1; p=quarantine"\n'
              '_dmarc.co.uk. TXT "v=DMARC1; p=reject"\n',
    }
    with NSDInstance(tempfile.mkdtemp(prefix="elemta-nsd-dmarc-"), zones) as server:
        yield server
    server.remove()


@pytest.fixture
def resolver(nsd):
    return Resolver(nameservers=["127.0.0.1"], port=nsd.port, timeout=2.0)


class Sig:
    def __init__(self, result, domain):
        self.result, self.domain = result, domain


def test_organizational_domain_comes_from_the_shipped_suffix_list():
    assert organizational_domain("mail.example.co.uk") == "example.co.uk"
    assert organizational_domain("a.b.example.com") == "example.com"
    assert organizational_domain("user.github.io") == "user.github.io"
    assert aligned("mail.example.co.uk", "example.co.uk", "r")
    assert not aligned("other.co.uk", "example.co.uk", "r")
    assert not aligned("mail.example.com", "example.com", "s")
    assert aligned("Example.COM.", "example.com", "s")


def test_policy_discovery(resolver):
    assert find_policy(resolver, "reject.com").p == "reject"
    sub = find_policy(resolver, "deep.mail.reject.com")
    assert (sub.domain, sub.p, sub.sp) == ("reject.com", "reject", "quarantine")
    assert find_policy(resolver, "sub.reject.com").p == "none"
    uk = find_policy(resolver, "mail.example.co.uk")
    assert (uk.domain, uk.p) == ("example.co.uk", "quarantine")
    assert find_policy(resolver, "nopolicy.com") is None
    assert find_policy(resolver, "notdmarc.com") is None
    assert find_policy(resolver, "half.com").pct == 50
    with pytest.raises(PolicyError, match="2 DMARC records"):
        find_policy(resolver, "double.com")
    with pytest.raises(PolicyError, match="Tag p must have one of"):
        find_policy(resolver, "broken.com")


def test_parse_policy_defaults_and_errors():
    policy = parse_policy("v=DMARC1; p=quarantine", "example.com")
    assert (policy.sp, policy.pct, policy.adkim, policy.aspf) == ("quarantine", 100, "r", "r")
    with pytest.raises(PolicyError, match="pct=150"):
        parse_policy("v=DMARC1; p=reject; pct=150", "example.com")
    # RFC 9989 (and checkdmarc): no p= tag means p=none.
    assert parse_policy("v=DMARC1; adkim=s", "example.com").p == "none"
    with pytest.raises(PolicyError, match="Tag p must have one of"):
        parse_policy("v=DMARC1; p=bogus", "example.com")


@pytest.mark.parametrize("spf, spf_domain, dkim, from_domain, result, disposition", [
    ("pass", "bounce.reject.com", [], "reject.com", "pass", "none"),       # relaxed SPF
    ("fail", "reject.com", [Sig("pass", "mail.reject.com")], "reject.com", "pass", "none"),
    ("pass", "other.com", [Sig("fail", "reject.com")], "reject.com", "fail", "reject"),
    (None, "", [], "news.reject.com", "fail", "quarantine"),              # sp= applies
    ("pass", "mail.strict.com", [Sig("pass", "mail.strict.com")], "strict.com", "fail",
     "reject"),                                                          # strict alignment
    ("pass", "strict.com", [], "strict.com", "pass", "none"),
    (None, "", [Sig("pass", "strict.com")], "strict.com", "pass", "none"),
])
def test_alignment_and_disposition(resolver, spf, spf_domain, dkim, from_domain, result,
                                   disposition):
    policy = find_policy(resolver, from_domain)
    checked = evaluate(policy, from_domain, spf, spf_domain, dkim, sample=0.0)
    assert (checked.result, checked.disposition) == (result, disposition)


def test_pct_samples_the_policy(resolver):
    policy = find_policy(resolver, "half.com")
    assert evaluate(policy, "half.com", sample=0.49).disposition == "reject"
    sampled_out = evaluate(policy, "half.com", sample=0.5)
    assert sampled_out.disposition == "quarantine"
    assert sampled_out.reason.endswith("pct=50 sampled out to quarantine")
    outcomes = {evaluate(policy, "half.com").disposition for _ in range(200)}
    assert outcomes == {"reject", "quarantine"}


def test_dns_failure_is_temporary():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as dead:
        dead.bind(("127.0.0.1", 0))
        slow = Resolver(["127.0.0.1"], port=dead.getsockname()[1], timeout=0.05, attempts=1)
        with pytest.raises(TemporaryDNSError):
            find_policy(slow, "reject.com")


# ---- the plugins together ------------------------------------------------------------------

BODY = b"To: someone@elemta.test\r\nSubject: hi\r\n\r\nhello\r\n"


def receive(manager, resolver, client, sender, message, queue_id=None, **kw):
    ctx = Context(client_address=client, helo="mail.example.net", resolver=resolver,
                  hostname="mx.elemta.test", **kw)
    ctx.new_transaction()
    ctx.sender, ctx.queue_id = sender, queue_id
    mail = manager.run("mail", ctx)
    ctx.message = Message(message)
    return ctx, mail, manager.run("data", ctx)


@pytest.fixture
def plugins(key):
    manager = PluginManager.from_mapping({"spf": {}, "dkim": {}, "dmarc": {"enforce": True}}).start()
    yield manager
    manager.close()


def test_aligned_dkim_passes_despite_spf_fail(plugins, resolver, key):
    message = b"From: Boss <boss@reject.com>\r\n" + BODY
    signed = apply_header_edits(message, Signer([SigningKey("reject.com", "sel",
                                                            key.key_file)]).sign(
        message, "reject.com"))
    ctx, mail, data = receive(plugins, resolver, "192.0.2.66", "boss@reject.com", signed)
    assert mail.reply is None and data.reply is None and data.quarantine is None
    header = dict(data.headers)["Authentication-Results"]
    assert header.endswith("\r\n\tdmarc=pass header.from=reject.com")
    assert "spf=fail smtp.mailfrom=boss@reject.com;" in header


def test_unaligned_mail_is_rejected_or_held(plugins, resolver, caplog):
    caplog.set_level("INFO", logger="elemta")
    ctx, _, data = receive(plugins, resolver, "192.0.2.66", "x@other.net",
                           b"From: boss@reject.com\r\n" + BODY, queue_id="Q7")
    assert data.reply == (550, "5.7.1", "Message rejected by the DMARC policy of reject.com")
    assert "Q7: DMARC fail for header.from=reject.com from [192.0.2.66]: no aligned SPF " \
           "or DKIM pass; policy of reject.com is p=reject" in caplog.text
    ctx, _, data = receive(plugins, resolver, "192.0.2.66", "x@other.net",
                           b"From: boss@quarantine.com\r\n" + BODY)
    assert data.reply is None
    assert data.quarantine == "DMARC policy of quarantine.com asks for quarantine"
    # SPF passes for quarantine.com from 192.0.2.1: aligned, so nothing is held.
    ctx, _, data = receive(plugins, resolver, "192.0.2.1", "x@quarantine.com",
                           b"From: boss@quarantine.com\r\n" + BODY)
    assert data.quarantine is None and ctx.state["dmarc"].result == "pass"


def test_nothing_is_enforced_for_our_users(plugins, resolver):
    for kw in ({"auth_user": "boss"}, {"trusted": True}, {"local": True}):
        ctx, _, data = receive(plugins, resolver, "192.0.2.66", "x@other.net",
                               b"From: boss@reject.com\r\n" + BODY, **kw)
        assert data.reply is None and data.quarantine is None
        assert "dmarc" not in ctx.state


def test_without_enforce_only_the_result_is_recorded(resolver):
    manager = PluginManager.from_mapping({"dmarc": {}}).start()
    ctx, _, data = receive(manager, resolver, "192.0.2.66", "x@other.net",
                           b"From: boss@reject.com\r\n" + BODY)
    assert data.reply is None and data.quarantine is None
    assert ctx.state["dmarc"].disposition == "reject"
    assert dict(data.headers)["Authentication-Results"] == (
        ' mx.elemta.test;\r\n\tdmarc=fail\r\n'
        '\t  reason="no aligned SPF or DKIM pass; policy of reject.com is p=reject"\r\n'
        '\t  header.from=reject.com')
    manager.close()


@pytest.mark.parametrize("from_lines, result, reason", [
    (b"", "permerror", "message has 0 From fields"),
    (b"From: a@reject.com\r\nFrom: b@reject.com\r\n", "permerror", "2 From fields"),
    (b"From: a@reject.com, b@other.com\r\n", "permerror", "From has 2 addresses"),
    (b"From: undisclosed\r\n", "permerror", "no usable domain"),
    (b"From: a@double.com\r\n", "permerror", "invalid policy: 2 DMARC records"),
    (b"From: a@nopolicy.com\r\n", "none", "no policy published"),
])
def test_odd_messages_give_clear_results(resolver, from_lines, result, reason):
    manager = PluginManager.from_mapping({"dmarc": {"enforce": True}}).start()
    ctx, _, data = receive(manager, resolver, "192.0.2.66", "x@other.net",
                           from_lines + BODY)
    checked = ctx.state["dmarc"]
    assert isinstance(checked, DMARCResult)
    assert checked.result == result and reason in checked.reason
    assert data.reply is None
    manager.close()
