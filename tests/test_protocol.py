"""The sans-IO SMTP core, driven by bytes alone (no sockets): RFC 5321 behaviour,
extensions, limits and bad input. See tests/protocol_driver.py for the driver."""

import base64
import re

import pytest

from tests.protocol_driver import Driver

EHLO = b"EHLO client.test\r\n"
ENVELOPE = b"MAIL FROM:<a@client.test>\r\nRCPT TO:<b@mx.test>\r\n"


def session(**settings):
    d = Driver(**settings)
    d.send(EHLO)
    return d


def codes(lines):
    return [line[:3] for line in lines]


def test_greeting_and_ehlo_lists_extensions():
    d = Driver(max_message_size=1000)
    assert d.wire == b"220 mx.test ESMTP Elemta\r\n"
    lines = d.replies(EHLO)
    assert lines[0] == "250-mx.test"
    assert [l[4:] for l in lines[1:]] == [
        "PIPELINING", "SIZE 1000", "ENHANCEDSTATUSCODES", "8BITMIME", "DSN", "SMTPUTF8",
        "CHUNKING"]
    assert lines[-1].startswith("250 ")


def test_starttls_and_auth_advertised_only_when_usable():
    d = session(starttls_available=True, auth_available=True)
    ehlo = d.replies(EHLO)
    assert "250-STARTTLS" in ehlo and not any("AUTH" in l for l in ehlo)
    d.send(b"STARTTLS\r\n")
    ehlo = d.replies(EHLO)
    assert "250-AUTH PLAIN LOGIN" in ehlo and not any("STARTTLS" in l for l in ehlo)


def test_helo_session():
    d = Driver()
    assert d.replies(b"HELO client.test\r\n") == ["250 mx.test"]
    assert d.replies(b"MAIL FROM:<a@b.test> SIZE=10\r\n")[0].startswith("555 5.5.4")


def test_a_whole_transaction_with_dot_unstuffing():
    d = session()
    out = d.replies(ENVELOPE + b"DATA\r\n")
    assert codes(out) == ["250", "250", "354"]
    out = d.replies(b"Subject: x\r\n\r\n..leading dot\r\nline\r\n.\r\n")
    assert out == ["250 2.0.0 Ok: queued as Q1"]
    txn, content = d.messages[0]
    assert content == b"Subject: x\r\n\r\n.leading dot\r\nline\r\n"
    assert txn.sender == "a@client.test"
    assert [r.address for r in txn.recipients] == ["b@mx.test"]
    assert d.replies(b"QUIT\r\n") == ["221 2.0.0 Bye"] and d.closed


def test_pipelined_commands_answered_in_order_and_byte_by_byte_input():
    d = session()
    stream = (ENVELOPE + b"RCPT TO:<c@mx.test>\r\nDATA\r\nhello\r\n.\r\nNOOP\r\n")
    for i in range(len(stream)):
        d.send(stream[i:i + 1])
    assert codes(d.wire.decode().splitlines()[-6:]) == ["250", "250", "250", "354",
                                                          "250", "250"]
    assert d.messages[0][1] == b"hello\r\n"


def test_empty_message_and_null_sender():
    d = session()
    d.send(b"MAIL FROM:<>\r\nRCPT TO:<b@mx.test>\r\nDATA\r\n")
    assert d.replies(b".\r\n") == ["250 2.0.0 Ok: queued as Q1"]
    assert d.messages[0][0].sender == "" and d.messages[0][1] == b""


@pytest.mark.parametrize("commands, expected", [
    (b"MAIL FROM:<a@b.test>\r\n", "503 5.5.1 Error: send HELO/EHLO first"),
])
def test_commands_before_helo(commands, expected):
    assert Driver().replies(commands) == [expected]


def test_commands_out_of_order():
    d = session()
    assert d.replies(b"RCPT TO:<b@mx.test>\r\n") == ["503 5.5.1 Error: need MAIL command"]
    assert d.replies(b"DATA\r\n") == ["503 5.5.1 Error: need MAIL command"]
    d.send(b"MAIL FROM:<a@b.test>\r\n")
    assert d.replies(b"MAIL FROM:<a@b.test>\r\n") == ["503 5.5.1 Error: nested MAIL command"]
    assert d.replies(b"DATA\r\n") == ["554 5.5.1 Error: no valid recipients"]
    assert d.replies(b"AUTH PLAIN\r\n")[0].startswith("503 5.5.1")


