"""Hosted domains (issue 14, requirement 2): the four address classes, each recipient
checked at RCPT, each delivered where its class says.

One real server, a stranger's client at 127.0.0.1 (outside relay.mynetworks):
    virt.test     a virtual mailbox domain: users in an lmdb table, delivered over LMTP to
                  a real Dovecot (tests/peers/dovecot.py), which stores into Maildirs
    alias.test    a virtual alias domain: sales@ to three classes at once (a Dovecot
                  user, a local user, a remote address), @alias.test a catch-all,
                  loop1 <-> loop2 a loop
    relay.test    relay domains with a recipient table (known@relay.test, and every user
    gateway.test  of gateway.test by its @domain key), delivered by relay.relay_transport
                  to one scripted server; remote mail (relayhost) goes to another
Unknown users get 550 5.1.1 in Postfix's words, so nothing is bounced later; a table that
cannot answer gets 451 4.3.0. Needs root and dovecot-lmtpd.
See also: elemta.addressing.hosted, elemta.addressing.virtual, elemta.delivery.routing,
tests/security/test_open_relay.py (the relay probes against these classes too).
"""

import os
import re
import smtplib
import tempfile

import pytest

from elemta.config import ConfigError
from elemta.config.loader import load_text
from elemta.maps.lmdbtable import compile_source
from tests.harness import wait_for
from tests.peers.dovecot import DovecotInstance, DovecotUser, dovecot_available
from tests.peers.sink import ScriptedServer

pytestmark = pytest.mark.skipif(bool(dovecot_available()), reason=str(dovecot_available()))

STRANGER = "127.0.0.1"
TRUSTED = "127.0.0.2"
ALIASES = {
    "sales@alias.test": ["alice@virt.test", "root@example.test", "partner@remote.test"],
    "@alias.test": "bob@virt.test",
    "loop1@alias.test": "loop2@alias.test",
    "loop2@alias.test": "loop1@alias.test",
    "self@alias.test": ["self@alias.test", "alice@virt.test"],
    "inject@alias.test": "a@virt.test\r\nRCPT TO:<x@victim.example>",
    # Targets spelled as an admin or a web panel may write them.
    "shout@alias.test": "Alice@VIRT.test.",
    "intl@alias.test": ["bob@virt.test", "alice@Bücher.test"],
    "jorg@alias.test": "jörg@remote.test",
    "long@alias.test": "l" * 65 + "@virt.test",
    # Domain aliases (virtual(5) "@domain @otherdomain"), one pair in a loop.
    "@domalias.test": "@VIRT.test",
    "@loopa.test": "@loopb.test",
    "@loopb.test": "@loopa.test",
}


def unknown(address, table):
    return "550 5.1.1 <%s>: Recipient address rejected: User unknown in %s" % (address, table)


@pytest.fixture(scope="module")
def dovecot():
    users = {"alice": DovecotUser(), "bob": DovecotUser()}
    with DovecotInstance(tempfile.mkdtemp(prefix="elemta-dovecot-"), users) as instance:
        yield instance
    instance.remove()


@pytest.fixture(scope="module")
def remote():
    """Where remote mail leaves (delivery.relayhost)."""
    with ScriptedServer() as sink:
        yield sink


@pytest.fixture(scope="module")
def gateway():
    """The relay domains' next hop (relay.relay_transport)."""
    with ScriptedServer() as sink:
        yield sink


@pytest.fixture(scope="module")
def vmailbox(tmp_path_factory):
    """The virtual mailbox table: lmdb, compiled as elemtactl map compile does."""
    source = tmp_path_factory.mktemp("tables") / "vmailbox"
    source.write_text("alice@virt.test alice\nbob@virt.test bob\nalice@bücher.test alice\n",
                      encoding="utf-8")
    compile_source(str(source))
    return str(source)


