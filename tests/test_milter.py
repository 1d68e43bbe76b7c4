"""The milter client against a scripted milter (tests/peers/milter.py), as an SMTP client,
the queue and the admin see it.

Elemta runs as a subprocess (tests/conftest.py elemta_server) with `milters:` pointing at
a scripted milter on loopback: a real socket server speaking the protocol, told what to
answer to each command. What is checked is what a user sees (the SMTP replies, the queued
message and envelope, the log line naming the milter) and what the milter was sent (the
stages in order, the macros). The real milters (opendkim, clamav-milter, Rspamd's proxy)
are in tests/test_milter_peers.py, every action against libmilter in
tests/test_milter_libmilter.py, the rarer stages and failures in
tests/test_milter_stages.py.
"""

import re
import smtplib
import socket
import struct
import time

import pytest

from tests.harness import free_port, wait_for
from tests.peers.milter import ScriptedMilter, reply, strings

MESSAGE = (b"From: <a@sender.test>\r\nTo: <b@example.test>\r\nSubject: hello\r\n"
           b"X-Old: one\r\nX-Old: two\r\n\r\nThe body.\r\n")


def milter_server(elemta_server, *milters, **defaults):
    """Elemta with the given milter entries (ScriptedMilter or dict) in that order."""
    entries = []
    for number, milter in enumerate(milters):
        entry = milter if isinstance(milter, dict) else {"socket": milter.address}
        entry.setdefault("name", "m%d" % number)
        entries.append(entry)
    sections = {"milters": entries}
    if defaults:
        sections["milter"] = defaults
    return elemta_server(**sections)


def send(server, raw=MESSAGE, recipients=("b@example.test",), sender="a@sender.test"):
    """Replies as (code, text): MAIL, each RCPT, and the end of data (None when every
    recipient or MAIL was refused)."""
    with smtplib.SMTP("127.0.0.1", server.port, timeout=60) as smtp:
        smtp.ehlo("client.test")
        replies = [smtp.mail(sender)]
        if replies[0][0] == 250:
            for rcpt in recipients:
                replies.append(smtp.rcpt(rcpt))
            if any(code == 250 for code, _ in replies[1:]):
                try:
                    replies.append(smtp.data(raw))
                except smtplib.SMTPDataError as error:
                    replies.append((error.smtp_code, error.smtp_error))
        return [(code, text.decode()) for code, text in replies]


def queue_id_of(replies):
    code, text = replies[-1]
    assert code == 250, replies
    return text.rsplit(" ", 1)[1]


@pytest.fixture
def port():
    return free_port()


def test_every_stage_in_order_with_postfix_macros_and_quit(elemta_server, port):
    with ScriptedMilter(port) as milter:
        server = milter_server(elemta_server, milter)
        queue_id = queue_id_of(send(server))
        assert wait_for(lambda: milter.sequence().endswith(b"Q"))
    # connect, helo, mail, rcpt, data, our Received and 5 headers, eoh, body, eom, quit
    assert milter.sequence() == b"CHMRTLLLLLLNBEQ"
    connect = milter.commands(b"C")[0]
    assert connect.startswith(b"[127.0.0.1]\x004") and connect.endswith(b"127.0.0.1\x00")
    assert milter.commands(b"H") == [b"client.test\x00"]
    assert milter.commands(b"M")[0].startswith(b"<a@sender.test>\x00")
    assert milter.commands(b"R") == [b"<b@example.test>\x00"]
    # Our Received header first, as Postfix shows its own; then the message's.
    received = milter.commands(b"L")[0]
    assert received.startswith(b"Received\x00from client.test (unknown [127.0.0.1])\n\t")
    assert b"with ESMTP id %s" % queue_id.encode() in received
    assert milter.commands(b"L")[1] == b"From\x00<a@sender.test>\x00"
    assert milter.commands(b"B") == [b"The body.\r\n"]
    # Postfix's default macros: the queue id ({i}) from MAIL on.
    assert milter.macros[b"C"]["j"] == "mx.test"
    assert milter.macros[b"C"]["{daemon_name}"] == "mx.test"
    assert milter.macros[b"C"]["_"] == "unknown [127.0.0.1]"
    assert milter.macros[b"C"]["v"].startswith("Elemta ")
    assert milter.macros[b"M"]["i"] == queue_id
    assert milter.macros[b"M"]["{mail_addr}"] == "a@sender.test"
    assert milter.macros[b"R"]["{rcpt_addr}"] == "b@example.test"
    assert milter.macros[b"R"]["{rcpt_mailer}"] == "local"
    assert milter.macros[b"E"] == {"i": queue_id}
    assert server.message(queue_id)[1].endswith(MESSAGE)
    log = server.log()
    assert "%s: milter m0: EOM from unknown[127.0.0.1]: continue" % queue_id in log


