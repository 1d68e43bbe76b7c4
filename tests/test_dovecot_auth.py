"""SMTP AUTH checked by a real Dovecot (auth.backend dovecot, Postfix's smtpd_sasl_type =
dovecot).

Owned by the test suite. One private Dovecot for the module (tests/peers/dovecot.py) whose
passwd-file passdb holds the users, with Debian's default disable_plaintext_auth = yes (so
PLAIN and LOGIN work only when Elemta says the session is secured by TLS) and
auth_username_format = %Ln (ALICE@Any.Domain logs in as alice). Its auth service listens on
a unix socket and on 127.0.0.1:PORT. One Elemta for most tests, with an smtp and a
submission listener and STARTTLS, asking Dovecot over the unix socket. Needs root and
dovecot-core.
See also: elemta.smtpd.dovecot_auth, elemta.smtpd.authn, tests/test_receive.py (the file
backend).
"""

import base64
import os
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import time

import pytest

from elemta.smtpd.dovecot_auth import login_name_error, parse_params, tab_unescape
from tests.harness import REPO, free_port, wait_for
from tests.peers.dovecot import DovecotInstance, DovecotUser, dovecot_available

MESSAGE = b"Subject: via Dovecot AUTH\r\n\r\nhello\r\n"


def b64(text):
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def client_tls():
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


needs_dovecot = pytest.mark.skipif(bool(dovecot_available()), reason=str(dovecot_available()))


@pytest.fixture(scope="module")
def dovecot():
    why = dovecot_available()
    if why:
        pytest.skip(why)
    workdir = tempfile.mkdtemp(prefix="elemta-dovecot-auth-")
    os.chmod(workdir, 0o755)
    users = {"alice": DovecotUser("wonderland"), "bob": DovecotUser("builder")}
    instance = DovecotInstance(os.path.join(workdir, "dovecot"), users, auth_socket=True,
                               auth_port=free_port(), auth_debug=True)
    instance.start()
    yield instance
    instance.stop()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def server(elemta_module_server, dovecot, tls_files):
    cert, key = tls_files
    return elemta_module_server(
        listeners=[{"mode": "smtp"}, {"mode": "submission"}],
        tls={"cert_file": cert, "key_file": key},
        auth={"backend": "dovecot", "dovecot_socket": dovecot.auth_socket,
              "allow_plaintext": True, "failure_delay": 0.05})


def submission(server, tls=True):
    """An smtplib session on the submission port, after STARTTLS and EHLO."""
    smtp = smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=20)
    if tls:
        smtp.starttls(context=client_tls())
    smtp.ehlo()
    return smtp


def auth_plain(smtp, username, password):
    return smtp.docmd("AUTH", "PLAIN " + b64("\0%s\0%s" % (username, password)))


def auth_login(smtp, username, password):
    """AUTH LOGIN step by step: the list of (code, text) replies."""
    replies = [smtp.docmd("AUTH", "LOGIN")]
    for answer in (username, password):
        if replies[-1][0] != 334:
            break
        replies.append(smtp.docmd(b64(answer)))
    return replies


def requests_read(dovecot, since):
    """The AUTH requests Dovecot's auth service read after log offset `since`, each as
    its list of TAB-separated fields."""
    lines = dovecot.read_log()[since:].splitlines()
    return [line.partition("client in: ")[2].split("\t") for line in lines
            if "client in: AUTH\t" in line]


def send(smtp, sender):
    smtp.sendmail(sender, ["far@away.test"], MESSAGE)


def queued_for(server, sender):
    """The envelope of the message queued from `sender`."""
    for queue_id in server.queued_ids():
        envelope, _ = server.message(queue_id)
        if envelope.sender == sender:
            return envelope
    raise AssertionError("nothing queued from %s" % sender)


# -- the protocol's escaping, without a server -----------------------------------------

def test_dovecot_tab_escaping_is_undone_and_control_characters_refused():
    assert tab_unescape("a\001tb\001nc\0011d\0010e\001rf") == "a\tb\nc\001d\0e\rf"
    assert parse_params(["user=al\001tice", "temp", "reason=x=y"]) == {
        "user": "al\tice", "temp": True, "reason": "x=y"}
    assert login_name_error("alice@example.test") is None
    assert login_name_error("al\tice") and login_name_error("a\nb") and login_name_error("")


# -- a real Dovecot --------------------------------------------------------------------