@pytest.fixture(scope="module")
def mx(elemta_module_server, dovecot, remote, gateway, vmailbox, tmp_path_factory):
    aliases = tmp_path_factory.mktemp("aliases") / "aliases"
    aliases.write_text("postmaster: root\nteam: whoever@alias.test\n")
    server = elemta_module_server(
        relay={"local_domains": ["example.test"], "mynetworks": [TRUSTED + "/32"],
               "relay_domains": ["relay.test", "gateway.test"],
               "relay_recipient_maps": {"known@relay.test": "ok", "@gateway.test": "ok"},
               "relay_transport": "smtp:[127.0.0.1]:%d" % gateway.port},
        virtual={"alias_domains": ["alias.test", "domalias.test", "loopa.test",
                                   "loopb.test"], "alias_maps": ALIASES,
                 "mailbox_domains": ["virt.test", "bücher.test"],
                 "mailbox_maps": "lmdb:" + vmailbox,
                 "transport": "lmtp:unix:" + dovecot.lmtp_socket},
        delivery={"workers": 1, "relayhost": "[127.0.0.1]:%d" % remote.port,
                  "min_backoff": 0.5, "max_backoff": 1.0},
        local={"aliases_file": str(aliases), "reject_unknown_users": True})
    os.makedirs(os.path.join(server.workdir, "mail"), exist_ok=True)
    wait_for(lambda: "local delivery agent started" in server.log()
             and "delivery worker started" in server.log())
    return server


def rcpt(server, address, source=STRANGER):
    with smtplib.SMTP("127.0.0.1", server.port, source_address=(source, 0)) as smtp:
        smtp.ehlo("client.test")
        smtp.mail("someone@client.test")
        code, text = smtp.docmd("RCPT TO:<%s>" % address)
        return "%d %s" % (code, text.decode())


def send(server, recipients, subject, source=STRANGER):
    """One message; returns (replies to each RCPT, queue id)."""
    with smtplib.SMTP("127.0.0.1", server.port, source_address=(source, 0)) as smtp:
        smtp.ehlo("client.test")
        smtp.mail("someone@client.test")
        replies = [smtp.docmd("RCPT TO:<%s>" % r)[0] for r in recipients]
        code, text = smtp.data(b"Subject: %s\r\n\r\nhosted mail\r\n" % subject.encode())
        assert code == 250, text
        return replies, text.decode().rsplit(" ", 1)[1]


def has_subject(messages, subject):
    return any(b"Subject: %s\r\n" % subject.encode() in m or
               b"Subject: %s\n" % subject.encode() in m for m in messages)


# ---- virtual mailbox domains -------------------------------------------------------------

def test_a_virtual_mailbox_user_gets_mail_in_dovecot(mx, dovecot):
    replies, _ = send(mx, ["alice@virt.test"], "to alice")
    assert replies == [250]
    wait_for(lambda: has_subject(dovecot.messages("alice"), "to alice"), timeout=20)


def test_an_unknown_virtual_mailbox_user_is_refused_at_rcpt_and_never_bounced(mx, remote):
    assert rcpt(mx, "nobody@virt.test") == unknown("nobody@virt.test",
                                                   "virtual mailbox table")
    assert rcpt(mx, "Nobody@VIRT.test.") == unknown("Nobody@VIRT.test.",
                                                    "virtual mailbox table")
    assert "to=<nobody@virt.test>, relay=" not in mx.log()        # never delivered
    assert not any(m.mail.startswith("MAIL FROM:<>") for m in remote.messages)


def test_a_mailbox_table_that_cannot_answer_is_a_temporary_failure(mx, vmailbox):
    os.rename(vmailbox + ".lmdb", vmailbox + ".away")
    try:
        assert rcpt(mx, "alice@virt.test") == \
            "451 4.3.0 <alice@virt.test>: Temporary lookup failure"
    finally:
        os.rename(vmailbox + ".away", vmailbox + ".lmdb")
    assert rcpt(mx, "alice@virt.test") == "250 2.1.5 Ok"
    assert re.search(r"<alice@virt.test>: lookup failed: lmdb:\S+vmailbox: cannot read",
                     mx.log())


# ---- virtual alias domains -------------------------------------------------------------------

def test_a_virtual_alias_goes_to_a_mailbox_a_local_user_and_a_remote_address(
        mx, dovecot, remote):
    replies, queue_id = send(mx, ["sales@alias.test"], "to sales")
    assert replies == [250]
    # Expanded before it was queued: the record holds the three, sales as their ORCPT.
    envelope, _ = mx.message(queue_id)
    assert [(r.address, r.orcpt) for r in envelope.recipients] == [
        (address, "rfc822;sales@alias.test") for address in ALIASES["sales@alias.test"]]
    wait_for(lambda: has_subject(dovecot.messages("alice"), "to sales"), timeout=20)
    wait_for(lambda: [m for m in remote.messages if b"to sales" in m.content], timeout=20)
    [out] = [m for m in remote.messages if b"to sales" in m.content]
    assert out.rcpts == ["RCPT TO:<partner@remote.test> ORCPT=rfc822;sales@alias.test"] or \
        out.rcpts == ["RCPT TO:<partner@remote.test>"]

    def root_mailbox():
        try:
            with open(os.path.join(mx.workdir, "mail", "root"), "rb") as f:
                return b"Subject: to sales" in f.read()
        except FileNotFoundError:
            return False
    wait_for(root_mailbox, timeout=20)


