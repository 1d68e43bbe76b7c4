"""SMTP smuggling: end-of-data sequences other servers read differently (SEC Consult 2023).

A client ends its message with something that is not <CR><LF>.<CR><LF> but that some
server takes for the end, then writes a second, forged transaction that the first server
keeps as content. Elemta ends DATA only at <CR><LF>.<CR><LF> and reads BDAT chunks by their
octet count, so the smuggled transaction must never get a reply of its own: with
smtpd.bare_line_endings "reject" (the default) the message is refused (550 5.5.2, or 550
5.6.0 for a NUL), with "normalize" it is one message holding the smuggled text. When Elemta
relays such a message on, its line endings become CRLF and dot-stuffing applies
(elemta.delivery.wire.DataEncoder), so a downstream server that is itself vulnerable (a
Postfix 3.7 with smtpd_forbid_bare_newline = no, which the control below shows splitting
"<LF>.<LF>") still sees one message.
Probed here: the sans-IO protocol core, real DATA and BDAT sessions against the `elemta`
subprocess under both policies, and delivery from Elemta into a real Postfix.
See also: elemta.smtp.protocol (_read_data, _read_chunk, ContentChecker).
"""

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

from tests.harness import REPO, free_port, wait_for
from tests.peers.postfix import PostfixInstance, postfix_available
from tests.protocol_driver import Driver

# The published end-of-data variants (SEC Consult's and later smuggling checkers'). The
# last is a lone dot at the start of the next line: plain dot-stuffing, so content.
ENDINGS = [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r.\r\n", b"\r\n.\r", b"\r\n.\n", b"\r.\n",
           b"\n.\r", b"\r\n\x00.\r\n", b"\r\n.\x00\r\n", b"\r\n\x00.\r", b"\r\n\x00.\n",
           b"\n\n.\r\n", b"\r\n."]
IDS = [repr(end)[2:-1] for end in ENDINGS]
POLICIES = ["reject", "normalize"]

BARE = ("550 5.5.2 Error: bare <CR> or <LF> in message data; lines must end with <CR><LF> "
        "(RFC 5321 2.3.8)")
NUL = "550 5.6.0 Error: NUL character in message data"
ENVELOPE = b"MAIL FROM:<a@c.test>\r\nRCPT TO:<b@example.test>\r\n"
# The forged transaction a vulnerable server would take as a second message.
SMUGGLED = (b"MAIL FROM:<ceo@bank.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n"
            b"Subject: smuggled\r\n\r\nevil\r\n.\r\n")


def attack(end):
    """Message content that ends early for a server that takes `end` for <CRLF>.<CRLF>."""
    return b"Subject: one\r\n\r\nbody" + end + SMUGGLED


def is_bare(end):
    return b"\r" in end.replace(b"\r\n", b"") or b"\n" in end.replace(b"\r\n", b"")


def refusal(end, policy):
    """The one reply Elemta gives the attack, or None when it is one accepted message."""
    if policy == "reject" and is_bare(end):
        return BARE
    if b"\x00" in end:
        return NUL
    return None


def bdat(content):
    return b"BDAT %d LAST\r\n" % len(content) + content


# -- the protocol core, bytes in, replies out -------------------------------------------------

@pytest.mark.parametrize("command", ["DATA", "BDAT"])
@pytest.mark.parametrize("end", ENDINGS, ids=IDS)
@pytest.mark.parametrize("policy", POLICIES)
def test_smuggled_end_of_data_never_splits_a_message(end, policy, command):
    d = Driver(bare_line_endings=policy)
    d.send(b"EHLO client.test\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<b@mx.test>\r\n")
    smuggled = attack(end)
    if command == "DATA":
        assert d.replies(b"DATA\r\n")[0].startswith("354 ")
        out = d.replies(smuggled)
    else:
        out = d.replies(bdat(smuggled))
    # One answer for one message: no 250 for the smuggled MAIL/RCPT, no 354.
    assert len(out) == 1, out
    assert len(d.messages) <= 1
    for txn, content in d.messages:
        assert txn.sender == "a@client.test"
        assert b"Subject: smuggled" in content     # still inside the first message
    expected = refusal(end, policy)
    if expected is None:
        assert out[0].startswith("250 2.0.0 Ok: queued as ") and len(d.messages) == 1
    else:
        assert out == [expected] and not d.messages
    assert d.replies(b"NOOP\r\n") == ["250 2.0.0 Ok"]


# -- over the wire -----------------------------------------------------------------------------

