"""End-to-end receive tests with swaks, a real SMTP client other than Python's smtplib.

Owned by the test suite. Each test runs the real `elemta` server (tests/conftest.py) and the
`swaks` program against it on loopback, then checks swaks' exit status, the replies in its
transcript, and what landed in the queue (envelope and content with Elemta's Received header).
See also: tests/test_receive.py (the same paths over smtplib), tests/test_relay_control.py.

swaks 20201014 has no option to send BODY=8BITMIME, so 8-bit content goes undeclared here:
refused by default, accepted with smtpd.undeclared_8bit = accept.
"""

import re
import shutil
import subprocess

import pytest

pytestmark = pytest.mark.skipif(shutil.which("swaks") is None,
                                reason="swaks is not installed (apt-get install swaks)")

HELO = "client.swaks.test"
STRANGER = "127.0.0.2"  # outside mynetworks when a test sets it to 127.0.0.1/32
BODY = "Line one.\nLine two."


class SwaksRun:
    """One finished swaks: exit status, its transcript, and the server replies in it."""

    def __init__(self, argv, returncode, stdout, stderr):
        self.argv = argv
        self.returncode = returncode
        self.transcript = stdout
        self.stderr = stderr
        # swaks marks server lines "<-  " (plain), "<~  " (TLS), "<** " / "<~* " (errors).
        self.replies = [line[4:] for line in stdout.splitlines()
                        if line[:4] in ("<-  ", "<~  ", "<** ", "<~* ")]

    def queue_id(self):
        """The id from the server's '250 2.0.0 Ok: queued as ID'."""
        ids = [m.group(1) for m in map(re.compile(r"^250 2\.0\.0 Ok: queued as (\S+)$").match,
                                       self.replies) if m]
        assert len(ids) == 1, self
        return ids[0]

    def client_writes(self):
        """What swaks wrote to the socket, one bytes object per write (needs -raw).

        -raw dumps each write as hex lines '  > 0000: 4D 41 ...'; offset 0000 starts a write.
        """
        writes = []
        for line in self.transcript.splitlines():
            match = re.match(r"^ {2}> (\d{4}): ((?:[0-9A-F]{2}\s+)+)", line)
            if match is None:
                continue
            if match.group(1) == "0000":
                writes.append(b"")
            writes[-1] += bytes.fromhex(match.group(2))
        return writes

    def __repr__(self):
        return "swaks exit %d: %s\n%s%s" % (self.returncode, " ".join(self.argv),
                                             self.transcript, self.stderr)


def swaks(port, *options):
    """Run swaks against 127.0.0.1:port and wait for it."""
    argv = ["swaks", "--server", "127.0.0.1", "--port", str(port), "--helo", HELO,
            "--timeout", "10"] + list(options)
    done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    return SwaksRun(argv, done.returncode, done.stdout.decode("utf-8", "replace"),
                    done.stderr.decode("utf-8", "replace"))


def only_message(server):
    """(queue id, envelope, content) of the one message in the queue."""
    ids = server.queued_ids()
    assert len(ids) == 1, ids
    envelope, content = server.message(ids[0])
    return ids[0], envelope, content


def assert_received(content, queue_id, protocol, recipient=None, client=b"127.0.0.1"):
    """Elemta's Received header is first and names the client, the protocol and the id."""
    assert content.startswith(b"Received: from " + HELO.encode() + b" (unknown [" + client + b"])\r\n")
    assert b"by mx.test (Elemta) with " + protocol + b" id " + queue_id.encode() in content
    if recipient is not None:
        assert b"\tfor <" + recipient.encode() + b">; " in content


def test_plain_esmtp(elemta_server):
    server = elemta_server()
    run = swaks(server.port, "--from", "sender@client.test", "--to", "user@example.test",
                "--header", "Subject: plain swaks", "--body", BODY)
    assert run.returncode == 0, run
    assert "STARTTLS" not in " ".join(run.replies)          # no certificate, no offer
    queue_id, envelope, content = only_message(server)
    assert run.queue_id() == queue_id
    assert envelope.sender == "sender@client.test"
    assert [r.address for r in envelope.recipients] == ["user@example.test"]
    assert (envelope.protocol, envelope.client_helo, envelope.auth_user) == ("ESMTP", HELO, None)
    assert_received(content, queue_id, b"ESMTP", "user@example.test")
    assert b"\r\nSubject: plain swaks\r\n" in content
    assert b"\r\n\r\nLine one.\r\nLine two.\r\n" in content
    assert envelope.size == len(content)