def test_the_catch_all_takes_what_no_entry_names(mx, dovecot):
    replies, queue_id = send(mx, ["whoever@alias.test", "self@alias.test"], "catch all")
    assert replies == [250, 250]
    envelope, _ = mx.message(queue_id)
    # self maps to itself and alice: kept as it is (no loop), then caught by @alias.test.
    assert [r.address for r in envelope.recipients] == [
        "bob@virt.test", "self@alias.test", "alice@virt.test"]
    wait_for(lambda: has_subject(dovecot.messages("bob"), "catch all"), timeout=20)


def test_a_local_alias_forwarding_to_a_virtual_alias_domain_is_expanded(mx, dovecot,
                                                                          remote):
    """/etc/aliases team -> whoever@alias.test: the local agent's forwarded copy has its
    virtual aliases expanded before it is queued (the catch-all: bob's mailbox), as
    Postfix's local forwards through cleanup; it never goes out to the relay host."""
    replies, _ = send(mx, ["team@example.test"], "to team")
    assert replies == [250]
    wait_for(lambda: has_subject(dovecot.messages("bob"), "to team"), timeout=20)
    assert not [m for m in remote.messages if b"to team" in m.content]


def test_a_virtual_alias_loop_is_refused_and_its_path_logged(mx):
    assert rcpt(mx, "loop1@alias.test") == (
        "451 4.6.0 <loop1@alias.test>: Alias expansion error: virtual alias loop")
    assert ("<loop1@alias.test>: virtual alias loop: <loop1@alias.test> -> "
            "<loop2@alias.test> -> <loop1@alias.test>") in mx.log()


def test_a_table_value_that_is_not_an_address_never_reaches_the_envelope(mx):
    """An alias table may be filled by others (a web panel's SQL rows): a value with a
    line break would be a second SMTP command at the next hop."""
    assert rcpt(mx, "inject@alias.test") == ("451 4.6.0 <inject@alias.test>: Alias "
                                             "expansion error: a virtual alias that is "
                                             "not an address")
    assert "the virtual alias table gives 'a@virt.test\\r\\nRCPT TO:<x@victim.example>'" \
        in mx.log()


def test_alias_targets_are_queued_in_normal_form_and_reach_dovecot(mx, dovecot):
    """A target as the table spells it: "Alice@VIRT.test." reached Dovecot's LMTP as it
    was, which answered 501, bounced after the client had 250; "alice@Bücher.test" in a
    message without SMTPUTF8 made the whole LMTP transaction fail, bob's copy with it.
    Each is queued in the form the smtpd queues a hosted recipient in."""
    replies, queue_id = send(mx, ["shout@alias.test", "intl@alias.test"], "spelled")
    assert replies == [250, 250]
    envelope, _ = mx.message(queue_id)
    assert [r.address for r in envelope.recipients] == [
        "Alice@virt.test", "bob@virt.test", "alice@xn--bcher-kva.test"]
    assert not envelope.smtputf8
    wait_for(lambda: has_subject(dovecot.messages("bob"), "spelled"), timeout=20)
    wait_for(lambda: len([m for m in dovecot.messages("alice")
                          if b"Subject: spelled" in m]) == 2, timeout=20)
    for address in envelope.recipients:
        wait_for(lambda: re.search(r"%s: to=<%s>, relay=\S+, delay=\S+, .*status=sent" % (
            queue_id, re.escape(address.address)), mx.log()), timeout=20)
    assert not re.search(r"to=<(Alice@virt|bob@virt|alice@xn--bcher-kva)\.test>.*"
                         r"status=bounced", mx.log())


