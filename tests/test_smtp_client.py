"""The delivery SMTP client over real sockets on loopback.

Against a scriptable fake server (tests/peers/sink.py) for everything a bad or unusual server
does, against a private Postfix (it must hold exactly what was sent), and against smtp-sink
(many messages, one big streamed one). The byte-level pieces (elemta.delivery.wire) are fed
bytes directly first.
"""

import io
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import tracemalloc

import pytest
from hypothesis import given, settings, strategies as st

from elemta.delivery.smtp_client import (DELIVERED, PERMANENT, TEMPORARY, SessionError,
                                         SMTPClient, Timeouts, TLSPolicy)
from elemta.delivery.wire import (DataEncoder, ReplyReader, SMTPProtocolError, orcpt_parameter,
                                  xtext)
from elemta.queue.model import Envelope, Recipient
from tests.harness import free_port, wait_for
from tests.peers.postfix import PostfixInstance, postfix_available
from tests.peers.sink import CLOSE, HANG, Replies, ScriptedServer, make_test_pki

CONTENT = (b"From: a@example.org\r\nTo: b@example.net\r\nSubject: test\r\n\r\n"
           b"Hello.\r\n.leading dot\r\n..two dots\r\n.\r\nlast line\r\n")


def envelope(*recipients, sender="a@example.org", content=CONTENT, **fields):
    recipients = recipients or ("b@example.net",)
    rcpts = [r if isinstance(r, Recipient) else Recipient(r) for r in recipients]
    return Envelope(queue_id="TESTQID", sender=sender, recipients=rcpts,
                    arrival=time.time(), size=len(content), **fields)


def client(**kw):
    kw.setdefault("tls", TLSPolicy("none"))
    return SMTPClient("client.example.org", **kw)


def send_one(server, env=None, content=CONTENT, **kw):
    env = env or envelope(content=content)
    with client(**kw) as c:
        c.connect("127.0.0.1", server.port)
        return c.send(env, io.BytesIO(content))


def unstuff(wire):
    return b"".join(l[1:] if l.startswith(b".") else l for l in wire.splitlines(True))


# -- wire: bytes in, bytes out ------------------------------------------------------------------

def encode_in_pieces(content, cuts):
    encoder = DataEncoder()
    points = sorted(set(c % (len(content) + 1) for c in cuts))
    pieces = [content[a:b] for a, b in zip([0] + points, points + [len(content)])]
    return b"".join(encoder.encode(p) for p in pieces) + encoder.finish()


@settings(max_examples=300, deadline=None)
@given(st.binary().map(lambda b: bytes(b"a.\r\n"[x % 4] for x in b)),
       st.lists(st.integers(min_value=0, max_value=400), max_size=6))
def test_data_encoding_is_crlf_only_dot_stuffed_and_ends_once(content, cuts):
    wire = encode_in_pieces(content, cuts)
    assert wire.endswith(b".\r\n")
    body = wire[:-3]
    # Nothing but CRLF ends a line, and no line before the end is a lone dot.
    assert b"\r" not in body.replace(b"\r\n", b"") and b"\n" not in body.replace(b"\r\n", b"")
    assert body == b"" or body.endswith(b"\r\n")
    assert b"\r\n.\r\n" not in b"\r\n" + body
    # The receiver, after un-stuffing, gets the content with its line endings made CRLF.
    expected = re.sub(rb"\r\n|\r|\n", b"\r\n", content)
    if expected and not expected.endswith(b"\r\n"):
        expected += b"\r\n"
    assert unstuff(body) == expected


def test_data_encoding_of_a_smuggling_attempt():
    attack = b"Subject: x\r\n\r\nhi\n.\nMAIL FROM:<evil@x>\r\n.\rRCPT TO:<v@x>\r\n"
    wire = encode_in_pieces(attack, [18, 19, 20])
    assert wire == (b"Subject: x\r\n\r\nhi\r\n..\r\nMAIL FROM:<evil@x>\r\n..\r\n"
                    b"RCPT TO:<v@x>\r\n.\r\n")


def test_reply_reader_multiline_status_and_split_reads():
    reader = ReplyReader()
    for byte in b"250-mx.example ESMTP\r\n250-PIPELINING\r\n250 SIZE 1000\r\n550-5.1.1 no such\r\n":
        reader.feed(bytes([byte]))
    ehlo = reader.next_reply()
    assert (ehlo.code, ehlo.lines) == (250, ("mx.example ESMTP", "PIPELINING", "SIZE 1000"))
    assert reader.next_reply() is None
    reader.feed(b"550 5.1.1 user\n")   # a bare LF is tolerated
    reply = reader.next_reply()
    assert (reply.code, reply.status, reply.text) == (550, "5.1.1", "no such / user")
    reader.feed(b"451 try later\r\n")
    assert reader.next_reply().status == "4.0.0"    # derived when the server gives none


