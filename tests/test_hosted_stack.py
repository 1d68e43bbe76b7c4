"""The hosted-domain stack end to end (issue 14, requirement 6): the pieces an admin puts
together for a host that serves mail for domains whose users are not accounts of it.

One set of real peers for the module, all on loopback:
    Dovecot   users alice@one.test and bob@two.test (named by address, as a host serving
              several domains needs); its auth socket answers Elemta's AUTH, its LMTP
              socket takes the virtual mailboxes' mail, its IMAP listener is how the test
              reads a mailbox, as a mail client would (imaplib)
    NSD       remote.test MX mx.remote.test -> REMOTE_MX (127.0.0.33)
    a sink    the remote MX: an SMTP server on REMOTE_MX, delivery.mx_port
and one Elemta configured as the admin would: a submission listener (port 587's job, on
a free loopback port here; STARTTLS, AUTH through Dovecot), an smtp listener (port 25's
job), virtual.mailbox_domains one.test and two.test whose users are in an
lmdb table made by `elemtactl map compile`, delivered by virtual.transport over LMTP;
virtual.alias_domains alias.test whose team@ goes to one virtual, one local (root, in a
private mail spool) and one remote user; remote mail through NSD's MX records.
Each recipient gets one copy even when the sender names it besides the alias that
reaches it, in either order (Postfix's cleanup drops the duplicate too).
Needs root, dovecot-lmtpd, dovecot-imapd and nsd.
See also: tests/test_hosted_domains.py (each address class on its own),
tests/test_dovecot_auth.py, tests/test_lmtp.py, tests/test_mx.py.
"""

import base64
import imaplib
import os
import re
import smtplib
import ssl
import subprocess
import sys
import tempfile

import pytest

from tests.harness import REPO, free_port, wait_for
from tests.peers.dovecot import DovecotInstance, DovecotUser, dovecot_available
from tests.peers.nsd import NSDInstance, nsd_available
from tests.peers.sink import ScriptedServer

WHY_NOT = dovecot_available(imap=True) or nsd_available()
pytestmark = pytest.mark.skipif(bool(WHY_NOT), reason=str(WHY_NOT))

REMOTE_MX = "127.0.0.33"
ALICE, BOB = "alice@one.test", "bob@two.test"
PASSWORDS = {ALICE: "wonderland", BOB: "builder"}
TEAM = ["bob@two.test", "root@example.test", "partner@remote.test"]
# What Elemta (Received) and Dovecot's LMTP (Return-Path, Delivered-To, Received) put on
# top of a message; everything below them must be what the client sent, byte for byte.
TRACE_HEADERS = {"received", "return-path", "delivered-to"}


@pytest.fixture(scope="module")
def dovecot():
    users = {address: DovecotUser(password) for address, password in PASSWORDS.items()}
    workdir = tempfile.mkdtemp(prefix="elemta-stack-dovecot-")
    with DovecotInstance(workdir, users, auth_socket=True, imap_port=free_port(),
                         full_addresses=True) as instance:
        yield instance
    instance.remove()


@pytest.fixture(scope="module")
def nsd():
    zones = {"remote.test": "@ MX 10 mx\nmx A %s\n" % REMOTE_MX}
    with NSDInstance(tempfile.mkdtemp(prefix="elemta-stack-nsd-"), zones) as server:
        yield server
    server.remove()


@pytest.fixture(scope="module")
def remote():
    """remote.test's MX, on the port Elemta's delivery uses for MX hosts."""
    with ScriptedServer(address=REMOTE_MX, port=free_port(REMOTE_MX)) as sink:
        yield sink


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    """The virtual mailbox table, compiled to lmdb by elemtactl as the admin does."""
    directory = tmp_path_factory.mktemp("tables")
    source = directory / "vmailbox"
    source.write_text("# users of the hosted mailbox domains\n"
                      "alice@one.test  one.test/alice/\nbob@two.test  two.test/bob/\n")
    compiled = subprocess.run(
        [sys.executable, "-m", "elemta.cli.elemtactl", "map", "compile", str(source)],
        capture_output=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=60)
    assert compiled.returncode == 0, compiled.stderr
    return "lmdb:%s" % source


@pytest.fixture(scope="module")
def mta(elemta_module_server, dovecot, nsd, remote, tables, tls_files):
    cert, key = tls_files
    server = elemta_module_server(
        listeners=[{"mode": "smtp"}, {"mode": "submission"}],
        tls={"cert_file": cert, "key_file": key},
        auth={"backend": "dovecot", "dovecot_socket": dovecot.auth_socket},
        virtual={"mailbox_domains": ["one.test", "two.test"], "mailbox_maps": tables,
                 "transport": "lmtp:unix:" + dovecot.lmtp_socket,
                 "alias_domains": ["alias.test"],
                 "alias_maps": {"team@alias.test": ", ".join(TEAM)}},
        delivery={"workers": 1, "mx_port": remote.port, "nameservers": [nsd.address],
                  "dns_port": nsd.port, "min_backoff": 0.5, "max_backoff": 1.0},
        local={"reject_unknown_users": True})
    os.makedirs(os.path.join(server.workdir, "mail"), exist_ok=True)
    wait_for(lambda: "local delivery agent started" in server.log()
             and "delivery worker started" in server.log())
    return server