def test_a_utf8_alias_target_needs_an_smtputf8_message(mx):
    """jörg@remote.test cannot be passed on in a message without SMTPUTF8: refused at
    RCPT for good (RFC 6531 3.7.4.1), logged with the target; with SMTPUTF8 it is
    taken."""
    assert rcpt(mx, "jorg@alias.test") == (
        "553 5.6.7 <jorg@alias.test>: Recipient address rejected: its virtual alias "
        "needs SMTPUTF8")
    assert "<jorg@alias.test>: its virtual alias 'j\\xf6rg@remote.test' is not ASCII" \
        in mx.log()
    with smtplib.SMTP("127.0.0.1", mx.port) as smtp:
        smtp.ehlo("client.test")
        smtp.mail("someone@client.test", ["SMTPUTF8"])
        assert smtp.docmd("RCPT TO:<jorg@alias.test>") == (250, b"2.1.5 Ok")


def test_an_alias_target_too_long_to_be_an_address_is_refused_for_good(mx):
    """A local part of 65 octets is refused by every next hop: 550 5.1.3 (it was 451,
    retried by the client for days), the reason in the log."""
    assert rcpt(mx, "long@alias.test") == (
        "550 5.1.3 <long@alias.test>: Recipient address rejected: virtual alias address "
        "too long (local part longer than 64 octets)")
    assert "the virtual alias table gives '%s@virt.test' for <long@alias.test>: local " \
           "part longer than 64 octets" % ("l" * 65) in mx.log()


def test_a_domain_alias_renames_the_domain_and_the_result_must_exist(mx, dovecot):
    """"@domalias.test @VIRT.test": user@domalias.test is user@virt.test, looked up again
    (it was refused with 451 4.6.0); a user virt.test lacks is refused at RCPT with the
    table it is missing from (Postfix would accept and bounce later); a rename that
    comes back is a loop."""
    replies, queue_id = send(mx, ["Alice@DomAlias.test"], "renamed")
    assert replies == [250]
    envelope, _ = mx.message(queue_id)
    assert [(r.address, r.orcpt) for r in envelope.recipients] == [
        ("Alice@virt.test", "rfc822;Alice@DomAlias.test")]
    wait_for(lambda: has_subject(dovecot.messages("alice"), "renamed"), timeout=20)
    assert rcpt(mx, "nobody@domalias.test") == unknown("nobody@domalias.test",
                                                       "virtual mailbox table")
    assert rcpt(mx, "x@loopa.test") == (
        "451 4.6.0 <x@loopa.test>: Alias expansion error: virtual alias loop")
    assert "virtual alias loop: <x@loopa.test> -> <x@loopb.test> -> <x@loopa.test>" \
        in mx.log()


def test_pickup_queues_alias_targets_in_normal_form_and_holds_what_cannot_be(mx, dovecot):
    """sendmail's mail through the same expansion: the targets in normal form (and
    SMTPUTF8 when one needs it), a target too long held for the admin, not retried."""
    import subprocess
    import sys
    from tests.harness import REPO

    def sendmail(recipient, subject):
        result = subprocess.run(
            [sys.executable, "-m", "elemta.cli.sendmail", "-C", mx.config_path, "-i",
             recipient], input=b"Subject: %s\n\nby sendmail\n" % subject.encode(),
            capture_output=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=60)
        assert result.returncode == 0, result.stderr
    sendmail("shout@alias.test", "picked up")
    # As the table spells it, Dovecot would have refused it (501) and it would bounce.
    wait_for(lambda: has_subject(dovecot.messages("alice"), "picked up"), timeout=20)
    sendmail("long@alias.test", "too long")
    wait_for(lambda: re.search(r"hold: 550 5\.1\.3 Alias expansion error: the virtual alias "
                               r"table gives 'l{65}@virt.test' for <long@alias.test>: local "
                               r"part longer than 64 octets; held for the admin", mx.log()),
             timeout=20)


def test_without_recipient_tables_only_alias_domains_check_users(tmp_path, elemta_server):
    """An alias domain's address needs an entry; a relay or mailbox domain without its
    recipient table takes every user (the next hop decides), as Postfix does."""
    server = elemta_server(relay={"mynetworks": [TRUSTED + "/32"],
                                  "relay_domains": ["open.test"]},
                           virtual={"alias_domains": ["alias.test"],
                                    "alias_maps": {"info@alias.test": "root@example.test"},
                                    "mailbox_domains": ["any.test"]})
    assert rcpt(server, "info@alias.test") == "250 2.1.5 Ok"
    assert rcpt(server, "other@alias.test") == unknown("other@alias.test",
                                                       "virtual alias table")
    assert rcpt(server, "whoever@open.test") == "250 2.1.5 Ok"
    assert rcpt(server, "whoever@any.test") == "250 2.1.5 Ok"
    assert rcpt(server, "whoever@elsewhere.test") == \
        "554 5.7.1 <whoever@elsewhere.test>: Relay access denied"


