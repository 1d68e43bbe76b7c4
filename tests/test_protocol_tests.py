"""Early talkers and pipelining abuse (issue #15 item 5, postscreen's pregreet and
pipelining tests): raw socket clients that talk before the greeting or send commands
ahead where they may not, against a real Elemta, get the configured reply (nothing, 550
5.5.1 to RCPT, or 521 5.5.1 and a hang-up) and the postscreen-style log lines; smtplib,
which waits its turn, passes; mynetworks clients are not tested.

Covers elemta.restrictions.protocoltests, the ImproperPipelining event of the protocol
core and their wiring in elemta.smtpd.session.
"""

import re
import shutil
import smtplib
import socket
import subprocess

import pytest

from elemta.smtp.events import NEED_DATA, Helo, ImproperPipelining
from elemta.smtp.protocol import ServerProtocol, Settings
from tests.harness import wait_for

MAIL = b"MAIL FROM:<a@c.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n"


def start(elemta_server, **tests):
    return elemta_server(smtpd={"hostname": "mx.test", "workers": 1},
                         relay={"mynetworks": ["127.0.0.1/32"]},
                         protocol_tests=tests)


def connect(server, client="127.0.0.2"):
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10,
                                 source_address=(client, 0))
    return s, s.getsockname()[1]


def read_replies(s, count):
    """The next `count` complete replies (multi-line ones as one), as text."""
    data, replies = b"", []
    while len(replies) < count:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
        replies = re.findall(rb"(?:\d{3}-[^\r\n]*\r\n)*\d{3}(?: [^\r\n]*)?\r\n", data)
    return [r.decode() for r in replies]


def read_all(s):
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            return data.decode()
        data += chunk


def test_pregreet_enforce_refuses_every_recipient(elemta_server):
    server = start(elemta_server, greet_wait=2, greet_action="enforce")
    s, port = connect(server)
    s.sendall(b"EHLO bot.test\r\n")              # before the greeting
    greeting, ehlo = read_replies(s, 2)
    assert greeting == "220-mx.test ESMTP Elemta\r\n220 mx.test ESMTP Elemta\r\n"
    assert ehlo.startswith("250-mx.test")
    s.sendall(MAIL)
    assert read_replies(s, 3) == ["250 2.1.0 Ok\r\n", "550 5.5.1 Protocol error\r\n",
                                  "554 5.5.1 Error: no valid recipients\r\n"]
    s.close()
    log = server.log()
    assert "PREGREET 15 after " in log
    assert re.search(r"PREGREET 15 after \d+\.\d\d from \[127\.0\.0\.2\]:%d: "
                     r"EHLO bot\.test\\r\\n" % port, log), log
    assert ("NOQUEUE: reject: RCPT from unknown[127.0.0.2]: 550 5.5.1 Protocol error; "
            "from=<a@c.test> to=<b@example.test> proto=ESMTP helo=<bot.test> "
            "(restriction pregreet)") in log
    assert server.queued_ids() == []


def test_pregreet_drop_hangs_up(elemta_server):
    server = start(elemta_server, greet_wait=2, greet_action="drop")
    s, port = connect(server)
    s.sendall(b"HELO bot.test\r\n")
    assert read_all(s) == "220-mx.test ESMTP Elemta\r\n521 5.5.1 Protocol error\r\n"
    s.close()
    assert ("NOQUEUE: reject: CONNECT from unknown[127.0.0.2]: 521 5.5.1 Protocol error; "
            "proto=SMTP (restriction pregreet)") in server.log()


def send_with_smtplib(server, client):
    with smtplib.SMTP("127.0.0.1", server.port, source_address=(client, 0),
                      timeout=10) as smtp:
        return smtp.sendmail("a@c.test", ["b@example.test"], b"Subject: t\r\n\r\nx\r\n")


