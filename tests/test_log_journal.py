"""logging.target: journal through a real server and a real systemd-journald (issue 17
req 4, "journald gets native fields"): the traffic of tests/traffic.py logged by Elemta
over journald's native protocol to a private journald (tests/peers/journald.py), read
back with journalctl: each delivery's queue id, sender, recipient, relay, status and DSN
are fields of the entry, the reject's too, and journalctl -o short shows the
Postfix-style lines elemtactl report reads.
"""

import os
import subprocess
import sys

import pytest

from elemta.report.parse import DELIVERY, read_events
from tests import traffic as T
from tests.harness import REPO, free_port, wait_for
from tests.peers.journald import JournaldInstance, journald_available


@pytest.fixture
def journal():
    reason = journald_available()
    if reason is not None:
        pytest.skip(reason)
    with JournaldInstance() as instance:
        yield instance


def test_no_journald_is_a_clear_error_at_start(tmp_path):
    """The daemon names the socket and stops, rather than losing every line."""
    socket_path = str(tmp_path / "journal" / "socket")
    config = tmp_path / "elemta.yaml"
    config.write_text("queue: {spool_dir: %s}\nlisteners: [{address: 127.0.0.1, port: %d}]\n"
                      "logging: {target: journal, journal_socket: %s}\n"
                      % (tmp_path / "spool", free_port(), socket_path))
    done = subprocess.run([sys.executable, "-m", "elemta.cli.elemta", "--config", str(config)],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert done.returncode != 0
    assert done.stderr.strip() == ("elemta: logging.target journal: no journald at %s (No "
                                   "such file or directory)" % socket_path)


def _wait_for_entries(journal, count, **matches):
    """The entries matching, once there are at least count (journald writes each
    datagram a moment after it arrives)."""
    found = []

    def enough():
        found[:] = journal.entries(**matches)
        return len(found) >= count
    wait_for(enough, timeout=60)
    return found


def test_deliveries_reach_the_journal_as_fields(elemta_server, journal):
    sent = T.run_traffic(elemta_server, log_target="journal", journal_socket=journal.socket)
    recipients = sum(len(r) for _, r in sent.sent)
    # Every recipient's attempts, the deferred one's twice, and the bounce's delivery.
    deliveries = _wait_for_entries(journal, recipients + 2, ELEMTA_EVENT="delivery")
    assert all(e["SYSLOG_IDENTIFIER"] == "elemta/delivery" for e in deliveries)
    assert all(e["ELEMTA_PROCESS"] == "delivery" for e in deliveries)
    assert all(e["PRIORITY"] == "6" and e["SYSLOG_FACILITY"] == "2" for e in deliveries)
    assert all(e["_TRANSPORT"] == "journal" for e in deliveries)   # native, not stdout
    relay = "127.0.0.1[127.0.0.1]:%d" % sent.sink.port
    outcome = [(e["ELEMTA_TO"], e["ELEMTA_STATUS"], e["ELEMTA_DSN"], e["ELEMTA_RELAY"])
               for e in deliveries]
    for address in T.DELIVERED + [T.ODD]:
        assert (address, "sent", "2.0.0", relay) in outcome
    assert (T.DEFERRED_ONCE, "deferred", "4.2.0", relay) in outcome
    assert (T.BOUNCED, "bounced", "5.1.1", relay) in outcome
    assert all(float(e["ELEMTA_DELAY"]) >= 0 for e in deliveries)
    bounced = next(e for e in deliveries if e["ELEMTA_STATUS"] == "bounced")
    assert "no such user" in bounced["ELEMTA_REASON"]
    # MESSAGE is the text line's message: Postfix's "QUEUEID: to=<...>, ... status=".
    assert bounced["MESSAGE"].startswith(bounced["ELEMTA_QUEUE_ID"] + ": to=<%s>"
                                         % T.BOUNCED)

    # A message's lines found by its queue id: the sender (queue manager's line) and
    # each recipient of the two-recipient message, under the same id.
    two = next(e for e in deliveries if e["ELEMTA_TO"] == T.DELIVERED[2])
    lines = journal.entries(ELEMTA_QUEUE_ID=two["ELEMTA_QUEUE_ID"])
    [queued] = [e for e in lines if e.get("ELEMTA_EVENT") == "queued"]
    assert queued["ELEMTA_FROM"] == T.SENDER and queued["ELEMTA_NRCPT"] == "2"
    assert int(queued["ELEMTA_SIZE"]) > 20
    assert {e["ELEMTA_TO"] for e in lines if e.get("ELEMTA_EVENT") == "delivery"} == \
        {T.DELIVERED[1], T.DELIVERED[2]}

    # The refused relay attempt, from smtpd: every part of the reject as a field.
    [reject] = journal.entries(ELEMTA_EVENT="reject")
    assert reject["SYSLOG_IDENTIFIER"] == "elemta/smtpd"
    assert (reject["ELEMTA_CLIENT"], reject["ELEMTA_FROM"], reject["ELEMTA_TO"]) == \
        ("unknown[127.0.0.2]", T.OTHER_SENDER, T.REFUSED)
    assert reject["ELEMTA_RESTRICTION"] == "reject_unauth_destination"
    assert "Relay access denied" in reject["MESSAGE"]


def test_journalctl_short_output_reads_as_postfix_lines(elemta_server, journal):
    """What an admin pipes into elemtactl report: journalctl -o short."""
    sent = T.run_traffic(elemta_server, log_target="journal", journal_socket=journal.socket)
    # Every delivery line written (as in the test above) before the journal is read.
    _wait_for_entries(journal, sum(len(r) for _, r in sent.sent) + 2,
                      ELEMTA_EVENT="delivery")
    events = [e for e in read_events(journal.short().splitlines())
              if e.event == DELIVERY]
    outcome = {(e.recipient, e.status) for e in events}
    for address in T.DELIVERED:
        assert (address, "sent") in outcome, events
    assert (T.BOUNCED, "bounced") in outcome and (T.DEFERRED_ONCE, "deferred") in outcome
    assert all(e.when is not None and e.queue_id for e in events)
    assert sent.rejected == 1


def test_a_record_too_big_for_a_datagram_goes_in_a_memfd(journal):
    """systemd's protocol: a record over the socket's datagram limit is passed as a
    sealed memfd; journald takes it whole. A value with newlines uses the binary-safe
    framing and comes back exact."""
    import logging
    from elemta.util.journal import JournalHandler
    handler = JournalHandler(journal.socket)
    logger = logging.getLogger("elemta.journaltest")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        big = "x" * (4 * 1024 * 1024)      # over any AF_UNIX datagram's size limit
        logger.warning("big one", extra={"queue_id": "BIG", "reason": big})
        logger.info("two lines", extra={"queue_id": "NL", "reason": "450 a\nb\x00c"})
    finally:
        logger.removeHandler(handler)
        handler.close()
    [entry] = _wait_for_entries(journal, 1, ELEMTA_QUEUE_ID="BIG")
    assert entry["ELEMTA_REASON"] == big and entry["PRIORITY"] == "4"
    assert entry["SYSLOG_IDENTIFIER"] == "elemta/journaltest"
    [entry] = _wait_for_entries(journal, 1, ELEMTA_QUEUE_ID="NL")
    # journalctl -o json writes a value that is not printable text as its bytes.
    reason = entry["ELEMTA_REASON"]
    if isinstance(reason, list):
        reason = bytes(reason).decode()
    assert reason == "450 a\nb\x00c"


def test_a_journald_that_goes_away_loses_no_line(capsys):
    """journald stopped under a running daemon: each line goes to stderr instead (the
    unit's stdout, which systemd also keeps), saying why; the process carries on."""
    import logging
    from elemta.util.journal import JournalHandler
    reason = journald_available()
    if reason is not None:
        pytest.skip(reason)
    journal = JournaldInstance().start()
    try:
        handler = JournalHandler(journal.socket)
    finally:
        journal.stop()
    logger = logging.getLogger("elemta.journaltest")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("1K114F: to=<a@b.test>, status=deferred")
    finally:
        logger.removeHandler(handler)
        handler.close()
    err = capsys.readouterr().err
    assert err.startswith("elemta: journal %s: " % journal.socket), err
    assert err.endswith("; the line was: 1K114F: to=<a@b.test>, status=deferred\n"), err
