"""Local delivery end to end: mail sent over SMTP (or by elemta-sendmail, as cron does)
to a real Elemta ends up in real users' mailboxes, files and commands, written as the
right user by the local agent.

Needs root: two test users are made for the session (elemta-mbox, elemta-maildir, with
useradd -m) and removed at its end. Each test gets a mail spool directory made like
Debian's /var/mail (root:mail 2775), a drop directory anyone may write (1777) for
files and commands run as nobody, and its own aliases file. Remote forwarding goes to
a scripted SMTP server (tests/peers/sink.py) through the transport map.
See also: tests/test_aliases.py (the pieces alone), elemta.local.agent.
"""

import grp
import os
import pwd
import re
import shutil
import signal
import smtplib
import stat
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import pytest

from elemta.config.schema import Config, QueueSettings
from elemta.delivery.local_transport import LocalTransport
from elemta.delivery.routing import LOCAL_DESTINATION
from elemta.addressing.normal import normal_address
from elemta.queue.model import Recipient
from tests.harness import REPO, wait_for
from tests.peers.sink import ScriptedServer

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="makes users: needs root")

USERS = ("elemta-mbox", "elemta-maildir")
RECORD_SCRIPT = """#!/bin/sh
id -un > "$1/cmd.uid"
echo "$USER|$RECIPIENT|$SENDER|$LOCAL|$DOMAIN|$HOME" > "$1/cmd.env"
cat > "$1/cmd.msg"
"""
FAIL_SCRIPT = """#!/bin/sh
echo "the disk is on fire" >&2
exit 75
"""


@pytest.fixture(scope="session")
def users():
    """{name: pwd entry} of the two test users, made once for the session."""
    for name in USERS:
        try:
            pwd.getpwnam(name)
        except KeyError:
            subprocess.run(["useradd", "-m", "-s", "/bin/sh", name], check=True,
                           capture_output=True)
        # A home left by an earlier run that died before its userdel keeps the old uid.
        entry = pwd.getpwnam(name)
        os.chown(entry.pw_dir, entry.pw_uid, entry.pw_gid)
    yield {name: pwd.getpwnam(name) for name in USERS}
    for name in USERS:
        subprocess.run(["userdel", "-r", name], capture_output=True)


