"""CPU exhaustion: a message that is costly to check must not freeze the smtpd worker.

Attack: a client sends a large message (tens of MB, whitespace-rich so that relaxed
canonicalization is slow) carrying many DKIM-Signature fields. dkimpy canonicalized and
hashed the whole body once per signature, in the worker's event loop, where the plugin
timeout never fired: 10 signatures over 26 MB held the one smtpd worker for about 20 s,
and every other session of it (greeting, EHLO) waited. Now the body is hashed once, the
work is bounded by plugins.dkim.max_signatures / max_body_bytes / max_headers (what is
over a limit is reported dkim=neutral "not checked: why" and logged), and it runs in a
helper process (elemta.util.offload). Lines with long WSP runs made dkimpy's relaxed
canonicalization quadratic (33 s of CPU for 26 MB, past the plugin timeout: 451 for a
cheap message); Elemta's own is linear (elemta.plugins.dkimcanon).

Runs the real server (tests/conftest.py elemta_server, one smtpd worker) with the DKIM
verifier on and the keys in a private NSD (tests/peers/nsd.py), as tests/test_plugins_wired.py.
See also: elemta/plugins/dkim.py, elemta/plugins/dkimcanon.py, elemta/util/offload.py,
man/elemta.conf.5.
"""

import os
import re
import select
import shutil
import signal
import socket
import tempfile
import time

import pytest

from elemta.plugins.dkim import Signer, SigningKey, generate_key
from elemta.plugins.api import Context, Message
from elemta.plugins.manager import PluginManager, apply_header_edits
from elemta.plugins.resolver import Resolver
from elemta.util import offload
from tests.peers.nsd import NSDInstance, nsd_available

pytestmark = pytest.mark.skipif(nsd_available() is not None, reason=str(nsd_available()))

NOT_US = ["192.0.2.0/24"]      # mynetworks without 127.0.0.1: our client is checked
# "Answered promptly": far more than an idle worker needs, far less than the check took.
PROMPT = 2.0


@pytest.fixture(scope="module")
def dkim_key():
    workdir = tempfile.mkdtemp(prefix="elemta-cpu-dkim-")
    yield generate_key("signed.test", "s1", os.path.join(workdir, "s1.key"))
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def dns(dkim_key):
    workdir = tempfile.mkdtemp(prefix="elemta-cpu-nsd-")
    server = NSDInstance(workdir, {"signed.test": dkim_key.zone_line + "\n"},
                         address="127.0.0.1")
    server.start()
    yield {"nameservers": ["127.0.0.1"], "port": server.port, "timeout": 2.0}
    server.stop()
    server.remove()


class Client:
    """A raw SMTP client: the test decides when to send and when to read."""

    def __init__(self, port, timeout=60):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""

    def reply(self):
        """(code, text) of the next reply, all its lines."""
        lines = []
        while True:
            while b"\r\n" not in self.buffer:
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError("closed; got %r" % lines)
                self.buffer += data
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            lines.append(line)
            if line[3:4] != b"-":
                return int(line[:3]), b"\n".join(lines).decode()

    def command(self, line):
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def waiting(self):
        """True when the server has said nothing more yet."""
        return not self.buffer and not select.select([self.sock], [], [], 0)[0]

    def close(self):
        self.sock.close()


def start_transaction(server):
    client = Client(server.port)
    assert client.reply()[0] == 220
    assert client.command(b"EHLO client.test")[0] == 250
    assert client.command(b"MAIL FROM:<a@signed.test>")[0] == 250
    assert client.command(b"RCPT TO:<rcpt@example.test>")[0] == 250
    assert client.command(b"DATA")[0] == 354
    return client


def signature(number):
    """A DKIM-Signature whose key exists and whose body hash is wrong: the verifier must
    canonicalize and hash the whole body to find that out."""
    return (b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=signed.test; s=s1;"
            b" t=%d; h=from:to:subject; bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpW5HYlOSNYE=;"
            b" b=AAAA%04d\r\n" % (1700000000 + number, number))


# Short whitespace runs: the most regular-expression work per byte that stays linear.
SHORT_RUNS = b"a  " * 30 + b"\r\n"
# One long run inside each line: dkimpy's "[\t ]+\r\n" retries it from every space, so its
# work grew with the square of the run - seconds per megabyte, whatever the machine.
LONG_RUNS = b"a" + b" " * 900 + b"a\r\n"