def test_unknown_and_malformed_commands():
    d = session()
    assert d.replies(b"FOO bar\r\n") == ["500 5.5.1 Error: command not recognized"]
    assert d.replies(b"\r\n") == ["500 5.5.1 Error: command not recognized"]
    assert d.replies(b"MAIL TO:<a@b.test>\r\n")[0].startswith("501 5.5.4")
    assert d.replies(b"MAIL FROM:a@b.test\r\n")[0].startswith("501 5.5.4")
    assert d.replies(b"MAIL FROM:<a@@b>\r\n")[0].startswith("501 5.1.7")
    assert d.replies(b"MAIL FROM:<a@b.test> BOGUS=1\r\n")[0].startswith("555 5.5.4")
    assert d.replies(b"EHLO\r\n") == ["501 5.5.4 Syntax: EHLO hostname"]
    assert d.replies(b"VRFY\r\n")[0].startswith("501 5.5.4")
    assert d.replies(b"NOOP\r\n") == ["250 2.0.0 Ok"]


def test_unknown_commands_are_put_to_the_driver_only_when_asked_for():
    from elemta.smtp.events import NEED_DATA, UnknownCommand
    from elemta.smtp.protocol import ServerProtocol, Settings
    from elemta.smtp.replies import Reply
    proto = ServerProtocol(Settings(hostname="mx.test", report_unknown_commands=True))
    proto.start()
    seen = []

    def replies(data):
        proto.receive_data(data)
        out = []
        while True:
            event = proto.next_event()
            if event is NEED_DATA:
                return out
            if isinstance(event, Reply):
                out.append(event.encode().decode().strip())
            elif isinstance(event, UnknownCommand):
                seen.append(event.line)
                if event.line.startswith("XREFUSE"):
                    proto.reject(Reply(554, "5.7.1", "Not that"))
                else:
                    proto.accept()          # the core's own refusal
            elif event.needs_decision:
                proto.accept()

    replies(b"EHLO client.test\r\n")
    assert replies(b"XFROB a b\r\n") == ["500 5.5.1 Error: command not recognized"]
    assert replies(b"XREFUSE now\r\n") == ["554 5.7.1 Not that"]
    # An empty line is no command at all: refused without asking.
    assert replies(b"\r\n") == ["500 5.5.1 Error: command not recognized"]
    assert seen == ["XFROB a b", "XREFUSE now"]
    assert replies(b"MAIL FROM:<a@b.test>\r\n") == ["250 2.1.0 Ok"]
    # Off (the default): the driver is never asked.
    assert session().replies(b"XFROB a b\r\n") == [
        "500 5.5.1 Error: command not recognized"]


def test_overlong_line_is_drained_then_refused_and_session_goes_on():
    d = session()
    assert d.replies(b"NOOP " + b"x" * 993 + b"\r\n") == ["250 2.0.0 Ok"]   # 1000 octets
    assert d.replies(b"NOOP " + b"x" * 994 + b"\r\n") == ["500 5.5.2 Error: line too long"]
    # A huge line in pieces is never buffered whole and answered once, at its end.
    for _ in range(100):
        assert d.send(b"y" * 10000) == b""
    assert len(d.proto._buf) <= 10000
    assert d.replies(b"tail\r\nNOOP\r\n") == ["500 5.5.2 Error: line too long",
                                              "250 2.0.0 Ok"]


def test_nul_and_control_characters_in_commands():
    d = session()
    assert d.replies(b"NOOP\x00\r\n") == ["500 5.5.2 Error: NUL character in command"]
    assert d.replies(b"NO\rOP\r\n") == ["500 5.5.2 Error: control character in command"]
    assert d.replies(b"NOOP \xff\r\n") == ["500 5.5.2 Error: command is not valid UTF-8"]


def test_non_ascii_address_needs_smtputf8():
    d = session()
    assert d.replies("MAIL FROM:<jösé@b.test>\r\n".encode())[0].startswith("553 5.6.7")
    assert codes(d.replies("MAIL FROM:<jösé@bü.test> SMTPUTF8\r\n"
                           "RCPT TO:<用户@例子.test>\r\nDATA\r\n".encode())) == [
        "250", "250", "354"]
    d.send("Subject: ü\r\n\r\nü\r\n.\r\n".encode())
    txn = d.messages[0][0]
    assert txn.smtputf8 and txn.sender == "jösé@bü.test"
    assert txn.recipients[0].address == "用户@例子.test"


