"""What the content-scanner tests send and read back over SMTP (tests/test_clamav.py,
tests/test_quarantine.py, tests/test_rspamd.py, tests/test_scanning_load.py).

    reply = send(server, message(EICAR))     # (554, "5.7.1 ...") or (250, "2.0.0 Ok: ...")
    queue_id_of(reply)                       # the queue id of a 250
"""

import smtplib
import time


def message(body, subject="scan me", to="b@example.test"):
    """A small message with a Message-ID of its own (no two scans see the same bytes)."""
    return (b"From: <a@sender.test>\r\nTo: <%s>\r\nSubject: %s\r\n"
            b"Message-ID: <%d@sender.test>\r\n\r\n%s\r\n"
            % (to.encode(), subject.encode(), time.time_ns(), body))


def send(server, raw, recipients=("b@example.test",)):
    """The reply to the end of DATA, (code, text), of one transaction to server."""
    with smtplib.SMTP("127.0.0.1", server.port, timeout=60) as smtp:
        smtp.ehlo("client.test")
        assert smtp.mail("a@sender.test")[0] == 250
        for rcpt in recipients:
            assert smtp.rcpt(rcpt)[0] == 250
        code, text = smtp.data(raw)
        return code, text.decode()


def queue_id_of(reply):
    """The queue id a 250 reply names; fails the test on any other reply."""
    assert reply[0] == 250, reply
    return reply[1].rsplit(" ", 1)[1]
