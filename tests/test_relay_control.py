"""No open relay: proven from a client address outside mynetworks (127.0.0.2), over
real sockets. Local domains take mail from anyone; other domains only from mynetworks
or after AUTH; everything else gets 554 5.7.1."""

import smtplib
import ssl

import pytest

MESSAGE = b"Subject: relay test\r\n\r\nbody\r\n"
STRANGER = ("127.0.0.2", 0)


def tls():
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@pytest.fixture
def server(elemta_server, tls_files, credentials):
    cert, key = tls_files
    return elemta_server(relay={"mynetworks": ["127.0.0.1/32", "::1/128"],
                                "local_domains": ["example.test"]},
                         tls={"cert_file": cert, "key_file": key},
                         auth={"credentials_file": credentials})


def test_stranger_may_send_to_local_domains_only(server):
    with smtplib.SMTP("127.0.0.1", server.port, source_address=STRANGER) as smtp:
        smtp.ehlo()
        smtp.mail("spammer@evil.test")
        assert smtp.rcpt("user@example.test")[0] == 250
        assert smtp.rcpt("user@EXAMPLE.TEST.")[0] == 250       # case and trailing dot
        assert smtp.rcpt("postmaster")[0] == 250
        assert smtp.rcpt("root@mx.test")[0] == 250             # the host name is local
        for target in ("victim@elsewhere.test", "user@example.test.evil.test",
                       "user@[127.0.0.1]", '"user@example.test"@elsewhere.test',
                       "@example.test:user@elsewhere.test"):
            code, text = smtp.docmd("RCPT TO:<%s>" % target)
            assert (code, text[:5]) == (554, b"5.7.1"), target
            assert b"Relay access denied" in text
        smtp.data(MESSAGE)
    [qid] = server.queued_ids()
    envelope, _ = server.message(qid)
    assert [r.address for r in envelope.recipients] == [
        "user@example.test", "user@EXAMPLE.TEST.", "postmaster", "root@mx.test"]
    assert "NOQUEUE: reject: RCPT from unknown[127.0.0.2]: 554 5.7.1" in server.log()


def test_stranger_with_only_foreign_recipients_queues_nothing(server):
    with smtplib.SMTP("127.0.0.1", server.port, source_address=STRANGER) as smtp:
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            smtp.sendmail("spammer@evil.test", ["victim@elsewhere.test"], MESSAGE)
    assert server.queued_ids() == []


def test_mynetworks_may_relay(server):
    with smtplib.SMTP("127.0.0.1", server.port, source_address=("127.0.0.1", 0)) as smtp:
        smtp.sendmail("app@example.test", ["friend@elsewhere.test"], MESSAGE)
    assert len(server.queued_ids()) == 1


def test_authenticated_stranger_may_relay(server):
    with smtplib.SMTP("127.0.0.1", server.port, source_address=STRANGER) as smtp:
        smtp.starttls(context=tls())
        smtp.login("alice", "wonderland")
        smtp.sendmail("alice@example.test", ["friend@elsewhere.test"], MESSAGE)
    assert len(server.queued_ids()) == 1


def test_failed_auth_does_not_open_the_relay(server):
    with smtplib.SMTP("127.0.0.1", server.port, source_address=STRANGER) as smtp:
        smtp.starttls(context=tls())
        with pytest.raises(smtplib.SMTPAuthenticationError):
            smtp.login("alice", "guess")
        smtp.mail("alice@example.test")
        assert smtp.rcpt("friend@elsewhere.test")[0] == 554
    assert server.queued_ids() == []