@pytest.fixture
def place(users):
    """Directories every user can reach (pytest's tmp_path is root's alone), clean homes."""
    top = tempfile.mkdtemp(prefix="elemta-local-")
    os.chmod(top, 0o755)
    mail = os.path.join(top, "mail")
    os.mkdir(mail)
    os.chown(mail, 0, grp.getgrnam("mail").gr_gid)
    os.chmod(mail, 0o2775)                      # like Debian's /var/mail
    drop = os.path.join(top, "drop")
    os.mkdir(drop)
    os.chmod(drop, 0o1777)
    for name, text in (("record.sh", RECORD_SCRIPT), ("fail.sh", FAIL_SCRIPT)):
        with open(os.path.join(top, name), "w") as f:
            f.write(text)
        os.chmod(os.path.join(top, name), 0o755)
    for user in users.values():
        for name in (".forward", "Maildir"):
            path = os.path.join(user.pw_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.unlink(path)
    yield SimpleNamespace(top=top, mail=mail, drop=drop, aliases=os.path.join(top, "aliases"),
                          users=users)
    # The server may still be delivering (it stops after this fixture's teardown): a dot
    # lock it removes under rmtree's feet is fine.
    shutil.rmtree(top, onerror=_gone_is_fine)


def _gone_is_fine(function, path, exc_info):
    if not issubclass(exc_info[0], FileNotFoundError):
        raise exc_info[1]


def start(elemta_server, place, aliases="", transport=(), delivery=None, sections=None,
          virtual=None,
          **local):
    with open(place.aliases, "w") as f:
        f.write("postmaster: root\n" + aliases)
    settings = {"aliases_file": place.aliases, "mail_spool_directory": place.mail,
                "reject_unknown_users": True, "command_timeout": 10.0}
    settings.update(local)
    delivery_settings = {"workers": 1, "min_backoff": 0.5, "max_backoff": 1.0,
                         "transport": list(transport)}
    delivery_settings.update(delivery or {})
    server = elemta_server(delivery=delivery_settings, local=settings,
                           api={"enabled": False}, **(sections or {}),
                           **({"virtual": virtual} if virtual else {}))
    wait_for(lambda: "local delivery agent started" in server.log()
             and "delivery worker started" in server.log())
    return server


def send(server, sender, recipients, body, headers=""):
    message = ("From: %s\r\nSubject: local test\r\n%s\r\n%s" % (sender, headers, body))
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.sendmail(sender, recipients, message.encode())


def read_when_there(path, count=1, timeout=10):
    """The file's bytes once it holds `count` mbox entries (or exists, for count=0)."""
    def ready():
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        entries = len(re.findall(rb"(?:^|\n\n)From ", data))
        return data if entries >= count else None
    return wait_for(ready, timeout)


def status_lines(server, address):
    return re.findall(r"to=<%s>, relay=local, delay=\S+, dsn=\S+, status=(\w+) \((.*)\)"
                      % re.escape(address), server.log())


# ---- mailboxes --------------------------------------------------------------------------

def test_mbox_in_the_mail_spool_written_as_the_user(elemta_server, place):
    server = start(elemta_server, place)
    user = place.users["elemta-mbox"]
    send(server, "someone@client.test", ["elemta-mbox@example.test"],
         "From the first line\r\n>From quoted already\r\nlast\r\n")
    data = read_when_there(os.path.join(place.mail, "elemta-mbox"))
    assert re.match(rb"From someone@client\.test \w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}\n"
                    rb"Return-Path: <someone@client\.test>\n"
                    rb"X-Original-To: elemta-mbox@example\.test\n"
                    rb"Delivered-To: elemta-mbox@example\.test\n"
                    rb"Received: from ", data), data
    assert b"\r" not in data
    assert data.endswith(b"\n\n>From the first line\n>From quoted already\nlast\n\n")
    st = os.stat(os.path.join(place.mail, "elemta-mbox"))
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (user.pw_uid, 0o600)
    wait_for(lambda: status_lines(server, "elemta-mbox@example.test"))
    assert sorted(os.listdir(place.mail)) == ["elemta-mbox"]      # no lock file left
    assert status_lines(server, "elemta-mbox@example.test") == [
        ("sent", "250 2.0.0 delivered to mailbox")]
    wait_for(lambda: server.queued_ids() == [])      # the sent result, recorded


def test_maildir_in_the_home_made_by_the_user(elemta_server, place):
    server = start(elemta_server, place, home_mailbox="Maildir/")
    user = place.users["elemta-maildir"]
    send(server, "someone@client.test", ["elemta-maildir@example.test"], "From Maildir\r\n")
    new = os.path.join(user.pw_dir, "Maildir", "new")
    [name] = wait_for(lambda: os.path.isdir(new) and os.listdir(new))
    with open(os.path.join(new, name), "rb") as f:
        data = f.read()
    assert data.startswith(b"Return-Path: <someone@client.test>\nX-Original-To: ")
    assert data.endswith(b"\n\nFrom Maildir\n")                # no From_ line, no quoting
    for path in (os.path.join(user.pw_dir, "Maildir"), os.path.join(new, name)):
        assert os.stat(path).st_uid == user.pw_uid
    assert os.listdir(os.path.join(user.pw_dir, "Maildir", "tmp")) == []
    wait_for(lambda: status_lines(server, "elemta-maildir@example.test"))
    assert status_lines(server, "elemta-maildir@example.test") == [
        ("sent", "250 2.0.0 delivered to maildir")]


# ---- aliases ----------------------------------------------------------------------------

def test_aliases_to_users_a_file_a_command_and_an_include(elemta_server, place):
    include = os.path.join(place.top, "team.list")
    with open(include, "w") as f:
        f.write("# the include list\nelemta-maildir\n")
    server = start(elemta_server, place, aliases=(
        "both: elemta-mbox, elemta-maildir\n"
        "archive: %s/archive.mbox\n"
        "record: \"|%s/record.sh %s\"\n"
        "listed: :include:%s\n" % (place.drop, place.top, place.drop, include)))
    send(server, "someone@client.test",
         ["both@example.test", "archive@example.test", "record@example.test",
          "listed@example.test"], "From the body\r\n")
    for user in USERS:
        read_when_there(os.path.join(place.mail, user), count=2 if user ==
                        "elemta-maildir" else 1)
    archive = read_when_there(os.path.join(place.drop, "archive.mbox"))
    assert archive.startswith(b"From someone@client.test ")
    assert b"\nDelivered-To: archive@example.test\n" in archive
    assert archive.endswith(b"\n>From the body\n\n")
    # Commands and files of a root-owned aliases file run as default_privileges.
    nobody = pwd.getpwnam("nobody")
    assert os.stat(os.path.join(place.drop, "archive.mbox")).st_uid == nobody.pw_uid
    wait_for(lambda: os.path.exists(os.path.join(place.drop, "cmd.msg")))
    wait_for(lambda: status_lines(server, "record@example.test"))
    with open(os.path.join(place.drop, "cmd.uid")) as f:
        assert f.read() == "nobody\n"
    with open(os.path.join(place.drop, "cmd.env")) as f:
        assert f.read() == "record|record@example.test|someone@client.test|record|" \
                           "example.test|%s\n" % nobody.pw_dir
    with open(os.path.join(place.drop, "cmd.msg"), "rb") as f:
        message = f.read()
    assert message.startswith(b"From someone@client.test ")
    assert b"\nDelivered-To: record@example.test\n" in message
    assert message.endswith(b"\n\nFrom the body\n")      # no quoting for commands
    wait_for(lambda: len(re.findall(r"relay=local", server.log())) == 4)
    assert status_lines(server, "both@example.test") == [
        ("sent", "250 2.0.0 delivered to mailbox")]
    assert status_lines(server, "record@example.test") == [
        ("sent", "250 2.0.0 delivered to command: %s/record.sh %s" % (place.top, place.drop))]
    assert status_lines(server, "listed@example.test") == [
        ("sent", "250 2.0.0 delivered to mailbox")]


def test_command_tempfail_defers_and_restricted_destinations_bounce(elemta_server, place):
    include = os.path.join(place.top, "files.list")
    with open(include, "w") as f:
        f.write("%s/from-include.mbox\n" % place.drop)
    server = start(elemta_server, place, aliases=(
        "flaky: \"|%s/fail.sh\"\n"
        "viainclude: :include:%s\n" % (place.top, include)))
    send(server, "elemta-mbox@example.test", ["flaky@example.test", "viainclude@example.test"],
         "body\r\n")
    wait_for(lambda: status_lines(server, "flaky@example.test")
             and status_lines(server, "viainclude@example.test"))
    assert status_lines(server, "flaky@example.test")[0] == (
        "deferred", "451 4.3.0 temporary failure. Command output: the disk is on fire")
    assert status_lines(server, "viainclude@example.test") == [
        ("bounced", "550 5.7.1 mail to file is restricted")]
    assert not os.path.exists(os.path.join(place.drop, "from-include.mbox"))
    # The sender is local: the bounce lands in its mailbox.
    dsn = read_when_there(os.path.join(place.mail, "elemta-mbox"))
    assert b"5.7.1" in dsn and b"viainclude@example.test" in dsn


# ---- .forward ---------------------------------------------------------------------------

def write_forward(user, text, mode=0o644):
    path = os.path.join(user.pw_dir, ".forward")
    with open(path, "w") as f:
        f.write(text)
    os.chown(path, user.pw_uid, user.pw_gid)
    os.chmod(path, mode)


def test_forward_to_a_local_user_and_a_remote_address(elemta_server, place):
    with ScriptedServer() as sink:
        server = start(elemta_server, place, transport=[
            {"domain": "remote.test", "nexthop": "smtp:[127.0.0.1]:%d" % sink.port}])
        write_forward(place.users["elemta-mbox"],
                      "# forward everything\nelemta-maildir, friend@remote.test\n")
        send(server, "someone@client.test", ["elemta-mbox@example.test"], "forward me\r\n")
        local = read_when_there(os.path.join(place.mail, "elemta-maildir"))
        assert b"\nDelivered-To: elemta-mbox@example.test\n" in local
        [message] = wait_for(lambda: sink.messages, timeout=15)
        assert message.mail == "MAIL FROM:<someone@client.test>" or \
            message.mail.startswith("MAIL FROM:<someone@client.test> ")
        assert message.rcpts[0].startswith("RCPT TO:<friend@remote.test>")
        assert message.content.startswith(b"Delivered-To: elemta-mbox@example.test\r\n"
                                          b"Received: from ")
        assert message.content.endswith(b"\r\nforward me\r\n")
        wait_for(lambda: status_lines(server, "elemta-mbox@example.test"))
        [(status, reply)] = status_lines(server, "elemta-mbox@example.test")
        assert status == "sent"
        assert re.match(r"250 2\.0\.0 delivered to mailbox, forwarded as \w+$", reply), reply
        assert not os.path.exists(os.path.join(place.mail, "elemta-mbox"))
        # A group-writable .forward is ignored, as Postfix ignores it: the mailbox it is.
        write_forward(place.users["elemta-mbox"], "friend@remote.test\n", mode=0o664)
        send(server, "someone@client.test", ["elemta-mbox@example.test"], "stay here\r\n")
        assert b"stay here" in read_when_there(os.path.join(place.mail, "elemta-mbox"))
        assert "is group or world writable: ignored" in server.log()
        assert len(sink.messages) == 1


# ---- refusals and loops -----------------------------------------------------------------

def test_unknown_users_are_refused_at_rcpt_and_extensions_reach_the_user(elemta_server,
                                                                          place):
    server = start(elemta_server, place, aliases="ops: elemta-mbox\n",
                   recipient_delimiter="+")
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.ehlo("client.test")
        client.mail("someone@client.test")
        assert client.rcpt("nosuchuser@example.test") == (
            550, b"5.1.1 <nosuchuser@example.test>: Recipient address rejected: User "
                 b"unknown in local recipient table")
        for known in ("ops@example.test", "elemta-mbox+news@example.test",
                      "postmaster@example.test", "root@mx.test"):
            assert client.rcpt(known)[0] == 250, known
        assert client.rcpt("friend@elsewhere.test")[0] == 250     # relaying from 127.0.0.1
        client.rset()
        client.sendmail("someone@client.test", ["elemta-mbox+news@example.test"],
                        b"Subject: extension\r\n\r\nnews\r\n")
    data = read_when_there(os.path.join(place.mail, "elemta-mbox"))
    assert b"\nDelivered-To: elemta-mbox+news@example.test\n" in data


@pytest.fixture(scope="module")
def plain_user(users):
    """A user whose name has no "-" (elemta-mbox is cut at its own hyphen when "-" is a
    delimiter, in Postfix too): the owner of a .forward-ext."""
    name = "elemtaext"
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", "/bin/sh", name], check=True,
                       capture_output=True)
    yield pwd.getpwnam(name)
    subprocess.run(["userdel", "-r", name], capture_output=True)


