"""Fuzzing the SMTP core with hypothesis: whatever bytes arrive, in whatever pieces,
it never raises and every reply it writes is well formed (RFC 5321 4.2)."""

import re

from hypothesis import given, settings, strategies as st

from tests.protocol_driver import Driver
from tests.reply_format import line_problem

# Pieces of real dialogue, so random streams reach every state, mixed with noise.
FRAGMENTS = [b"EHLO x\r\n", b"HELO y\r\n", b"MAIL FROM:<a@b.test>", b" SIZE=100",
             b" BODY=8BITMIME", b" SMTPUTF8", b"RCPT TO:<c@d.test>", b" NOTIFY=NEVER",
             b"DATA\r\n", b"BDAT 5\r\n", b"BDAT 3 LAST\r\n", b"BDAT 0 LAST\r\n",
             b"\r\n.\r\n", b".\r\n", b"\r\n", b"\n", b"\r", b".", b"..", b"\x00",
             b"\xc3\xa9", b"\xff", b"RSET\r\n", b"NOOP\r\n", b"QUIT\r\n", b"STARTTLS\r\n",
             b"AUTH PLAIN\r\n", b"AUTH LOGIN dXNlcg==\r\n", b"AUTH PLAIN AHUAcA==\r\n",
             b"*\r\n", b"=\r\n", b"VRFY a\r\n", b"HELP\r\n", b"x" * 1200, b"<", b">", b":"]

streams = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=40)),
                   max_size=40).map(b"".join)


def check_wire(wire):
    assert wire.endswith(b"\r\n") or wire == b""
    lines = wire.split(b"\r\n")[:-1]
    previous = None
    for line in lines:
        # A multi-line reply keeps one code and ends with a space-separated last line.
        assert line_problem(line, previous) is None, line_problem(line, previous)
        previous = line if line[3:4] == b"-" else None


@settings(max_examples=400, deadline=None)
@given(stream=streams, cuts=st.lists(st.integers(0, 2000), max_size=8),
       tls=st.booleans(), auth=st.booleans(), normalize=st.booleans())
def test_random_streams_get_well_formed_replies(stream, cuts, tls, auth, normalize):
    d = Driver(starttls_available=tls, auth_available=auth, auth_plaintext=auth,
               max_message_size=50, max_recipients=3, users={"user": "p"},
               bare_line_endings="normalize" if normalize else "reject",
               relay_ok=lambda a: not a.startswith("c"))
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    for start, end in zip(points, points[1:]):
        d.send(stream[start:end])
    check_wire(d.wire)
    for txn, content in d.messages:
        assert len(content) <= 50


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=300))
def test_any_body_is_one_message_or_a_clean_refusal(body):
    """Whatever the content, DATA ends at the first CRLF.CRLF and never earlier."""
    d = Driver(bare_line_endings="normalize", undeclared_8bit="accept")
    d.send(b"EHLO x\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n")
    stuffed = body.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    d.send(stuffed + b"\r\n.\r\n")
    check_wire(d.wire)
    if b"\x00" in body:
        assert not d.messages and d.wire.endswith(
            b"550 5.6.0 Error: NUL character in message data\r\n")
    else:
        assert len(d.messages) == 1
        assert d.messages[0][1] == re.sub(rb"\r\n|\r|\n", b"\r\n", body + b"\r\n")
