"""SMTP AUTH to a relay host (client side): delivery.sasl_password_file, sasl_require_tls.

Owned by the test suite. The relay host is a real private Postfix (tests/peers/postfix.py)
that relays only for authenticated clients (smtpd_relay_restrictions =
permit_sasl_authenticated, reject) and checks passwords with a real private Dovecot's auth
service (smtpd_sasl_type = dovecot; tests/peers/dovecot.py). What it accepts it parks in its
hold queue. It listens three times on 127.0.0.1: with STARTTLS, without STARTTLS (AUTH
offered in clear), and with STARTTLS offering only AUTH LOGIN. Postfix's own log says whether
a client authenticated (sasl_method=..., sasl_username=...), whether TLS was on
(smtpd_tls_loglevel 1) and which commands each session used (its "disconnect from ...
ehlo=1 quit=1 commands=2" line). Needs root, postfix and
dovecot-core.
See also: elemta.delivery.sasl, elemta.delivery.smtp_client (AUTH), tests/test_smtp_client.py.
"""

import io
import os
import re
import shutil
import smtplib
import tempfile

import pytest

from elemta.delivery.sasl import SASLFileError, SASLPasswords, nexthop_key
from elemta.delivery.smtp_client import DELIVERED, SMTPClient, Timeouts
from elemta.queue.model import Envelope, Recipient
from tests.harness import free_port, wait_for
from tests.peers.dovecot import DovecotInstance, DovecotUser, dovecot_available
from tests.peers.postfix import PostfixInstance, postfix_available
from tests.peers.sink import make_test_pki

pytestmark = pytest.mark.skipif(bool(postfix_available() or dovecot_available()),
                                reason=str(postfix_available() or dovecot_available()))


class Relay:
    """The relay host's ports and its Postfix."""

    def __init__(self, postfix, tls_port, plain_port, login_port):
        self.postfix = postfix
        self.tls_port, self.plain_port, self.login_port = tls_port, plain_port, login_port

    def sessions(self, since=0):
        """Postfix's per-session summaries ("ehlo=1 starttls=1 auth=1 ...") after `since`."""
        return re.findall(r"disconnect from \S+ (.*)", self.postfix.read_log()[since:])


@pytest.fixture(scope="module")
def relay():
    workdir = tempfile.mkdtemp(prefix="elemta-relay-auth-")
    os.chmod(workdir, 0o755)
    users = {"alice": DovecotUser("wonderland")}
    with DovecotInstance(os.path.join(workdir, "dovecot"), users, auth_socket=True) as dovecot:
        _, cert, key = make_test_pki(os.path.join(workdir, "pki"), "relay.test")
        tls_port, plain_port, login_port = free_port(), free_port(), free_port()
        settings = {"smtpd_tls_cert_file": cert, "smtpd_tls_key_file": key,
                    "smtpd_tls_security_level": "may", "smtpd_tls_loglevel": "1",
                    "smtpd_sasl_auth_enable": "yes", "smtpd_sasl_type": "dovecot",
                    "smtpd_sasl_path": dovecot.auth_socket,
                    "smtpd_relay_restrictions": "permit_sasl_authenticated, reject"}
        listeners = {plain_port: {"smtpd_tls_security_level": "none"},
                     login_port: {"smtpd_sasl_mechanism_filter": "login"}}
        with PostfixInstance(os.path.join(workdir, "postfix"), tls_port, hold_only=True,
                             extra_main_cf=settings, extra_listeners=listeners) as postfix:
            yield Relay(postfix, tls_port, plain_port, login_port)
    shutil.rmtree(workdir, ignore_errors=True)


def start_elemta(elemta_server, tmp_path, port, password_lines, **delivery):
    password_file = tmp_path / "sasl_passwd"
    if password_lines is not None:
        password_file.write_text(password_lines)
        password_file.chmod(0o600)
    settings = {"workers": 1, "relayhost": "[127.0.0.1]:%d" % port, "min_backoff": 60,
                "connect_timeout": 2, "command_timeout": 5, "data_timeout": 5,
                "sasl_password_file": str(password_file)}
    settings.update(delivery)
    server = elemta_server(delivery=settings, api={"enabled": False})
    wait_for(lambda: "delivery worker started" in server.log())
    return server


