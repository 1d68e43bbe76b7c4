"""LMTP delivery (RFC 2033) into a real Dovecot: per-recipient replies after the final dot.

Owned by the test suite. A private Dovecot (tests/peers/dovecot.py) listens for LMTP on a
unix socket and on 127.0.0.1:PORT and stores into Maildirs: alice and owner have mailboxes,
carol's is full (her quota is one byte, so Dovecot refuses her copy after DATA with 552,
while alice's copy of the same message is saved), nobody is unknown (550 at RCPT). Most
tests go through the real Elemta server (delivery.transport sends unix.lmtp.test to the
socket, tcp.lmtp.test to the TCP port); the first ones drive the client alone. Needs root
and dovecot-lmtpd.
See also: elemta.delivery.lmtp, elemta.delivery.smtp_client (LMTP mode).
"""

import email
import email.policy
import io
import re
import smtplib
import tempfile

import pytest

from elemta.delivery.smtp_client import (DELIVERED, PERMANENT, TEMPORARY, TLS_NONE, SMTPClient,
                                         Timeouts, TLSPolicy)
from elemta.queue.model import Envelope, Recipient
from tests.harness import wait_for
from tests.peers.dovecot import DovecotInstance, DovecotUser, dovecot_available

pytestmark = pytest.mark.skipif(bool(dovecot_available()), reason=str(dovecot_available()))

USERS = {"alice": DovecotUser(), "owner": DovecotUser(), "carol": DovecotUser(quota="1B"),
         "dave": DovecotUser()}


@pytest.fixture(scope="module")
def dovecot():
    with DovecotInstance(tempfile.mkdtemp(prefix="elemta-dovecot-"), USERS) as instance:
        yield instance
    instance.remove()


# -- the client alone --------------------------------------------------------------------------

def envelope(sender, recipients, body):
    return Envelope(queue_id="T1", sender=sender, arrival=0.0, size=len(body),
                    recipients=[Recipient(address=a) for a in recipients])


def client_to(dovecot, unix):
    client = SMTPClient("client.test", timeouts=Timeouts(connect=2, greeting=5, data_done=5),
                        tls=TLSPolicy(TLS_NONE), lmtp=True)
    if unix:
        return client.connect(dovecot.lmtp_socket, server_name="client.test")
    return client.connect("127.0.0.1", dovecot.lmtp_port)


@pytest.mark.parametrize("unix", [True, False], ids=["unix", "tcp"])
def test_client_gets_one_reply_per_recipient_after_the_dot(dovecot, unix):
    body = b"Subject: direct %d\r\n\r\nsaved for dave, refused for carol\r\n" % unix
    before = len(dovecot.messages("dave"))
    with client_to(dovecot, unix) as client:
        assert client.extensions.keys() >= {"PIPELINING", "ENHANCEDSTATUSCODES"}
        result = client.send(envelope("s@client.test", ["dave@x.test", "carol@x.test"], body),
                             io.BytesIO(body))
        dave, carol = result.recipients
        assert dave.outcome == DELIVERED and "Saved" in dave.text
        assert (carol.outcome, carol.code, carol.status) == (PERMANENT, 552, "5.2.2")
        assert "<carol@x.test> Quota exceeded" in carol.text
        # The connection goes on: a second message on it, after RSET.
        assert client.reset()
        again = client.send(envelope("s@client.test", ["dave@x.test"], b"x\r\n"),
                            io.BytesIO(b"x\r\n"))
        assert [r.outcome for r in again.recipients] == [DELIVERED]
    stored = dovecot.messages("dave")[before:]
    assert len(stored) == 2 and b"saved for dave, refused for carol" in stored[0]
    if unix:
        assert client.peer == "client.test[%s]" % dovecot.lmtp_socket


def test_a_full_mailbox_can_be_a_temporary_failure_for_that_recipient_only():
    # quota_full_tempfail = yes: Dovecot answers 452 after the dot instead of 552.
    workdir = tempfile.mkdtemp(prefix="elemta-dovecot-")
    with DovecotInstance(workdir, USERS, quota_tempfail=True) as tempfail:
        with client_to(tempfail, unix=True) as client:
            result = client.send(envelope("s@client.test", ["carol@x.test", "dave@x.test"],
                                          b"x\r\n"), io.BytesIO(b"x\r\n"))
        carol, dave = result.recipients
        assert (carol.outcome, carol.code, carol.status) == (TEMPORARY, 452, "4.2.2")
        assert dave.outcome == DELIVERED and len(tempfail.messages("dave")) == 1
    tempfail.remove()


# -- through the real server -------------------------------------------------------------------

def start_elemta(elemta_server, dovecot, **transports):
    transport = [{"domain": "unix.lmtp.test", "nexthop": "lmtp:unix:%s" % dovecot.lmtp_socket},
                 {"domain": "tcp.lmtp.test", "nexthop": "lmtp:[127.0.0.1]:%d"
                  % dovecot.lmtp_port}]
    transport += [{"domain": d, "nexthop": n} for d, n in transports.items()]
    server = elemta_server(delivery={"workers": 1, "transport": transport, "min_backoff": 60,
                                     "connect_timeout": 2, "command_timeout": 5,
                                     "data_timeout": 5},
                           api={"enabled": False})
    wait_for(lambda: "delivery worker started" in server.log())
    return server


def send(server, sender, recipients, subject, body):
    message = ("From: <%s>\r\nTo: <%s>\r\nSubject: %s\r\n\r\n%s\r\n"
               % (sender, recipients[0], subject, body)).encode()
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.sendmail(sender, recipients, message)


