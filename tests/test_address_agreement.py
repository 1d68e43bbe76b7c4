"""Every entry point gives the same answer to "is this address ours, and does it exist?"
(issue 12, requirement 1).

One set of tricky addresses - IDN domains in both spellings, upper case, a final dot,
needless and needed quotes, user+ext, address literals, an alias, an unknown user - goes
through each door mail comes in by, and each must say the same thing as the table below:

    SMTP RCPT      a real running server, from a client outside mynetworks: 250 for a
                   known local recipient, 550 5.1.1 for an unknown one, 554 5.7.1 (relay
                   refused) for a remote one
    sendmail -bv   deliverable local / undeliverable / deliverable remote domain
    sendmail       a submission picked up by the running server: the queue record holds
                   each recipient as written, as the SMTP record does; pickup's own view
                   (ctx.outbound, what plugins are told) says local for the local ones
    routing        the delivery worker's Router: the local agent for the local ones

The hosted classes (virtual mailbox, virtual alias and relay domains, issue 14) have
rows of their own (HOSTED): the RCPT reply naming the table an unknown user is missing
from, sendmail -bv's words, virtual aliases expanded alike into the smtpd's and pickup's
queue records (a virtual mailbox or relay recipient in the normal form its table was
asked with, by both), and the router's next hop for each class.

Before the addressing layer, pickup kept xn--bcher-kva.example and bücher.example apart,
and sendmail -bv knew no alias, kept the final dot and took an A-label for a remote
domain, so those rows failed there.
See also: elemta.addressing, tests/security/test_open_relay.py (the relay probes).
"""

import dataclasses
import os
import smtplib
import subprocess
import sys
from types import SimpleNamespace

import pytest

from elemta.addressing.normal import canonical
from elemta.config import ConfigError
from elemta.config.loader import load_config
from elemta.config.schema import TLSPolicyEntry
from elemta.delivery.concurrency import DestinationSlots
from elemta.delivery.routing import LOCAL, Router
from elemta.delivery.smtp_transport import SMTPTransport
from elemta.pickup.worker import PickupWorker
from elemta.queue.model import Recipient
from tests.harness import REPO, wait_for

USER, ALIAS, UNKNOWN, REMOTE = "user", "alias", "unknown", "remote"
KNOWN = (USER, ALIAS)

# (address as written, what it is)
ADDRESSES = [
    ("root@example.test", USER),
    ("ROOT@EXAMPLE.TEST.", USER),                     # case, the root's final dot
    ('"root"@example.test', USER),                    # quotes it does not need
    ("root+tag@Example.Test", USER),                  # user+ext (recipient_delimiter)
    ("root@bücher.example", USER),                    # IDN as U-labels
    ("root@xn--bcher-kva.example", USER),             # ... and as A-labels
    ("Root@BÜCHER.Example.", USER),
    ("root@XN--BCHER-KVA.EXAMPLE.", USER),
    ("root@mx.test.", USER),                          # the host name
    ("root@example.test\u3002", USER),               # ideographic full stop: a final dot
    ("root@bücher.example\uff0e", USER),              # ... fullwidth
    ("info@example.test", ALIAS),                     # an alias, not a user
    ('"INFO"@xn--bcher-kva.example.', ALIAS),
    ("info+news@bücher.example", ALIAS),
    ("nosuchuser-xyz@example.test", UNKNOWN),
    ("nosuchuser-xyz@XN--BCHER-KVA.example.", UNKNOWN),
    ('"root x"@example.test', UNKNOWN),               # quotes it needs: not root
    ("root@[127.0.0.1]", REMOTE),                     # literals: no listed local literal
    ("root@[IPv6:::1]", REMOTE),
    ("root@example.net", REMOTE),
    ("root@bücher.example.net", REMOTE),              # a local domain as a prefix
    ("root@xn--bcher-kva.example.net.", REMOTE),
]
TRUSTED = "127.0.0.2"            # in mynetworks: may relay (for the queue record)
STRANGER = "127.0.0.1"           # not: its RCPT replies show the relay check