def send(server, sender, subject):
    message = ("From: <%s>\r\nTo: <r@far.test>\r\nSubject: %s\r\n\r\nvia the relay\r\n"
               % (sender, subject)).encode()
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.sendmail(sender, ["r@far.test"], message)
    match = wait_for(lambda: re.search(r"(\w+): from=<%s>" % re.escape(sender), server.log()))
    return match.group(1)


def result_of(server, queue_id, timeout=10):
    """(relay, status, reply) of the message's one delivery line."""
    pattern = r"%s: to=<r@far\.test>, relay=(\S+), delay=\S+, dsn=\S+, status=(\w+) \((.*)\)" % queue_id
    return wait_for(lambda: re.search(pattern, server.log()), timeout).groups()


def test_auth_plain_after_starttls_and_the_relay_takes_the_mail(elemta_server, tmp_path, relay):
    since = len(relay.postfix.read_log())
    server = start_elemta(elemta_server, tmp_path, relay.tls_port,
                          "# the relay host\n[127.0.0.1]:%d   alice:wonderland\n"
                          "[127.0.0.1]:1 someone:else\n" % relay.tls_port)
    queue_id = send(server, "auth-ok@client.test", "authenticated")
    relay_name, status, reply = result_of(server, queue_id)
    assert (relay_name, status) == ("127.0.0.1[127.0.0.1]:%d" % relay.tls_port, "sent")
    match = relay.postfix.wait_for_log(r"(\w+): client=\S+, sasl_method=PLAIN, "
                                       r"sasl_username=alice")
    relay.postfix.wait_for_log(r"%s: hold: .*from=<auth-ok@client\.test>" % match.group(1))
    assert reply.endswith("queued as %s" % match.group(1))
    tls = re.findall(r"TLS connection established from \S+: (TLS\S+)",
                     relay.postfix.read_log()[since:])
    assert tls and tls[0].startswith("TLSv1."), "AUTH went without STARTTLS"
    assert "wonderland" not in server.log()


def test_no_password_over_a_session_without_tls(elemta_server, tmp_path, relay):
    since = len(relay.postfix.read_log())
    server = start_elemta(elemta_server, tmp_path, relay.plain_port,
                          "[127.0.0.1]:%d alice:wonderland\n" % relay.plain_port)
    queue_id = send(server, "no-tls@client.test", "not in clear")
    relay_name, status, reply = result_of(server, queue_id)
    assert status == "deferred"
    assert reply == ("451 4.7.0 not authenticating to %s over an unencrypted session (it did "
                     "not offer STARTTLS; delivery.sasl_require_tls is set)" % relay_name)
    # Postfix saw EHLO and QUIT, never AUTH (it counts even a failed attempt as auth=0/1).
    assert wait_for(lambda: relay.sessions(since)) == ["ehlo=1 quit=1 commands=2"]
    with server.queue() as q:
        assert q.get(queue_id).state == "deferred"


def test_a_wrong_password_defers_with_the_servers_535(elemta_server, tmp_path, relay):
    server = start_elemta(elemta_server, tmp_path, relay.tls_port,
                          "[127.0.0.1]:%d alice:looking-glass\n" % relay.tls_port)
    queue_id = send(server, "wrong@client.test", "wrong password")
    relay_name, status, reply = result_of(server, queue_id)
    assert status == "deferred"
    assert reply.startswith("454 4.7.8 SASL authentication failed; server %s said: 535 5.7.8 "
                            "Error: authentication failed" % relay_name)
    assert "looking-glass" not in server.log()


def test_a_missing_password_file_is_logged_and_defers(elemta_server, tmp_path, relay):
    server = start_elemta(elemta_server, tmp_path, relay.tls_port, None)
    missing = str(tmp_path / "sasl_passwd")
    queue_id = send(server, "nofile@client.test", "no file")
    _, status, reply = result_of(server, queue_id)
    assert status == "deferred"
    assert reply == ("451 4.3.0 SASL password lookup failed: cannot read the SASL password "
                     "file %s: No such file or directory" % missing)
    assert re.search(r"error: %s: cannot read the SASL password file %s"
                     % (queue_id, re.escape(missing)), server.log())


