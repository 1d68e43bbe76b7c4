"""`elemtactl queue ...` and `mailq` as an admin runs them: real subprocesses over a real
spool, with mail put in by the real server (smtplib) or by Queue.commit, and the delivery
agent's part (deferring, failing) played by writing index records as it will.

Output is checked byte for byte against Postfix's layouts (mailq, postsuper, qshape).
"""

import json
import os
import re
import shutil
import smtplib
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from elemta.queue.ids import new_queue_id
from elemta.queue.listing import Selection, listed_from_record
from elemta.queue.model import (BOUNCED, DEFERRED, FAILED, HOLD, INCOMING, RCPT_DEFERRED, SENT,
                                STATES, Envelope, Recipient)
from elemta.queue.queue import Queue
from tests.harness import REPO, free_port

HEADING = ("-------Queue ID------ --Size-- ---Arrival Time---- --Sender/Recipient------\n")
INDENT = " " * 51
MESSAGE = b"From: a@client.test\r\nTo: b@example.test\r\nSubject: queue test\r\n\r\nHello.\r\n"


def run(program, *args, stdin=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "elemta.cli." + program] + list(args),
                          input=stdin, capture_output=True, text=True, cwd=cwd,
                          env=dict(os.environ, PYTHONPATH=REPO), timeout=60)


def elemtactl(*args, **kwargs):
    return run("elemtactl", *args, **kwargs)


def ctl(spool, *args, **kwargs):
    """elemtactl queue ACTION --spool-dir SPOOL ARGS..."""
    return elemtactl("queue", args[0], "--spool-dir", spool, *args[1:], **kwargs)


def asctime(seconds):
    return time.asctime(time.localtime(seconds))[:19]


def accept(spool, count=1, sender="alice@example.org", recipients=("bob@example.net",),
           content=MESSAGE, age=0.0):
    """Queue messages with Queue.commit (as smtpd does); returns their ids."""
    with Queue(spool) as queue:
        writers = []
        for _ in range(count):
            envelope = Envelope(new_queue_id(), sender, [Recipient(r) for r in recipients],
                                time.time() - age)
            writer = queue.start_message(envelope)
            writer.write(content)
            writer.finish()
            writers.append(writer)
        queue.commit(writers)
        return [w.queue_id for w in writers]


def play_delivery(spool, queue_id, state, error=None, replies=None, statuses=None,
                  attempts=1, next_attempt=None):
    """What the delivery agent will write after an attempt: state, error, per-recipient
    status and reply."""
    with Queue(spool) as queue:
        record = queue.get(queue_id)
        record.state, record.attempts, record.last_error = state, attempts, error
        record.next_attempt = next_attempt or time.time() + 3600
        for recipient, reply, status in zip(record.envelope.recipients, replies or [],
                                            statuses or []):
            recipient.last_reply, recipient.status = reply, status
        queue.index.put(record)


def record(spool, queue_id):
    with Queue(spool) as queue:
        return queue.get(queue_id)


def assert_index_consistent(spool):
    """The per-state view, the records, the hold markers and the files all agree."""
    with Queue(spool) as queue:
        records = {r.queue_id: r for r in queue.index.iter_records()}
        briefs = {b.queue_id: b for b in queue.index.iter_briefs()}
        assert {q: b.state for q, b in briefs.items()} == {
            q: r.state for q, r in records.items()}
        for queue_id, brief in briefs.items():
            assert brief.size == records[queue_id].envelope.size
        # What mailq prints from the listing database is what the records say.
        assert list(queue.listed_matching(Selection(now=time.time()))) == [
            listed_from_record(records[q]) for q in sorted(records)]
        held = set(queue.store.iter_held())
        assert held == {q for q, r in records.items() if r.state == HOLD}
        assert set(queue.store.iter_queue_ids()) == set(records)
        due = {q for _, q in queue.index.iter_due()}
        assert due == {q for q, r in records.items() if r.state in (INCOMING, DEFERRED)}


@pytest.fixture
def spool(tmp_path):
    path = str(tmp_path / "spool")
    Queue(path).close()
    return path


# ---------------------------------------------------------------- list / mailq