@pytest.fixture(scope="module")
def server(elemta_module_server, tmp_path_factory):
    aliases = tmp_path_factory.mktemp("aliases") / "aliases"
    aliases.write_text("info: root\n")
    os.chmod(str(aliases.parent), 0o755)
    return elemta_module_server(
        relay={"local_domains": ["example.test", "Bücher.Example"],
               "mynetworks": [TRUSTED + "/32"], "relay_domains": ["relay.test"],
               "relay_recipient_maps": ["known@relay.test ok"],
               "relay_transport": "smtp:[127.0.0.3]:2525"},
        virtual={"alias_domains": ["alias.test"],
                 "alias_maps": {"sales@alias.test": ["alice@virt.test", "root@example.test"]},
                 "mailbox_domains": ["virt.test", "Mailbox.Bücher.Example"],
                 "mailbox_maps": ["alice@virt.test ok",
                                  "alice@mailbox.xn--bcher-kva.example ok"],
                 "transport": "lmtp:[127.0.0.4]:24"},
        local={"reject_unknown_users": True, "aliases_file": str(aliases),
               "recipient_delimiter": "+"})


@pytest.fixture(scope="module")
def config(server):
    return load_config(server.config_path, check_files=False)


def ids(rows):
    return [address for address, _ in rows]


def rcpt_reply(server, address, source):
    with smtplib.SMTP("127.0.0.1", server.port, source_address=(source, 0)) as smtp:
        smtp.ehlo("client.test")
        smtp.mail("someone@client.test", ["SMTPUTF8"])
        return smtp.docmd("RCPT TO:<%s>" % address)


@pytest.mark.parametrize("address, kind", ADDRESSES, ids=ids(ADDRESSES))
def test_smtp_rcpt(server, address, kind):
    code, text = rcpt_reply(server, address, STRANGER)
    expected = {USER: 250, ALIAS: 250, UNKNOWN: 550, REMOTE: 554}[kind]
    assert (code, text.decode()[:5]) == (expected, {250: "2.1.5", 550: "5.1.1",
                                                    554: "5.7.1"}[expected])


def sendmail(server, *args, stdin=b""):
    result = subprocess.run(
        [sys.executable, "-m", "elemta.cli.sendmail", "-C", server.config_path] + list(args),
        input=stdin, capture_output=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=60)
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def bv_verdict(line):
    if "... deliverable: remote domain " in line:
        return REMOTE
    if "... deliverable: local alias " in line:
        return ALIAS
    if "... deliverable: local user " in line or "... deliverable: local role " in line:
        return USER
    if "... undeliverable: no such local user " in line:
        return UNKNOWN
    return line


def test_sendmail_bv(server):
    status, out, err = sendmail(server, "-bv", *ids(ADDRESSES))
    lines = out.splitlines()
    assert len(lines) == len(ADDRESSES), (out, err)
    said = [(line.split("... ")[0], bv_verdict(line)) for line in lines]
    assert [address for address, _ in said] == ids(ADDRESSES)
    assert [(a, verdict, kind) for (a, verdict), (_, kind) in zip(said, ADDRESSES)
            if verdict != kind] == []
    assert status == 67, err               # EX_NOUSER: some local recipient is unknown
    assert sendmail(server, "-bv", *ids(r for r in ADDRESSES if r[1] != UNKNOWN))[0] == 0


def queued_recipients(server, queue_id):
    envelope, _ = server.message(queue_id)
    return [r.address for r in envelope.recipients]


def test_smtp_and_sendmail_queue_the_same_recipients(server):
    """One message by SMTP (from a relay client, so remote recipients are taken too), one
    by sendmail through the maildrop and the running pickup: the same recipients, each
    as its sender wrote it, and only the unknown ones refused by SMTP."""
    before = set(server.queued_ids())
    with smtplib.SMTP("127.0.0.1", server.port, source_address=(TRUSTED, 0)) as smtp:
        smtp.ehlo("client.test")
        smtp.mail("someone@client.test", ["SMTPUTF8"])
        accepted = [address for address, _ in ADDRESSES
                    if smtp.docmd("RCPT TO:<%s>" % address)[0] == 250]
        assert accepted == ids(r for r in ADDRESSES if r[1] != UNKNOWN)
        assert smtp.data(b"Subject: by smtp\r\n\r\nhi\r\n")[0] == 250
    [by_smtp] = wait_for(lambda: set(server.queued_ids()) - before)

    status, _, err = sendmail(server, "-i", *accepted, stdin=b"Subject: by sendmail\n\nhi\n")
    assert status == 0, err
    [by_pickup] = wait_for(lambda: set(server.queued_ids()) - before - {by_smtp}, timeout=20)
    assert queued_recipients(server, by_smtp) == accepted
    assert queued_recipients(server, by_pickup) == accepted


def pickup_says_local(config, address):
    """What the pickup process tells plugins (ctx.outbound) about one recipient."""
    worker = PickupWorker(config, 0, None, os.getpid())
    envelope = SimpleNamespace(recipients=[Recipient(address)], queue_id="x", sender="")
    return not worker._context(envelope).outbound