def test_a_milter_asks_for_its_own_macros(elemta_server, port):
    # SMFIM_CONNECT (0): {client_addr} {client_port}; the configured ones are not sent.
    symlists = struct.pack("!I", 0) + b"{client_addr} {client_port}\x00"
    with ScriptedMilter(port, symlists=symlists) as milter:
        server = milter_server(elemta_server, milter)
        queue_id_of(send(server))
    assert set(milter.macros[b"C"]) == {"{client_addr}", "{client_port}"}
    assert milter.macros[b"C"]["{client_addr}"] == "127.0.0.1"


def test_reply_code_at_rcpt_refuses_that_recipient_only(elemta_server, port):
    script = {b"R": [reply(b"y", b"550 5.7.1 Nobody by that name\x00"), reply(b"c")]}
    with ScriptedMilter(port, script) as milter:
        server = milter_server(elemta_server, milter)
        replies = send(server, recipients=("x@example.test", "b@example.test"))
    assert replies[1] == (550, "5.7.1 Nobody by that name")
    assert replies[2][0] == 250
    queue_id = queue_id_of(replies)
    assert [r.address for r in server.message(queue_id)[0].recipients] == [
        "b@example.test"]
    assert ("NOQUEUE: reject: RCPT from unknown[127.0.0.1]: 550 5.7.1 Nobody by that "
            "name; from=<a@sender.test> to=<x@example.test>") in server.log()
    assert "(milter m0)" in server.log()


@pytest.mark.parametrize("answer, expected", [
    (b"t", (451, "4.7.1 Service unavailable - try again later")),
    (b"r", (550, "5.7.1 Command rejected")),
])
def test_tempfail_and_reject_at_mail(elemta_server, port, answer, expected):
    with ScriptedMilter(port, {b"M": [reply(answer)]}) as milter:
        server = milter_server(elemta_server, milter)
        replies = send(server)
        assert wait_for(lambda: b"Q" in milter.sequence())
    assert replies == [expected]
    assert server.queued_ids() == []
    assert "milter m0: MAIL from unknown[127.0.0.1]: %s" % (
        "tempfail" if answer == b"t" else "reject") in server.log()


def test_reject_at_connect_refuses_the_session(elemta_server, port):
    # The harness's probe for the greeting is let in; the next client is not.
    with ScriptedMilter(port, {b"C": [reply(b"c"), reply(b"r")]}) as milter:
        server = milter_server(elemta_server, milter)
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            greeting = sock.recv(512)
    assert greeting.startswith(b"554 5.7.1 mx.test Command rejected"), greeting
    assert "NOQUEUE: reject: CONNECT from unknown[127.0.0.1]: 554 5.7.1" in server.log()


def test_end_of_message_modifications_are_applied(elemta_server, port):
    edits = [(b"p", b""),                                      # progress
             (b"h", strings("X-Added", "by milter")),
             (b"i", struct.pack("!I", 0) + strings("X-First", "on top")),
             (b"m", struct.pack("!I", 2) + strings("X-Old", "changed")),
             (b"m", struct.pack("!I", 1) + strings("X-Old", "")),       # delete
             (b"m", struct.pack("!I", 1) + strings("Subject", "new subject")),
             (b"b", b"A new body\r\n"), (b"b", b"in two chunks\r\n"),
             (b"+", b"<added@elsewhere.test>\x00"),
             (b"-", b"<b@example.test>\x00"),
             (b"e", b"<bounces@sender.test>\x00"),
             (b"c", b"")]
    with ScriptedMilter(port, {b"E": [edits]}) as milter:
        server = milter_server(elemta_server, milter)
        queue_id = queue_id_of(send(server, recipients=("b@example.test",
                                                       "c@example.test")))
    envelope, content = server.message(queue_id)
    assert [r.address for r in envelope.recipients] == ["c@example.test",
                                                        "added@elsewhere.test"]
    assert envelope.sender == "bounces@sender.test"
    headers, _, body = content.partition(b"\r\n\r\n")
    assert body == b"A new body\r\nin two chunks\r\n"
    # Index 0 is the top: above our Received header, which the milter saw first.
    assert headers.startswith(b"X-First: on top\r\nReceived: from client.test ")
    lines = headers.split(b"\r\n")
    ours = lines.index(next(line for line in lines if line.startswith(b"From:")))
    assert lines[ours:] == [b"From: <a@sender.test>",
                            b"To: <b@example.test>", b"Subject: new subject",
                            b"X-Old: changed", b"X-Added: by milter"]
    log = server.log()
    assert ("%s: milter m0: EOM from unknown[127.0.0.1]: continue; add header X-Added, "
            "insert header X-First, change header X-Old, delete header X-Old, change "
            "header Subject, replace body, add rcpt <added@elsewhere.test>, delete rcpt "
            "<b@example.test>, change sender <bounces@sender.test>" % queue_id) in log