@pytest.mark.parametrize("data, reason", [
    (b"hello there\r\n", "not an SMTP reply"),
    (b"250-one\r\n550 two\r\n", "code changed"),
    (b"250 " + b"x" * 3000, "longer than"),
    (b"".join(b"250-x\r\n" for _ in range(300)), "lines"),
])
def test_reply_reader_refuses_garbage(data, reason):
    reader = ReplyReader()
    reader.feed(data)
    with pytest.raises(SMTPProtocolError, match=reason):
        while reader.next_reply():
            pass


def test_dsn_parameter_encoding():
    assert xtext("id+1=2 x") == "id+2B1+3D2+20x"
    assert orcpt_parameter("rfc822;a+b@example.org", utf8=False) == "rfc822;a+2Bb@example.org"
    assert orcpt_parameter("rfc822;jösé@example.org", utf8=False) is None
    assert orcpt_parameter("rfc822;jösé@example.org", utf8=True) == "utf-8;j\\x{F6}s\\x{E9}@example.org"


# -- against the scripted server: connections ---------------------------------------------------

@pytest.fixture
def scripted():
    servers = []

    def start(**kw):
        server = ScriptedServer(**kw).start()
        servers.append(server)
        return server
    yield start
    for server in servers:
        server.stop()


def test_421_greeting_means_try_the_next_host(scripted):
    server = scripted(script={"GREETING": "421 4.3.2 busy, come back later"})
    with pytest.raises(SessionError) as caught:
        client().connect("127.0.0.1", server.port)
    assert caught.value.try_next_host and not caught.value.permanent
    assert (caught.value.reply.code, caught.value.reply.status) == (421, "4.3.2")
    assert caught.value.reply.text == "busy, come back later"
    assert caught.value.reason == "greeting"      # the deferrals metric's reason


def test_refused_connection_means_try_the_next_host():
    with pytest.raises(SessionError) as caught:
        client().connect("127.0.0.1", free_port(), server_name="mx1.example.net")
    error = caught.value
    assert error.try_next_host and error.reply.local and error.reply.status == "4.4.1"
    assert "mx1.example.net[127.0.0.1]" in error.reply.text and "refused" in error.reply.text
    assert error.reason == "connect"


def test_silent_greeting_times_out(scripted):
    server = scripted(script={"GREETING": HANG})
    started = time.monotonic()
    with pytest.raises(SessionError) as caught:
        client(timeouts=Timeouts(greeting=0.3)).connect("127.0.0.1", server.port)
    assert 0.3 <= time.monotonic() - started < 2
    assert "timed out while receiving the reply to the initial server greeting" in str(
        caught.value)
    assert caught.value.reason == "timeout"


def test_ehlo_refused_falls_back_to_helo(scripted):
    server = scripted(script={"EHLO": "502 5.5.2 Error: command not recognized"})
    result = send_one(server, envelope(body="8BITMIME"))
    assert [r.outcome for r in result.recipients] == [DELIVERED]
    commands = server.sessions[0].commands
    assert commands[:3] == ["EHLO client.example.org", "HELO client.example.org",
                            "MAIL FROM:<a@example.org>"]   # no ESMTP parameters after HELO


def test_source_address(scripted):
    server = scripted(address="127.0.0.1")
    send_one(server, source_address="127.0.0.2")
    assert server.sessions[0].peer[0] == "127.0.0.2"


# -- transactions ---------------------------------------------------------------------------------

def test_per_recipient_results_in_one_transaction(scripted):
    def rcpt(session, argument):
        if "temp@" in argument:
            return "450 4.2.0 <temp@example.net>: mailbox busy"
        if "gone@" in argument:
            return "550 5.1.1 <gone@example.net>: no such user"
        return "250 2.1.5 Ok"
    server = scripted(script={"RCPT": rcpt})
    env = envelope("ok@example.net", "temp@example.net", "gone@example.net")
    result = send_one(server, env)
    outcomes = [(r.address, r.outcome, r.code, r.status) for r in result.recipients]
    assert outcomes == [("ok@example.net", DELIVERED, 250, "2.0.0"),
                        ("temp@example.net", TEMPORARY, 450, "4.2.0"),
                        ("gone@example.net", PERMANENT, 550, "5.1.1")]
    assert result.recipients[2].text == "<gone@example.net>: no such user"
    assert result.recipients[1].reason == "rcpt"     # the stage that got the 450
    [message] = server.messages
    assert message.rcpts == ["RCPT TO:<ok@example.net>"] and message.content == CONTENT


def test_450_then_250_on_the_next_attempt(scripted):
    server = scripted(script={"RCPT": Replies("450 4.7.1 greylisted, try again", "250 2.1.5 Ok")})
    first = send_one(server)
    assert first.recipients[0].outcome == TEMPORARY and first.recipients[0].code == 450
    assert not server.messages
    second = send_one(server)
    assert second.recipients[0].outcome == DELIVERED
    assert len(server.messages) == 1