@pytest.mark.parametrize("address, kind", ADDRESSES, ids=ids(ADDRESSES))
def test_pickup_classification(config, address, kind):
    assert pickup_says_local(config, address) == (kind != REMOTE)


@pytest.mark.parametrize("address, kind", ADDRESSES, ids=ids(ADDRESSES))
def test_routing(config, address, kind):
    assert (Router(config).destination(address).kind == LOCAL) == (kind != REMOTE)


# ---- tables keyed by domain read their keys as the router reads addresses -----------------

def test_tls_policy_and_destination_limits_take_either_spelling(config, tmp_path):
    """A tls_policy entry written in U-labels must govern mail routed in A-labels (it
    once fell back to tls_level: a silent downgrade from secure to may)."""
    delivery = dataclasses.replace(config.delivery, tls_policy=(
        TLSPolicyEntry("Bücher.Example.NET.", "secure"),
        TLSPolicyEntry(".xn--mller-kva.example.net", "verify")))
    config = dataclasses.replace(config, delivery=delivery)
    transport = SMTPTransport(config, store=None, resolver=None)
    router = Router(config)
    for address, level in [("u@xn--bcher-kva.example.net", "secure"),
                           ("u@BÜCHER.example.net.", "secure"),
                           ("u@mx.müller.example.net", "verify"),
                           ("u@other.example.net", config.delivery.tls_level)]:
        assert transport.tls_for(router.destination(address)).level == level, address
    slots = DestinationSlots(str(tmp_path / "slots" / "lock"), 20,
                             limits=[("bücher.example.net", 2), (".MÜLLER.example.net.", 3)])
    assert slots.limit_for(router.destination("u@xn--bcher-kva.example.net")) == 2
    assert slots.limit_for(router.destination("u@mx.xn--mller-kva.example.net")) == 3


def test_a_transport_domain_written_twice_in_two_spellings_is_refused(tmp_path):
    path = tmp_path / "elemta.yaml"
    path.write_text("delivery:\n  transport:\n"
                    "    - {domain: bücher.example, nexthop: 'smtp:[127.0.0.2]:25'}\n"
                    "    - {domain: XN--BCHER-KVA.example., nexthop: 'smtp:[127.0.0.3]:25'}\n",
                    encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path), check_files=False)
    assert "is already in delivery.transport[0]" in str(caught.value)


# ---- the hosted address classes (issue 14): virtual mailbox, virtual alias, relay -------------

MAILBOX, RELAYED, ALIASED = "virtual mailbox", "relay", "virtual alias"
# (address as written, its class, known?, what a virtual alias expands to)
HOSTED = [
    ("alice@virt.test", MAILBOX, True, None),
    ("ALICE@VIRT.TEST.", MAILBOX, True, None),
    ('"alice"@virt.test', MAILBOX, True, None),
    ("alice+tag@virt.test", MAILBOX, True, None),              # found as alice@virt.test
    ("alice@mailbox.bücher.example", MAILBOX, True, None),
    ("alice@MAILBOX.XN--BCHER-KVA.EXAMPLE.", MAILBOX, True, None),
    ("nobody@virt.test", MAILBOX, False, None),
    ("nobody@Mailbox.Bücher.Example", MAILBOX, False, None),
    ("sales@alias.test", ALIASED, True, ["alice@virt.test", "root@example.test"]),
    ("SALES@Alias.Test.", ALIASED, True, ["alice@virt.test", "root@example.test"]),
    ("sales+x@alias.test", ALIASED, True, ["alice+x@virt.test", "root+x@example.test"]),
    ("nobody@alias.test", ALIASED, False, None),
    ("known@relay.test", RELAYED, True, None),
    ("KNOWN@Relay.Test.", RELAYED, True, None),
    ("nobody@relay.test", RELAYED, False, None),
]
TABLE = {MAILBOX: "virtual mailbox table", ALIASED: "virtual alias table",
         RELAYED: "relay recipient table"}


@pytest.mark.parametrize("address, kind, known, targets", HOSTED, ids=[h[0] for h in HOSTED])
def test_smtp_rcpt_hosted(server, address, kind, known, targets):
    code, text = rcpt_reply(server, address, STRANGER)
    if known:
        assert (code, text.decode()) == (250, "2.1.5 Ok")
    else:
        shown = address.encode("ascii", "replace").decode()     # replies are ASCII
        assert (code, text.decode()) == (550, "5.1.1 <%s>: Recipient address rejected: "
                                              "User unknown in %s" % (shown, TABLE[kind]))