def test_every_character_of_the_delimiter_splits_everywhere(elemta_server, place,
                                                            plain_user):
    """recipient_delimiter "+-" (Postfix: each character is a delimiter): user-ext and
    user+ext are user's everywhere an extension matters - local recipients and aliases,
    .forward-ext (with the delimiter the address used), virtual aliases and canonical
    maps (the extension goes back on, with its delimiter), virtual mailbox and sender
    login tables. postmaster, and with "-" NAME-request, are never cut, as Postfix's
    split_addr() says. The delimiter was once taken whole by all but the table
    searches: "+-" is in no address, so mbox+x was an unknown user, .forward-ext was
    never read and aliases and canonical results lost their extension."""
    forward = os.path.join(plain_user.pw_dir, ".forward-news")
    with open(forward, "w") as f:
        f.write("elemta-maildir\n")
    os.chown(forward, plain_user.pw_uid, plain_user.pw_gid)
    try:
        server = start(elemta_server, place, recipient_delimiter="+-",
                       aliases="mbox: elemta-mbox\nlist: elemta-maildir\n", sections={
                           "virtual": {"alias_domains": ["alias.test"],
                                       "alias_maps": {
                                           "sales@alias.test": "mbox@example.test"},
                                       "mailbox_domains": ["virt.test"],
                                       "mailbox_maps": {"alice@virt.test": "ok"},
                                       "transport": "lmtp:[127.0.0.1]:9"},
                           "rewrite": {"canonical_maps": {
                               "old@example.test": "mbox@example.test"}},
                           "smtpd": {"sender_login_maps": {"boss@example.test": "boss"},
                                     "reject_sender_login_mismatch": "all"}})
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
            client.ehlo("client.test")
            assert client.mail("boss-x@example.test") == (
                553, b"5.7.1 <boss-x@example.test>: Sender address rejected: not logged "
                     b"in")
            assert client.mail("boss+x@example.test")[0] == 553
            assert client.mail("someone@client.test")[0] == 250
            for known in ("mbox-a@example.test", "mbox+a@example.test",
                          "list-x@example.test", "elemtaext-a@example.test",
                          "alice-x@virt.test", "alice+x@virt.test",
                          "postmaster-x@example.test"):
                assert client.rcpt(known)[0] == 250, known
            for unknown in ("list-request@example.test", "nobody-alice@virt.test",
                            "bob-x@virt.test"):
                assert client.rcpt(unknown)[0] == 550, unknown
        send(server, "someone@client.test", ["elemtaext-news@example.test"], "news\r\n")
        send(server, "someone@client.test", ["elemtaext+news@example.test"], "plus\r\n")
        send(server, "someone@client.test",
             ["sales-x@alias.test", "old+y@example.test", "mbox-z@example.test"],
             "three\r\n")
        # ~elemtaext/.forward-news sent elemtaext-news on to elemta-maildir; there is no
        # .forward+news, so elemtaext+news stayed in elemtaext's mailbox.
        data = read_when_there(os.path.join(place.mail, "elemta-maildir"))
        assert b"\nDelivered-To: elemtaext-news@example.test\n" in data
        data = read_when_there(os.path.join(place.mail, "elemtaext"))
        assert b"\nDelivered-To: elemtaext+news@example.test\n" in data
        assert data.endswith(b"\n\nplus\n\n")
        data = read_when_there(os.path.join(place.mail, "elemta-mbox"), count=3)
        for address in (b"mbox-x@example.test", b"mbox+y@example.test",
                        b"mbox-z@example.test"):
            assert b"\nDelivered-To: %s\n" % address in data
    finally:
        os.unlink(forward)