def test_an_unsafe_header_from_a_milter_is_refused_and_logged(elemta_server, port):
    edits = [(b"h", strings("X-Evil", "a\r\n\r\nInjected body")),
             (b"h", strings("Bad Name", "x")), (b"a", b"")]
    with ScriptedMilter(port, {b"E": [edits]}) as milter:
        server = milter_server(elemta_server, milter)
        queue_id = queue_id_of(send(server))
    assert server.message(queue_id)[1].endswith(MESSAGE)
    log = server.log()
    assert "%s: milter m0: header edit refused: header X-Evil has a line break" % (
        queue_id) in log
    assert "header name 'Bad Name' is not a field name" in log


def test_deleting_every_recipient_refuses_the_message(elemta_server, port):
    with ScriptedMilter(port, {b"E": [[(b"-", b"<b@example.test>\x00"), (b"c", b"")]]}) \
            as milter:
        server = milter_server(elemta_server, milter)
        replies = send(server)
    assert replies[-1] == (550, "5.7.1 Error: no recipients left after content filtering")
    assert server.queued_ids() == []


def test_discard_at_end_of_message_says_250_and_drops_it_logged(elemta_server, port):
    with ScriptedMilter(port, {b"E": [reply(b"d")]}) as milter:
        server = milter_server(elemta_server, milter)
        queue_id = queue_id_of(send(server))
    assert server.queued_ids() == []
    log = server.log()
    assert "%s: milter m0: EOM from unknown[127.0.0.1]: discard" % queue_id in log
    assert "%s: discard: END-OF-MESSAGE from unknown[127.0.0.1]: discarded by milter m0" \
        % queue_id in log


def test_quarantine_holds_the_message_with_the_reason(elemta_server, port):
    with ScriptedMilter(port, {b"E": [[(b"q", b"looks odd\x00"), (b"c", b"")]]}) as milter:
        server = milter_server(elemta_server, milter)
        queue_id = queue_id_of(send(server))
    with server.queue() as queue:
        assert queue.get(queue_id).state == "hold"
    assert "%s: hold: END-OF-MESSAGE from unknown[127.0.0.1]: looks odd (milter m0)" % (
        queue_id) in server.log()


def test_discard_at_rcpt_discards_the_message(elemta_server, port):
    with ScriptedMilter(port, {b"R": [reply(b"d")]}) as milter:
        server = milter_server(elemta_server, milter)
        queue_id = queue_id_of(send(server))
    assert server.queued_ids() == []
    assert "%s: discard: END-OF-MESSAGE" % queue_id in server.log()


def test_rset_aborts_the_milter_transaction(elemta_server, port):
    with ScriptedMilter(port) as milter:
        server = milter_server(elemta_server, milter)
        with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as smtp:
            smtp.ehlo("client.test")
            assert smtp.mail("a@sender.test")[0] == 250
            assert smtp.rcpt("b@example.test")[0] == 250
            smtp.rset()
            assert smtp.mail("a@sender.test")[0] == 250
            assert smtp.rcpt("b@example.test")[0] == 250
            assert smtp.data(MESSAGE)[0] == 250
        assert wait_for(lambda: milter.sequence().endswith(b"Q"))
    assert milter.sequence().startswith(b"CHMRAMRT")


def test_accept_at_mail_skips_the_milter_for_that_message(elemta_server, port):
    with ScriptedMilter(port, {b"M": [reply(b"a")]}) as milter:
        server = milter_server(elemta_server, milter)
        queue_id_of(send(server))
        assert wait_for(lambda: milter.sequence().endswith(b"Q"))
    assert milter.sequence() == b"CHMQ"


def test_the_first_milter_that_refuses_decides_and_later_ones_see_earlier_edits(
        elemta_server, port):
    second_port = free_port()
    first = ScriptedMilter(port, {b"E": [[(b"h", strings("X-First", "1")), (b"c", b"")]]})
    second = ScriptedMilter(second_port)
    with first, second:
        server = milter_server(elemta_server, first, second)
        queue_id_of(send(server))
        assert wait_for(lambda: second.sequence().endswith(b"Q"))
    assert b"X-First\x001\x00" in second.commands(b"L")


def test_a_milter_timeout_applies_default_action_tempfail(elemta_server, port):
    with ScriptedMilter(port, {b"M": [[3, (b"c", b"")]]}) as milter:
        server = milter_server(elemta_server, milter, command_timeout=1)
        replies = send(server)
    assert replies == [(451, "4.3.0 Temporary local problem, please try again later")]
    # The queue id is known from MAIL on (the milters' {i}), as in Postfix.
    assert re.search(r"\]: warning: [0-9A-Z]+: milter m0 \(%s\) failed at mail: timed out "
                     r"after 1s waiting for a reply; default_action tempfail: 451 4\.3\.0"
                     % re.escape(milter.address), server.log())


def test_progress_keeps_a_slow_milter_within_its_timeout(elemta_server, port):
    slow = [0.6, (b"p", b""), 0.6, (b"p", b""), 0.6, (b"c", b"")]
    with ScriptedMilter(port, {b"E": [slow]}) as milter:
        server = milter_server(elemta_server, milter, content_timeout=1)
        queue_id_of(send(server))