# ---- the client side ----------------------------------------------------------------------

def submission(server, user):
    """An SMTP session on the submission port, after STARTTLS and AUTH PLAIN as user."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    smtp = smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=20)
    smtp.starttls(context=context)
    smtp.ehlo("laptop.one.test")
    token = base64.b64encode(("\0%s\0%s" % (user, PASSWORDS[user])).encode()).decode()
    assert smtp.docmd("AUTH", "PLAIN " + token) == (235, b"2.7.0 Authentication successful")
    return smtp


def message(subject, to):
    """A message as a mail client writes it (CRLF, its own Date and Message-ID, 8-bit
    text: sent with BODY=8BITMIME)."""
    return ("From: Alice <alice@one.test>\r\nTo: %s\r\nSubject: %s\r\n"
            "Date: Sun, 06 Dec 2026 04:00:00 +0000\r\n"
            "Message-ID: <%s@laptop.one.test>\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n\r\n"
            "Hello,\r\n\r\n.a line that starts with a dot\r\n  and one with spaces \r\n"
            "caf\xe9 \u2615\r\n-- \r\nalice\r\n" % (to, subject, subject.replace(" ", "."))
            ).encode("utf-8")


def imap_messages(dovecot, user):
    """Every message in user's INBOX as IMAP FETCH BODY[] returns it."""
    imap = imaplib.IMAP4("127.0.0.1", dovecot.imap_port)
    try:
        imap.login(user, PASSWORDS[user])
        imap.select("INBOX", readonly=True)
        _, [numbers] = imap.search(None, "ALL")
        found = []
        for number in numbers.split():
            _, data = imap.fetch(number, "(BODY.PEEK[])")
            found.append(data[0][1])
        return found
    finally:
        imap.logout()


def with_subject(messages, subject):
    return [m for m in messages if re.search(rb"^Subject: %s\r?$" % re.escape(
        subject.encode()), m, re.M)]


def split_trace(stored):
    """(names of the header fields on top that the MTAs added, the rest): the trace
    fields are taken off from the top while their names are in TRACE_HEADERS."""
    names = []
    rest = stored
    while True:
        match = re.match(rb"([A-Za-z-]+):[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*", rest)
        if not match or match.group(1).decode().lower() not in TRACE_HEADERS:
            return names, rest
        names.append(match.group(1).decode().lower())
        rest = rest[match.end():]


def root_mailbox(server):
    try:
        with open(os.path.join(server.workdir, "mail", "root"), "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


def done(server, queue_id):
    """Wait until Elemta is through with queue_id: delivered to all, logged, removed."""
    wait_for(lambda: "%s: removed" % queue_id in server.log(), timeout=20)


# ---- the tests -------------------------------------------------------------------------------

def send(server, recipients, content):
    """One message from alice on the submission port; its queue id."""
    with submission(server, ALICE) as smtp:
        smtp.mail(ALICE, ["BODY=8BITMIME"])
        assert [smtp.rcpt(r)[0] for r in recipients] == [250] * len(recipients)
        code, text = smtp.data(content)
        assert code == 250, text
        return text.decode().rsplit(" ", 1)[1]


def deliveries(server, queue_id):
    """The final recipients of queue_id in Elemta's delivery log lines, one per line."""
    return re.findall(r"%s: to=<([^>]*)>, relay=\S+, .*status=sent" % queue_id,
                      server.log())


def test_submitted_mail_reaches_another_domains_mailbox_byte_for_byte(mta, dovecot):
    """alice@one.test logs in with her Dovecot password, writes to bob@two.test; bob
    reads it over IMAP: what the client sent, with only trace fields put on top."""
    sent = message("from alice to bob", BOB)
    queue_id = send(mta, [BOB], sent)
    done(mta, queue_id)
    [fetched] = with_subject(imap_messages(dovecot, BOB), "from alice to bob")
    added, rest = split_trace(fetched)
    # Allowed to differ: Dovecot's LMTP prepends Return-Path, Delivered-To and its
    # Received, above the Received Elemta prepended. Nothing else, and nothing below.
    assert added == ["return-path", "delivered-to", "received", "received"], fetched
    assert rest == sent
    assert fetched.startswith(b"Return-Path: <alice@one.test>\r\n"
                              b"Delivered-To: bob@two.test\r\n")
    assert re.search(rb"\r\nReceived: from laptop\.one\.test \(unknown \[127\.0\.0\.1\]\)\r\n"
                     rb"(\t.*\r\n)*\tby mx\.test \(Elemta\) with ESMTPSA id %s\r\n"
                     rb"\tfor <bob@two\.test>; " % queue_id.encode(), fetched), fetched
    assert ("%s: client=unknown[127.0.0.1], sasl_method=PLAIN, "
            "sasl_username=alice@one.test" % queue_id) in mta.log()
    assert deliveries(mta, queue_id) == [BOB]
    assert "wonderland" not in mta.log()


def test_an_unknown_virtual_user_is_refused_at_rcpt_and_nothing_is_delivered_or_bounced(
        mta, dovecot, remote):
    refused = (550, b"5.1.1 <nobody@two.test>: Recipient address rejected: User unknown "
                    b"in virtual mailbox table")
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=20) as smtp:     # inbound, as an MX
        smtp.ehlo("mx.elsewhere.test")
        smtp.mail("someone@elsewhere.test")
        assert smtp.rcpt("nobody@two.test") == refused
    with submission(mta, ALICE) as smtp:
        smtp.mail(ALICE, ["BODY=8BITMIME"])
        assert smtp.rcpt("nobody@two.test") == refused
        assert smtp.rcpt(BOB)[0] == 250
        code, text = smtp.data(message("to nobody and bob", "nobody@two.test, " + BOB))
        assert code == 250, text
        queue_id = text.decode().rsplit(" ", 1)[1]
    done(mta, queue_id)
    assert with_subject(imap_messages(dovecot, BOB), "to nobody and bob")
    assert deliveries(mta, queue_id) == [BOB]
    assert "to=<nobody@two.test>, relay=" not in mta.log()       # never delivered
    # No bounce anywhere: none queued, none in alice's mailbox (the sender's), none out.
    assert not mta.queued_ids()
    assert not re.search(r"\S+: from=<>", mta.log())
    assert not [m for m in imap_messages(dovecot, ALICE) if b"to nobody and bob" in m]
    assert not [m for m in remote.messages if m.mail.startswith("MAIL FROM:<>")]