def test_a_local_submission_to_a_loop_waits_in_the_maildrop(mx):
    """pickup expands before it queues, as the smtpd does: a loop leaves the file in the
    maildrop (tried again later, nothing lost) with the reason in the log."""
    import subprocess
    import sys
    from tests.harness import REPO
    result = subprocess.run(
        [sys.executable, "-m", "elemta.cli.sendmail", "-C", mx.config_path, "-i",
         "loop2@alias.test"], input=b"Subject: loop\n\nround and round\n",
        capture_output=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=60)
    assert result.returncode == 0, result.stderr
    wait_for(lambda: re.search(r"maildrop: \S+: 4\.6\.0 Alias expansion error: virtual alias "
                               r"loop: <loop2@alias.test> -> <loop1@alias.test> -> "
                               r"<loop2@alias.test>; tried again in", mx.log()), timeout=20)
    assert [n for n in os.listdir(os.path.join(mx.spool, "maildrop"))
            if not n.startswith(".")]


def test_an_alias_domain_address_no_alias_expands_bounces_at_delivery_and_never_goes_out(
        elemta_server, tmp_path):
    """An address of a virtual alias domain in the queue unexpanded has no alias: one that
    sendmail queued (pickup cannot refuse it), one whose entry keeps it in its own
    expansion. Delivery bounces it with Postfix's words (its trivial-rewrite sends such an
    address to error(8)), whatever the transport map says, and never looks for its MX or
    sends it to the relay host, where it would have gone out for a domain that is ours."""
    with ScriptedServer() as outside:
        server = elemta_server(
            virtual={"alias_domains": ["alias.test"],
                     "alias_maps": {"self@alias.test": ["self@alias.test",
                                                        "root@example.test"]}},
            delivery={"workers": 1, "relayhost": "[127.0.0.1]:%d" % outside.port,
                      "transport": [{"domain": "alias.test",
                                     "nexthop": "smtp:[127.0.0.1]:%d" % outside.port}],
                      "min_backoff": 0.5, "max_backoff": 1.0})
        os.makedirs(os.path.join(server.workdir, "mail"), exist_ok=True)
        assert rcpt(server, "nobody@alias.test") == unknown("nobody@alias.test",
                                                            "virtual alias table")
        with smtplib.SMTP("127.0.0.1", server.port) as smtp:
            smtp.sendmail("root@example.test", ["self@alias.test"],
                          b"Subject: to self\r\n\r\nkept in its own expansion\r\n")
        import subprocess
        import sys
        from tests.harness import REPO
        result = subprocess.run(
            [sys.executable, "-m", "elemta.cli.sendmail", "-C", server.config_path, "-i",
             "-f", "root@example.test", "nobody@alias.test"],
            input=b"Subject: by sendmail\n\nno such alias\n", capture_output=True,
            env=dict(os.environ, PYTHONPATH=REPO), timeout=60)
        assert result.returncode == 0, result.stderr
        for address in ("self@alias.test", "nobody@alias.test"):
            wait_for(lambda: re.search(
                r"to=<%s>, relay=none, delay=\S+, dsn=\S+, status=bounced \(550 5\.1\.1 User "
                r"unknown in virtual alias table\)" % re.escape(address), server.log()),
                timeout=20)
        # The bounces reach the sender (root, here); the copy for root was delivered.
        mailbox = os.path.join(server.workdir, "mail", "root")
        wait_for(lambda: os.path.exists(mailbox) and open(mailbox, "rb").read().count(
            b"User unknown in virtual alias table") >= 2, timeout=20)
        assert b"kept in its own expansion" in open(mailbox, "rb").read()
        assert outside.sessions == []