def test_a_needlessly_quoted_local_part_is_the_same_mailbox(elemta_server, place):
    """"elemta-mbox"@example.test is elemta-mbox@example.test (RFC 5321 4.1.2): accepted at
    RCPT and delivered to that mailbox; a quoted name that needs its quotes is still
    looked up as written, so an unknown one is refused."""
    server = start(elemta_server, place)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.ehlo("client.test")
        client.mail("someone@client.test")
        # docmd, not rcpt(): smtplib would take the quotes off itself.
        assert client.docmd("RCPT", 'TO:<"elemta-mbox"@example.test>')[0] == 250
        assert client.docmd("RCPT", 'TO:<"elemta\\-maildir"@example.test>')[0] == 250
        assert client.docmd("RCPT", 'TO:<"elemta mbox"@example.test>') == (
            550, b'5.1.1 <"elemta mbox"@example.test>: Recipient address rejected: User '
                 b'unknown in local recipient table')
        assert client.data(b"Subject: quoted\r\n\r\nquoted local part\r\n")[0] == 250
    data = read_when_there(os.path.join(place.mail, "elemta-mbox"))
    assert b"\nDelivered-To: elemta-mbox@example.test\n" in data
    assert data.endswith(b"\n\nquoted local part\n\n")
    wait_for(lambda: status_lines(server, '"elemta\\-maildir"@example.test'))
    assert status_lines(server, '"elemta\\-maildir"@example.test')[0][0] == "sent"
    assert os.path.exists(os.path.join(place.mail, "elemta-maildir"))