def test_sendmail_bv_hosted(server):
    status, out, err = sendmail(server, "-bv", *[h[0] for h in HOSTED])
    expected = []
    for address, kind, known, targets in HOSTED:
        domain = address.rpartition("@")[2]
        if not known:
            expected.append("%s... undeliverable: User unknown in %s" % (address, TABLE[kind]))
        elif targets:
            expected.append("%s... deliverable: virtual alias of %s"
                            % (address, ", ".join(targets)))
        else:
            expected.append("%s... deliverable: %s domain %s" % (address, kind, domain))
    assert out.splitlines() == expected, err
    assert status == 67


def test_smtp_and_sendmail_queue_the_same_expanded_recipients(server):
    """Virtual aliases are expanded before the queue, by the smtpd and by pickup alike;
    a virtual mailbox or relay recipient is queued in its normal form by both (so
    "alice"@virt.test is alice@virt.test, queued once, and ALICE@VIRT.TEST. is
    ALICE@virt.test: the local part's case is the mailbox's business)."""
    accepted = [h[0] for h in HOSTED if h[2]]
    before = set(server.queued_ids())
    with smtplib.SMTP("127.0.0.1", server.port, source_address=(STRANGER, 0)) as smtp:
        smtp.ehlo("client.test")
        smtp.mail("someone@client.test", ["SMTPUTF8"])
        assert [smtp.docmd("RCPT TO:<%s>" % a)[0] for a in accepted] == [250] * len(accepted)
        assert smtp.data(b"Subject: hosted by smtp\r\n\r\nhi\r\n")[0] == 250
    [by_smtp] = wait_for(lambda: set(server.queued_ids()) - before)
    status, _, err = sendmail(server, "-i", *accepted, stdin=b"Subject: hosted\n\nhi\n")
    assert status == 0, err
    [by_pickup] = wait_for(lambda: set(server.queued_ids()) - before - {by_smtp}, timeout=20)
    expected = []
    for address, kind, _, targets in HOSTED:
        queued = canonical(address) if kind in (MAILBOX, RELAYED) else address
        for one in targets or [queued]:
            if one not in expected and (targets or address in accepted):
                expected.append(one)
    assert expected[:4] == ["alice@virt.test", "ALICE@virt.test", "alice+tag@virt.test",
                            "alice@mailbox.xn--bcher-kva.example"]
    assert queued_recipients(server, by_smtp) == expected
    assert queued_recipients(server, by_pickup) == expected



def test_a_recipient_named_twice_is_queued_once_by_smtp_and_sendmail(server):
    """Named twice, or after an alias that reached it: one queue recipient, so one copy
    (Postfix's cleanup drops the duplicate too); another spelling stays apart."""
    named = ["root@example.test", "sales@alias.test", "root@example.test",
             "alice@virt.test", "ROOT@EXAMPLE.TEST.", "alice@virt.test"]
    expected = ["root@example.test", "alice@virt.test", "ROOT@EXAMPLE.TEST."]
    before = set(server.queued_ids())
    with smtplib.SMTP("127.0.0.1", server.port, source_address=(STRANGER, 0)) as smtp:
        smtp.ehlo("client.test")
        smtp.mail("someone@client.test")
        assert [smtp.docmd("RCPT TO:<%s>" % a)[0] for a in named] == [250] * len(named)
        assert smtp.data(b"Subject: named twice\r\n\r\nhi\r\n")[0] == 250
    [by_smtp] = wait_for(lambda: set(server.queued_ids()) - before)
    status, _, err = sendmail(server, "-i", *named, stdin=b"Subject: twice\n\nhi\n")
    assert status == 0, err
    [by_pickup] = wait_for(lambda: set(server.queued_ids()) - before - {by_smtp}, timeout=20)
    assert queued_recipients(server, by_smtp) == expected
    assert queued_recipients(server, by_pickup) == expected

@pytest.mark.parametrize("address, kind, known, targets",
                         [h for h in HOSTED if h[1] != ALIASED], ids=lambda v: str(v))
def test_routing_hosted(config, address, kind, known, targets):
    destination = Router(config).destination(address)
    if kind == MAILBOX:
        assert (destination.kind, destination.host, destination.port) == ("lmtp", "127.0.0.4", 24)
    else:
        assert (destination.kind, destination.host, destination.port) == (
            "smtp", "127.0.0.3", 2525)
