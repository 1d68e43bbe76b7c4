"""Sender login maps (smtpd.sender_login_maps, reject_sender_login_mismatch) and the login
name in the Received header and the log, over real sockets.

One server for the module, under the default rule (authenticated): a submission listener
(AUTH required; allowed without TLS here, auth.allow_plaintext) with the credentials-file
backend (users alice, bob and one whose name holds comment specials), and an smtp
listener where a client that did not log in is not bound. The table is lmdb, compiled
as elemtactl map compile does, so a test can take it away (451 4.3.0). One more server
shows the rule "all".
See also: elemta.smtpd.senderlogin, elemta.smtpd.received.
"""

import os
import re
import smtplib

import pytest

from elemta.maps.lmdbtable import compile_source
from elemta.util.credentials import set_user

MESSAGE = b"Subject: login test\r\n\r\nbody\r\n"
ODD_USER = "carol(x)\\y"


@pytest.fixture(scope="module")
def logins(tmp_path_factory):
    source = tmp_path_factory.mktemp("tables") / "sender_logins"
    source.write_text("alice@example.test alice\n"
                      "shared@example.test alice, bob\n"
                      "@team.test bob\n"
                      "carol@example.test %s\n" % ODD_USER)
    compile_source(str(source))
    return str(source)


@pytest.fixture(scope="module")
def server(elemta_module_server, logins, tmp_path_factory):
    credentials = str(tmp_path_factory.mktemp("auth") / "credentials")
    for user in ("alice", "bob", ODD_USER):
        set_user(credentials, user, "secret")
    return elemta_module_server(
        listeners=[{"mode": "smtp"}, {"mode": "submission"}],
        smtpd={"sender_login_maps": "lmdb:" + logins},
        auth={"credentials_file": credentials, "allow_plaintext": True,
              "failure_delay": 0.1})


def mail_from(server, sender, user=None):
    """The reply to MAIL FROM:<sender> after AUTH as user (None: no AUTH, smtp port)."""
    port = server.ports["submission"] if user else server.ports["smtp"]
    with smtplib.SMTP("127.0.0.1", port) as smtp:
        smtp.ehlo()
        if user:
            smtp.login(user, "secret")
        code, text = smtp.docmd("MAIL FROM:<%s>" % sender)
        return "%d %s" % (code, text.decode())


def send(server, sender, user):
    """Send one message as user from sender; the queued (envelope, content)."""
    before = set(server.queued_ids())
    with smtplib.SMTP("127.0.0.1", server.ports["submission"]) as smtp:
        smtp.login(user, "secret")
        smtp.sendmail(sender, ["friend@elsewhere.test"], MESSAGE)
    [qid] = set(server.queued_ids()) - before
    return qid, server.message(qid)


def test_the_owner_may_send_and_is_named_in_received_and_log(server):
    qid, (envelope, content) = send(server, "alice@example.test", "alice")
    assert envelope.sender == "alice@example.test"
    assert envelope.auth_user == "alice"
    received = content.split(b"\r\n\r\n")[0].decode()
    assert "\t(Authenticated sender: alice)\r\n" in received
    assert "%s: client=unknown[127.0.0.1], sasl_method=PLAIN, sasl_username=alice" \
        % qid in server.log()


def test_any_of_several_owners_and_a_domain_entry(server):
    assert mail_from(server, "shared@example.test", "bob").startswith("250")
    assert mail_from(server, "Shared@Example.TEST", "alice").startswith("250")
    assert mail_from(server, "anyone@team.test", "bob").startswith("250")
    assert mail_from(server, "anyone+tag@team.test", "bob").startswith("250")


def test_another_users_address_is_refused(server):
    assert mail_from(server, "alice@example.test", "bob") == (
        "553 5.7.1 <alice@example.test>: Sender address rejected: not owned by user bob")
    assert "NOQUEUE: reject: MAIL from unknown[127.0.0.1]: 553 5.7.1 " \
           "<alice@example.test>: Sender address rejected: not owned by user bob; " \
           "from=<alice@example.test>" in server.log()


def test_an_unlisted_sender_is_refused_to_an_authenticated_user(server):
    assert mail_from(server, "someone@elsewhere.test", "alice") == (
        "553 5.7.1 <someone@elsewhere.test>: Sender address rejected: not owned by user "
        "alice")


def test_the_null_sender_is_always_allowed(server):
    assert mail_from(server, "", "bob").startswith("250")


def test_a_client_that_did_not_log_in_is_not_bound_by_default(server):
    assert mail_from(server, "alice@example.test").startswith("250")


def test_a_login_name_with_comment_specials_is_quoted_in_received(server):
    _, (envelope, content) = send(server, "carol@example.test", ODD_USER)
    received = content.split(b"\r\n\r\n")[0].decode()
    assert "\t(Authenticated sender: carol\\(x\\)\\\\y)\r\n" in received
    assert envelope.auth_user == ODD_USER


def test_a_table_that_cannot_answer_is_a_temporary_failure(server, logins):
    os.rename(logins + ".lmdb", logins + ".away")
    try:
        assert mail_from(server, "alice@example.test", "alice") == \
            "451 4.3.0 <alice@example.test>: Temporary lookup failure"
    finally:
        os.rename(logins + ".away", logins + ".lmdb")
    assert mail_from(server, "alice@example.test", "alice").startswith("250")
    assert re.search(r"<alice@example.test>: sender login lookup failed: lmdb:\S+"
                     r"sender_logins: cannot read", server.log())


def test_rule_all_binds_clients_that_did_not_log_in(elemta_server, logins):
    server = elemta_server(smtpd={"sender_login_maps": "lmdb:" + logins,
                                  "reject_sender_login_mismatch": "all"})
    assert mail_from(server, "alice@example.test") == (
        "553 5.7.1 <alice@example.test>: Sender address rejected: not logged in")
    assert mail_from(server, "nobody@elsewhere.test").startswith("250")   # unowned
    assert mail_from(server, "").startswith("250")