def test_8bit_content_needs_8bitmime_by_default():
    d = session()
    d.send(ENVELOPE + b"DATA\r\n")
    assert d.replies(b"caf\xc3\xa9\r\n.\r\n") == [
        "554 5.6.1 Error: 8-bit message data without BODY=8BITMIME"]
    d.send(b"MAIL FROM:<a@b.test> BODY=8BITMIME\r\nRCPT TO:<b@mx.test>\r\nDATA\r\n")
    assert codes(d.replies(b"caf\xc3\xa9\r\n.\r\n")) == ["250"]
    assert d.messages[0][0].body == "8BITMIME"
    lenient = session(undeclared_8bit="accept")
    lenient.send(ENVELOPE + b"DATA\r\n")
    assert codes(lenient.replies(b"caf\xc3\xa9\r\n.\r\n")) == ["250"]
    assert lenient.messages[0][0].body == "8BITMIME"


def test_nul_in_content_is_refused():
    d = session()
    d.send(ENVELOPE + b"DATA\r\n")
    assert d.replies(b"a\x00b\r\n.\r\n") == ["550 5.6.0 Error: NUL character in message data"]
    assert not d.messages and d.aborted


def test_bare_lf_normalized_when_configured():
    d = session(bare_line_endings="normalize")
    d.send(ENVELOPE + b"DATA\r\n")
    assert codes(d.replies(b"a\nb\rc\r\n.\r\n")) == ["250"]
    assert d.messages[0][1] == b"a\r\nb\r\nc\r\n"


def test_message_size_limit_exact_and_over():
    d = session(max_message_size=10)
    d.send(ENVELOPE + b"DATA\r\n")
    assert codes(d.replies(b"12345678\r\n.\r\n")) == ["250"]       # 10 octets: ok
    d.send(ENVELOPE + b"DATA\r\n")
    assert d.replies(b"123456789\r\n.\r\n") == [
        "552 5.3.4 Error: message exceeds fixed limit of 10 bytes"]
    assert len(d.messages) == 1
    assert d.replies(b"MAIL FROM:<a@b.test> SIZE=11\r\n")[0].startswith("552 5.3.4")
    assert d.replies(b"NOOP\r\n") == ["250 2.0.0 Ok"]


def test_recipient_limit():
    d = session(max_recipients=2)
    out = d.replies(b"MAIL FROM:<a@b.test>\r\n" + b"RCPT TO:<x@mx.test>\r\n" * 3)
    assert out[-1] == "452 4.5.3 Error: too many recipients"


def test_too_many_errors_closes_with_421():
    d = session(max_errors=3)
    out = d.replies(b"BAD\r\n" * 5)
    assert codes(out) == ["500", "500", "500", "421"] and d.closed


