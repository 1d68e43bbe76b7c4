"""A real Postfix relays mail into Elemta: Elemta's receive path facing a real MTA client.

Owned by the test suite. A private Postfix (tests/peers/postfix.py) has relayhost pointing at
the real `elemta` server (tests/conftest.py); the test submits to Postfix's smtpd with smtplib
and waits until Elemta has queued what Postfix's smtp client delivered. Needs root and the
postfix package.
See also: tests/test_swaks.py, tests/test_receive.py, ../shared/peers.md.
"""

import shutil
import smtplib
import tempfile
import time

import pytest

from tests.peers.postfix import PostfixInstance, postfix_available
from tests.harness import free_port

pytestmark = pytest.mark.skipif(postfix_available() is not None,
                                reason=str(postfix_available()))

POSTFIX_HELO = "postfix.peer.test"   # the private instance's myhostname

UTF8_MESSAGE = ("From: sender@client.test\r\nTo: user@example.test\r\nSubject: 8-bit\r\n"
                "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
                "Content-Transfer-Encoding: 8bit\r\n\r\n"
                "na\u00efve caf\u00e9 \u2603 \u65e5\u672c\r\n.leading dot\r\n").encode("utf-8")
PLAIN_MESSAGE = (b"From: sender@client.test\r\nTo: one@example.test, two@elsewhere.test\r\n"
                 b"Subject: two recipients\r\n\r\nHello both.\r\n")