def test_550_mail_from_bounces_all_and_the_connection_stays_usable(scripted):
    server = scripted(script={"MAIL": Replies("550 5.7.1 sender refused", "250 2.1.0 Ok")})
    with client() as c:
        c.connect("127.0.0.1", server.port)
        refused = c.send(envelope("x@example.net", "y@example.net"), io.BytesIO(CONTENT))
        assert [(r.outcome, r.status) for r in refused.recipients] == [(PERMANENT, "5.7.1")] * 2
        assert c.usable
        accepted = c.send(envelope(), io.BytesIO(CONTENT))
        assert accepted.recipients[0].outcome == DELIVERED
    commands = server.sessions[0].commands
    assert "RSET" in commands and len(server.sessions) == 1 and len(server.messages) == 1


def test_no_recipient_accepted_means_no_data(scripted):
    server = scripted(extensions=["SIZE 100000"],    # no PIPELINING: one step at a time
                      script={"RCPT": "550 5.1.1 no"})
    result = send_one(server)
    assert result.recipients[0].outcome == PERMANENT
    assert not any(c == "DATA" for c in server.sessions[0].commands)


def test_several_messages_on_one_connection(scripted):
    server = scripted()
    with client() as c:
        c.connect("127.0.0.1", server.port)
        for n in range(3):
            content = CONTENT + b"message %d\r\n" % n
            result = c.send(envelope(content=content), io.BytesIO(content))
            assert result.recipients[0].outcome == DELIVERED
    assert len(server.sessions) == 1
    assert [m.content[-11:] for m in server.messages] == [b"message %d\r\n" % n for n in range(3)]
    assert server.sessions[0].commands[-1] == "QUIT"


# -- misbehaviour: never a traceback, always a clear temporary failure --------------------------

@pytest.mark.parametrize("reply, reason, word", [
    (b"this is not smtp\r\n", "garbage: not an SMTP reply", "protocol"),
    (b"250 " + b"A" * 5000 + b"\r\n", "garbage: reply line longer than 2048 bytes",
     "protocol"),
    (CLOSE, "lost connection with 127.0.0.1[127.0.0.1]:", "lost_connection"),
    ("421 4.3.0 shutting down", "shutting down", "rcpt"),
    ("354 go ahead", "unexpected reply to RCPT TO", "protocol"),
])
def test_a_bad_reply_to_rcpt_is_a_temporary_failure(scripted, reply, reason, word):
    server = scripted(script={"RCPT": reply})
    with client() as c:
        c.connect("127.0.0.1", server.port)
        result = c.send(envelope("a@example.net", "b@example.net"), io.BytesIO(CONTENT))
        assert not c.usable
    assert [r.outcome for r in result.recipients] == [TEMPORARY, TEMPORARY]
    assert reason in result.recipients[0].text
    assert [r.reason for r in result.recipients] == [word, word]
    assert result.try_next_host
    assert not server.messages


def test_lost_connection_after_the_dot_is_temporary_but_not_for_the_next_host(scripted):
    server = scripted(script={"DOT": CLOSE})
    result = send_one(server)
    assert result.recipients[0].outcome == TEMPORARY
    assert "while receiving the reply to end of DATA" in result.recipients[0].text
    assert result.recipients[0].reason == "lost_connection"
    assert not result.try_next_host     # it may have been delivered: do not send it twice now


def test_final_reply_timeout(scripted):
    server = scripted(script={"DOT": HANG})
    started = time.monotonic()
    result = send_one(server, timeouts=Timeouts(data_done=0.3))
    assert 0.3 <= time.monotonic() - started < 2
    assert result.recipients[0].outcome == TEMPORARY
    assert "timed out while receiving the reply to end of DATA" in result.recipients[0].text
    assert result.recipients[0].reason == "timeout"


def test_unreadable_content_hangs_up_without_the_final_dot(scripted):
    class Corrupt(io.BytesIO):
        def read(self, size=-1):
            data = super().read(size)
            if not data:
                raise ValueError("CRC mismatch")
            return data
    server = scripted()
    with client() as c:
        c.connect("127.0.0.1", server.port)
        with pytest.raises(ValueError):
            c.send(envelope(), Corrupt(CONTENT))
        assert not c.usable
    wait_for(lambda: server.sessions[0].closed.is_set())
    assert not server.messages


# -- extensions ------------------------------------------------------------------------------------

def test_pipelining_sends_mail_rcpts_and_data_in_one_write(scripted):
    server = scripted()
    send_one(server, envelope("a@example.net", "b@example.net", "c@example.net"))
    reads = server.sessions[0].reads
    assert any(read.startswith(b"MAIL FROM:") and read.endswith(b"DATA\r\n")
               and read.count(b"RCPT TO:") == 3 for read in reads), reads