def test_a_milter_that_is_down(elemta_server, port):
    # Nothing listens on port: tempfail by default, at MAIL (the greeting still comes).
    server = milter_server(elemta_server, {"socket": "inet:127.0.0.1:%d" % port,
                                           "name": "gone"})
    assert send(server) == [(451, "4.3.0 Temporary local problem, please try again later")]
    assert "milter gone (inet:127.0.0.1:%d) failed at connect: cannot connect" % port \
        in server.log()
    assert "milter gone: MAIL from unknown[127.0.0.1]: unavailable: 451 4.3.0" in \
        server.log()


def test_a_milter_that_is_down_with_default_action_accept_per_milter(elemta_server, port):
    server = milter_server(elemta_server, {"socket": "inet:127.0.0.1:%d" % port,
                                           "name": "gone", "default_action": "accept"})
    queue_id_of(send(server))
    assert "failed at connect: cannot connect" in server.log()


def test_a_unix_socket_milter(elemta_server, tmp_path):
    path = str(tmp_path / "milter.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    # A milter that answers option negotiation and then rejects the message.
    import threading

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:             # the test is over and closed the listener
                return
            threading.Thread(target=talk, args=(conn,), daemon=True).start()

    def talk(conn):
        with conn:
            conn.recv(17)                                       # OPTNEG
            conn.sendall(struct.pack("!IcIII", 13, b"O", 6, 0x1FF, 0))
            while True:
                header = conn.recv(5)
                if len(header) < 5:
                    return
                (length,) = struct.unpack("!I", header[:4])
                rest = b""
                while len(rest) < length - 1:
                    rest += conn.recv(length - 1 - len(rest))
                if header[4:5] == b"E":
                    text = b"554 5.7.1 Unix says no\x00"
                    conn.sendall(struct.pack("!I", len(text) + 1) + b"y" + text)
                elif header[4:5] not in (b"D", b"A", b"Q"):
                    conn.sendall(struct.pack("!Ic", 1, b"c"))
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    server = milter_server(elemta_server, {"socket": "unix:" + path})
    assert send(server)[-1] == (554, "5.7.1 Unix says no")
    listener.close()


def test_verdicts_and_failures_reach_prometheus(elemta_server, tmp_path, monkeypatch, port):
    from tests.test_metrics import settled, start_server, value
    with ScriptedMilter(port, {b"R": [reply(b"r"), reply(b"c")]}) as milter:
        server, api_port = start_server(
            elemta_server, tmp_path, monkeypatch,
            milters=[{"socket": milter.address, "name": "scripted"},
                     {"socket": "inet:127.0.0.1:%d" % free_port(), "name": "gone",
                      "default_action": "accept"}])
        send(server, recipients=("x@example.test", "b@example.test"))
        time.sleep(0.5)

    def counted(samples):
        assert value(samples, "elemta_milter_verdicts_total", milter="scripted",
                     stage="rcpt", action="reject") == 1
        assert value(samples, "elemta_milter_verdicts_total", milter="scripted",
                     stage="eom", action="continue") == 1
        # Once per session: the harness's probe for the greeting, and ours. Nothing
        # listens: kind connect.
        assert value(samples, "elemta_milter_failures_total", milter="gone",
                     stage="connect", kind="connect") >= 1
        # The scripted milter answered the content: its time is observed, once.
        assert value(samples, "elemta_milter_scan_seconds_count", milter="scripted") == 1
    settled(api_port, counted)


HANG_UP = "hang up"


class BrokenMilter:
    """A real listening socket that accepts and reads the MTA's option negotiation, then
    does `answer`: None, never answers (a milter that hangs); HANG_UP, closes the
    connection; bytes, sends them (a packet the protocol does not allow)."""

    def __init__(self, answer=None):
        import threading
        self.answer = answer
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.address = "inet:127.0.0.1:%d" % self.listener.getsockname()[1]
        self.received = []          # bytes read, per connection
        self.connections = []
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def _serve(self):
        import threading
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(conn)
            self.received.append(bytearray())
            threading.Thread(target=self._talk, args=(conn, self.received[-1]),
                             daemon=True).start()

    def _talk(self, conn, received):
        try:
            while len(received) < 5 or len(received) < 4 + struct.unpack(
                    "!I", bytes(received[:4]))[0]:
                data = conn.recv(4096)
                if not data:
                    return
                received += data
            if self.answer == HANG_UP:
                conn.close()
                return
            if self.answer is not None:
                conn.sendall(self.answer)
            while conn.recv(4096):
                pass
        except OSError:
            return

    def __exit__(self, *exc):
        self.listener.close()
        for conn in self.connections:
            conn.close()


@pytest.mark.parametrize("default_action", ["tempfail", "accept"])
def test_a_milter_that_never_answers_counts_a_timeout_and_applies_its_default(
        elemta_server, tmp_path, monkeypatch, default_action):
    from tests.test_metrics import scrape, settled, start_server, value
    with BrokenMilter() as milter:
        server, api_port = start_server(
            elemta_server, tmp_path, monkeypatch,
            milters=[{"socket": milter.address, "name": "silent",
                      "default_action": default_action}],
            milter={"connect_timeout": 1})
        before, _ = scrape(api_port)
        replies = send(server)
        # It was asked: the option negotiation reached it (command byte O).
        assert any(data[4:5] == b"O" for data in milter.received), milter.received
    if default_action == "tempfail":
        assert replies == [(451, "4.3.0 Temporary local problem, please try again later")]
        assert server.queued_ids() == []
    else:
        queue_id = queue_id_of(replies)
        assert server.queued_ids() == [queue_id]
    assert re.search(r"milter silent \(%s\) failed at connect: timed out after 1s waiting "
                     r"for option negotiation; default_action %s"
                     % (re.escape(milter.address), default_action), server.log())
    counted = lambda s, kind: value(s, "elemta_milter_failures_total", milter="silent",
                                    stage="connect", kind=kind)

    def failed(samples):
        assert counted(samples, "timeout") - counted(before, "timeout") == 1
        assert counted(samples, "connect") == counted(samples, "protocol") == 0
        assert value(samples, "elemta_milter_scan_seconds_count", milter="silent") == 0
    settled(api_port, failed)


@pytest.mark.parametrize("answer, kind, why", [
    (HANG_UP, "io", "closed the connection while we waited for option negotiation"),
    (struct.pack("!I", 0) + b"O", "protocol", "sent a packet of 0 bytes"),
    (struct.pack("!Ic", 1, b"c"), "protocol", "answered option negotiation with b'c'")])
def test_a_milter_that_breaks_the_conversation_counts_its_kind(
        elemta_server, tmp_path, monkeypatch, answer, kind, why):
    from tests.test_metrics import labelled, scrape, settled, start_server
    with BrokenMilter(answer) as milter:
        server, api_port = start_server(
            elemta_server, tmp_path, monkeypatch,
            milters=[{"socket": milter.address, "name": "broken"}])
        before = labelled(scrape(api_port)[0], "elemta_milter_failures_total")
        assert send(server) == [(451, "4.3.0 Temporary local problem, please try again "
                                      "later")]
    assert "milter broken (%s) failed at connect: %s; default_action tempfail" % (
        milter.address, why) in server.log()
    def failed(samples):
        after = labelled(samples, "elemta_milter_failures_total")
        # (kind, milter, stage): one more of this kind, none of another
        assert {k: n - before.get(k, 0) for k, n in after.items()} == {
            (kind, "broken", "connect"): 1}
    settled(api_port, failed)


# ---- mail from sendmail (pickup): Postfix's non_smtpd_milters ---------------------------

def test_sendmail_mail_passes_the_non_smtp_milters_as_localhost(elemta_server, port):
    from tests.test_sendmail import queued, sendmail
    edits = [(b"h", strings("X-Local-Milter", "seen")), (b"c", b"")]
    with ScriptedMilter(port, {b"E": [edits]}) as milter:
        server = milter_server(elemta_server, {"socket": milter.address, "name": "local",
                                               "smtp": False, "non_smtp": True})
        # Not an smtp milter: the SMTP client's mail does not reach it.
        smtp_id = queue_id_of(send(server))
        assert milter.commands(b"M") == []
        status, _, err = sendmail(server, "root", stdin=b"Subject: cron\n\ndisk full\n")
        assert status == 0, err
        messages = queued(server, 2)
        assert wait_for(lambda: milter.sequence().endswith(b"Q"))
    [(envelope, content)] = [m for m in messages if m[0].queue_id != smtp_id]
    assert b"\r\nX-Local-Milter: seen\r\n" in content.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    assert milter.sequence().startswith(b"CHMRT")
    assert milter.commands(b"C")[-1] == b"localhost\x004\x00\x00127.0.0.1\x00"
    assert milter.commands(b"H")[-1] == b"localhost\x00"
    assert milter.macros[b"M"]["i"] == envelope.queue_id
    # Our Received header first, as Postfix's non_smtpd_milters see Postfix's.
    first = milter.commands(b"L")[0]
    assert first.startswith(b"Received\x00from userid 0\n\tby mx.test (Elemta)")
    assert b"id %s" % envelope.queue_id.encode() in first
    assert content.startswith(b"Received: from userid 0\r\n\tby mx.test (Elemta)")
    assert "%s: milter local: EOM from local: continue; add header X-Local-Milter" % (
        envelope.queue_id) in server.log()


def test_sendmail_mail_a_milter_rejects_is_held_for_the_admin(elemta_server, port):
    from tests.test_sendmail import queued, sendmail
    with ScriptedMilter(port, {b"E": [reply(b"y", b"550 5.7.1 Not from cron\x00")]}) \
            as milter:
        server = milter_server(elemta_server, {"socket": milter.address, "name": "local",
                                               "non_smtp": True})
        assert sendmail(server, "root", stdin=b"Subject: cron\n\nhello\n")[0] == 0
        [(envelope, _)] = queued(server, 1)
    with server.queue() as queue:
        assert queue.get(envelope.queue_id).state == "hold"
    # pickup logs the hold once the message is queued: wait for the line.
    assert wait_for(lambda: "%s: hold: 550 5.7.1 Not from cron (milter local); held for "
                    "the admin" % envelope.queue_id in server.log())


# ---- the stages Postfix shows that a plain transaction does not -------------------------

SMFIP_NOUNKNOWN, SMFIP_NODATA = 0x100, 0x200


@pytest.mark.parametrize("steps, answer, expected", [
    (0, reply(b"y", b"554 5.7.1 Go away\x00"), (554, b"5.7.1 Go away")),
    (0, reply(b"t"), (451, b"4.7.1 Service unavailable - try again later")),
    (0, reply(b"c"), (500, b"5.5.1 Error: command not recognized")),
    (0, reply(b"a"), (500, b"5.5.1 Error: command not recognized")),
    (SMFIP_NOUNKNOWN, reply(b"r"), (500, b"5.5.1 Error: command not recognized")),
])
def test_an_unknown_command_goes_to_the_milters_that_want_it(elemta_server, port, steps,
                                                             answer, expected):
    with ScriptedMilter(port, {b"U": [answer]}, steps=steps) as milter:
        server = milter_server(elemta_server, milter)
        with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as smtp:
            smtp.ehlo("client.test")
            assert smtp.docmd("XFROB", "the widget") == expected
            # Refused, never obeyed: the session goes on as before.
            assert smtp.mail("a@sender.test")[0] == 250
        assert wait_for(lambda: milter.sequence().endswith(b"Q"))
    if steps & SMFIP_NOUNKNOWN:
        assert milter.commands(b"U") == []
    else:
        assert milter.commands(b"U") == [b"XFROB the widget\x00"]
    refused = "NOQUEUE: reject: UNKNOWN from unknown[127.0.0.1]: %d %s" % (
        expected[0], expected[1].decode())
    assert (refused in server.log()) == (expected[0] != 500)


def test_the_data_command_goes_to_the_milter_and_its_refusal_is_given(elemta_server,
                                                                      port):
    script = {b"T": [reply(b"y", b"550 5.7.1 Not today\x00")]}
    with ScriptedMilter(port, script) as milter:
        server = milter_server(elemta_server, milter)
        assert send(server)[-1] == (550, "5.7.1 Not today")
    assert milter.commands(b"T") == [b""]
    assert server.queued_ids() == []
    assert "milter m0: DATA from unknown[127.0.0.1]: reject: 550 5.7.1 Not today" in \
        server.log()


def test_a_milter_that_skips_data_is_not_sent_it(elemta_server, port):
    with ScriptedMilter(port, steps=SMFIP_NODATA) as milter:
        server = milter_server(elemta_server, milter)
        queue_id = queue_id_of(send(server))
        assert wait_for(lambda: milter.sequence().endswith(b"Q"))
    assert milter.sequence() == b"CHMRLLLLLLNBEQ"
    # Its macros still come, as Postfix sends them: libmilter keeps them for later.
    assert milter.macros[b"T"] == {"i": queue_id}


def test_a_long_body_goes_in_chunks_of_at_most_65535_bytes(elemta_server, port):
    # A line far longer than a chunk, then many short ones: cut by size, not by line.
    body = b"x" * 150000 + b"\r\n" + b"".join(b"line %06d\r\n" % n for n in range(20000))
    raw = b"From: <a@sender.test>\r\nSubject: long\r\n\r\n" + body
    with ScriptedMilter(port) as milter:
        server = milter_server(elemta_server, milter)
        queue_id = queue_id_of(send(server, raw=raw))
        assert wait_for(lambda: milter.sequence().endswith(b"Q"))
    chunks = milter.commands(b"B")
    assert [len(chunk) for chunk in chunks] == [65535] * (len(body) // 65535) + [
        len(body) % 65535]
    assert b"".join(chunks) == body
    assert server.message(queue_id)[1].endswith(body)


# ---- recipients a milter adds and deletes: the address handling RCPT TO gets -----------

ADDRESSING = {"virtual": {"alias_domains": ["alias.test"],
                          "alias_maps": {"team@alias.test": "x@example.test, y@remote.test",
                                         "sales@alias.test": "s1@example.test, "
                                                             "c@example.test"}},
              "rewrite": {"canonical_maps": {"old@example.test": "new@example.test"}}}


def test_recipients_a_milter_adds_are_rewritten_and_alias_expanded(elemta_server, port):
    edits = [(b"+", b"<team@alias.test>\x00"),
             (b"2", b"<old@example.test>\x00NOTIFY=NEVER\x00"),      # ADDRCPT_PAR
             (b"+", b"<b@example.test>\x00"),                        # there already
             (b"c", b"")]
    with ScriptedMilter(port, {b"E": [edits]}) as milter:
        server = elemta_server(milters=[{"socket": milter.address, "name": "m0"}],
                               **ADDRESSING)
        queue_id = queue_id_of(send(server))
    envelope = server.message(queue_id)[0]
    assert [(r.address, r.orcpt) for r in envelope.recipients] == [
        ("b@example.test", None),
        ("x@example.test", "rfc822;team@alias.test"),
        ("y@remote.test", "rfc822;team@alias.test"),
        ("new@example.test", "rfc822;old@example.test")]


def test_a_milter_deletes_exactly_the_recipient_it_names(elemta_server, port):
    # sales@alias.test brought s1 and c; c was also a recipient of its own, and d named
    # sales@alias.test as its DSN original recipient: only s1 goes.
    edits = [(b"-", b"<sales@alias.test>\x00"), (b"c", b"")]
    with ScriptedMilter(port, {b"E": [edits]}) as milter:
        server = elemta_server(milters=[{"socket": milter.address, "name": "m0"}],
                               **ADDRESSING)
        with smtplib.SMTP("127.0.0.1", server.port, timeout=60) as smtp:
            smtp.ehlo("client.test")
            assert smtp.mail("a@sender.test")[0] == 250
            assert smtp.rcpt("sales@alias.test")[0] == 250
            assert smtp.rcpt("c@example.test")[0] == 250
            assert smtp.rcpt("d@example.test", ["ORCPT=rfc822;sales@alias.test"])[0] == 250
            code, text = smtp.data(MESSAGE)
    assert code == 250, text
    envelope = server.message(text.decode().rsplit(" ", 1)[1])[0]
    assert [r.address for r in envelope.recipients] == ["c@example.test", "d@example.test"]


def test_a_recipient_added_then_deleted_is_not_queued(elemta_server, port):
    edits = [(b"+", b"<team@alias.test>\x00"), (b"-", b"<team@alias.test>\x00"),
             (b"c", b"")]
    with ScriptedMilter(port, {b"E": [edits]}) as milter:
        server = elemta_server(milters=[{"socket": milter.address, "name": "m0"}],
                               **ADDRESSING)
        queue_id = queue_id_of(send(server))
    assert [r.address for r in server.message(queue_id)[0].recipients] == [
        "b@example.test"]


# ---- our Received header, first, as Postfix shows its own -------------------------------

def test_header_indexes_count_our_received_header_first(elemta_server, port):
    # The milter sees two Received fields, ours first; deleting the second removes
    # the one the message came with, and ours stays.
    raw = b"Received: from upstream.test by relay.test; Sun, 6 Dec 2026 10:00:00 +0000\r\n" \
        + MESSAGE
    edits = [(b"m", struct.pack("!I", 2) + strings("Received", "")), (b"c", b"")]
    with ScriptedMilter(port, {b"E": [edits]}) as milter:
        server = milter_server(elemta_server, milter)
        queue_id = queue_id_of(send(server, raw=raw))
    seen = [data.split(b"\0")[0] for data in milter.commands(b"L")]
    assert seen[:2] == [b"Received", b"Received"]
    assert b"id %s" % queue_id.encode() in milter.commands(b"L")[0]
    content = server.message(queue_id)[1]
    assert content.startswith(b"Received: from client.test (unknown [127.0.0.1])\r\n")
    assert b"upstream.test" not in content
    assert content.endswith(MESSAGE)


# ---- every final answer at the end of message -------------------------------------------

@pytest.mark.parametrize("answer, expected", [
    (reply(b"r"), (550, "5.7.1 Command rejected")),
    (reply(b"t"), (451, "4.7.1 Service unavailable - try again later")),
    (reply(b"y", b"451 4.7.0 Greylisted, come back later\x00"),
     (451, "4.7.0 Greylisted, come back later")),
    (reply(b"y", b"554 5.7.1 Spam\r\n554 5.7.1 more text\x00"),
     (554, "5.7.1 Spam more text")),
])
def test_a_refusal_at_end_of_message_is_given_and_nothing_queued(elemta_server, port,
                                                                 answer, expected):
    with ScriptedMilter(port, {b"E": [answer]}) as milter:
        server = milter_server(elemta_server, milter)
        assert send(server)[-1] == expected
    assert server.queued_ids() == []
    assert "reject: END-OF-MESSAGE from unknown[127.0.0.1]: %d %s" % expected in \
        server.log()


def test_accept_at_end_of_message_queues_it_unchanged(elemta_server, port):
    with ScriptedMilter(port, {b"E": [reply(b"a")]}) as milter:
        server = milter_server(elemta_server, milter)
        queue_id = queue_id_of(send(server))
    assert server.message(queue_id)[1].endswith(b"\r\n" + MESSAGE)
    assert "%s: milter m0: EOM from unknown[127.0.0.1]: accept" % queue_id in server.log()


def test_skip_in_the_body_sends_no_more_chunks(elemta_server, port):
    body = b"y" * 200000 + b"\r\n"
    raw = b"Subject: skip\r\n\r\n" + body
    with ScriptedMilter(port, {b"B": [reply(b"s")]}) as milter:
        server = milter_server(elemta_server, milter)
        queue_id = queue_id_of(send(server, raw=raw))
        assert wait_for(lambda: milter.sequence().endswith(b"Q"))
    assert milter.sequence().endswith(b"NBEQ")
    assert server.message(queue_id)[1].endswith(body)


# ---- release --rescan asks the milters again ------------------------------------------

def rescan(server, *queue_ids):
    """`elemtactl queue release --rescan`, as the admin runs it."""
    from tests.test_quarantine import elemtactl
    return elemtactl(server, "release", "--rescan", *queue_ids)


def test_rescan_tells_the_milter_the_stored_session_again(elemta_server, port,
                                                          credentials):
    """The conversation is rebuilt from the queued envelope: the client as it connected
    (no name was stored: "[address]"), its HELO, the authenticated user, the sender and
    recipients, the queue id, and the content as stored (our Received header first)."""
    quarantine = [(b"q", b"looks odd\x00"), (b"c", b"")]
    with ScriptedMilter(port, {b"E": [quarantine]}) as milter:
        server = elemta_server(milters=[{"socket": milter.address, "name": "m0"}],
                               auth={"credentials_file": credentials,
                                     "allow_plaintext": True})
        with smtplib.SMTP("127.0.0.1", server.port, timeout=60) as smtp:
            smtp.ehlo("client.test")
            smtp.login("alice", "wonderland")
            smtp.sendmail("a@sender.test", ["b@example.test"], MESSAGE)
        [queue_id] = server.queued_ids()
        assert len(milter.commands(b"E")) == 1                  # at intake
        result = rescan(server, queue_id)
        assert result.stdout == ("%s: rescanned: still on hold: held by milter m0: looks "
                                 "odd\nReleased from hold: 0 messages\n" % queue_id), result
        assert wait_for(lambda: len(milter.commands(b"E")) == 2
                        and milter.sequence().endswith(b"Q"))
    # connect, helo, mail, rcpt, data, the stored header fields, eoh, body, eom, quit
    assert milter.sequence() == b"CHMRTLLLLLLNBEQ"
    connect = milter.commands(b"C")[-1]
    assert connect.startswith(b"[127.0.0.1]\x004") and connect.endswith(b"127.0.0.1\x00")
    assert milter.commands(b"H")[-1] == b"client.test\x00"
    assert milter.commands(b"M")[-1].startswith(b"<a@sender.test>\x00")
    assert milter.commands(b"R")[-1] == b"<b@example.test>\x00"
    assert milter.macros[b"M"]["i"] == queue_id
    assert milter.macros[b"M"]["{auth_authen}"] == "alice"
    assert milter.macros[b"R"]["{rcpt_addr}"] == "b@example.test"
    _, content = server.message(queue_id)
    headers = milter.commands(b"L")[-6:]
    assert headers[0].startswith(b"Received\x00") and b" id %s" % queue_id.encode() in \
        headers[0]
    assert milter.commands(b"B")[-1] == content.split(b"\r\n\r\n", 1)[1]
    with server.queue() as queue:
        record = queue.get(queue_id)
    assert (record.state, record.hold.by, record.hold.reason) == (
        "hold", "milter m0", "looks odd")


def test_rescan_of_mail_from_sendmail_asks_the_non_smtp_milters_as_localhost(
        elemta_server, port):
    """A message from sendmail is told again to the non_smtp milters, as pickup told it;
    a milter that would reject it now keeps it held, saying so; one that lets it pass
    releases it."""
    from tests.test_sendmail import queued, sendmail
    with ScriptedMilter(port, {b"E": [reply(b"r")]}) as milter:
        server = milter_server(elemta_server, {"socket": milter.address, "name": "local",
                                               "smtp": False, "non_smtp": True})
        status, _, err = sendmail(server, "root", stdin=b"Subject: cron\n\ndisk full\n")
        assert status == 0, err
        [(envelope, _)] = queued(server, 1)
        queue_id = envelope.queue_id
        with server.queue() as queue:
            # pickup holds what a milter rejects: nobody to answer
            assert queue.get(queue_id).state == "hold"
        result = rescan(server, queue_id)
        assert result.stdout.splitlines()[0] == (
            "%s: rescanned: still on hold: held by milter local: would reject: 550 5.7.1 "
            "Command rejected" % queue_id), result
        assert wait_for(lambda: milter.sequence().endswith(b"Q"))
        connect = milter.commands(b"C")[-1]
        assert connect.startswith(b"localhost\x00")
        milter.script[b"E"] = [reply(b"c")]            # the milter changed its mind
        result = rescan(server, queue_id)
        assert result.stdout.splitlines()[0] == (
            "%s: rescanned: nothing found; released from hold" % queue_id), result
    with server.queue() as queue:
        record = queue.get(queue_id)
    assert record is None or record.state != "hold"