@pytest.mark.parametrize("written, normal", [
    ('"root"@example.test', "root@example.test"),
    ('"first.last"@example.test', "first.last@example.test"),
    ('"ro\\ot"@example.test', "root@example.test"),          # a quoted pair is the char
    ('"a b"@example.test', '"a b"@example.test'),              # needs its quotes
    ('"a..b"@example.test', '"a..b"@example.test'),
    ('""@example.test', '""@example.test'),
    ('"a@b"@example.test', '"a@b"@example.test'),
    ("plain@example.test", "plain@example.test"),
])
def test_normal_address_drops_only_needless_quotes(written, normal):
    assert normal_address(written) == normal


def test_mail_loops_bounce(elemta_server, place):
    server = start(elemta_server, place, aliases="ping: pong\npong: ping\n")
    send(server, "elemta-maildir@example.test", ["elemta-mbox@example.test", "ping@example.test"],
         "loop\r\n", headers="Delivered-To: elemta-mbox@example.test\r\n")
    wait_for(lambda: status_lines(server, "elemta-mbox@example.test")
             and status_lines(server, "ping@example.test"))
    assert status_lines(server, "elemta-mbox@example.test") == [
        ("bounced", "550 5.4.6 mail forwarding loop for <elemta-mbox@example.test>")]
    [(status, reply)] = status_lines(server, "ping@example.test")
    assert status == "bounced" and reply.startswith("550 5.4.6 mail forwarding loop for")
    assert not os.path.exists(os.path.join(place.mail, "elemta-mbox"))
    dsn = read_when_there(os.path.join(place.mail, "elemta-maildir"))
    assert b"Status: 5.4.6" in dsn