def test_without_pipelining_one_command_per_write(scripted):
    server = scripted(extensions=["8BITMIME"])
    send_one(server, envelope("a@example.net", "b@example.net"))
    commands = [r for r in server.sessions[0].reads if r[:4] in (b"MAIL", b"RCPT", b"DATA")]
    assert [r.split(b":")[0] for r in commands] == [b"MAIL FROM", b"RCPT TO", b"RCPT TO",
                                                   b"DATA\r\n"]


def test_size_announced_and_refused_early(scripted):
    server = scripted(extensions=["PIPELINING", "SIZE 1000"])
    small = send_one(server)
    assert "MAIL FROM:<a@example.org> SIZE=%d" % len(CONTENT) in server.sessions[0].commands
    assert small.recipients[0].outcome == DELIVERED
    big = CONTENT + b"x" * 2000 + b"\r\n"
    result = send_one(server, envelope(content=big), content=big)
    assert (result.recipients[0].outcome, result.recipients[0].status) == (PERMANENT, "5.3.4")
    assert "exceeds size limit 1000" in result.recipients[0].text
    assert not any(c.startswith("MAIL") for c in server.sessions[1].commands)


def test_8bitmime_only_when_offered(scripted):
    eight_bit = CONTENT.replace(b"Hello.", "Grüße.".encode("utf-8"))
    offered = scripted()
    send_one(offered, envelope(body="8BITMIME", content=eight_bit), content=eight_bit)
    assert "MAIL FROM:<a@example.org> SIZE=%d BODY=8BITMIME" % len(eight_bit) in \
        offered.sessions[0].commands
    assert offered.messages[0].content == eight_bit
    plain = scripted(extensions=["PIPELINING"])
    send_one(plain, envelope(body="8BITMIME", content=eight_bit), content=eight_bit)
    assert "MAIL FROM:<a@example.org>" in plain.sessions[0].commands


def test_smtputf8_required_and_passed(scripted):
    env = envelope("jösé@exämple.net", sender="grüße@example.org", smtputf8=True)
    lacking = scripted(extensions=["PIPELINING", "8BITMIME"])
    result = send_one(lacking, env)
    assert (result.recipients[0].outcome, result.recipients[0].status) == (PERMANENT, "5.6.7")
    assert "SMTPUTF8 is required, but was not offered" in result.recipients[0].text
    assert not any(c.startswith("MAIL") for c in lacking.sessions[0].commands)
    offering = scripted()
    result = send_one(offering, env)
    assert result.recipients[0].outcome == DELIVERED
    assert offering.messages[0].mail.endswith(" SMTPUTF8")
    assert offering.messages[0].rcpts == ["RCPT TO:<jösé@exämple.net>"]


def test_dsn_parameters_passed_when_offered(scripted):
    rcpt = Recipient("b@example.net", notify=("SUCCESS", "FAILURE"),
                     orcpt="rfc822;B+list@example.net")
    env = envelope(rcpt, ret="HDRS", envid="QID 42")
    offered = scripted()
    result = send_one(offered, env)
    assert result.dsn_passed
    assert offered.messages[0].mail == ("MAIL FROM:<a@example.org> SIZE=%d RET=HDRS "
                                        "ENVID=QID+2042" % len(CONTENT))
    assert offered.messages[0].rcpts == [
        "RCPT TO:<b@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;B+2Blist@example.net"]
    lacking = scripted(extensions=["PIPELINING"])
    result = send_one(lacking, env)
    assert not result.dsn_passed
    assert lacking.messages[0].rcpts == ["RCPT TO:<b@example.net>"]


def test_content_reaches_the_server_normalised_and_dot_stuffed(scripted):
    server = scripted()
    sloppy = b"Subject: x\n\n.one\r\nbare CR\rbare LF\n.\nMAIL FROM:<evil@x>\n.\r\nno newline"
    send_one(server, envelope(content=sloppy), content=sloppy)
    [message] = server.messages
    assert message.content == (b"Subject: x\r\n\r\n.one\r\nbare CR\r\nbare LF\r\n.\r\n"
                               b"MAIL FROM:<evil@x>\r\n.\r\nno newline\r\n")
    assert not any(c.startswith("MAIL FROM:<evil") for c in server.sessions[0].commands)


# -- TLS ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pki():
    workdir = tempfile.mkdtemp(prefix="elemta-pki-")
    os.chmod(workdir, 0o755)    # Postfix reads the certificate as its own user too
    yield make_test_pki(workdir, "mx.example.net")
    shutil.rmtree(workdir, ignore_errors=True)


