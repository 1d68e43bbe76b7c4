"""Scanning never blocks the event loop, and a message is scanned once (issue 16 req 5).

Real scanners: a private clamd (tests/peers/clamd.py; its log has a line per stream it
scans) and a private Rspamd (tests/test_rspamd.py's fixture; its log has a line per
task, naming our queue id). A gate (tests/peers/gate.py) between Elemta and clamd
stalls the 30 MB scan for as long as the test needs, so "while the scan is under way"
is a fact the test sees, not a timing guess. Elemta runs one smtpd worker (the
harness's default) unless said: the other session is served by the same event loop.
See also: elemta/plugins/scanner.py, tests/test_clamav.py, tests/test_rspamd.py.
"""

import smtplib
import threading

import pytest

from tests.peers.clamd import EICAR, SIGNATURE, clamd_available, private_clamd
from tests.peers.gate import GateProxy
from tests.peers.rspamd import rspamd_available
from tests.scanning import message
from tests.test_rspamd import rspamd  # noqa: F401 (the module's Rspamd fixture)

pytestmark = pytest.mark.skipif(clamd_available() is not None,
                                reason=str(clamd_available()))

BIG = 40 << 20          # limits and scanner sizes: room for the 30 MB message


@pytest.fixture(scope="module")
def clamd():
    with private_clamd(stream_max_length="40M") as instance:
        yield instance


def transaction(port, raw, recipients=("b@example.test",)):
    """(greeting code, reply to the end of DATA) of one whole session."""
    smtp = smtplib.SMTP(timeout=300)
    try:
        greeting, _ = smtp.connect("127.0.0.1", port)
        smtp.ehlo("client.test")
        assert smtp.mail("a@sender.test")[0] == 250
        for rcpt in recipients:
            assert smtp.rcpt(rcpt)[0] == 250
        code, text = smtp.data(raw)
        smtp.quit()
        return greeting, (code, text.decode())
    finally:
        smtp.close()


def test_a_30_mb_scan_under_way_holds_up_only_its_own_session(elemta_server, clamd):
    with GateProxy(("127.0.0.1", clamd.port), stall_after=1 << 20) as gate:
        server = elemta_server(limits={"message_size": BIG}, plugins={"clamav": {
            "enabled": True, "address": gate.address, "max_size": BIG, "timeout": 600}})
        # 30 MB of text lines, the virus at the very end: found only if all was scanned.
        body = (b"y" * 998 + b"\r\n") * (30 * 1000) + EICAR
        before = clamd.scans()
        big = {}
        sender = threading.Thread(target=lambda: big.update(
            reply=transaction(server.port, message(body))[1]))
        sender.start()
        try:
            assert gate.stalled.wait(300), "the 30 MB message never reached clamd"
            # The big message is with the scanner, which reads no more for now. The
            # same worker greets another client and takes a whole message from it,
            # scanned by the same clamd (under the gate's limit, so straight through).
            greeting, reply = transaction(server.port, message(b"Nothing to see here."))
            assert greeting == 220
            assert reply[0] == 250, reply
            assert "reply" not in big and sender.is_alive()   # the big scan still waits
            assert "%s: clamav: clean" % reply[1].rsplit(" ", 1)[1] in server.log()
        finally:
            gate.open()
            sender.join(600)
    assert big["reply"] == (554, "5.7.1 Message rejected: virus found: %s.UNOFFICIAL"
                            % SIGNATURE)
    assert clamd.scans() == before + 2


@pytest.mark.skipif(rspamd_available() is not None, reason=str(rspamd_available()))
def test_many_recipients_one_scan_at_clamd_and_at_rspamd(elemta_server, clamd, rspamd,  # noqa: F811
                                                         tmp_path, monkeypatch):
    from tests.test_metrics import settled, start_server, value
    server, api_port = start_server(
        elemta_server, tmp_path, monkeypatch,
        plugins={"clamav": {"enabled": True, "address": clamd.address},
                 "rspamd": {"enabled": True, "address": rspamd.address}})
    recipients = ["user%d@example.test" % n for n in range(50)]
    before = clamd.scans()
    _, reply = transaction(server.port, message(b"One for all."), recipients)
    assert reply[0] == 250, reply
    queue_id = reply[1].rsplit(" ", 1)[1]
    assert clamd.scans() == before + 1
    with open(rspamd.log_path, errors="replace") as f:
        tasks = [line for line in f if "qid: <%s>" % queue_id in line]
    assert len(tasks) == 1, tasks

    def counted(samples):
        for scanner in ("clamav", "rspamd"):
            assert value(samples, "elemta_scanner_scan_seconds_count", scanner=scanner) == 1
    settled(api_port, counted)