def costly_message(size, signatures=10, line=SHORT_RUNS):
    return (b"".join(signature(n) for n in range(signatures))
            + b"From: <a@signed.test>\r\nTo: <rcpt@example.test>\r\nSubject: big\r\n\r\n"
            + line * (size // len(line)))


def spooled(server, reply):
    assert reply[0] == 250, reply
    return server.message(reply[1].rsplit(" ", 1)[1])[1]


def auth_results(content):
    """Our Authentication-Results field, unfolded."""
    unfolded = re.sub(r"\r\n[ \t]+", " ", content.decode("ascii", "replace"))
    found = re.search(r"^Authentication-Results: mx\.test;(.*?)\r$", unfolded, re.M)
    assert found, unfolded[:2000]
    return re.sub(r"\s+", " ", found.group(1))


def ehlo_time(server):
    """Seconds from connecting to the EHLO reply of a new client, which then quits."""
    started = time.monotonic()
    client = Client(server.port, timeout=60)
    try:
        assert client.reply()[0] == 220
        assert client.command(b"EHLO bystander.test")[0] == 250
        answered = time.monotonic() - started
        client.command(b"QUIT")
    finally:
        client.close()
    return answered


def test_other_sessions_are_answered_while_a_large_message_is_dkim_checked(
        elemta_server, dns):
    server = elemta_server(relay={"mynetworks": NOT_US}, dns=dns,
                           plugins={"dkim": {"enabled": True, "timeout": 60}})
    sender = start_transaction(server)
    sender.sock.sendall(costly_message(26 * 1024 * 1024) + b".\r\n")
    # A bystander connects again and again until the large message is answered: each
    # time the worker must greet it and answer its EHLO at once, whether it is reading
    # the message, checking it or writing it.
    times = []
    while sender.waiting():
        times.append(ehlo_time(server))
        assert times[-1] < PROMPT, "a bystander's EHLO took %.1f s" % times[-1]
        time.sleep(0.1)
    results = auth_results(spooled(server, sender.reply()))
    sender.close()
    assert len(times) >= 5, "the large message was answered too soon to tell: %s" % times
    assert results.count("dkim=fail") == 5       # the body hash does not match
    assert results.count("dkim=neutral") == 5    # over max_signatures: not checked


def send_signed(server, dkim_key, copies, body=b"A short body.\r\n"):
    content = (b"From: <a@signed.test>\r\nTo: <rcpt@example.test>\r\nSubject: hi\r\n"
               b"Message-ID: <%d@client.test>\r\n\r\n%s" % (int(time.time() * 1e6), body))
    fields = Signer([SigningKey("signed.test", "s1", dkim_key.key_file)]).sign(
        content, "signed.test")
    raw = apply_header_edits(content, fields * copies)
    client = start_transaction(server)
    client.sock.sendall(raw + b".\r\n")
    reply = client.reply()
    client.close()
    return auth_results(spooled(server, reply))


def test_signatures_beyond_max_signatures_are_reported_not_checked(elemta_server, dns,
                                                                   dkim_key):
    server = elemta_server(relay={"mynetworks": NOT_US}, dns=dns,
                           plugins={"dkim": {"enabled": True}})
    results = send_signed(server, dkim_key, 7)
    assert results.count("dkim=pass") == 5        # the documented default: 5, top first
    assert results.count('dkim=neutral reason="not checked: more than max_signatures (5) '
                         'signatures"') == 2, results
    assert re.search(r"DKIM: 2 of 7 signatures from \[127\.0\.0\.1\] not checked: more "
                     r"than max_signatures \(5\) signatures \(plugins\.dkim limits\)",
                     server.log()), server.log()


def test_a_body_over_max_body_bytes_is_reported_not_checked(elemta_server, dns, dkim_key):
    server = elemta_server(relay={"mynetworks": NOT_US}, dns=dns,
                           plugins={"dkim": {"enabled": True, "max_body_bytes": 1000}})
    assert "dkim=pass" in send_signed(server, dkim_key, 1, b"short\r\n")
    results = send_signed(server, dkim_key, 1, (b"y" * 70 + b"\r\n") * 30)
    assert 'dkim=neutral reason="not checked: body of' in results
    assert "more than max_body_bytes (1000)" in results
    assert "DKIM: 1 of 1 signatures from [127.0.0.1] not checked: body of" in server.log()


def test_more_header_fields_than_max_headers_are_reported_not_checked(elemta_server, dns,
                                                                      dkim_key):
    server = elemta_server(relay={"mynetworks": NOT_US}, dns=dns,
                           plugins={"dkim": {"enabled": True, "max_headers": 20}})
    results = send_signed(server, dkim_key, 30)
    assert results.count("dkim=neutral") == 30
    assert "header fields, more than max_headers (20)" in results


def test_long_whitespace_runs_get_their_verdict_within_the_plugin_timeout(elemta_server,
                                                                          dns):
    """Attack: 26 MB of lines each with a 900-space run. dkimpy's relaxed canonicalization
    is quadratic in such a run (over 30 s of CPU here, against the plugin's default 10 s
    timeout: 451 for every such message, and a helper kept busy cheaply); ours is linear
    (elemta.plugins.dkimcanon), so the message gets its real verdict."""
    server = elemta_server(relay={"mynetworks": NOT_US}, dns=dns,
                           plugins={"dkim": {"enabled": True}})
    sender = start_transaction(server)
    sender.sock.sendall(costly_message(26 * 1024 * 1024, line=LONG_RUNS) + b".\r\n")
    results = auth_results(spooled(server, sender.reply()))
    sender.close()
    assert results.count("dkim=fail") == 5       # the body hash does not match
    assert results.count("dkim=neutral") == 5    # over max_signatures: not checked


def test_our_users_long_whitespace_runs_are_signed_within_the_plugin_timeout(dns,
                                                                             dkim_key):
    """The same body from one of our users: dkimpy's signer canonicalized it with the same
    quadratic expression (451 at the storage stage, past the default 10 s timeout); ours
    hands dkimpy a body whose WSP is canonical already, and the signature verifies."""
    manager = PluginManager.from_mapping({"dkim": {"sign": True, "keys": [
        {"domain": "signed.test", "selector": "s1", "key_file": dkim_key.key_file}]},
        "authres": {"enabled": False}}).start(strict=True)
    resolver = Resolver(**dns)
    try:
        body = costly_message(26 * 1024 * 1024, signatures=0, line=LONG_RUNS)
        outgoing = Context(client_address="192.0.2.10", auth_user="alice",
                           sender="a@signed.test", resolver=resolver,
                           message=Message(body))
        outcome = manager.run("storage", outgoing)
        assert [name for name, _ in outcome.headers] == ["DKIM-Signature"], outcome
        inbound = Context(client_address="192.0.2.99", resolver=resolver,
                          message=Message(apply_header_edits(body, outcome.headers)))
        manager.run("data", inbound)
        assert [(r.method, r.result) for r in inbound.auth_results] == [("dkim", "pass")]
    finally:
        manager.close()


def compute_helpers(server):
    """pids of the server's offload helpers (elemta.util.offload), by process title."""
    return sorted(pid for pid, title in server.titles().items()
                  if title == offload.TITLE)


def test_the_plugin_timeout_stops_a_check_that_runs_too_long(elemta_server, dns):
    """In the event loop the timeout could not fire; in a helper it does: 451, the helper
    is killed, and the next message is checked by a fresh one. A check that cannot finish,
    whatever the machine's speed: the worker's idle helper is stopped (SIGSTOP) before the
    message comes, so it never answers."""
    server = elemta_server(relay={"mynetworks": NOT_US}, dns=dns,
                           plugins={"dkim": {"enabled": True, "timeout": 3}})
    first = start_transaction(server)
    first.sock.sendall(costly_message(10000, signatures=1) + b".\r\n")
    assert "dkim=fail" in auth_results(spooled(server, first.reply()))
    first.close()
    helpers = compute_helpers(server)
    assert len(helpers) == 1, server.titles()      # the one smtpd worker's, idle now
    stopped = helpers[0]
    os.kill(stopped, signal.SIGSTOP)
    try:
        sender = start_transaction(server)
        sender.sock.sendall(costly_message(10000, signatures=1) + b".\r\n")
        code, text = sender.reply()
        sender.close()
        assert (code, text[4:9]) == (451, "4.3.0"), text
        assert re.search(r"plugin dkim failed at data stage for client \[127\.0\.0\.1\]: "
                         r"timed out after 3s", server.log()), server.log()
        assert stopped not in compute_helpers(server)   # killed, not left stopped
        small = start_transaction(server)
        small.sock.sendall(costly_message(10000, signatures=1) + b".\r\n")
        assert "dkim=fail" in auth_results(spooled(server, small.reply()))
        small.close()
        fresh = compute_helpers(server)
        assert len(fresh) == 1 and fresh != [stopped], (stopped, server.titles())
    finally:
        if stopped in server.titles():
            os.kill(stopped, signal.SIGKILL)