def test_opportunistic_tls(scripted, pki):
    _, cert, key = pki
    server = scripted(cert_file=cert, key_file=key)
    result = send_one(server, tls=TLSPolicy("may"))     # a CA we do not know: fine for "may"
    assert result.recipients[0].outcome == DELIVERED and server.sessions[0].tls
    commands = server.sessions[0].commands
    assert commands[:3] == ["EHLO client.example.org", "STARTTLS", "EHLO client.example.org"]


def test_opportunistic_tls_without_starttls_is_plaintext(scripted):
    server = scripted()
    result = send_one(server, tls=TLSPolicy("may"))
    assert result.recipients[0].outcome == DELIVERED and not server.sessions[0].tls


def test_mandatory_tls_without_starttls_fails_the_host(scripted):
    server = scripted()
    with pytest.raises(SessionError) as caught:
        client(tls=TLSPolicy("encrypt")).connect("127.0.0.1", server.port)
    assert caught.value.tls_failure and caught.value.try_next_host
    assert caught.value.reply.status == "4.7.4"
    assert "TLS is required, but was not offered" in caught.value.reply.text
    assert caught.value.reason == "tls"
    assert not server.messages


@pytest.mark.parametrize("level, use_ca, server_name, works", [
    ("encrypt", False, "mx.example.net", True),
    ("verify", True, "other.example.net", True),     # chain only: any name
    ("verify", False, "mx.example.net", False),      # the system CAs do not know ours
    ("secure", True, "mx.example.net", True),
    ("secure", True, "other.example.net", False),    # the name must match
])
def test_tls_verification_levels(scripted, pki, level, use_ca, server_name, works):
    ca, cert, key = pki
    server = scripted(cert_file=cert, key_file=key)
    policy = TLSPolicy(level, ca_file=ca if use_ca else None)
    c = client(tls=policy)
    if works:
        c.connect("127.0.0.1", server.port, server_name=server_name)
        assert c.tls_version in ("TLSv1.2", "TLSv1.3")
        assert c.send(envelope(), io.BytesIO(CONTENT)).recipients[0].outcome == DELIVERED
        c.quit()
    else:
        with pytest.raises(SessionError) as caught:
            c.connect("127.0.0.1", server.port, server_name=server_name)
        assert caught.value.tls_failure and caught.value.try_next_host
        assert caught.value.reply.status == "4.7.5"
        assert "certificate verify failed" in caught.value.reply.text
        assert not server.messages


def test_data_after_the_starttls_reply_is_refused(scripted, pki):
    _, cert, key = pki
    injected = "220 2.0.0 go ahead\r\n250 injected reply"
    server = scripted(cert_file=cert, key_file=key, script={"STARTTLS": injected})
    with pytest.raises(SessionError) as caught:
        client(tls=TLSPolicy("may")).connect("127.0.0.1", server.port)
    assert "sent data after its STARTTLS reply" in caught.value.reply.text


# -- against a real Postfix -----------------------------------------------------------------------

needs_postfix = pytest.mark.skipif(postfix_available() is not None,
                                   reason=str(postfix_available()))


@pytest.fixture(scope="module")
def postfix(pki):
    if postfix_available():
        pytest.skip(postfix_available())
    _, cert, key = pki
    workdir = tempfile.mkdtemp(prefix="elemta-postfix-")
    instance = PostfixInstance(workdir, free_port(), hold_only=True, extra_main_cf={
        "smtpd_tls_cert_file": cert, "smtpd_tls_key_file": key,
        "smtpd_tls_security_level": "may", "smtpd_tls_loglevel": "1",
        "message_size_limit": "200000",
        # Keep Postfix from adding Message-Id/Date to "local" (loopback) clients' mail, so
        # what it holds can be compared byte for byte with what was sent.
        "local_header_rewrite_clients": ""})
    with instance:
        yield instance
    shutil.rmtree(workdir, ignore_errors=True)


def postcat(postfix, queue_id, *flags):
    done = subprocess.run(["postcat", "-c", postfix.config_dir] + list(flags) + ["-q", queue_id],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True)
    return done.stdout


def held_message(postfix, reply):
    """Envelope records and content of the message Postfix queued, by its 250 reply."""
    queue_id = re.search(r"queued as (\w+)", reply.text).group(1)
    wait_for(lambda: postfix.queue_count("hold") and postcat(postfix, queue_id, "-e"))
    envelope_records = postcat(postfix, queue_id, "-e").decode()
    content = postcat(postfix, queue_id, "-h", "-b")
    # Postfix put its own Received header on top (with folded lines): drop it.
    content = re.sub(rb"\AReceived: .*?\n(?=\S)", b"", content, flags=re.DOTALL)
    return queue_id, envelope_records, content