def test_a_forward_that_comes_back_through_another_address_bounces(elemta_server, place):
    """elemta-mbox's .forward sends to away@remote.test, which a virtual alias maps back
    to elemta-mbox: the forwarded copy carries Delivered-To: elemta-mbox@example.test,
    so its delivery is a mail loop (5.4.6, as Postfix's local says), bounced to the
    sender, and no mailbox gets a copy."""
    server = start(elemta_server, place, virtual={
        "alias_maps": {"away@remote.test": "elemta-mbox@example.test"}})
    write_forward(place.users["elemta-mbox"], "away@remote.test\n")
    send(server, "elemta-maildir@example.test", ["elemta-mbox@example.test"], "round\r\n")
    wait_for(lambda: len(status_lines(server, "elemta-mbox@example.test")) == 2)
    first, second = status_lines(server, "elemta-mbox@example.test")
    assert first[0] == "sent" and first[1].startswith("250 2.0.0 forwarded as ")
    assert second == ("bounced", "550 5.4.6 mail forwarding loop for "
                                 "<elemta-mbox@example.test>")
    dsn = read_when_there(os.path.join(place.mail, "elemta-maildir"))
    assert b"Status: 5.4.6" in dsn and b"mail forwarding loop" in dsn
    assert not os.path.exists(os.path.join(place.mail, "elemta-mbox"))