def queue_id_of(server, sender):
    match = wait_for(lambda: re.search(r"(\w+): from=<%s>" % re.escape(sender), server.log()))
    return match.group(1)


def delivery_line(server, queue_id, address, status, timeout=10):
    """(relay, reply) of the log line that gave `address` this status."""
    pattern = (r"%s: to=<%s>, relay=(\S+), delay=\S+, dsn=\S+, status=%s \((.*)\)"
               % (queue_id, re.escape(address), status))
    return wait_for(lambda: re.search(pattern, server.log()), timeout).groups()


def test_one_message_three_fates_and_the_bounce_arrives_over_lmtp_tcp(elemta_server, dovecot):
    server = start_elemta(elemta_server, dovecot)
    send(server, "owner@tcp.lmtp.test",
         ["alice@unix.lmtp.test", "nobody@unix.lmtp.test", "carol@unix.lmtp.test"],
         "three fates", "alice keeps this line.")
    queue_id = queue_id_of(server, "owner@tcp.lmtp.test")

    relay, reply = delivery_line(server, queue_id, "alice@unix.lmtp.test", "sent")
    assert relay == "mx.test[%s]" % dovecot.lmtp_socket
    assert reply.startswith("250 2.0.0 <alice@unix.lmtp.test>")
    [stored] = dovecot.messages("alice")
    stored = email.message_from_bytes(stored, policy=email.policy.default)
    assert stored["Subject"] == "three fates"
    assert stored["Return-Path"] == "<owner@tcp.lmtp.test>"
    assert stored.get_content().strip() == "alice keeps this line."
    # Refused at RCPT by an unknown user, and after the dot by a full mailbox: both bounce.
    _, unknown = delivery_line(server, queue_id, "nobody@unix.lmtp.test", "bounced")
    assert unknown.startswith("550 5.1.1 <nobody@unix.lmtp.test> User doesn't exist")
    _, full = delivery_line(server, queue_id, "carol@unix.lmtp.test", "bounced")
    assert full.startswith("552 5.2.2 <carol@unix.lmtp.test> Quota exceeded")
    assert dovecot.messages("carol") == []

    # The DSN goes back to owner, whose mailbox is behind lmtp:[127.0.0.1]:port.
    [raw] = wait_for(lambda: dovecot.messages("owner"))
    dsn_id = re.search(r"%s: sender non-delivery notification: (\w+)" % queue_id,
                       server.log()).group(1)
    relay, _ = delivery_line(server, dsn_id, "owner@tcp.lmtp.test", "sent")
    assert relay == "127.0.0.1[127.0.0.1]:%d" % dovecot.lmtp_port
    report = email.message_from_bytes(raw, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    _, status, original = report.get_payload()
    per_recipient = {part["Final-Recipient"]: part for part in status.get_payload()[1:]}
    assert set(per_recipient) == {"rfc822; nobody@unix.lmtp.test",
                                  "rfc822; carol@unix.lmtp.test"}
    assert per_recipient["rfc822; nobody@unix.lmtp.test"]["Status"] == "5.1.1"
    carol = per_recipient["rfc822; carol@unix.lmtp.test"]
    assert (carol["Action"], carol["Status"]) == ("failed", "5.2.2")
    assert "Quota exceeded" in carol["Diagnostic-Code"]
    assert "Subject: three fates" in str(original.get_payload())
    assert "alice" not in "".join(per_recipient)


def test_a_missing_socket_defers_with_the_reason(elemta_server, dovecot, tmp_path):
    missing = str(tmp_path / "no-such-dir" / "lmtp")
    server = start_elemta(elemta_server, dovecot, **{"gone.lmtp.test": "lmtp:unix:" + missing})
    send(server, "owner@tcp.lmtp.test", ["alice@gone.lmtp.test"], "later", "not yet")
    queue_id = queue_id_of(server, "owner@tcp.lmtp.test")
    relay, reply = delivery_line(server, queue_id, "alice@gone.lmtp.test", "deferred")
    assert relay == "mx.test[%s]" % missing
    assert reply == "451 4.4.1 connect to mx.test[%s]: No such file or directory" % missing
    with server.queue() as q:
        record = q.get(queue_id)
    assert record.state == "deferred"
    assert record.envelope.recipients[0].last_reply == reply


def test_a_mandatory_smtp_tls_level_leaves_lmtp_alone_unless_a_policy_names_it(
        elemta_server, dovecot):
    """As Postfix's lmtp (no TLS unless asked): tls_level encrypt is for SMTP; a
    tls_policy entry for the LMTP host does require it."""
    transport = [{"domain": "tcp.lmtp.test",
                  "nexthop": "lmtp:[127.0.0.1]:%d" % dovecot.lmtp_port}]
    server = elemta_server(delivery={"workers": 1, "transport": transport, "min_backoff": 60,
                                     "tls_level": "encrypt"}, api={"enabled": False})
    wait_for(lambda: "delivery worker started" in server.log())
    send(server, "a@client.test", ["owner@tcp.lmtp.test"], "plain lmtp", "fine")
    delivery_line(server, queue_id_of(server, "a@client.test"), "owner@tcp.lmtp.test", "sent")
    assert server.stop() == []
    strict = elemta_server(delivery={
        "workers": 1, "transport": transport, "min_backoff": 60,
        "tls_policy": [{"domain": "127.0.0.1", "level": "encrypt"}]}, api={"enabled": False})
    wait_for(lambda: "delivery worker started" in strict.log())
    send(strict, "b@client.test", ["owner@tcp.lmtp.test"], "strict lmtp", "no")
    _, reply = delivery_line(strict, queue_id_of(strict, "b@client.test"),
                             "owner@tcp.lmtp.test", "deferred")
    assert "TLS" in reply