@pytest.mark.parametrize("recipients", [
    ["team@alias.test", BOB], [BOB, "team@alias.test"],
    ["team@alias.test", "root@example.test"], ["team@alias.test", "partner@remote.test"]],
    ids=["then-bob", "bob-first", "then-root", "then-partner"])
def test_a_virtual_alias_reaches_a_mailbox_a_local_user_and_a_remote_address_once_each(
        mta, dovecot, remote, recipients):
    """team@alias.test goes to bob@two.test (virtual, LMTP), root (local, its mailbox
    file) and partner@remote.test (remote, NSD's MX): one copy each, also for the one
    the sender named besides the alias, whichever came first. (Dovecot's LMTP stores one
    copy of a recipient given twice in a transaction, so Elemta's log is counted too.)"""
    subject = "team " + "-".join(r.split("@")[0] for r in recipients)
    queue_id = send(mta, recipients, message(subject, ", ".join(recipients)))
    done(mta, queue_id)
    assert sorted(deliveries(mta, queue_id)) == sorted(TEAM)
    assert len(with_subject(imap_messages(dovecot, BOB), subject)) == 1
    assert root_mailbox(mta).count(b"\nSubject: %s\n" % subject.encode()) == 1
    [out] = [m for m in remote.messages if subject.encode() in m.content]
    assert [r.split(">")[0] for r in out.rcpts] == ["RCPT TO:<partner@remote.test"]
    assert out.mail.startswith("MAIL FROM:<alice@one.test>")


@pytest.mark.parametrize("spelling", ["bob@two.test.", '"bob"@two.test', "bob@TWO.Test"],
                         ids=["final-dot", "needless-quotes", "domain-case"])
def test_another_spelling_of_a_mailbox_is_queued_as_the_table_knows_it_and_delivered(
        mta, dovecot, remote, spelling):
    """The virtual mailbox table took bob@two.test for the client's spelling, so
    bob@two.test is what is queued and what Dovecot's LMTP is asked for (the client's
    spelling is its ORCPT). Queued as the client wrote it, bob@two.test. was refused by
    Dovecot after the 250 (501 5.5.4 Invalid TO) and the bounce went to the sender, who
    may be anybody (backscatter)."""
    subject = "spelled %s" % spelling
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=20) as smtp:     # inbound, as an MX
        smtp.ehlo("mx.elsewhere.test")
        smtp.mail("someone@remote.test", ["BODY=8BITMIME"])
        assert smtp.docmd("RCPT TO:<%s>" % spelling) == (250, b"2.1.5 Ok")
        code, text = smtp.data(message(subject, spelling))
        assert code == 250, text
        queue_id = text.decode().rsplit(" ", 1)[1]
    done(mta, queue_id)
    assert deliveries(mta, queue_id) == [BOB]
    [fetched] = with_subject(imap_messages(dovecot, BOB), subject)
    assert fetched.startswith(b"Return-Path: <someone@remote.test>\r\n"
                              b"Delivered-To: bob@two.test\r\n")
    assert not re.search(r"%s: to=<[^>]*>, .*status=(bounced|deferred)" % queue_id,
                         mta.log())
    assert not re.search(r"\S+: from=<>", mta.log())         # no bounce was made
    assert not [m for m in remote.messages if m.mail.startswith("MAIL FROM:<>")]