def test_a_killed_local_agent_loses_nothing(elemta_server, place):
    """kill -9 of the local agent in the middle of a delivery: the delivery worker defers
    the recipient, the master starts a new agent, and the next attempt delivers (at
    worst twice, never lost)."""
    server = start(elemta_server, place, aliases=(
        "slow: \"|touch %s/started; sleep 1.5; cat >> %s/slow.out\"\n"
        % (place.drop, place.drop)))
    send(server, "someone@client.test", ["slow@example.test"], "take your time\r\n")
    agent = wait_for(lambda: [pid for pid, title in server.titles().items()
                              if title == "elemta: local"])[0]
    wait_for(lambda: os.path.exists(os.path.join(place.drop, "started")))
    os.kill(agent, signal.SIGKILL)
    deferred = wait_for(lambda: [line for line in status_lines(server, "slow@example.test")
                                 if line[0] == "deferred"])
    assert "local delivery agent" in deferred[0][1]
    # The worker heard at once, not when the orphaned command let go of its connection.
    assert not os.path.exists(os.path.join(place.drop, "slow.out"))
    wait_for(lambda: [line for line in status_lines(server, "slow@example.test")
                      if line[0] == "sent"], timeout=20)
    wait_for(lambda: server.queued_ids() == [])
    with open(os.path.join(place.drop, "slow.out"), "rb") as f:
        copies = f.read().count(b"take your time")
    assert 1 <= copies <= 2


def test_a_killed_local_agent_holds_mail_up_seconds_not_the_backoff(elemta_server, place):
    """Issue 11 req 1: with the default 5-minute min_backoff, a recipient deferred because
    the agent was killed under it is tried again within seconds of the new agent's start
    (a short retry: the agent going away is not the mail's fault)."""
    server = start(elemta_server, place, delivery={"min_backoff": 300.0,
                                                   "max_backoff": 4000.0}, aliases=(
        "slow: \"|touch %s/started; sleep 1.5; cat >> %s/slow.out\"\n"
        % (place.drop, place.drop)))
    send(server, "someone@client.test", ["slow@example.test"], "come back soon\r\n")
    agent = wait_for(lambda: [pid for pid, title in server.titles().items()
                              if title == "elemta: local"])[0]
    wait_for(lambda: os.path.exists(os.path.join(place.drop, "started")))
    os.kill(agent, signal.SIGKILL)
    wait_for(lambda: [line for line in status_lines(server, "slow@example.test")
                      if line[0] == "deferred"])
    deferred = time.monotonic()
    wait_for(lambda: server.log().count("local delivery agent started") == 2)
    restarted = time.monotonic() - deferred
    wait_for(lambda: [line for line in status_lines(server, "slow@example.test")
                      if line[0] == "sent"], timeout=15)
    print("\nnew agent %.2f s after the deferral, mail delivered %.2f s after it"
          % (restarted, time.monotonic() - deferred))
    wait_for(lambda: server.queued_ids() == [])
    with open(os.path.join(place.drop, "slow.out"), "rb") as f:
        copies = f.read().count(b"come back soon")
    assert 1 <= copies <= 2


# ---- cron ---------------------------------------------------------------------------------

def test_cron_style_sendmail_ends_in_the_mailbox(elemta_server, place):
    server = start(elemta_server, place)
    result = subprocess.run([sys.executable, "-m", "elemta.cli.sendmail", "-C",
                             server.config_path, "elemta-mbox"],
                            input=b"backup finished\n", capture_output=True,
                            env=dict(os.environ, PYTHONPATH=REPO), timeout=30)
    assert result.returncode == 0, result.stderr
    data = read_when_there(os.path.join(place.mail, "elemta-mbox"))
    assert data.startswith(b"From root@mx.test ")
    assert b"\nDelivered-To: elemta-mbox@mx.test\n" in data
    assert data.endswith(b"\n\nbackup finished\n\n")