def test_recipient_tables_keyed_by_international_domains_answer_either_spelling(
        elemta_server, tmp_path):
    """Tables written with UTF-8 domains, as an admin or a web panel writes them: an lmdb
    mailbox table compiled by elemtactl, an inline alias table and a SQLite relay
    recipient table. The RCPT check asks for the A-label form of whatever the client
    wrote, so UTF-8 keys were never found: every user of an IDN domain was refused."""
    import sqlite3
    import subprocess
    import sys
    from tests.harness import REPO
    source = tmp_path / "vmailbox"
    source.write_text("alice@bücher.test  ok\n", encoding="utf-8")
    compiled = subprocess.run(
        [sys.executable, "-m", "elemta.cli.elemtactl", "map", "compile", str(source)],
        capture_output=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=60)
    assert compiled.returncode == 0, compiled.stderr
    database = tmp_path / "relay.sqlite"
    with sqlite3.connect(str(database)) as db:
        db.executescript("CREATE TABLE rcpt (address TEXT);"
                         "INSERT INTO rcpt VALUES ('known@zürich.test');")
    cf = tmp_path / "relay-sqlite.cf"
    cf.write_text("dbpath = %s\nquery = SELECT 'ok' FROM rcpt WHERE address = '%%s'\n"
                  % database)
    server = elemta_server(
        relay={"relay_domains": ["zürich.test"],
               "relay_recipient_maps": "sqlite:%s" % cf},
        virtual={"mailbox_domains": ["bücher.test"], "mailbox_maps": "lmdb:%s" % source,
                 "transport": "lmtp:[127.0.0.1]:9",
                 "alias_domains": ["münchen.test"],
                 "alias_maps": {"Info@MÜNCHEN.test": "alice@bücher.test"}})

    def rcpt_utf8(address):
        with smtplib.SMTP("127.0.0.1", server.port) as smtp:
            smtp.ehlo("client.test")
            smtp.mail("someone@client.test", ["SMTPUTF8"])
            code, text = smtp.docmd("RCPT TO:<%s>" % address)
            return "%d %s" % (code, text.decode())
    for address in ("alice@xn--bcher-kva.test", "ALICE@Bücher.Test.",
                    "info@xn--mnchen-3ya.test", "info@münchen.test",
                    "known@xn--zrich-kva.test", "known@zürich.test"):
        assert rcpt_utf8(address) == "250 2.1.5 Ok", address
    assert rcpt_utf8("bob@xn--bcher-kva.test") == unknown("bob@xn--bcher-kva.test",
                                                          "virtual mailbox table")
    assert rcpt_utf8("other@xn--zrich-kva.test") == unknown("other@xn--zrich-kva.test",
                                                            "relay recipient table")


# ---- relay domains -------------------------------------------------------------------------

def test_relay_domains_take_their_known_recipients_from_anyone(mx, gateway):
    assert rcpt(mx, "someone@relay.test") == unknown("someone@relay.test",
                                                     "relay recipient table")
    replies, _ = send(mx, ["known@relay.test", "anyone@gateway.test"], "relayed")
    assert replies == [250, 250]
    wait_for(lambda: [m for m in gateway.messages if b"relayed" in m.content], timeout=20)
    [out] = [m for m in gateway.messages if b"relayed" in m.content]
    assert sorted(r.split(">")[0] for r in out.rcpts) == [
        "RCPT TO:<anyone@gateway.test", "RCPT TO:<known@relay.test"]


def test_other_domains_stay_refused_to_strangers(mx):
    assert rcpt(mx, "x@remote.test") == "554 5.7.1 <x@remote.test>: Relay access denied"
    assert rcpt(mx, "x@sub.relay.test") == \
        "554 5.7.1 <x@sub.relay.test>: Relay access denied"
    assert rcpt(mx, "x@remote.test", source=TRUSTED) == "250 2.1.5 Ok"


# ---- sendmail -bv says what RCPT says ---------------------------------------------------------

def test_sendmail_bv_knows_the_classes(mx):
    import subprocess
    import sys
    from tests.harness import REPO
    result = subprocess.run(
        [sys.executable, "-m", "elemta.cli.sendmail", "-C", mx.config_path, "-bv",
         "alice@virt.test", "nobody@virt.test", "sales@alias.test", "known@relay.test",
         "x@relay.test", "alice@domalias.test", "nobody@domalias.test"], capture_output=True, env=dict(os.environ, PYTHONPATH=REPO),
        timeout=60)
    assert result.stdout.decode().splitlines() == [
        "alice@virt.test... deliverable: virtual mailbox domain virt.test",
        "nobody@virt.test... undeliverable: User unknown in virtual mailbox table",
        "sales@alias.test... deliverable: virtual alias of alice@virt.test, "
        "root@example.test, partner@remote.test",
        "known@relay.test... deliverable: relay domain relay.test",
        "x@relay.test... undeliverable: User unknown in relay recipient table",
        "alice@domalias.test... deliverable: virtual alias of alice@virt.test",
        "nobody@domalias.test... undeliverable: virtual alias of nobody@virt.test: User "
        "unknown in virtual mailbox table"]
    assert result.returncode == 67


