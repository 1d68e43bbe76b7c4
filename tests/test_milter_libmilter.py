"""Every milter action against libmilter, the reference C library (Debian's python3-milter
wraps it): a milter of our own on it (tests/peers/libmilter_milter.py) does what each
message's X-Test-Action header fields ask, so the packets Elemta decodes are the ones
libmilter encodes (tests/test_milter.py uses a scripted milter whose codec the test
suite wrote). What is checked is what a user sees: the SMTP replies, the queued
envelope and content, the held state, the log.
"""

import os
import smtplib

import pytest

from tests.harness import free_port
from tests.peers.milters import LibMilter, libmilter_available
from tests.test_milter import milter_server, queue_id_of, send


@pytest.fixture(scope="module")
def libmilter(tmp_path_factory):
    why = libmilter_available()
    if why:
        if os.geteuid() == 0:       # the Makefile installs APT_PACKAGES as root
            pytest.fail(why + " (python3-milter is in APT_PACKAGES)")
        pytest.skip(why)
    with LibMilter(tmp_path_factory.mktemp("libmilter"), free_port()) as milter:
        yield milter


def message(*actions, subject="hello"):
    fields = b"".join(b"X-Test-Action: %s\r\n" % a.encode() for a in actions)
    return (b"From: <a@sender.test>\r\nTo: <b@example.test>\r\nSubject: %s\r\n"
            b"X-Old: one\r\nX-Old: two\r\n%s\r\nThe body.\r\n" % (subject.encode(), fields))


@pytest.fixture
def server(elemta_server, libmilter):
    return milter_server(elemta_server, {"socket": libmilter.address, "name": "libmilter"},
                         content_timeout=2)


def header_lines(content):
    return content.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


def test_header_edits(server):
    queue_id = queue_id_of(send(server, message("headers")))
    lines = header_lines(server.message(queue_id)[1])
    # Inserted at index 0: above our Received header, which libmilter saw first.
    assert lines[0] == b"X-Inserted: at the top"
    assert lines[1].startswith(b"Received: from client.test")
    ours = lines.index(b"From: <a@sender.test>")
    assert lines[ours:] == [b"From: <a@sender.test>", b"To: <b@example.test>",
                            b"Subject: changed by libmilter", b"X-Old: two",
                            b"X-Test-Action: headers", b"X-Added: by libmilter"]
    assert ("%s: milter libmilter: EOM from unknown[127.0.0.1]: continue; add header "
            "X-Added, insert header X-Inserted, change header Subject, delete header X-Old"
            % queue_id) in server.log()


def test_body_replacement_with_bare_lf_is_queued_crlf(server):
    queue_id = queue_id_of(send(server, message("body")))
    assert server.message(queue_id)[1].split(b"\r\n\r\n", 1)[1] == (
        b"A body from libmilter\r\nin two chunks\r\n")


def test_recipients_added_deleted_and_added_with_esmtp_parameters(server):
    replies = send(server, message("add-rcpt", "add-rcpt-par", "del-rcpt"),
                   recipients=("b@example.test", "c@example.test"))
    queue_id = queue_id_of(replies)
    envelope = server.message(queue_id)[0]
    assert [r.address for r in envelope.recipients] == [
        "c@example.test", "added@elsewhere.test", "par@elsewhere.test"]
    # The ESMTP parameters of an added recipient are ignored, as Postfix's cleanup
    # ignores them, and the log says so.
    assert envelope.recipients[2].notify is None
    assert ('%s: milter libmilter: ignoring ESMTP parameters "NOTIFY=NEVER" of add rcpt '
            '<par@elsewhere.test>' % queue_id) in server.log()


def test_sender_change(server):
    envelope = server.message(queue_id_of(send(server, message("chgfrom"))))[0]
    assert envelope.sender == "bounces@sender.test"


def test_sender_change_with_esmtp_parameters_takes_the_address_only(server):
    with smtplib.SMTP("127.0.0.1", server.port, timeout=60) as smtp:
        smtp.ehlo("client.test")
        smtp.mail("a@sender.test", ["RET=FULL"])
        smtp.rcpt("b@example.test")
        code, text = smtp.data(message("chgfrom-par"))
    assert code == 250, text
    queue_id = text.decode().rsplit(" ", 1)[1]
    envelope = server.message(queue_id)[0]
    assert (envelope.sender, envelope.ret) == ("bounces@sender.test", "FULL")
    assert ('%s: milter libmilter: ignoring ESMTP parameters "RET=HDRS" of change sender '
            '<bounces@sender.test>' % queue_id) in server.log()