def test_list_shows_mail_from_the_real_server_in_mailq_layout(elemta_server):
    server = elemta_server()
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        client.sendmail("alice@client.test", ["bob@example.test", "carol@example.test"],
                        MESSAGE)
        client.sendmail("", ["postmaster@example.test"], MESSAGE)
    first, second = server.queued_ids()
    r1, r2 = record(server.spool, first), record(server.spool, second)
    expected = (HEADING
                + "%-21s %8d %s alice@client.test\n" % (first, r1.envelope.size,
                                                        asctime(r1.envelope.arrival))
                + INDENT + "bob@example.test\n"
                + INDENT + "carol@example.test\n"
                + "\n"
                + "%-21s %8d %s MAILER-DAEMON\n" % (second, r2.envelope.size,
                                                    asctime(r2.envelope.arrival))
                + INDENT + "postmaster@example.test\n"
                + "\n-- %d Kbytes in 2 Requests.\n"
                % ((r1.envelope.size + r2.envelope.size) // 1024))
    listed = elemtactl("--config", server.config_path, "queue", "list")
    assert (listed.returncode, listed.stderr) == (0, "")
    assert listed.stdout == expected
    # mailq is the same listing; --config may also follow the command.
    mailq = run("mailq", "--config", server.config_path)
    assert (mailq.returncode, mailq.stdout) == (0, expected)
    assert elemtactl("queue", "list", "--config", server.config_path).stdout == expected


def test_an_empty_queue_says_so(spool):
    listed = ctl(spool, "list")
    assert (listed.returncode, listed.stdout, listed.stderr) == (0, "Mail queue is empty\n", "")
    assert ctl(spool, "list", "--json").stdout == ""


def test_marks_reasons_and_the_closing_line_follow_postfix(spool):
    plain, held, deferred, mixed = (accept(spool, recipients=rcpts)[0] for rcpts in (
        ["one@a.example"], ["two@b.example"], ["three@c.example", "four@c.example"],
        ["five@d.example", "six@d.example", "seven@d.example", "eight@d.example"]))
    assert ctl(spool, "hold", held).returncode == 0
    play_delivery(spool, deferred, DEFERRED,
                  error="connect to mx.c.example[192.0.2.1]:25: Connection refused")
    play_delivery(spool, mixed, DEFERRED, replies=[
        "450 4.2.0 <five@d.example>: Recipient address rejected: Greylisted",
        None, "450 4.2.0 <five@d.example>: Recipient address rejected: Greylisted", None],
        statuses=[RCPT_DEFERRED, SENT, RCPT_DEFERRED, "pending"])
    size = len(MESSAGE)

    def head(queue_id, mark=""):
        arrival = record(spool, queue_id).envelope.arrival
        return "%-21s %8d %s alice@example.org\n" % (queue_id + mark, size, asctime(arrival))

    refused = "connect to mx.c.example[192.0.2.1]:25: Connection refused"
    greylisted = "450 4.2.0 <five@d.example>: Recipient address rejected: Greylisted"
    expected = (HEADING
                + head(plain) + INDENT + "one@a.example\n\n"
                # "!" as Postfix marks it; who held it where Postfix says why it waits.
                + head(held, "!") + " " * (76 - len("held by admin")) + "(held by admin)\n"
                + INDENT + "two@b.example\n\n"
                + head(deferred)
                + " " * (76 - len(refused)) + "(" + refused + ")\n"
                + INDENT + "three@c.example\n" + INDENT + "four@c.example\n\n"
                + head(mixed)
                + " " * (76 - len(greylisted)) + "(" + greylisted + ")\n"
                + INDENT + "five@d.example\n" + INDENT + "seven@d.example\n"
                + " " * (76 - len("reason unavailable")) + "(reason unavailable)\n"
                + INDENT + "eight@d.example\n"
                + "\n-- %d Kbytes in 4 Requests.\n" % (4 * size // 1024))
    assert ctl(spool, "list").stdout == expected

    lines = [json.loads(line) for line in ctl(spool, "list", "--json").stdout.splitlines()]
    assert [(m["queue_id"], m["queue_name"]) for m in lines] == [
        (plain, INCOMING), (held, HOLD), (deferred, DEFERRED), (mixed, DEFERRED)]
    assert lines[2]["recipients"] == [
        {"address": "three@c.example", "status": "pending", "delay_reason": refused},
        {"address": "four@c.example", "status": "pending", "delay_reason": refused}]
    assert [r["address"] for r in lines[3]["recipients"]] == [
        "five@d.example", "seven@d.example", "eight@d.example"]
    assert lines[0]["message_size"] == size and lines[0]["sender"] == "alice@example.org"


def test_filters_pick_by_state_sender_recipient_domain_and_age(spool):
    old = accept(spool, sender="news@list.example", recipients=["x@big.example"], age=7200)[0]
    fresh = accept(spool, sender="alice@example.org",
                   recipients=["y@big.example", "z@small.example"])[0]
    null = accept(spool, sender="", recipients=["w@small.example"], age=600)[0]
    ctl(spool, "hold", fresh)

    def ids(*options):
        result = ctl(spool, "list", "--json", *options)
        assert result.returncode == 0, result.stderr
        return [json.loads(line)["queue_id"] for line in result.stdout.splitlines()]

    assert ids() == [old, fresh, null]
    assert ids("--state", "hold") == [fresh]
    assert ids("--state", "incoming,hold") == [old, fresh, null]
    assert ids("--state", "deferred") == []
    assert ids("--from", "*@LIST.example") == [old]
    assert ids("--from", "<>") == [null]
    assert ids("--to", "z@*") == [fresh]
    assert ids("--domain", "small.example") == [fresh, null]
    assert ids("--older-than", "1h") == [old]
    assert ids("--older-than", "5m", "--newer-than", "1h") == [null]
    assert ids("--newer-than", "300") == [fresh]
    mailq = run("mailq", "--spool-dir", spool, "--state", "hold")
    assert mailq.stdout.splitlines()[1].startswith(fresh + "!")


# ---------------------------------------------------------------- show

def test_show_prints_envelope_state_recipients_and_headers(spool):
    content = (b"Received: from client.test\r\nSubject: about the thing\r\n\r\n"
               b"First line.\r\nSecond line.\r\n")
    [queue_id] = accept(spool, recipients=["r1@x.example", "r2@y.example"], content=content)
    play_delivery(spool, queue_id, DEFERRED, attempts=2, replies=[
        "250 2.0.0 ok", "451 4.3.0 try later"], statuses=[SENT, RCPT_DEFERRED])
    shown = ctl(spool, "show", queue_id)
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    assert text.startswith("Queue ID:   %s\nState:      deferred, 2 attempts, next attempt "
                           % queue_id)
    assert "\nSize:       %d bytes\nSender:     <alice@example.org>\n" % len(content) in text
    assert ("Recipients:\n  <r1@x.example>  sent\n    last reply: 250 2.0.0 ok\n"
            "  <r2@y.example>  deferred\n    last reply: 451 4.3.0 try later\n") in text
    assert "Spool file: %s/messages/%s/%s\n" % (spool, queue_id[-1], queue_id) in text
    assert text.endswith("\nReceived: from client.test\nSubject: about the thing\n")
    assert "First line" not in text

    whole = ctl(spool, "show", queue_id, "--body").stdout
    assert whole.endswith("\nReceived: from client.test\nSubject: about the thing\n\n"
                          "First line.\nSecond line.\n")
    data = json.loads(ctl(spool, "show", "--json", queue_id).stdout)
    assert (data["queue_id"], data["attempts"], data["recipients"][1]["last_reply"]) == (
        queue_id, 2, "451 4.3.0 try later")


def test_unknown_and_malformed_ids_are_one_line_errors(spool):
    [queue_id] = accept(spool)
    missing = new_queue_id()
    shown = ctl(spool, "show", missing)
    assert (shown.returncode, shown.stdout) == (67, "")
    assert shown.stderr == "elemtactl: queue: no such message: %s\n" % missing
    held = ctl(spool, "hold", missing, queue_id)
    assert held.returncode == 67
    assert held.stdout == "%s: placed on hold\nPlaced on hold: 1 message\n" % queue_id
    assert held.stderr == "elemtactl: queue: no such message: %s\n" % missing
    bad = ctl(spool, "delete", "../../etc/passwd")
    assert (bad.returncode, bad.stdout) == (64, "")
    assert bad.stderr == ("elemtactl: queue delete: not a queue id: ../../etc/passwd (a queue "
                          "id is 20 characters of 0-9 and A-Z, as mailq shows it)\n")
    assert record(spool, queue_id).state == HOLD


def test_missing_spool_index_and_bad_options_are_clear(tmp_path, spool):
    nowhere = str(tmp_path / "nowhere")
    result = ctl(nowhere, "list")
    assert result.returncode == 66
    assert result.stderr == ("elemtactl: queue: no spool directory %s (is --config right?)\n"
                             % nowhere)
    assert not os.path.exists(nowhere)
    for args, code in ((("list", "--state", "frozen"), 64), (("list", "--older-than", "soon"), 64),
                       (("hold",), 64), (("hold", new_queue_id(), "--all"), 64)):
        result = ctl(spool, *args)
        assert result.returncode == code, (args, result)
        assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
        assert result.stderr.startswith("elemtactl: queue ")


# ---------------------------------------------------------------- actions

def test_hold_release_delete_requeue_flush_print_what_they_did(spool):
    a, b, c = accept(spool, 3)
    play_delivery(spool, c, DEFERRED, error="451 later", attempts=2,
                  next_attempt=time.time() + 7200)

    held = ctl(spool, "hold", a, b + "!")      # a mark copied from mailq is ignored
    assert held.stdout == ("%s: placed on hold\n%s: placed on hold\n"
                           "Placed on hold: 2 messages\n" % (a, b))
    assert ctl(spool, "hold", a).stdout == "%s: already on hold\nPlaced on hold: 0 messages\n" % a
    assert sorted(os.listdir(os.path.join(spool, "hold"))) == sorted([a, b])
    assert ctl(spool, "release", a).stdout == ("%s: released from hold\n"
                                               "Released from hold: 1 message\n" % a)
    assert record(spool, a).state == INCOMING

    from elemta.queue import wakeup
    with wakeup.bind(spool, 0) as delivery_worker:     # stands in for a delivery worker
        delivery_worker.settimeout(5)
        flushed = ctl(spool, "flush")
        assert delivery_worker.recv(10) == b"!"          # woken, not left to its timer
    assert flushed.stdout == "%s: due now\nDue now: 1 message\n" % c
    assert flushed.stderr == ""
    assert record(spool, c).next_attempt <= time.time()
    assert record(spool, c).state == DEFERRED
    assert ctl(spool, "flush", b).stdout == (
        "%s: on hold, left alone (release it first)\nDue now: 0 messages\n" % b)

    requeued = ctl(spool, "requeue", c)
    assert requeued.stdout == "%s: requeued\nRequeued: 1 message\n" % c
    after = record(spool, c)
    assert (after.state, after.attempts, after.last_error) == (INCOMING, 0, None)

    deleted = ctl(spool, "delete", b, a)
    assert deleted.stdout == "%s: deleted\n%s: deleted\nDeleted: 2 messages\n" % (b, a)
    with Queue(spool) as queue:
        assert [r.queue_id for r in queue.index.iter_records()] == [c]
        assert not os.path.exists(queue.store.path(a))
        assert list(queue.store.iter_held()) == []
    assert_index_consistent(spool)


def test_show_json_and_mailq_say_who_held_a_message_and_why(spool):
    """Issue 16 req 4: an admin's hold is "held by admin" (with --reason, why), in
    queue show, its JSON and mailq's reason line; it survives a reindex (the hold marker
    keeps it) and release forgets it."""
    [queue_id] = accept(spool)
    held = ctl(spool, "hold", "--reason", "customer asked to wait", queue_id)
    assert held.stdout == "%s: placed on hold\nPlaced on hold: 1 message\n" % queue_id
    for _ in range(2):
        shown = ctl(spool, "show", queue_id).stdout
        assert "\nState:      hold\nArrival:" in shown
        assert re.search(r"\nHold:       held by admin: customer asked to wait \(since "
                         r"\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}\)\n", shown), shown
        data = json.loads(ctl(spool, "show", "--json", queue_id).stdout)
        assert (data["hold"]["by"], data["hold"]["reason"]) == ("admin",
                                                                "customer asked to wait")
        assert "(held by admin: customer asked to wait)\n" in ctl(spool, "list").stdout
        assert ctl(spool, "reindex").returncode == 0
    assert ctl(spool, "release", queue_id).returncode == 0
    shown = ctl(spool, "show", queue_id).stdout
    assert "Hold:" not in shown and "held by" not in ctl(spool, "list").stdout
    assert json.loads(ctl(spool, "show", "--json", queue_id).stdout)["hold"] is None


def test_release_rescan_without_a_scanner_leaves_the_message_held(spool):
    """--rescan with no content scanner enabled cannot judge: the message stays held,
    the command says why and exits 75 (EX_TEMPFAIL) so a script tries again later."""
    [queue_id] = accept(spool)
    ctl(spool, "hold", queue_id)
    result = ctl(spool, "release", "--rescan", queue_id)
    assert result.returncode == 75, result
    assert result.stdout == ("%s: rescan failed: left on hold as it was: no content scanner "
                             "is enabled (plugins with scans_content: clamav, rspamd) and no "
                             "milter runs for this message\n"
                             "Released from hold: 0 messages\n" % queue_id)
    assert result.stderr == ("elemtactl: queue release --rescan: 1 message left on hold: a "
                             "scanner could not decide (try again)\n")
    assert record(spool, queue_id).state == HOLD


def test_bulk_selection_by_pattern_state_and_stdin(spool):
    spam = accept(spool, 3, sender="offer@spam.example")
    ham = accept(spool, 2, sender="friend@example.org")
    held = ctl(spool, "hold", "--from", "*@spam.example")
    assert held.stdout.splitlines() == ["%s: placed on hold" % q for q in spam] + [
        "Placed on hold: 3 messages"]
    # release --all only looks at held mail; delete reads ids from stdin like postsuper -d -.
    assert ctl(spool, "release", "--all", "--to", "nobody@*").stdout == (
        "Released from hold: 0 messages\n")
    deleted = ctl(spool, "delete", "-", stdin="%s\n%s*\n" % (spam[0], spam[1]))
    assert deleted.stdout.splitlines()[-1] == "Deleted: 2 messages"
    released = ctl(spool, "release", "--all")
    assert released.stdout == "%s: released from hold\nReleased from hold: 1 message\n" % spam[2]
    everything = ctl(spool, "delete", "--all", "--state", "incoming")
    assert everything.stdout.splitlines()[-1] == "Deleted: 3 messages"
    assert ctl(spool, "list").stdout == "Mail queue is empty\n"
    assert ham  # both went with --all


def test_requeue_tries_a_failed_message_again_for_the_recipients_not_delivered(spool):
    [queue_id] = accept(spool, recipients=["done@x.example", "gone@y.example"])
    play_delivery(spool, queue_id, FAILED, error="too many attempts",
                  replies=["250 ok", "550 5.1.1 no such user"], statuses=[SENT, BOUNCED])
    listed = ctl(spool, "list").stdout
    assert INDENT + "gone@y.example\n" in listed and "done@x.example" not in listed
    assert ctl(spool, "requeue", queue_id).returncode == 0
    after = record(spool, queue_id)
    assert after.state == INCOMING
    assert [r.status for r in after.envelope.recipients] == [SENT, "pending"]


# ---------------------------------------------------------------- the files are the truth

def test_hold_survives_reindex_a_lost_index_and_a_restart(elemta_server):
    server = elemta_server()
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        for n in range(3):
            client.sendmail("alice@client.test", ["bob%d@example.test" % n], MESSAGE)
    kept, held, deleted = server.queued_ids()
    config = ["--config", server.config_path]
    assert elemtactl(*config, "queue", "hold", held).returncode == 0
    assert elemtactl(*config, "queue", "delete", deleted).returncode == 0

    reindexed = elemtactl(*config, "queue", "reindex")   # while the server runs
    assert reindexed.stdout == "reindexed 2 messages (1 on hold) from %s\n" % server.spool
    assert record(server.spool, held).state == HOLD

    server.stop()
    shutil.rmtree(os.path.join(server.spool, "index.lmdb"))
    lost = elemtactl(*config, "queue", "list")
    assert lost.returncode == 66
    assert lost.stderr == ("elemtactl: queue: no index in %s; rebuild it with: elemtactl "
                           "queue reindex\n" % server.spool)
    server.start()                                       # start-up reconciles from files
    listed = elemtactl(*config, "queue", "list", "--json").stdout.splitlines()
    assert [(m["queue_id"], m["queue_name"]) for m in map(json.loads, listed)] == [
        (kept, INCOMING), (held, HOLD)]
    assert_index_consistent(server.spool)


def test_reconcile_settles_a_hold_cut_short_by_a_crash(spool):
    a, b, c = accept(spool, 3)
    with Queue(spool) as queue:
        queue.store.mark_held(a)                 # crashed after the marker, before the index
        r = queue.get(b)
        r.state = HOLD
        queue.index.put(r)                       # crashed releasing: marker gone, index not
        queue.store.mark_held(c)
        queue.store.remove(c)                    # crashed deleting: file gone, marker left
        summary = queue.reconcile()
    assert (summary.held, summary.released, summary.stale_markers) == ([a], [b], [c])
    assert_index_consistent(spool)


# ---------------------------------------------------------------- summary

def test_summary_counts_states_and_prints_qshape(spool):
    accept(spool, 2, recipients=["a@one.example", "b@one.example"], age=120)
    accept(spool, 1, recipients=["c@two.example"], age=45 * 60,
           content=MESSAGE + b"x" * 3000)
    [held] = accept(spool, 1, recipients=["d@Two.Example"], age=3 * 86400)
    ctl(spool, "hold", held)
    summary = ctl(spool, "summary")
    assert summary.returncode == 0, summary.stderr
    big = len(MESSAGE) + 3000
    assert summary.stdout == (
        "State        Messages     Kbytes\n"
        "incoming            3 %10d\n" % ((2 * len(MESSAGE) + big) // 1024)
        + "active              0          0\n"
        "deferred            0          0\n"
        "hold                1          0\n"
        "failed              0          0\n"
        "total               4 %10d\n" % ((3 * len(MESSAGE) + big) // 1024)
        + "\n"
        "Recipient domains by age in minutes (as qshape):\n"
        "                                         T  5 10 20 40 80 160 320 640 1280 1280+\n"
        "                                  TOTAL  6  4  0  0  0  1   0   0   0    0     1\n"
        "                            one.example  4  4  0  0  0  0   0   0   0    0     0\n"
        "                            two.example  2  0  0  0  0  1   0   0   0    0     1\n")
    data = json.loads(ctl(spool, "summary", "--json", "--sender-domains").stdout)
    assert data["states"]["hold"] == {"messages": 1, "bytes": len(MESSAGE)}
    assert data["domains"] == {"example.org": [4, 2, 0, 0, 0, 1, 0, 0, 0, 0, 1]}
    only_hold = json.loads(ctl(spool, "summary", "--json", "--state", "hold").stdout)
    assert only_hold["total"][0] == 1


# ---------------------------------------------------------------- under load

def test_commands_run_while_the_server_accepts_mail(elemta_server):
    """Several senders keep the server committing, and a delivery worker keeps claiming
    and deferring (its DNS server does not answer: every attempt defers, retried within
    a second), while elemtactl lists, holds, releases, deletes, flushes and summarises;
    nothing is lost, nothing is corrupted."""
    server = elemta_server(smtpd={"workers": 2}, delivery={
        "workers": 1, "nameservers": ["127.0.0.1"], "dns_port": free_port(),
        "dns_timeout": 0.1, "min_backoff": 0.2, "max_backoff": 0.5})
    config = ["--config", server.config_path]
    accepted = []
    stop = threading.Event()
    errors = []

    def sender(n):
        try:
            with smtplib.SMTP("127.0.0.1", server.port) as client:
                while not stop.is_set():
                    client.sendmail("load%d@client.test" % n, ["rcpt%d@remote.test" % n],
                                    MESSAGE)
                    accepted.append(n)
        except Exception as exc:   # reported below; a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    try:
        deleted = set()
        deadline = time.monotonic() + 3
        rounds = 0
        while time.monotonic() < deadline or rounds < 2:
            rounds += 1
            for args in (("list",), ("list", "--json"), ("summary",),
                         ("hold", "--from", "load0@*"), ("flush",),
                         ("release", "--all"), ("hold", "--to", "rcpt1@*")):
                result = elemtactl(*config, "queue", *args)
                assert result.returncode == 0, (args, result.stderr)
                assert "Traceback" not in result.stderr
            listed = [json.loads(line) for line in
                      elemtactl(*config, "queue", "list", "--json", "--from",
                                "load2@*").stdout.splitlines()]
            victims = [m["queue_id"] for m in listed[:5]]
            if victims:
                result = elemtactl(*config, "queue", "delete", *victims)
                assert result.returncode == 0, result.stderr
                deleted.update(victims)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert errors == []
    assert len(accepted) > 50
    # Compared in several reads: nothing may change them meanwhile.
    assert server.stop() == []
    queued = server.queued_ids()
    assert len(queued) == len(accepted) - len(deleted)
    assert not deleted & set(queued)
    assert_index_consistent(server.spool)
    summary = json.loads(elemtactl(*config, "queue", "summary", "--json").stdout)
    assert sum(s["messages"] for s in summary["states"].values()) == len(queued)
    assert set(summary["states"]) == set(STATES)
    assert "status=deferred" in server.log()       # delivery really ran alongside
    with Queue(server.spool) as queue:
        for queue_id in queue.store.iter_held():
            assert queue.get(queue_id).envelope.recipients[0].address == "rcpt1@remote.test"


def test_a_closed_pipe_ends_the_listing_quietly(spool):
    accept(spool, 3000)      # more than a pipe holds
    pipeline = subprocess.run(
        "%s -m elemta.cli.elemtactl queue list --spool-dir %s | head -3"
        % (sys.executable, spool), shell=True, capture_output=True, text=True,
        env=dict(os.environ, PYTHONPATH=REPO), timeout=60)
    assert pipeline.stdout.splitlines()[0] == HEADING.rstrip("\n")
    assert len(pipeline.stdout.splitlines()) == 3
    assert pipeline.stderr == ""


# ---------------------------------------------------------------- cat (issue 21 req 2)

def cat(spool, *args, python=sys.executable, pythonpath=REPO, **kwargs):
    """`elemtactl queue cat` as bytes: (status, stdout bytes, stderr text)."""
    done = subprocess.run([python, "-m", "elemta.cli.elemtactl", "queue", "cat",
                           "--spool-dir", spool] + list(args), capture_output=True,
                          env=dict(os.environ, PYTHONPATH=pythonpath), timeout=60, **kwargs)
    return done.returncode, done.stdout, done.stderr.decode("utf-8", "replace")


CAT_CONTENT = (b"Received: from client.test\r\nSubject: the thing\r\nX-Long: folded\r\n"
               b" on two lines\r\n\r\nFirst line.\r\n\r\nAfter an empty line.\r\n")


def test_cat_prints_the_envelope_then_the_message_as_stored(spool):
    with Queue(spool) as queue:
        envelope = Envelope(new_queue_id(), "alice@example.org",
                            [Recipient("r1@x.example", ("SUCCESS", "FAILURE"),
                                       "rfc822;R1@x.example"), Recipient("r2@y.example")],
                            time.time(), ret="HDRS", envid="env-1",
                            client_address="192.0.2.7", client_helo="client.test",
                            protocol="ESMTPSA", auth_user="alice", priority=7)
        queue.add(envelope, [CAT_CONTENT])
    queue_id = envelope.queue_id
    play_delivery(spool, queue_id, DEFERRED, replies=["250 2.0.0 ok"], statuses=[SENT])
    status, out, err = cat(spool, queue_id)
    assert (status, err) == (0, "")
    head = ("*** ENVELOPE RECORDS %s ***\n"
            "queue_id: %s\n" % (queue_id, queue_id)).encode()
    assert out.startswith(head)
    envelope_text = out[:out.index(b"*** MESSAGE CONTENTS")].decode()
    for line in ("message_arrival_time: %s" % time.asctime(time.localtime(envelope.arrival)),
                 "message_size: %d" % len(CAT_CONTENT), "priority: 7",
                 "sender: alice@example.org", "client: client.test [192.0.2.7]",
                 "protocol: ESMTPSA", "sasl_username: alice", "dsn_ret: HDRS",
                 "dsn_envid: env-1",
                 "recipient: r1@x.example (sent) NOTIFY=SUCCESS,FAILURE "
                 "ORCPT=rfc822;R1@x.example", "recipient: r2@y.example (pending)"):
        assert "\n%s\n" % line in envelope_text, (line, envelope_text)
    assert "\nstate: deferred, 1 attempt, next attempt " in envelope_text
    assert out.endswith(("*** MESSAGE CONTENTS %s ***\n" % queue_id).encode() + CAT_CONTENT
                        + ("*** MESSAGE FILE END %s ***\n" % queue_id).encode())
    headers, _, body = CAT_CONTENT.partition(b"\r\n\r\n")
    assert cat(spool, "--headers", queue_id) == (0, headers + b"\r\n", "")
    assert cat(spool, "--body", queue_id) == (0, body, "")
    assert cat(spool, "--headers", "--body", queue_id) == (0, CAT_CONTENT, "")


def test_cat_of_a_message_without_a_line_end_or_body_keeps_its_markers_apart(spool):
    [queue_id] = accept(spool, content=b"Subject: no end")
    status, out, _ = cat(spool, queue_id)
    assert status == 0 and out.endswith(
        b"Subject: no end\n*** MESSAGE FILE END %s ***\n" % queue_id.encode())
    assert cat(spool, "--body", queue_id) == (0, b"", "")
    assert cat(spool, "--headers", queue_id) == (0, b"Subject: no end", "")


@pytest.mark.parametrize("word, shown", [
    ("../../etc/passwd", "../../etc/passwd"),
    ("/etc/passwd", "/etc/passwd"),
    ("1K1XRPBHMXDC82RER/X5", "1K1XRPBHMXDC82RER/X5"),
    ("1k1xrpbhmxdc82rerx5s", "1k1xrpbhmxdc82rerx5s"),
    ("1K1XRPBHMXDC82RERX5S\n../x", "1K1XRPBHMXDC82RERX5S\\n../x"),
])
def test_cat_refuses_what_is_not_a_queue_id_naming_it(spool, word, shown):
    assert cat(spool, word) == (64, b"", "elemtactl: queue cat: not a queue id: %s (a queue "
                                         "id is 20 characters of 0-9 and A-Z, as mailq "
                                         "shows it)\n" % shown)


def test_cat_refuses_a_nul_from_standard_input_and_an_unknown_id(spool):
    [queue_id] = accept(spool)
    status, out, err = cat(spool, "-", input=("%s\0../x\n" % queue_id).encode())
    assert (status, out) == (64, b"")
    assert err.startswith("elemtactl: queue cat: not a queue id: %s\\x00../x " % queue_id)
    unknown = new_queue_id()
    status, out, err = cat(spool, queue_id, unknown)
    assert status == 67 and out.startswith(b"*** ENVELOPE RECORDS %s" % queue_id.encode())
    assert err == "elemtactl: queue cat: no such message: %s\n" % unknown


def _plant(spool, queue_id, target, how):
    """Put a link to `target` where the message file of queue_id is."""
    path = os.path.join(spool, "messages", queue_id[-1], queue_id)
    os.unlink(path)
    (os.symlink if how == "symlink" else os.link)(target, path)


@pytest.mark.parametrize("how, why", [("symlink", "is a symbolic link or not a regular "
                                                  "file, refused"),
                                      ("hardlink", "has 2 hard links, refused")])
def test_cat_never_shows_what_a_link_planted_in_the_spool_points_to(spool, tmp_path, how,
                                                                    why):
    planted = tmp_path / "elsewhere"
    [queue_id, other] = accept(spool, 2)
    with Queue(spool) as queue:         # a whole spool file, of another message
        planted.write_bytes(open(queue.store.path(other), "rb").read()
                            .replace(other.encode(), queue_id.encode()))
    _plant(spool, queue_id, str(planted), how)
    status, out, err = cat(spool, queue_id)
    assert (status, out) == (77, b"")
    assert err.startswith("elemtactl: queue cat: %s: " % queue_id) and why in err, err


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run as root and as nobody")
def test_cat_works_for_root_and_the_service_user_and_root_reads_as_the_service_user():
    """The spool belongs to the service user (nobody here). root's elemtactl becomes
    that user before it reads anything, so a link the service user plants to a file
    only root may read shows nothing, even apart from O_NOFOLLOW; the service user's
    own elemtactl refuses links too."""
    import pwd
    from tests.harness import code_for_everyone
    from tests.test_privileges import interpreter_for_nobody
    python = interpreter_for_nobody()
    if python is None:
        pytest.skip("no Python interpreter that user nobody can read")
    workdir = tempfile.mkdtemp()
    try:
        os.chmod(workdir, 0o755)
        pythonpath = code_for_everyone(os.path.join(workdir, "python"))
        spool = os.path.join(workdir, "spool")
        [queue_id, planted_id] = accept(spool, 2)
        secret = os.path.join(workdir, "secret")
        with open(secret, "wb") as f:
            f.write(b"root only\n")
        os.chmod(secret, 0o600)
        _plant(spool, planted_id, secret, "symlink")
        nobody = pwd.getpwnam("nobody")
        for directory, dirs, files in os.walk(spool):
            for name in [directory] + [os.path.join(directory, n) for n in dirs + files]:
                os.lchown(name, nobody.pw_uid, nobody.pw_gid)
        as_nobody = dict(user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[])
        for who in ({}, as_nobody):
            status, out, err = cat(spool, queue_id, python=python, pythonpath=pythonpath,
                                   cwd=workdir, **who)
            assert (status, err) == (0, ""), who
            assert out.endswith(MESSAGE + b"*** MESSAGE FILE END %s ***\n"
                                % queue_id.encode())
            status, out, err = cat(spool, planted_id, python=python, pythonpath=pythonpath,
                                   cwd=workdir, **who)
            assert (status, out) == (77, b""), (who, err)
            assert "symbolic link" in err and "root only" not in err
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------- priority (req 3)

def test_priority_by_id_or_selection_is_shown_by_show_and_json(spool):
    [first, second] = accept(spool, 2)
    [other] = accept(spool, sender="carol@other.test")
    done = ctl(spool, "priority", first, "-5")
    assert (done.returncode, done.stdout) == (
        0, "%s: priority changed\nPriority changed to -5: 1 message\n" % first)
    done = ctl(spool, "priority", "--from", "alice@*", "30")
    assert done.stdout == ("%s: priority changed\n%s: priority changed\n"
                           "Priority changed to 30: 2 messages\n" % (first, second))
    again = ctl(spool, "priority", first, "30")
    assert again.stdout == ("%s: priority unchanged (already that)\n"
                            "Priority changed to 30: 0 messages\n" % first)
    assert "\nPriority:   30\n" in ctl(spool, "show", first).stdout
    assert "\nPriority:   0 (the default)\n" in ctl(spool, "show", other).stdout
    listed = [json.loads(line) for line in ctl(spool, "list", "--json").stdout.splitlines()]
    assert {m["queue_id"]: m["priority"] for m in listed} == {first: 30, second: 30,
                                                              other: 0}
    assert json.loads(ctl(spool, "show", "--json", first).stdout)["priority"] == 30
    assert_index_consistent(spool)


@pytest.mark.parametrize("args, code, why", [
    (["101"], 64, "argument N: a priority is from -100 to 100, not 101"),
    (["1.5"], 64, "argument N: a priority is a whole number from -100 to 100, not '1.5'"),
    ([], 64, "argument N: %s is a queue id: the priority comes last (queue priority "
             "ID... N)"),
])
def test_priority_refuses_a_bad_number(spool, args, code, why):
    [queue_id] = accept(spool)
    done = ctl(spool, "priority", queue_id, *args)
    assert (done.returncode, done.stdout) == (code, "")
    assert why.replace("%s", queue_id) in done.stderr, done.stderr
    assert record(spool, queue_id).envelope.priority == 0


def test_priority_of_an_unknown_id_says_so(spool):
    unknown = new_queue_id()
    done = ctl(spool, "priority", unknown, "5")
    assert (done.returncode, done.stdout, done.stderr) == (
        67, "Priority changed to 5: 0 messages\n",
        "elemtactl: queue: no such message: %s\n" % unknown)


# What `elemtactl queue list`, `queue summary` and mailq leave out of their start-up (a big
# listing used to spend as long starting as listing: issue #20). Modules, not timings.
UNNEEDED_FOR_READING = ("elemta.config.schema", "elemta.queue.queue", "elemta.cli.topcmd",
                        "elemta.cli.configcmd", "elemta.cli.pfimport", "gevent",
                        "prometheus_client", "dkim", "urllib.request")


@pytest.mark.parametrize("command", [["elemtactl", "queue", "list"],
                                     ["elemtactl", "queue", "summary"],
                                     ["mailq"]])
def test_reading_the_queue_imports_nothing_it_does_not_use(tmp_path, command):
    spool = str(tmp_path / "spool")
    [queue_id] = accept(spool)
    program, args = command[0], command[1:] + ["--spool-dir", spool]
    code = ("import sys, io\n"
            "from elemta.cli import %s as program\n"
            "real, sys.stdout = sys.stdout, io.TextIOWrapper(io.BytesIO())\n"
            "status = program.main(%r)\n"
            "sys.stdout = real\n"
            "print(status, sorted(m for m in sys.modules if m.split('.')[0] in %r\n"
            "                     or m in %r))\n"
            % (program, args, ("gevent", "prometheus_client", "dkim"), UNNEEDED_FOR_READING))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO), timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0 []"
    shown = run(program, *args)        # the same path, its output seen
    assert shown.returncode == 0
    assert (queue_id in shown.stdout) == (command[-1] != "summary")


def test_queue_commands_parse_as_with_the_whole_parser():
    """The queue fast path (build_parser(only="queue")) answers usage errors and --help
    exactly as the parser of every command does."""
    from elemta.cli import elemtactl
    for argv in (["queue", "list", "--state", "nosuch"], ["queue", "lst"], ["queue"],
                 ["--cluster", "queue", "list", "--bogus"], ["queue", "list", "--help"],
                 ["--config", "x.yaml", "queue", "summary", "--json", "--extra"]):
        answers = []
        for parser in (elemtactl.build_parser(), elemtactl.build_parser(only="queue")):
            try:
                answers.append(("parsed", sorted(vars(parser.parse_args(argv)))))
            except elemtactl.Failure as failure:
                answers.append(("failure", str(failure), failure.code))
            except SystemExit as exit_:
                answers.append(("exit", exit_.code))
        assert answers[0] == answers[1], argv
    assert elemtactl._fast_command(["--config", "queue", "status"]) is None
    assert elemtactl._fast_command(["--config=x", "--cluster", "queue", "list"]) == "queue"