# ---- the config ---------------------------------------------------------------------------

def test_a_domain_in_two_classes_is_refused_naming_file_line_key():
    text = ("relay:\n  local_domains: [example.test]\n"
            "virtual:\n  mailbox_domains: [virt.test, Example.Test.]\n")
    with pytest.raises(ConfigError) as caught:
        load_text("/etc/elemta/elemta.yaml", text, check_files=False)
    assert str(caught.value) == (
        "/etc/elemta/elemta.yaml:4: virtual.mailbox_domains[1]: example.test is already "
        "in relay.local_domains[0]: a domain belongs to one address class")


# ---- a database table that goes away ------------------------------------------------------------

def test_a_relay_recipient_table_in_a_stopped_postgresql_gets_451_not_550(
        elemta_server, postgres, tmp_path):
    """relay.relay_recipient_maps in PostgreSQL: while the server is down every RCPT to
    the relay domain is 451 4.3.0 (the client retries), never 550; then answers again."""
    postgres.execute("CREATE TABLE relay_rcpt (address text);"
                     "INSERT INTO relay_rcpt VALUES ('known@relay.test');")
    cf = tmp_path / "relay-pgsql.cf"
    cf.write_text("hosts = 127.0.0.1:%d\nuser = %s\npassword = %s\ndbname = %s\n"
                  "query = SELECT 'ok' FROM relay_rcpt WHERE address = '%%s'\ntimeout = 3\n"
                  % (postgres.port, postgres.user, postgres.password, postgres.dbname))
    server = elemta_server(relay={"mynetworks": [TRUSTED + "/32"],
                                  "relay_domains": ["relay.test"],
                                  "relay_recipient_maps": "pgsql:%s" % cf})
    assert rcpt(server, "known@relay.test") == "250 2.1.5 Ok"
    assert rcpt(server, "other@relay.test") == unknown("other@relay.test",
                                                       "relay recipient table")
    postgres.stop()
    try:
        for address in ("known@relay.test", "other@relay.test"):
            assert rcpt(server, address) == \
                "451 4.3.0 <%s>: Temporary lookup failure" % address
    finally:
        postgres.start()
    assert rcpt(server, "known@relay.test") == "250 2.1.5 Ok"
    assert "<other@relay.test>: lookup failed: pgsql:%s: " % cf in server.log()


def test_the_transport_map_wins_over_the_class_transport():
    """As Postfix's transport_maps win over virtual_transport and relay_transport."""
    from elemta.delivery.routing import Router
    config = load_text("/etc/elemta/elemta.yaml", (
        "relay:\n  relay_domains: [relay.test, other-relay.test]\n"
        "  relay_transport: 'smtp:[127.0.0.3]:25'\n"
        "virtual:\n  mailbox_domains: [virt.test, other.test]\n"
        "  transport: 'lmtp:[127.0.0.4]:24'\n"
        "delivery:\n  transport:\n"
        "    - {domain: virt.test, nexthop: 'lmtp:unix:/run/other/lmtp'}\n"
        "    - {domain: relay.test, nexthop: 'smtp:[127.0.0.5]:2525'}\n"), check_files=False)
    router = Router(config)
    assert router.destination("u@virt.test").key == "lmtp:unix:/run/other/lmtp"
    assert router.destination("u@other.test").key == "lmtp:[127.0.0.4]:24"
    assert router.destination("u@relay.test").key == "smtp:[127.0.0.5]:2525"
    assert router.destination("u@other-relay.test").key == "smtp:[127.0.0.3]:25"


def test_the_host_name_is_a_local_domain_and_no_other():
    load_text("/etc/elemta/elemta.yaml", "smtpd:\n  hostname: mx.example.test\n"
              "relay:\n  local_domains: [mx.example.test, Example.Test]\n",
              check_files=False)
    with pytest.raises(ConfigError) as caught:
        load_text("/etc/elemta/elemta.yaml", "smtpd:\n  hostname: mx.example.test\n"
                  "relay:\n  relay_domains: [MX.example.test.]\n", check_files=False)
    assert str(caught.value) == (
        "/etc/elemta/elemta.yaml:4: relay.relay_domains[0]: mx.example.test is already "
        "in smtpd.hostname: a domain belongs to one address class")