def test_starttls(elemta_server, tls_files):
    cert, key = tls_files
    server = elemta_server(tls={"cert_file": cert, "key_file": key})
    run = swaks(server.port, "-tls", "--from", "sender@client.test", "--to", "user@example.test",
                "--body", BODY)
    assert run.returncode == 0, run
    assert "220 2.0.0 Ready to start TLS" in run.replies
    assert "=== TLS started with cipher TLSv1." in run.transcript
    queue_id, envelope, content = only_message(server)
    assert run.queue_id() == queue_id
    assert envelope.protocol == "ESMTPS" and envelope.auth_user is None
    assert_received(content, queue_id, b"ESMTPS", "user@example.test")
    assert b"\r\n\t(using TLSv1." in content
    assert b"\r\n\r\nLine one.\r\nLine two.\r\n" in content


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_auth_after_starttls_lets_a_stranger_relay(elemta_server, tls_files, credentials,
                                                   mechanism):
    cert, key = tls_files
    server = elemta_server(tls={"cert_file": cert, "key_file": key},
                           auth={"credentials_file": credentials},
                           relay={"mynetworks": ["127.0.0.1/32"]})
    run = swaks(server.port, "--local-interface", STRANGER, "-tls", "--auth", mechanism,
                "--auth-user", "alice", "--auth-password", "wonderland",
                "--from", "alice@example.test", "--to", "friend@elsewhere.test",
                "--body", BODY)
    assert run.returncode == 0, run
    assert "250-AUTH PLAIN LOGIN" in run.replies
    assert "235 2.7.0 Authentication successful" in run.replies
    # AUTH is offered only inside TLS: the first EHLO reply is before STARTTLS.
    first_ehlo = run.replies[:run.replies.index("220 2.0.0 Ready to start TLS")]
    assert not any("AUTH" in reply for reply in first_ehlo)
    queue_id, envelope, content = only_message(server)
    assert envelope.sender == "alice@example.test"
    assert [r.address for r in envelope.recipients] == ["friend@elsewhere.test"]
    assert (envelope.protocol, envelope.auth_user) == ("ESMTPSA", "alice")
    assert envelope.client_address == STRANGER
    assert_received(content, queue_id, b"ESMTPSA", "friend@elsewhere.test",
                    client=STRANGER.encode())
    assert "AUTH %s succeeded for alice" % mechanism in server.log()


def test_smtps_with_auth(elemta_server, tls_files, credentials):
    cert, key = tls_files
    server = elemta_server(listeners=[{"mode": "smtp"}, {"mode": "smtps"}],
                           tls={"cert_file": cert, "key_file": key},
                           auth={"credentials_file": credentials})
    run = swaks(server.ports["smtps"], "-tlsc", "--auth", "PLAIN", "--auth-user", "alice",
                "--auth-password", "wonderland", "--from", "alice@example.test",
                "--to", "one@elsewhere.test,two@example.test", "--body", BODY)
    assert run.returncode == 0, run
    # Implicit TLS: the handshake comes before the greeting, and STARTTLS is not offered.
    transcript = run.transcript
    assert transcript.index("=== TLS started") < transcript.index("<~  220 mx.test")
    assert not any("STARTTLS" in reply for reply in run.replies)
    queue_id, envelope, content = only_message(server)
    assert run.queue_id() == queue_id
    assert [r.address for r in envelope.recipients] == ["one@elsewhere.test",
                                                        "two@example.test"]
    assert (envelope.protocol, envelope.auth_user) == ("ESMTPSA", "alice")
    assert_received(content, queue_id, b"ESMTPSA")
    assert b"\tfor <" not in content        # several recipients: none is named (Bcc)
    assert b"\r\n\t(using TLSv1." in content