# -- the client alone, against the same relay ------------------------------------------------

def envelope(sender):
    return Envelope(queue_id="T1", sender=sender, arrival=0.0,
                    recipients=[Recipient(address="r@far.test")])


@pytest.mark.parametrize("port_name, require_tls, mechanism", [
    ("login_port", True, "LOGIN"),         # only LOGIN offered: LOGIN, inside TLS
    ("plain_port", False, "PLAIN"),        # sasl_require_tls off: AUTH in clear is allowed
])
def test_client_authenticates_as_the_session_allows(relay, port_name, require_tls, mechanism):
    client = SMTPClient("client.test", timeouts=Timeouts(connect=2, greeting=5),
                        credentials=("alice", "wonderland"), sasl_require_tls=require_tls)
    with client.connect("127.0.0.1", getattr(relay, port_name)):
        assert client.authenticated == mechanism
        assert (client.tls_version is not None) == require_tls
        sender = "direct-%s@client.test" % mechanism.lower()
        result = client.send(envelope(sender), io.BytesIO(b"Subject: direct\r\n\r\nhi\r\n"))
        assert [r.outcome for r in result.recipients] == [DELIVERED]
    relay.postfix.wait_for_log(r"sasl_method=%s, sasl_username=alice" % mechanism)
    relay.postfix.wait_for_log(r"hold: .*from=<%s>" % re.escape(sender))


# -- the password file -----------------------------------------------------------------------

def test_password_file_keys_as_postfix_writes_them(tmp_path):
    path = tmp_path / "sasl_passwd"
    path.write_text("# comment\n\n[Relay.Example]:587 u1:p:with:colons\n"
                    "partner.example  u2:p2\npartner.example:2525 u3:\n"
                    "[10.0.0.1]\n   u4:p4\n")
    table = SASLPasswords(str(path))
    assert table.lookup(nexthop_key("relay.example", 587, False, 25)) == ("u1", "p:with:colons")
    assert table.lookup(nexthop_key("relay.example", 25, False, 25)) is None
    assert table.lookup(nexthop_key("partner.example", 25, True, 25)) == ("u2", "p2")
    assert table.lookup(nexthop_key("partner.example", 2525, True, 25)) == ("u3", "")
    # The port-less form stands for the default port only.
    assert table.lookup(nexthop_key("partner.example", 587, True, 25)) is None
    # A line starting with whitespace continues the one before.
    assert table.lookup(nexthop_key("10.0.0.1", 25, False, 25)) == ("u4", "p4")
    # A bracketed entry is not an MX-looked-up one, and the other way round.
    assert table.lookup(nexthop_key("10.0.0.1", 25, True, 25)) is None
    # Edits are seen without a reload.
    path.write_text("[relay.example]:587 new:secret\n")
    assert table.lookup(nexthop_key("relay.example", 587, False, 25)) == ("new", "secret")


@pytest.mark.parametrize("text, line, says", [
    ("ok.example u:p\n[bad!host]:25 u:p\n", 2, "neither an IP address nor a host name"),
    ("relay.example\n", 1, "expected \"next-hop user:password\""),
    ("# c\nrelay.example justauser\n", 2, "must be user:password"),
    ("  u:p\n", 1, "continuation line"),
])
def test_password_file_errors_name_file_and_line(tmp_path, text, line, says):
    path = tmp_path / "sasl_passwd"
    path.write_text(text)
    with pytest.raises(SASLFileError) as error:
        SASLPasswords(str(path)).lookup(("a.example",))
    assert str(error.value).startswith("%s:%d: " % (path, line))
    assert says in str(error.value)


def test_a_duplicate_entry_is_a_warning_and_the_first_stands(tmp_path, caplog):
    """As postmap: one duplicated line must not hold up the mail of every next hop."""
    path = tmp_path / "sasl_passwd"
    path.write_text("a.example u:p\n\nA.example u:q\n")
    assert SASLPasswords(str(path)).lookup(("a.example",)) == ("u", "p")
    assert ("%s:3: a second entry for A.example is ignored (the first, on line 1, is used)"
            % path) in caplog.text