@needs_postfix
def test_postfix_holds_exactly_what_was_sent_over_starttls(postfix, pki):
    body = ("Subject: Grüße\r\nFrom: a@example.org\r\n\r\n8-bit: Grüße\r\n.dot line\r\n"
            ".\r\n" + "long line " * 50 + "\r\nend\r\n").encode("utf-8")
    env = envelope("b@example.net", "c@example.net", content=body, body="8BITMIME")
    c = SMTPClient("client.example.org", tls=TLSPolicy("secure", ca_file=pki[0]))
    c.connect("127.0.0.1", postfix.smtpd_port, server_name="mx.example.net")
    assert c.tls_version and {"PIPELINING", "SIZE", "DSN", "SMTPUTF8"} <= set(c.extensions)
    result = c.send(env, io.BytesIO(body))
    c.quit()
    assert [(r.outcome, r.code, r.status) for r in result.recipients] == [
        (DELIVERED, 250, "2.0.0")] * 2
    _, records, content = held_message(postfix, result.recipients[0].reply)
    assert "sender: a@example.org" in records
    assert "recipient: b@example.net" in records and "recipient: c@example.net" in records
    # postcat prints lines with LF endings; the bytes Postfix stored are exactly ours.
    assert content == body.replace(b"\r\n", b"\n")
    postfix.wait_for_log(r"TLS connection established from .*TLSv1\.[23]")


@needs_postfix
def test_postfix_takes_several_messages_and_smtputf8_on_one_connection(postfix):
    envs = [envelope(content=CONTENT),
            envelope("jösé@exämple.net", sender="grüße@example.org", smtputf8=True),
            envelope("d@example.net", content=CONTENT.replace(b"test", b"third"))]
    queue_ids = []
    with client() as c:
        c.connect("127.0.0.1", postfix.smtpd_port)
        for env in envs:
            content = CONTENT if env is not envs[2] else CONTENT.replace(b"test", b"third")
            result = c.send(env, io.BytesIO(content))
            assert result.recipients[0].outcome == DELIVERED, result.recipients[0].reply
            queue_ids.append(held_message(postfix, result.recipients[0].reply)[0])
    records = postcat(postfix, queue_ids[1], "-e").decode("utf-8")
    assert "sender: grüße@example.org" in records and "recipient: jösé@exämple.net" in records
    # One client connection carried all three (Postfix logs a "disconnect from" per session).
    log = postfix.wait_for_log(r"disconnect from \S+ ehlo=1 mail=3 rcpt=3 data=3 quit=1")
    assert log


@needs_postfix
def test_postfix_size_limit_is_respected_before_sending(postfix):
    big = CONTENT + b"x" * 998 + b"\r\n"
    big = big * 250     # about 270 kB, Postfix takes 200 kB here
    with client() as c:
        c.connect("127.0.0.1", postfix.smtpd_port)
        result = c.send(envelope(content=big), io.BytesIO(big))
    assert (result.recipients[0].outcome, result.recipients[0].status) == (PERMANENT, "5.3.4")
    assert "exceeds size limit 200000" in result.recipients[0].text


# -- against smtp-sink ----------------------------------------------------------------------------

SMTP_SINK = "/usr/sbin/smtp-sink"


@pytest.fixture
def smtp_sink():
    if not os.path.exists(SMTP_SINK):
        pytest.skip("smtp-sink is not installed (apt-get install postfix)")
    workdir = tempfile.mkdtemp(prefix="elemta-sink-")
    os.chmod(workdir, 0o777)    # smtp-sink -u nobody writes its dumps here
    port = free_port()
    argv = [SMTP_SINK, "-d", os.path.join(workdir, "%M."), "127.0.0.1:%d" % port, "64"]
    if os.geteuid() == 0:
        argv[1:1] = ["-u", "nobody"]
    process = subprocess.Popen(argv)

    def accepting():
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False
    wait_for(accepting)
    yield port, workdir
    process.terminate()
    process.wait()
    shutil.rmtree(workdir, ignore_errors=True)


def sink_dumps(workdir):
    return [os.path.join(workdir, name) for name in os.listdir(workdir)]


def test_smtp_sink_many_messages_on_one_pipelined_connection(smtp_sink):
    port, workdir = smtp_sink
    count = 200
    started = time.monotonic()
    with client() as c:
        c.connect("127.0.0.1", port)
        assert "PIPELINING" in c.extensions
        for n in range(count):
            content = CONTENT + b"number %d\r\n" % n
            result = c.send(envelope("b@example.net", "c@example.net", content=content),
                            io.BytesIO(content))
            assert [r.outcome for r in result.recipients] == [DELIVERED, DELIVERED]
    elapsed = time.monotonic() - started
    wait_for(lambda: len(sink_dumps(workdir)) == count)
    print("\n%d messages, 2 recipients each, one connection: %.0f messages/s"
          % (count, count / elapsed))
    with open(sorted(sink_dumps(workdir))[0], "rb") as dump:
        data = dump.read()
    assert b"X-Rcpt-Args: <b@example.net>" in data and b"X-Rcpt-Args: <c@example.net>" in data