def test_discard_at_end_of_message_queues_nothing(server):
    replies = send(server, message("discard", "headers"))
    assert replies[-1][0] == 250
    assert server.queued_ids() == []
    assert "discard: END-OF-MESSAGE from unknown[127.0.0.1]: discarded by milter " \
        "libmilter" in server.log()


def test_accept_skips_the_rest_of_that_milter(server, libmilter):
    """SMFIS_ACCEPT: the message is queued as it came and that milter sees no more of
    it: accepted at a header field, it is not asked at the end of message (libmilter
    records {i} there), so the edits asked for below that field never happen."""
    queue_id = queue_id_of(send(server, message("accept-early", "headers")))
    lines = header_lines(server.message(queue_id)[1])
    assert b"X-Added: by libmilter" not in lines and b"Subject: hello" in lines
    assert "macro i=%s" % queue_id not in libmilter.told()
    queue_id = queue_id_of(send(server, message("accept", "headers")))
    assert b"X-Added: by libmilter" not in header_lines(server.message(queue_id)[1])
    assert "macro i=%s" % queue_id in libmilter.told()


def test_quarantine_holds_it_with_the_reason(server):
    queue_id = queue_id_of(send(server, message("quarantine")))
    with server.queue() as queue:
        assert queue.get(queue_id).state == "hold"
    assert "%s: hold: END-OF-MESSAGE from unknown[127.0.0.1]: held by libmilter (milter " \
        "libmilter)" % queue_id in server.log()


def test_progress_keeps_it_past_content_timeout(server):
    # 3 s of work against content_timeout 2 s, a PROGRESS every 0.3 s.
    queue_id = queue_id_of(send(server, message("progress", "headers")))
    assert b"X-Added: by libmilter" in header_lines(server.message(queue_id)[1])
    assert "failed at" not in server.log()


@pytest.mark.parametrize("action, expected", [
    ("reject", (550, "5.7.1 Rejected by libmilter")),
    ("tempfail", (451, "4.7.0 Try again, said libmilter")),
    # Without a reply of the milter's own: Postfix's defaults.
    ("reject-plain", (550, "5.7.1 Command rejected")),
    ("tempfail-plain", (451, "4.7.1 Service unavailable - try again later")),
])
def test_custom_reply_codes_at_end_of_message(server, action, expected):
    replies = send(server, message(action))
    assert replies[-1] == expected
    assert server.queued_ids() == []


def test_custom_reply_codes_at_rcpt_and_helo(server, libmilter):
    replies = send(server, message(), recipients=("refused@example.test",
                                                  "b@example.test"))
    assert replies[1] == (550, "5.1.1 No such user here, says libmilter")
    queue_id = queue_id_of(replies)
    assert [r.address for r in server.message(queue_id)[0].recipients] == [
        "b@example.test"]
    assert "macro i=%s" % queue_id in libmilter.told()
    with smtplib.SMTP("127.0.0.1", server.port, timeout=60) as smtp:
        code, text = smtp.ehlo("refused.test")
    assert (code, text.decode()) == (554, "5.7.1 HELO refused by libmilter")


def test_every_action_in_one_message(server):
    actions = ("headers", "body", "add-rcpt", "del-rcpt", "chgfrom", "quarantine")
    queue_id = queue_id_of(send(server, message(*actions),
                                recipients=("b@example.test", "c@example.test")))
    envelope, content = server.message(queue_id)
    assert envelope.sender == "bounces@sender.test"
    assert [r.address for r in envelope.recipients] == ["c@example.test",
                                                        "added@elsewhere.test"]
    assert content.split(b"\r\n\r\n", 1)[1] == b"A body from libmilter\r\nin two chunks\r\n"
    assert b"Subject: changed by libmilter" in header_lines(content)
    with server.queue() as queue:
        assert queue.get(queue_id).state == "hold"