@needs_dovecot
def test_plain_and_login_authenticate_and_the_message_is_accepted(server):
    with submission(server) as smtp:
        assert smtp.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        assert smtp.mail("a@client.test")[0] == 530        # submission: AUTH first
        smtp.rset()
        assert auth_plain(smtp, "alice", "wonderland") == (
            235, b"2.7.0 Authentication successful")
        send(smtp, "plain@client.test")
    with submission(server) as smtp:
        replies = auth_login(smtp, "bob", "builder")
        assert [code for code, _ in replies] == [334, 334, 235]
        send(smtp, "login@client.test")
    assert queued_for(server, "plain@client.test").auth_user == "alice"
    assert queued_for(server, "login@client.test").auth_user == "bob"
    assert "sasl_username=alice" in server.log()
    assert "wonderland" not in server.log() and "builder" not in server.log()


@needs_dovecot
def test_the_login_name_recorded_is_the_one_dovecot_returns(server):
    with submission(server) as smtp:
        assert auth_plain(smtp, "ALICE@Any.Domain", "wonderland")[0] == 235
        send(smtp, "canonical@client.test")
    assert queued_for(server, "canonical@client.test").auth_user == "alice"
    assert "AUTH PLAIN succeeded for ALICE@Any.Domain as alice" in server.log()


@needs_dovecot
def test_a_wrong_password_is_535_and_counted(server):
    with submission(server) as smtp:
        assert auth_plain(smtp, "alice", "guess") == (
            535, b"5.7.8 Error: authentication failed")
        assert auth_login(smtp, "bob", "guess")[-1][0] == 535
        assert auth_plain(smtp, "nosuchuser", "guess")[0] == 535
        # The failures slow this client down (auth.failure_delay per failure), whichever
        # backend said no.
        assert auth_plain(smtp, "alice", "wonderland")[0] == 235
    assert "AUTH from 127.0.0.1 waits" in server.log()


@needs_dovecot
def test_tab_and_line_feed_in_names_and_passwords_cannot_inject(server, dovecot):
    """Everything Elemta sends Dovecot is a number, a fixed word, an address or base64:
    a TAB or LF in a user name or password cannot add a field or a request."""
    since = len(dovecot.read_log())
    with submission(server) as smtp:
        assert auth_plain(smtp, "alice", "x\tuser=bob")[0] == 535
        assert auth_plain(smtp, "mallory\tuser=alice", "wonderland")[0] == 535
        injected = "mallory\nAUTH\t1\tPLAIN\tservice=smtp\tresp=" + b64("\0alice\0wonderland")
        assert auth_login(smtp, injected, "x")[-1][0] == 535
        assert auth_login(smtp, "alice", "wonder\nland")[-1][0] == 535
        # The worker's connection to Dovecot is still in step: the next AUTH is answered
        # for itself.
        assert auth_plain(smtp, "alice", "wonderland")[0] == 235
    assert "succeeded for mallory" not in server.log()
    # Dovecot read five requests, one per AUTH, each with only the fields Elemta sends.
    requests = requests_read(dovecot, since)
    assert len(requests) == 5
    for request in requests:
        names = [field.partition("=")[0] for field in request[4:]]
        assert names in (["nologin", "secured", "lip", "rip", "resp"],
                         ["nologin", "secured", "lip", "rip"]), request


@needs_dovecot
def test_the_request_dovecot_reads(server, dovecot):
    """What Dovecot's auth service reads (its auth_debug log): the session is called
    secured after STARTTLS only, the addresses are there, the password is not."""
    since = len(dovecot.read_log())
    with submission(server) as smtp:
        assert auth_plain(smtp, "alice", "wonderland")[0] == 235
    with submission(server, tls=False) as smtp:        # auth.allow_plaintext
        assert auth_plain(smtp, "alice", "wonderland")[0] == 235
    tls, clear = requests_read(dovecot, since)
    assert "secured" in tls and "secured" not in clear
    for request in (tls, clear):
        assert request[2:4] == ["PLAIN", "service=smtp"]
        assert "lip=127.0.0.1" in request and "rip=127.0.0.1" in request
    assert "wonderland" not in dovecot.read_log()


@needs_dovecot
def test_the_inet_socket_works_too(elemta_server, dovecot, tls_files):
    cert, key = tls_files
    server = elemta_server(
        listeners=[{"mode": "submission"}], tls={"cert_file": cert, "key_file": key},
        auth={"backend": "dovecot", "dovecot_socket": "inet:127.0.0.1:%d" % dovecot.auth_port})
    with submission(server) as smtp:
        assert auth_plain(smtp, "alice", "wonderland")[0] == 235
        send(smtp, "inet@client.test")
    assert queued_for(server, "inet@client.test").auth_user == "alice"