def test_rejected_recipient_and_relay_denied():
    d = session(relay_ok=lambda a: a.endswith("@mx.test"))
    out = d.replies(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@elsewhere.test>\r\n")
    assert out[1] == "554 5.7.1 Relay access denied"
    assert d.replies(b"DATA\r\n") == ["554 5.5.1 Error: no valid recipients"]


def test_dsn_parameters_are_kept():
    d = session()
    d.send(b"MAIL FROM:<a@b.test> RET=HDRS ENVID=QQ+2Bx\r\n"
           b"RCPT TO:<b@mx.test> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;b+40mx.test\r\n"
           b"RCPT TO:<c@mx.test> NOTIFY=NEVER\r\nDATA\r\nx\r\n.\r\n")
    txn = d.messages[0][0]
    assert (txn.ret, txn.envid) == ("HDRS", "QQ+x")
    assert txn.recipients[0].notify == ("SUCCESS", "DELAY")
    assert txn.recipients[0].orcpt == "rfc822;b@mx.test"
    assert txn.recipients[1].notify == ("NEVER",)
    bad = d.replies(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<b@mx.test> NOTIFY=NEVER,DELAY\r\n")
    assert bad[1].startswith("501 5.5.4")


def test_postmaster_without_domain_and_source_route():
    d = session()
    out = d.replies(b"MAIL FROM:<@relay.test:a@b.test>\r\nRCPT TO:<Postmaster>\r\n")
    assert codes(out) == ["250", "250"]
    assert d.proto.transaction.sender == "a@b.test"


def test_vrfy_help_noop_rset():
    d = session()
    assert d.replies(b"VRFY root\r\n")[0].startswith("252 2.0.0")
    assert codes(d.replies(b"HELP\r\n")) == ["214", "214"]
    d.send(b"MAIL FROM:<a@b.test>\r\n")
    assert d.replies(b"RSET\r\n") == ["250 2.0.0 Ok"]
    assert d.replies(b"RCPT TO:<b@mx.test>\r\n")[0].startswith("503")


def test_bdat_chunks_and_last():
    d = session()
    d.send(ENVELOPE)
    assert d.replies(b"BDAT 5\r\nhello") == ["250 2.0.0 5 octets received"]
    assert d.replies(b"BDAT 8 LAST\r\n\r\n.world") == ["250 2.0.0 Ok: queued as Q1"]
    assert d.messages[0][1] == b"hello\r\n.world"      # no dot-unstuffing in BDAT


def test_bdat_without_transaction_still_consumes_the_chunk():
    d = session()
    assert d.replies(b"BDAT 10\r\nNOOP\r\nNOOP") == ["503 5.5.1 Error: need MAIL command"]
    assert d.replies(b"NOOP\r\n") == ["250 2.0.0 Ok"]
    d.send(ENVELOPE + b"BDAT 3\r\nabc")
    assert d.replies(b"DATA\r\n") == ["503 5.5.1 Error: DATA not allowed after BDAT"]
    assert d.replies(b"BDAT 0 LAST\r\n") == ["250 2.0.0 Ok: queued as Q1"]


def test_bdat_over_size_limit():
    d = session(max_message_size=5)
    d.send(ENVELOPE)
    assert d.replies(b"BDAT 6 LAST\r\n123456")[0].startswith("552 5.3.4")
    assert not d.messages and d.replies(b"NOOP\r\n") == ["250 2.0.0 Ok"]


def test_bdat_crlf_split_across_chunks_is_not_bare():
    d = session()
    d.send(ENVELOPE + b"BDAT 2\r\na\r")
    assert codes(d.replies(b"BDAT 2 LAST\r\n\nb")) == ["250"]
    assert d.messages[0][1] == b"a\r\nb"


def b64(text):
    return base64.b64encode(text.encode()).decode().encode()


def test_auth_needs_tls_unless_allowed():
    d = session(auth_available=True)
    assert d.replies(b"AUTH PLAIN " + b64("\0u\0p") + b"\r\n") == [
        "538 5.7.11 Encryption required for requested authentication mechanism"]


@pytest.mark.parametrize("dialogue", [
    [b"AUTH PLAIN " + b64("\0user\0secret")],
    [b"AUTH PLAIN", b64("\0user\0secret")],
    [b"AUTH LOGIN", b64("user"), b64("secret")],
    [b"AUTH LOGIN " + b64("user"), b64("secret")],
])
def test_auth_mechanisms(dialogue):
    d = session(auth_available=True, auth_plaintext=True, users={"user": "secret"})
    out = []
    for line in dialogue:
        out += d.replies(line + b"\r\n")
    assert out[-1] == "235 2.7.0 Authentication successful"
    assert all(l.startswith("334 ") for l in out[:-1])
    assert d.proto.auth_user == "user"


def test_auth_offers_only_the_backends_mechanisms_and_records_its_login_name():
    """An AUTH backend (Dovecot) may support fewer mechanisms than the core: only those
    are offered and accepted; the login name recorded is the one the backend returns."""
    d = session(auth_available=True, auth_plaintext=True)
    d.proto.offer_auth_mechanisms(["LOGIN", "CRAM-MD5"])
    assert "250-AUTH LOGIN" in d.replies(b"EHLO c\r\n")
    assert d.replies(b"AUTH PLAIN " + b64("\0user\0secret") + b"\r\n")[0].startswith(
        "504 5.5.4")
    d.proto.receive_data(b"AUTH LOGIN " + b64("User@Example.TEST") + b"\r\n"
                         + b64("secret") + b"\r\n")
    events = []
    while True:
        event = d.proto.next_event()
        events.append(event)
        if getattr(event, "needs_decision", False):
            break
    assert events[-1].username == "User@Example.TEST"
    d.proto.accept_auth("user")
    assert d.proto.auth_user == "user"
    d2 = session(auth_available=True, auth_plaintext=True)
    d2.proto.offer_auth_mechanisms(["GSSAPI"])
    assert not any("AUTH" in line for line in d2.replies(b"EHLO c\r\n"))


def test_auth_failures_and_bad_input():
    d = session(auth_available=True, auth_plaintext=True, users={"user": "secret"})
    assert d.replies(b"AUTH PLAIN " + b64("\0user\0wrong") + b"\r\n") == [
        "535 5.7.8 Error: authentication failed"]
    assert d.replies(b"AUTH PLAIN !!!notbase64\r\n")[0].startswith("501 5.5.2")
    assert d.replies(b"AUTH LOGIN\r\n") == ["334 VXNlcm5hbWU6"]
    assert d.replies(b"*\r\n") == ["501 5.0.0 Authentication cancelled"]
    assert d.replies(b"AUTH CRAM-MD5\r\n")[0].startswith("504 5.5.4")
    assert d.replies(b"AUTH PLAIN " + b64("nonul") + b"\r\n")[0].startswith("501 5.5.2")
    assert d.replies(b"NOOP\r\n") == ["250 2.0.0 Ok"]


def test_submission_requires_auth_before_mail():
    d = session(auth_available=True, auth_plaintext=True, auth_required=True,
                users={"user": "secret"})
    assert d.replies(b"MAIL FROM:<a@b.test>\r\n") == ["530 5.7.0 Error: authentication required"]
    d.send(b"AUTH PLAIN " + b64("\0user\0secret") + b"\r\n")
    assert codes(d.replies(b"MAIL FROM:<a@b.test>\r\n")) == ["250"]


def test_starttls_discards_pipelined_plaintext_and_forgets_ehlo():
    d = session(starttls_available=True)
    out = d.replies(b"STARTTLS\r\nMAIL FROM:<injected@b.test>\r\n")
    assert out == ["220 2.0.0 Ready to start TLS"] and d.starttls == 1
    assert d.replies(b"MAIL FROM:<a@b.test>\r\n") == ["503 5.5.1 Error: send HELO/EHLO first"]
    d.send(EHLO)
    assert d.replies(b"STARTTLS\r\n") == ["554 5.5.1 Error: TLS already active"]


def test_requiretls_is_offered_and_taken_only_inside_tls():
    """RFC 8689 2: REQUIRETLS in EHLO only on a TLS session; on MAIL FROM over a
    cleartext one it is refused with 530 5.7.10, and inside TLS it marks the message."""
    d = session(starttls_available=True)
    assert not any("REQUIRETLS" in line for line in d.replies(EHLO))
    assert d.replies(b"MAIL FROM:<a@b.test> REQUIRETLS\r\n") == [
        "530 5.7.10 REQUIRETLS support required: start TLS first"]
    d.send(b"STARTTLS\r\n")
    assert "250 REQUIRETLS" in d.replies(EHLO)
    assert d.replies(b"MAIL FROM:<a@b.test> REQUIRETLS=yes\r\n") == [
        "501 5.5.4 Error: REQUIRETLS takes no value"]
    d.send(b"MAIL FROM:<a@b.test> REQUIRETLS\r\nRCPT TO:<b@mx.test>\r\nDATA\r\n"
           b"Subject: r\r\n\r\nx\r\n.\r\n")
    [(txn, _)] = d.messages
    assert txn.requiretls
    d.send(ENVELOPE + b"DATA\r\nSubject: plain\r\n\r\nx\r\n.\r\n")
    assert not d.messages[1][0].requiretls


def test_starttls_unavailable():
    assert session().replies(b"STARTTLS\r\n") == ["502 5.5.1 Error: command not implemented"]


def test_every_reply_carries_an_enhanced_status_code():
    d = session(auth_available=True, auth_plaintext=True)
    d.send(b"HELP\r\nVRFY x\r\nNOOP\r\nFOO\r\nRCPT TO:<a@b>\r\n" + ENVELOPE +
           b"DATA\r\nx\r\n.\r\nRSET\r\nAUTH PLAIN =\r\nQUIT\r\n")
    lines = d.wire.decode().splitlines()
    for line in lines[1 + 9:]:          # past the greeting and the EHLO answer
        if line[:3] in ("334", "354"):
            continue
        assert re.match(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3} ", line), line


@pytest.mark.parametrize("status", [None, "5.7.1", "5.7.23", "4.999.999"])
def test_a_long_reply_line_stays_within_512_octets(status):
    """RFC 5321 4.5.3.1.5 counts the code and the enhanced status too: a long text (a
    plugin's explanation, an echoed address) is cut so the whole line fits."""
    from elemta.smtp.replies import Reply
    from tests.reply_format import line_problem
    code = 421 if status and status[0] == "4" else 550
    wire = Reply(code, status, ["x" * 600, "\u00e9" * 600]).encode()
    for line in wire.split(b"\r\n")[:-1]:
        assert len(line) + 2 <= 512 and line_problem(line) is None, len(line)
        assert line.endswith(b"...")