def test_pregreet_ignore_only_logs_and_patient_clients_pass(elemta_server):
    server = start(elemta_server, greet_wait=1, greet_action="enforce")
    assert send_with_smtplib(server, "127.0.0.3") == {}      # waits for the 220
    assert "PREGREET" not in server.log()
    server.stop()
    server = start(elemta_server, greet_wait=2, greet_action="ignore")
    s, _ = connect(server)
    s.sendall(b"EHLO bot.test\r\n")
    read_replies(s, 2)
    s.sendall(MAIL)
    assert read_replies(s, 3)[1:] == ["250 2.1.5 Ok\r\n",
                                      "354 End data with <CR><LF>.<CR><LF>\r\n"]
    s.sendall(b"Subject: t\r\n\r\nx\r\n.\r\nQUIT\r\n")
    assert read_replies(s, 2)[0].startswith("250 2.0.0 Ok: queued as ")
    assert "PREGREET 15 after " in server.log()
    assert len(server.queued_ids()) == 1


@pytest.mark.parametrize("action", ["enforce", "drop", "ignore"])
def test_pipelining_after_helo(elemta_server, action):
    server = start(elemta_server, pipelining_enable=True, pipelining_action=action)
    s, port = connect(server)
    assert read_replies(s, 1) == ["220 mx.test ESMTP Elemta\r\n"]   # no wait: test off
    s.sendall(b"HELO bot.test\r\n" + MAIL)       # HELO: PIPELINING never announced
    expected = {
        "enforce": ["250 mx.test\r\n", "250 2.1.0 Ok\r\n", "550 5.5.1 Protocol error\r\n",
                    "554 5.5.1 Error: no valid recipients\r\n"],
        "drop": ["521 5.5.1 Protocol error\r\n"],
        "ignore": ["250 mx.test\r\n", "250 2.1.0 Ok\r\n", "250 2.1.5 Ok\r\n",
                   "354 End data with <CR><LF>.<CR><LF>\r\n"]}[action]
    assert read_replies(s, len(expected)) == expected
    if action == "drop":
        assert read_all(s) == ""                 # and the connection is closed
    s.close()
    log = server.log()
    assert re.search(r"COMMAND PIPELINING from \[127\.0\.0\.2\]:%d after HELO: "
                     r"MAIL FROM:<a@c\.test>\\r\\nRCPT TO:<b@example\.test>\\r\\nDATA\\r\\n"
                     % port, log), log
    refusal = {"enforce": "NOQUEUE: reject: RCPT from unknown[127.0.0.2]: 550 5.5.1 "
                          "Protocol error; from=<a@c.test> to=<b@example.test> proto=SMTP "
                          "helo=<bot.test> (restriction pipelining)",
               "drop": "NOQUEUE: reject: HELO from unknown[127.0.0.2]: 521 5.5.1 Protocol "
                       "error; proto=SMTP helo=<> (restriction pipelining)",
               "ignore": None}[action]
    if refusal:
        assert refusal in log
    else:
        assert "NOQUEUE: reject" not in log


def test_pipelining_after_ehlo_and_mynetworks_clients_pass(elemta_server):
    server = start(elemta_server, pipelining_enable=True, pipelining_action="drop")
    for client in ("127.0.0.2", "127.0.0.1"):
        s, _ = connect(server, client)
        read_replies(s, 1)
        if client == "127.0.0.2":                # waits for PIPELINING, then uses it
            s.sendall(b"EHLO good.test\r\n")
            assert "PIPELINING" in read_replies(s, 1)[0]
            s.sendall(MAIL)
            replies = read_replies(s, 3)
        else:                                    # mynetworks: never tested
            s.sendall(b"HELO lan.test\r\n" + MAIL)
            replies = read_replies(s, 4)
        assert replies[-1].startswith("354 "), replies
        s.sendall(b"Subject: t\r\n\r\nx\r\n.\r\nQUIT\r\n")
        assert read_replies(s, 2)[0].startswith("250 2.0.0 Ok: queued as ")
        s.close()
    assert send_with_smtplib(server, "127.0.0.3") == {}
    wait_for(lambda: len(server.queued_ids()) == 3)
    assert "COMMAND PIPELINING" not in server.log()