def dialogue(port, data):
    """Send raw bytes (ending in QUIT); every reply line until the server hangs up."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        assert s.recv(1000).startswith(b"220 ")
        s.sendall(data)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return [line for line in b"".join(chunks).decode().splitlines()
            if not line.startswith("250-")]


@pytest.fixture(scope="module")
def receivers(elemta_module_server):
    """{policy: server} for both smtpd.bare_line_endings policies; bank.test is local too,
    so a smuggled RCPT would be accepted if it were ever read as a command."""
    return {policy: elemta_module_server(
        smtpd={"bare_line_endings": policy},
        relay={"local_domains": ["example.test", "bank.test"]}) for policy in POLICIES}


@pytest.mark.parametrize("command", ["DATA", "BDAT"])
@pytest.mark.parametrize("end", ENDINGS, ids=IDS)
@pytest.mark.parametrize("policy", POLICIES)
def test_smuggling_over_the_wire_never_splits_a_message(receivers, policy, end, command):
    server = receivers[policy]
    before = set(server.queued_ids())
    content = attack(end)
    if command == "DATA":
        lines = dialogue(server.port, b"EHLO c\r\n" + ENVELOPE + b"DATA\r\n" + content
                         + b"QUIT\r\n")
        opening = [lines[0], "250 2.1.0 Ok", "250 2.1.5 Ok",
                   "354 End data with <CR><LF>.<CR><LF>"]
    else:
        lines = dialogue(server.port, b"EHLO c\r\n" + ENVELOPE + bdat(content) + b"QUIT\r\n")
        opening = [lines[0], "250 2.1.0 Ok", "250 2.1.5 Ok"]
    assert lines[0].startswith("250 ")             # the EHLO's last line
    # The envelope's replies, exactly one for the content, and the goodbye.
    assert lines[:len(opening)] == opening and len(lines) == len(opening) + 2, lines
    assert lines[-1] == "221 2.0.0 Bye"
    final = lines[-2]
    expected = refusal(end, policy)
    after = set(server.queued_ids())
    if expected is not None:
        assert final == expected
        assert after == before
        return
    assert final.startswith("250 2.0.0 Ok: queued as "), final
    queue_id = final.rsplit(" ", 1)[1]
    assert after - before == {queue_id}
    envelope, stored = server.message(queue_id)
    assert envelope.sender == "a@c.test"
    assert [r.address for r in envelope.recipients] == ["b@example.test"]
    assert b"MAIL FROM:<ceo@bank.test>" in stored and b"Subject: smuggled" in stored
    # Whatever the client sent, what is kept has only CRLF line endings.
    assert not is_bare(stored)


# -- relayed on: what a downstream server sees ------------------------------------------------

needs_postfix = pytest.mark.skipif(bool(postfix_available()), reason=str(postfix_available()))


@pytest.fixture(scope="module")
def downstream():
    """A real Postfix that parks what it gets in its hold queue, and reads bare <LF> as a
    line end (smtpd_forbid_bare_newline = no, the default before Postfix 3.9)."""
    workdir = tempfile.mkdtemp(prefix="elemta-smuggling-postfix-")
    with PostfixInstance(workdir, free_port(), hold_only=True,
                         extra_main_cf={"smtpd_forbid_bare_newline": "no"}) as postfix:
        yield postfix
    shutil.rmtree(workdir, ignore_errors=True)


def held_senders(postfix):
    return re.findall(r"hold: .*? from=<([^>]*)>", postfix.read_log())


@needs_postfix
def test_relayed_messages_stay_one_message_downstream(elemta_module_server, downstream):
    # Control: the downstream Postfix is fooled by "<LF>.<LF>" when it gets it as sent.
    lines = dialogue(downstream.smtpd_port, b"EHLO c\r\nMAIL FROM:<direct@c.test>\r\n"
                     b"RCPT TO:<r@remote.test>\r\nDATA\r\nSubject: one\r\n\r\nbody\n.\n"
                     b"MAIL FROM:<ceo-direct@bank.test>\r\nRCPT TO:<r@remote.test>\r\n"
                     b"DATA\r\nSubject: smuggled\r\n\r\nevil\r\n.\r\nQUIT\r\n")
    assert sum(line.startswith("250 2.0.0 Ok: queued") for line in lines) == 2, lines
    wait_for(lambda: "ceo-direct@bank.test" in held_senders(downstream))

    # Elemta accepts every variant it can ("normalize"), by DATA and by BDAT, and sends
    # each on to that Postfix; local submission (sendmail -i) brings bare LFs too.
    server = elemta_module_server(
        smtpd={"bare_line_endings": "normalize"},
        relay={"mynetworks": ["127.0.0.0/8"]},
        delivery={"workers": 1, "relayhost": "[127.0.0.1]:%d" % downstream.smtpd_port})
    sent = 0
    for end in ENDINGS:
        if refusal(end, "normalize") is not None:
            continue
        content = attack(end).replace(b"b@example.test", b"r@remote.test")
        for command in (b"DATA\r\n" + content, bdat(content)):
            lines = dialogue(server.port, b"EHLO c\r\nMAIL FROM:<a@c.test>\r\n"
                             b"RCPT TO:<r@remote.test>\r\n" + command + b"QUIT\r\n")
            assert lines[-2].startswith("250 2.0.0 Ok: queued as "), (end, lines)
            sent += 1
    result = subprocess.run(
        [sys.executable, "-m", "elemta.cli.sendmail", "-C", server.config_path, "-i",
         "-f", "a@c.test", "r@remote.test"],
        input=b"Subject: one\n\nbody\n.\nMAIL FROM:<ceo@bank.test>\nRCPT TO:<r@remote.test>\n"
              b"DATA\nSubject: smuggled\n\nevil\n.\n",
        capture_output=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=30)
    assert result.returncode == 0, result.stderr
    sent += 1

    def outcomes():
        found = re.findall(r"to=<r@remote\.test>, relay=\S+, delay=\S+, dsn=\S+, status=(\w+ \(.*)",
                           server.log())
        return found if len(found) >= sent else None
    wrong = [o for o in wait_for(outcomes, timeout=40) if not o.startswith("sent (250 ")]
    assert not wrong, wrong
    # Postfix logs the hold before its 250; its log writer may lag a little.
    wait_for(lambda: held_senders(downstream).count("a@c.test") >= sent)
    senders = held_senders(downstream)
    assert senders.count("a@c.test") == sent and "ceo@bank.test" not in senders, senders