def test_a_big_message_is_streamed_in_bounded_memory(smtp_sink, tmp_path):
    port, workdir = smtp_sink
    path = str(tmp_path / "big")
    line = b"0123456789" * 7 + b"\n"      # LF endings: converted on the way out
    with open(path, "wb") as f:
        f.write(b"Subject: big\n\n")
        for _ in range(8 * 1024 * 1024 // len(line)):
            f.write(line)
    size = os.path.getsize(path)
    env = envelope()
    env.size = size
    tracemalloc.start()
    try:
        with client() as c, open(path, "rb") as content:
            c.connect("127.0.0.1", port)
            result = c.send(env, content)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.recipients[0].outcome == DELIVERED
    assert peak < 1024 * 1024, peak     # an 8 MB message, well under 1 MB at any time
    [dump] = wait_for(lambda: sink_dumps(workdir))
    wait_for(lambda: os.path.getsize(dump) > size)
    with open(dump, "rb") as f:
        data = f.read()
    # smtp-sink's dump has LF line endings: every line of ours arrived, whole and in order.
    body = data[data.index(b"Subject: big\n\n") + 14:]
    assert body.rstrip(b"\n") == (line * (8 * 1024 * 1024 // len(line))).rstrip(b"\n")


def test_354_without_any_accepted_recipient_gets_an_empty_dot(scripted):
    # RFC 2920 3.1: a pipelining server may say 354 although every RCPT failed.
    server = scripted(script={"RCPT": "550 5.1.1 no", "DATA": "354 go on"})
    with client() as c:
        c.connect("127.0.0.1", server.port)
        result = c.send(envelope(), io.BytesIO(CONTENT))
        assert result.recipients[0].outcome == PERMANENT and c.usable
        assert c.send(envelope(), io.BytesIO(CONTENT)).recipients[0].outcome == PERMANENT
    assert [m.wire for m in server.messages] == [b"", b""]   # never our content
    assert server.sessions[0].commands.count("RSET") == 1


# -- LMTP mode (RFC 2033; the real Dovecot is in tests/test_lmtp.py) ------------------------------

LHLO = "250-fake.test\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES"


def test_lmtp_decides_each_recipient_by_its_own_reply_after_the_dot(scripted):
    # Two replies for three accepted recipients, then silence: the third is still undecided.
    replies = b"250 2.0.0 <a@x.test> saved\r\n452 4.2.2 <b@x.test> over quota\r\n"
    server = scripted(script={"LHLO": LHLO, "DOT": replies})
    c = client(lmtp=True, timeouts=Timeouts(data_done=0.5))
    c.connect("127.0.0.1", server.port)
    result = c.send(envelope("a@x.test", "b@x.test", "c@x.test"), io.BytesIO(CONTENT))
    a, b, third = result.recipients
    assert (a.outcome, a.text) == (DELIVERED, "<a@x.test> saved")
    assert (b.outcome, b.code, b.status) == (TEMPORARY, 452, "4.2.2")
    assert third.outcome == TEMPORARY and "timed out" in third.text
    # The message was handed over: another server must not get it again.
    assert not result.try_next_host and not c.usable
    assert server.sessions[0].commands[0] == "LHLO client.example.org"


def test_lmtp_has_no_helo_fallback(scripted):
    server = scripted(script={"LHLO": "500 5.5.1 what?"})
    with pytest.raises(SessionError) as caught:
        client(lmtp=True).connect("127.0.0.1", server.port)
    assert caught.value.reply.code == 500
    assert server.sessions[0].commands == ["LHLO client.example.org", "QUIT"]


def test_unix_socket_that_is_missing(tmp_path):
    missing = str(tmp_path / "lmtp")
    with pytest.raises(SessionError) as caught:
        client(lmtp=True).connect(missing, server_name="me.test")
    assert str(caught.value.reply) == ("451 4.4.1 connect to me.test[%s]: No such file or "
                                       "directory" % missing)


# -- SMTP AUTH (RFC 4954; the real Postfix relay is in tests/test_relay_auth.py) ------------------

def test_auth_plain_is_one_line_with_the_initial_response(scripted):
    server = scripted(extensions=["PIPELINING", "AUTH LOGIN PLAIN"],
                      script={"AUTH": "235 2.7.0 Authentication successful"})
    with client(credentials=("alice", "wonderland"), sasl_require_tls=False) as c:
        c.connect("127.0.0.1", server.port)
        assert c.authenticated == "PLAIN"
    # base64("\0alice\0wonderland")
    assert server.sessions[0].commands[1] == "AUTH PLAIN AGFsaWNlAHdvbmRlcmxhbmQ="


def test_no_auth_in_clear_when_tls_is_required(scripted):
    server = scripted(extensions=["AUTH PLAIN"], script={"AUTH": "235 2.7.0 ok"})
    with pytest.raises(SessionError) as caught:
        client(credentials=("alice", "wonderland")).connect("127.0.0.1", server.port)
    assert caught.value.reply.status == "4.7.0" and not caught.value.permanent
    assert "unencrypted session" in caught.value.reply.text
    assert server.sessions[0].commands == ["EHLO client.example.org", "QUIT"]


@pytest.mark.parametrize("extensions, script, reply", [
    (["AUTH CRAM-MD5"], {}, "451 4.7.0 SASL authentication to {peer} impossible: it offers "
                            "CRAM-MD5, Elemta speaks PLAIN and LOGIN"),
    (["AUTH PLAIN"], {"AUTH": "535 5.7.8 Error: authentication failed"},
     "454 4.7.8 SASL authentication failed; server {peer} said: 535 5.7.8 Error: "
     "authentication failed"),
])
def test_auth_failures_are_temporary_and_quote_the_server(scripted, extensions, script, reply):
    server = scripted(extensions=extensions, script=script)
    c = client(credentials=("alice", "wonderland"), sasl_require_tls=False)
    with pytest.raises(SessionError) as caught:
        c.connect("127.0.0.1", server.port)
    assert str(caught.value.reply) == reply.format(peer=c.peer)
    assert caught.value.try_next_host and not caught.value.permanent


def test_credentials_without_an_auth_offer_send_unauthenticated(scripted):
    server = scripted()
    result = send_one(server, credentials=("alice", "wonderland"))
    assert result.recipients[0].outcome == DELIVERED
    assert not any(c.startswith("AUTH") for c in server.sessions[0].commands)


def test_a_take_paused_in_a_quit_never_reaches_a_connection_the_reaper_closes(scripted):
    """take() QUITs an expired connection (slow: it yields) and then looks at the next one
    in the list it fetched; the reaper meanwhile found that next one expired and is in its
    QUIT. Before the fix take() QUIT it too: two greenlets on one socket (gevent's
    ConcurrentObjectUseError, seen in the chaos test's delivery log)."""
    import gevent
    from elemta.delivery.connections import ConnectionCache

    def slow_quit(session, argument):
        time.sleep(1.0)
        return "221 2.0.0 Bye"
    server = scripted(script={"QUIT": slow_quit})
    older, newer = SMTPClient("client.test"), SMTPClient("client.test")
    for c in (older, newer):
        c.connect("127.0.0.1", server.port, server_name="sink")
    cache = ConnectionCache(idle_limit=1.0)     # the reaper looks at t = 0.5, 1, 1.5...
    try:
        gevent.sleep(0.3)
        cache.park("127.0.0.1", server.port, "sink", older)        # t = 0.3
        cache.park("127.0.0.1", server.port, "sink", newer)        # t = 0.3, taken first
        gevent.sleep(1.1)
        # t = 1.4, newer expired: take() QUITs it until t = 2.4; the reaper (t = 1.5) finds
        # older expired and QUITs it. take() must then find nothing left to try.
        assert cache.take("127.0.0.1", server.port, "sink") is None
        gevent.sleep(2.0)           # the sink answers one slow QUIT after the other
        assert server.sessions and all(s.commands[-1:] == ["QUIT"] for s in server.sessions)
        assert len(server.sessions) == 2
    finally:
        cache.close()


def test_the_cache_reaper_never_brings_back_a_connection_someone_took(scripted):
    """The reaper's slow QUIT of an expired connection yields; a fresh connection taken
    meanwhile must not be parked again behind its user's back (two greenlets on one
    socket: gevent's ConcurrentObjectUseError, seen under load in the relay bench)."""
    import gevent
    from elemta.delivery.connections import ConnectionCache

    def slow_quit(session, argument):
        time.sleep(1.0)
        return "221 2.0.0 Bye"
    server = scripted(script={"QUIT": slow_quit})
    old, fresh = SMTPClient("client.test"), SMTPClient("client.test")
    for client in (old, fresh):
        client.connect("127.0.0.1", server.port, server_name="sink")
    cache = ConnectionCache(idle_limit=1.0)     # the reaper looks at t = 0.5, 1, 1.5...
    try:
        gevent.sleep(0.3)
        cache.park("127.0.0.1", server.port, "sink", old)          # t = 0.3
        gevent.sleep(0.9)
        cache.park("127.0.0.1", server.port, "sink", fresh)        # t = 1.2
        gevent.sleep(0.6)           # t = 1.8: the reaper (t = 1.5) is in old's QUIT
        assert cache.take("127.0.0.1", server.port, "sink") is fresh
        gevent.sleep(1.0)           # t = 2.8: it has finished (2.5), not looked again (3)
        assert cache._idle.get(("127.0.0.1", server.port, "sink"), []) == []
        fresh.quit()
    finally:
        cache.close()