@needs_dovecot
def test_a_temporary_failure_in_dovecot_is_454(server, dovecot):
    """Dovecot's passdb cannot be read (its file replaced by one only root may read):
    Dovecot says FAIL ... temp, and the client hears 454 4.7.0, not 535."""
    with open(dovecot.passwd_path, "rb") as f:
        users = f.read()
    replacement = dovecot.passwd_path + ".new"
    with open(replacement, "wb") as f:
        f.write(users)
    os.chmod(replacement, 0o600)
    os.rename(replacement, dovecot.passwd_path)
    time.sleep(1.1)         # Dovecot looks at the file again at most once a second
    try:
        with submission(server) as smtp:
            assert auth_plain(smtp, "alice", "wonderland") == (
                454, b"4.7.0 Temporary authentication failure")
    finally:
        os.chmod(dovecot.passwd_path, 0o644)
    assert "temporary failure: Dovecot reports a temporary failure" in server.log()
    time.sleep(1.1)         # the file readable again: Dovecot looks at it again
    with submission(server) as smtp:
        assert auth_plain(smtp, "alice", "wonderland")[0] == 235


@needs_dovecot
def test_check_config_connects_to_the_socket_as_master_user(dovecot):
    """elemta --check-config (run as root) connects as master.user, as the workers will:
    a socket only root may write to is named with the reason; Dovecot's 0666 one is OK."""
    workdir = tempfile.mkdtemp(prefix="elemta-dovecot-check-")
    os.chmod(workdir, 0o755)
    locked = os.path.join(workdir, "auth-root-only")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(locked)
            os.chmod(locked, 0o600)
            listener.listen()
            for path, expected in ((locked, "auth.dovecot_socket: cannot connect to %s: "
                                             "Permission denied (as master.user nobody"
                                    % locked),
                                   (dovecot.auth_socket, "configuration OK")):
                config = os.path.join(workdir, "elemta.yaml")
                with open(config, "w") as f:
                    f.write("queue: {spool_dir: %s/spool}\nmaster: {user: nobody}\n"
                            "api: {enabled: false}\n"
                            "auth: {backend: dovecot, dovecot_socket: %s}\n" % (workdir, path))
                check = subprocess.run(
                    [sys.executable, "-m", "elemta.cli.elemta", "--config", config,
                     "--check-config"], capture_output=True, timeout=60,
                    env=dict(os.environ, PYTHONPATH=REPO))
                output = (check.stdout + check.stderr).decode()
                assert expected in output, output
                assert check.returncode == (0 if path == dovecot.auth_socket else 1)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_elemta_starts_before_dovecot_and_says_454(elemta_server, tls_files, tmp_path):
    """No Dovecot yet (its socket missing): Elemta starts all the same, offers AUTH, and
    answers it 454 4.7.0 until Dovecot is there; the log says why, once."""
    cert, key = tls_files
    missing = str(tmp_path / "no-dovecot-yet")
    server = elemta_server(
        listeners=[{"mode": "submission"}], tls={"cert_file": cert, "key_file": key},
        auth={"backend": "dovecot", "dovecot_socket": missing})
    with submission(server) as smtp:
        assert smtp.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        assert auth_plain(smtp, "alice", "wonderland") == (
            454, b"4.7.0 Temporary authentication failure")
    assert server.log().count("cannot use Dovecot auth at %s: No such file or directory"
                              % missing) == 1


@needs_dovecot
def test_dovecot_down_is_454_never_535_and_auth_recovers(server, dovecot):
    """Last in the module: it stops the module's Dovecot (and starts it again)."""
    dovecot.stop()
    try:
        with submission(server) as smtp:
            assert "auth" in smtp.esmtp_features       # clients try, and hear "later"
            assert auth_plain(smtp, "alice", "wonderland") == (
                454, b"4.7.0 Temporary authentication failure")
            assert auth_login(smtp, "alice", "wonderland")[-1][0] == 454
            assert smtp.mail("down@client.test")[0] == 530
        assert "temporary failure: " in server.log()
    finally:
        dovecot.start()

    def authenticates():
        with submission(server) as smtp:
            return auth_plain(smtp, "alice", "wonderland")[0] == 235
    wait_for(authenticates, timeout=15)