def sendmail_wrapper(server, directory):
    """A sendmail(1) for clients that run one by path, as mail(1) does: ours, on this
    server's config."""
    wrapper = os.path.join(directory, "sendmail")
    with open(wrapper, "w") as f:
        f.write("#!/bin/sh\nPYTHONPATH=%s exec %s -m elemta.cli.sendmail -C %s \"$@\"\n"
                % (REPO, sys.executable, server.config_path))
    os.chmod(wrapper, 0o755)
    return wrapper


PATCH = (b"From: Dev <dev@client.test>\nTo: elemta-mbox@mx.test\nSubject: [PATCH] fix\n\n"
         b"A fix.\n.\ndiff --git a/x b/x\n")
PHP_MAIL = (b"To: elemta-mbox@mx.test\nBcc: elemta-maildir@mx.test\nSubject: order 42\n"
            b"From: shop@client.test\n\nThanks for your order.\n")


@pytest.mark.parametrize("client", ["mailx", "git send-email", "php"])
def test_local_mail_clients_reach_the_mailboxes(elemta_server, place, client):
    """Issue 5 req 4: what mail(1), git send-email and PHP's mail() submit through our
    sendmail is queued by pickup and delivered to the local users' mailboxes."""
    if client == "mailx" and shutil.which("bsd-mailx") is None:
        pytest.skip("bsd-mailx is not installed (make test installs it)")
    server = start(elemta_server, place, home_mailbox="")
    sendmail = sendmail_wrapper(server, place.top)
    mbox = os.path.join(place.mail, "elemta-mbox")
    if client == "mailx":
        mailrc = os.path.join(place.top, "mailrc")
        with open(mailrc, "w") as f:
            f.write("set sendmail=%s\n" % sendmail)
        subprocess.run(["bsd-mailx", "-s", "backup report", "elemta-mbox"],
                       input=b"3 files copied\n", check=True, timeout=30,
                       env=dict(os.environ, MAILRC=mailrc, HOME=place.top))
        data = read_when_there(mbox)
        assert b"\nSubject: backup report\n" in data
        assert data.endswith(b"\n\n3 files copied\n\n")
    elif client == "git send-email":
        subprocess.run([sendmail, "-i", "-f", "dev@client.test", "elemta-mbox"],
                       input=PATCH, check=True, timeout=30)
        data = read_when_there(mbox)
        assert data.startswith(b"From dev@client.test ")
        assert data.endswith(b"\n\nA fix.\n.\ndiff --git a/x b/x\n\n")   # the lone dot kept
    else:
        subprocess.run([sendmail, "-t", "-i"], input=PHP_MAIL, check=True, timeout=30)
        data = read_when_there(mbox)
        assert b"\nSubject: order 42\n" in data and b"Bcc:" not in data
        # The Bcc recipient (elemta-maildir) got it in the mail spool too: no Bcc line.
        other = read_when_there(os.path.join(place.mail, "elemta-maildir"))
        assert b"Thanks for your order." in other and b"Bcc:" not in other


# ---- the agent's absence ----------------------------------------------------------------

def test_without_the_local_agent_delivery_defers(tmp_path):
    config = Config(queue=QueueSettings(spool_dir=str(tmp_path)))
    transport = LocalTransport(config, None)
    results = transport.deliver(SimpleNamespace(queue_id="X"), LOCAL_DESTINATION,
                                [(0, Recipient("root@localhost"))])
    assert results == {0: ("deferred", "451 4.3.0 local delivery agent is not running "
                                       "(%s/run/local.sock: No such file or directory)"
                           % tmp_path, "local")}