@pytest.fixture
def workdir():
    """A scratch directory the postfix user can reach (pytest's tmp_path is root-only)."""
    path = tempfile.mkdtemp(prefix="elemta-postfix-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def body_of(message):
    return message.split(b"\r\n\r\n", 1)[1]


def submit(postfix, sender, recipients, message, mail_options=()):
    """Hand a message to Postfix's smtpd; Postfix's queue id."""
    with smtplib.SMTP("127.0.0.1", postfix.smtpd_port, timeout=10) as client:
        client.ehlo("submitter.client.test")
        client.mail(sender, list(mail_options))
        for recipient in recipients:
            assert client.rcpt(recipient)[0] == 250
        code, text = client.data(message)
    assert code == 250, (code, text)
    return text.decode().rsplit(" ", 1)[1]


def wait_for_queue(server, count, timeout=15.0):
    """The ids in Elemta's queue once it holds `count` messages."""
    deadline = time.monotonic() + timeout
    while True:
        ids = server.queued_ids()
        if len(ids) >= count:
            return ids
        assert time.monotonic() < deadline, "Elemta queued %r; Postfix said:\n%s" % (
            ids, server.log())
        time.sleep(0.05)


def elemta_ids_from_postfix_log(postfix, postfix_id, recipients, elemta_port):
    """Elemta's queue id for each recipient, as Postfix's smtp client logged it on success."""
    ids = []
    for recipient in recipients:
        match = postfix.wait_for_log(
            r"%s: to=<%s>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:%d, .*status=sent "
            r"\(250 2\.0\.0 Ok: queued as (\w+)\)"
            % (postfix_id, recipient.replace(".", r"\."), elemta_port))
        ids.append(match.group(1))
    return ids


def assert_relayed(server, postfix_id, elemta_id, sender, recipients, message,
                   protocol):
    envelope, content = server.message(elemta_id)
    assert envelope.sender == sender
    # Postfix's queue manager may reorder recipients; each one arrives exactly once.
    assert sorted(r.address for r in envelope.recipients) == sorted(recipients)
    assert (envelope.client_helo, envelope.protocol) == (POSTFIX_HELO, protocol)
    # Elemta's trace header first, then Postfix's own, then the original message.
    assert content.startswith(b"Received: from %s (unknown [127.0.0.1])\r\n" % POSTFIX_HELO.encode())
    elemta_trace, rest = content.split(b"\r\nReceived: ", 1)
    assert b"by mx.test (Elemta) with %s id %s" % (protocol.encode(), elemta_id.encode()) \
        in elemta_trace
    assert rest.startswith(b"from submitter.client.test (unknown [127.0.0.1])\r\n\tby %s "
                           b"(Postfix) with ESMTP id %s" % (POSTFIX_HELO.encode(),
                                                            postfix_id.encode()))
    assert content.endswith(b"\r\n\r\n" + body_of(message))
    for header in message.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        assert header + b"\r\n" in content
    assert envelope.size == len(content)
    assert "%s: client=unknown[127.0.0.1]" % elemta_id in server.log()
    return envelope, content


def test_postfix_relays_an_8bit_message_and_a_two_recipient_message(elemta_server, workdir):
    server = elemta_server()
    with PostfixInstance(workdir, free_port(), relayhost=server.port) as postfix:
        utf8_id = submit(postfix, "sender@client.test", ["user@example.test"], UTF8_MESSAGE,
                         mail_options=["BODY=8BITMIME"])
        two_id = submit(postfix, "sender@client.test",
                        ["one@example.test", "two@elsewhere.test"], PLAIN_MESSAGE)
        queued = wait_for_queue(server, 2)
        [utf8_elemta_id] = elemta_ids_from_postfix_log(postfix, utf8_id, ["user@example.test"],
                                                       server.port)
        two_elemta_ids = elemta_ids_from_postfix_log(
            postfix, two_id, ["one@example.test", "two@elsewhere.test"], server.port)
    # One transaction for both recipients: one message in Elemta.
    assert two_elemta_ids[0] == two_elemta_ids[1]
    assert sorted(queued) == sorted([utf8_elemta_id, two_elemta_ids[0]])

    envelope, content = assert_relayed(server, utf8_id, utf8_elemta_id,
                                       "sender@client.test", ["user@example.test"],
                                       UTF8_MESSAGE, "ESMTP")
    assert envelope.body == "8BITMIME"      # Postfix passed the declaration on
    assert "na\u00efve caf\u00e9 \u2603".encode("utf-8") in content
    assert b"\r\n.leading dot\r\n" in content
    envelope, _ = assert_relayed(server, two_id, two_elemta_ids[0],
                                 "sender@client.test",
                                 ["one@example.test", "two@elsewhere.test"],
                                 PLAIN_MESSAGE, "ESMTP")
    assert envelope.body == "7BIT"
    assert "warning:" not in postfix.read_log()    # Postfix found nothing odd in Elemta's replies
    # Plain ESMTP: neither side mentions TLS.
    assert "TLS connection established" not in postfix.read_log()
    assert "TLS connection established" not in server.log()


def test_postfix_uses_opportunistic_tls_to_elemta(elemta_server, tls_files, workdir):
    cert, key = tls_files
    server = elemta_server(tls={"cert_file": cert, "key_file": key})
    with PostfixInstance(workdir, free_port(), relayhost=server.port,
                         extra_main_cf={"smtp_tls_security_level": "may",
                                        "smtp_tls_loglevel": "1"}) as postfix:
        postfix_id = submit(postfix, "sender@client.test", ["user@example.test"],
                            UTF8_MESSAGE, mail_options=["BODY=8BITMIME"])
        [queued] = wait_for_queue(server, 1)
        [elemta_id] = elemta_ids_from_postfix_log(postfix, postfix_id, ["user@example.test"],
                                                  server.port)
        postfix.wait_for_log(
            r"(Untrusted|Anonymous) TLS connection established to "
            r"127\.0\.0\.1\[127\.0\.0\.1\]:%d: TLSv1\.[23]" % server.port)
    assert queued == elemta_id
    _, content = assert_relayed(server, postfix_id, elemta_id, "sender@client.test",
                                ["user@example.test"], UTF8_MESSAGE, "ESMTPS")
    assert b"\r\n\t(using TLSv1." in content
    assert "warning:" not in postfix.read_log()
    assert "TLS connection established from unknown[127.0.0.1]" in server.log()