def events(proto):
    found = []
    while True:
        event = proto.next_event()
        if event is NEED_DATA:
            return found
        found.append(event)
        if isinstance(event, (Helo, ImproperPipelining)):
            proto.accept()


def test_core_reports_improper_pipelining_once_and_only_when_asked():
    proto = ServerProtocol(Settings(hostname="mx.test", pipelining_test=True))
    proto.start()
    proto.receive_data(b"EHLO x\r\nNOOP\r\n")      # before the EHLO reply
    found = events(proto)
    assert found[1] == ImproperPipelining("EHLO", b"NOOP\r\n")
    proto.receive_data(b"NOOP\r\nNOOP\r\n")        # after it: allowed, and said once
    assert not [e for e in events(proto) if isinstance(e, ImproperPipelining)]
    quiet = ServerProtocol(Settings(hostname="mx.test"))
    quiet.start()
    quiet.receive_data(b"HELO x\r\nNOOP\r\n")
    assert not [e for e in events(quiet) if isinstance(e, ImproperPipelining)]
    data_first = ServerProtocol(Settings(hostname="mx.test", pipelining_test=True))
    data_first.start()
    data_first.receive_data(b"EHLO x\r\n")
    events(data_first)
    data_first.receive_data(b"DATA\r\nSubject: early\r\n")
    assert ImproperPipelining("DATA", b"Subject: early\r\n") in events(data_first)


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
def test_swaks_pipelining_after_ehlo_passes_both_tests(elemta_server):
    """swaks waits for the whole greeting and pipelines only once EHLO announced it."""
    server = start(elemta_server, greet_wait=1, greet_action="drop",
                   pipelining_enable=True, pipelining_action="drop")
    done = subprocess.run(
        ["swaks", "--server", "127.0.0.1", "--port", str(server.port), "--local-interface",
         "127.0.0.3", "--helo", "good.test", "--from", "a@c.test", "--to",
         "b@example.test", "--pipeline", "--timeout", "10"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    output = done.stdout.decode("utf-8", "replace")
    assert done.returncode == 0, output
    assert "<** " not in output                 # no error reply
    assert "250 2.0.0 Ok: queued as " in output
    log = server.log()
    assert "PREGREET" not in log and "COMMAND PIPELINING" not in log
    assert len(server.queued_ids()) == 1


def test_pregreet_input_stays_readable_and_failures_are_noted_for_plugins(caplog):
    from elemta.config.schema import ProtocolTestSettings
    from elemta.restrictions.protocoltests import ProtocolTests
    caplog.set_level("INFO", logger="elemta")
    server_side, client_side = socket.socketpair()
    notes = {}
    tests = ProtocolTests(ProtocolTestSettings(greet_wait=5, greet_action="ignore"),
                          "smtp", False, "192.0.2.1", 1234, notes)
    client_side.sendall(b"EHLO x\r\n\x01")
    assert tests.pregreet(server_side, b"220-mx.test hi\r\n") is None
    assert notes == {"protocol_tests_failed": ["pregreet"]}
    assert "PREGREET 9 after " in caplog.text
    assert " from [192.0.2.1]:1234: EHLO x\\r\\n\\001" in caplog.text
    assert client_side.recv(100) == b"220-mx.test hi\r\n"
    assert server_side.recv(100) == b"EHLO x\r\n\x01"     # looked at, not taken
    for exempt in (ProtocolTests(ProtocolTestSettings(greet_wait=5), "smtp", True,
                                 "192.0.2.1", 1, notes),          # mynetworks
                   ProtocolTests(ProtocolTestSettings(greet_wait=5), "submission", False,
                                 "192.0.2.1", 1, notes)):
        client_side.sendall(b"EHLO x\r\n")
        assert exempt.pregreet(server_side, b"220-mx.test hi\r\n") is None
        assert server_side.recv(100) == b"EHLO x\r\n"
    assert notes == {"protocol_tests_failed": ["pregreet"]}
    server_side.close()
    client_side.close()


def test_enforced_pipelining_failure_at_data_refuses_the_message(elemta_server):
    """DATA sent together with the content, after EHLO: the recipients were accepted
    before the test failed, so the message itself is refused, never queued."""
    server = start(elemta_server, pipelining_enable=True, pipelining_action="enforce")
    s, _ = connect(server)
    assert read_replies(s, 1) == ["220 mx.test ESMTP Elemta\r\n"]
    s.sendall(b"EHLO bot.test\r\n")
    read_replies(s, 1)
    s.sendall(b"MAIL FROM:<a@c.test>\r\nRCPT TO:<b@example.test>\r\n")
    assert read_replies(s, 2) == ["250 2.1.0 Ok\r\n", "250 2.1.5 Ok\r\n"]
    s.sendall(b"DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n")
    replies = read_replies(s, 2)
    assert replies[0].startswith("354 ")
    assert replies[1] == "550 5.5.1 Protocol error\r\n"
    s.sendall(b"QUIT\r\n")
    s.close()
    assert server.queued_ids() == []
    assert re.search(r": reject: END-OF-MESSAGE from unknown\[127\.0\.0\.2\]: 550 5\.5\.1 "
                     r"Protocol error; from=<a@c\.test> \(restriction pipelining\)",
                     server.log())


def read_line(s):
    """One line the server sent, up to its CRLF, read byte by byte so nothing after it
    is taken."""
    line = b""
    while not line.endswith(b"\r\n"):
        byte = s.recv(1)
        if not byte:
            break
        line += byte
    return line


def test_a_client_answering_the_first_greeting_line_is_caught(elemta_server):
    """The greeting is multi-line (greet_banner): "220-" first, then the wait, then the
    last line. A bot that answers the first line, without waiting for the last one,
    talks during the wait and fails the test, as postscreen catches it."""
    server = start(elemta_server, greet_wait=3, greet_action="drop")
    s, port = connect(server)
    assert read_line(s) == b"220-mx.test ESMTP Elemta\r\n"
    s.settimeout(0.5)
    with pytest.raises(socket.timeout):       # the last line is held back: the wait
        s.recv(100)
    s.settimeout(10)
    s.sendall(b"EHLO bot.test\r\n")
    assert read_all(s) == "521 5.5.1 Protocol error\r\n"
    s.close()
    assert re.search(r"PREGREET 15 after \d\.\d\d from \[127\.0\.0\.2\]:%d: "
                     r"EHLO bot\.test\\r\\n" % port, server.log())


def test_without_greet_banner_the_wait_is_silent_and_the_greeting_one_line(elemta_server):
    """greet_banner: false: nothing is sent during the wait, then a one-line 220; a
    client talking into the silence is caught all the same."""
    server = start(elemta_server, greet_wait=3, greet_banner=False, greet_action="enforce")
    s, port = connect(server)
    s.settimeout(0.5)
    with pytest.raises(socket.timeout):
        s.recv(100)
    s.settimeout(10)
    s.sendall(b"EHLO bot.test\r\n")
    greeting, ehlo = read_replies(s, 2)
    assert greeting == "220 mx.test ESMTP Elemta\r\n"
    assert ehlo.startswith("250-mx.test")
    s.sendall(MAIL)
    assert read_replies(s, 3)[1] == "550 5.5.1 Protocol error\r\n"
    s.close()
    assert "PREGREET 15 after " in server.log()
    # A patient client gets the one-line greeting and its mail through.
    assert send_with_smtplib(server, "127.0.0.3") == {}