def test_pipelining_sends_the_transaction_in_one_write(elemta_server):
    server = elemta_server()
    run = swaks(server.port, "--pipeline", "-raw", "--from", "sender@client.test",
                "--to", "a@example.test,b@example.test", "--body", BODY)
    assert run.returncode == 0, run
    assert "250-PIPELINING" in run.replies
    assert (b"MAIL FROM:<sender@client.test>\r\nRCPT TO:<a@example.test>\r\n"
            b"RCPT TO:<b@example.test>\r\nDATA\r\n") in run.client_writes()
    # The four replies came back in order, answering the batch.
    batch = run.replies.index("250 2.1.0 Ok")
    assert run.replies[batch:batch + 4] == ["250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.1.5 Ok",
                                            "354 End data with <CR><LF>.<CR><LF>"]
    queue_id, envelope, content = only_message(server)
    assert run.queue_id() == queue_id
    assert [r.address for r in envelope.recipients] == ["a@example.test", "b@example.test"]
    assert_received(content, queue_id, b"ESMTP")


EIGHT_BIT = ("Subject: 8-bit\nContent-Type: text/plain; charset=utf-8\n"
             "Content-Transfer-Encoding: 8bit\n\nna\u00efve caf\u00e9 \u2603\n.leading dot\n")


def test_undeclared_8bit_body_is_refused_by_default(elemta_server, tmp_path):
    server = elemta_server()
    message = tmp_path / "8bit.eml"
    message.write_bytes(EIGHT_BIT.encode("utf-8"))
    run = swaks(server.port, "--from", "sender@client.test", "--to", "user@example.test",
                "--data", "@%s" % message)
    assert run.returncode == 26, run                # "server did not accept mail"
    assert "554 5.6.1 Error: 8-bit message data without BODY=8BITMIME" in run.replies
    assert server.queued_ids() == []


def test_8bit_body_arrives_byte_for_byte_when_accepted(elemta_server, tmp_path):
    server = elemta_server(smtpd={"undeclared_8bit": "accept"})
    message = tmp_path / "8bit.eml"
    message.write_bytes(EIGHT_BIT.encode("utf-8"))
    run = swaks(server.port, "--from", "sender@client.test", "--to", "user@example.test",
                "--data", "@%s" % message)
    assert run.returncode == 0, run
    assert "250-8BITMIME" in run.replies
    queue_id, envelope, content = only_message(server)
    assert_received(content, queue_id, b"ESMTP", "user@example.test")
    # swaks sends CRLF lines and dot-stuffs; Elemta stores the unstuffed original.
    assert EIGHT_BIT.replace("\n", "\r\n").encode("utf-8") in content
    assert b"\r\n.leading dot\r\n" in content and b"..leading" not in content


def test_relay_attempt_from_outside_mynetworks_is_refused(elemta_server):
    server = elemta_server(relay={"mynetworks": ["127.0.0.1/32"]})
    run = swaks(server.port, "--local-interface", STRANGER, "--from", "spammer@evil.test",
                "--to", "victim@elsewhere.test", "--body", BODY)
    assert run.returncode == 24, run                # "no RCPTs accepted"
    refusals = [r for r in run.replies if r.startswith("554 ")]
    assert len(refusals) == 1 and refusals[0].startswith("554 5.7.1 "), run
    assert "Relay access denied" in refusals[0]
    assert not any(r.startswith("354") for r in run.replies)
    assert server.queued_ids() == []
    assert "NOQUEUE: reject: RCPT from unknown[127.0.0.2]: 554 5.7.1" in server.log()


def test_wrong_password_gets_535_and_queues_nothing(elemta_server, tls_files, credentials):
    cert, key = tls_files
    server = elemta_server(tls={"cert_file": cert, "key_file": key},
                           auth={"credentials_file": credentials, "failure_delay": 0.05})
    run = swaks(server.port, "-tls", "--auth", "LOGIN", "--auth-user", "alice",
                "--auth-password", "guess", "--from", "alice@example.test",
                "--to", "user@example.test", "--body", BODY)
    assert run.returncode == 28, run                # "error in AUTH transaction"
    assert run.replies[-2] == "535 5.7.8 Error: authentication failed", run
    assert run.replies[-1] == "221 2.0.0 Bye"
    assert server.queued_ids() == []
    assert "SASL LOGIN authentication failed for <alice>" in server.log()
