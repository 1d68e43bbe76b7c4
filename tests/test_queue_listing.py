"""The queue listing and summary read from the index's Briefs and listing database (what
mailq and `elemtactl queue summary` print for a big queue) say what the full records say.

Real LMDB indexes in temporary directories; the records are written as smtpd, delivery
and the admin actions write them (QueueIndex.put). See also tests/test_elemtactl_queue.py
(the same commands end to end, output byte for byte).
"""

import os
import random
import time

import pytest

from elemta.cli.queuecmd import asctime
from elemta.queue import index as index_module
from elemta.queue.index import QueueIndex, QueueRecord
from elemta.queue.listing import Selection, iter_listed, listed_from_record, summarise
from elemta.queue.model import (BOUNCED, DEFERRED, FAILED, HOLD, INCOMING, RCPT_DEFERRED,
                                SENT, Envelope, Hold, Recipient)

NOW = 1_760_000_000.0


def queue_id(n):
    return "1K%018d" % n


def make_record(n, state, arrival, sender="alice@example.org", recipients=None,
                last_error=None, hold=None):
    recipients = recipients or [Recipient("bob@example.net")]
    return QueueRecord(Envelope(queue_id(n), sender, recipients, arrival, size=1000 + n),
                       state, attempts=1, next_attempt=arrival + 600,
                       last_error=last_error, hold=hold)


@pytest.fixture
def index(tmp_path):
    opened = QueueIndex(str(tmp_path / "index.lmdb"), 1 << 26)
    yield opened
    opened.close()


def varied_records():
    """One of each kind of message mailq shows differently."""
    return [
        make_record(1, INCOMING, NOW - 30),
        make_record(2, HOLD, NOW - 4000, hold=Hold("clamav", "virus found: Eicar", NOW)),
        make_record(3, DEFERRED, NOW - 9000, last_error="connect to mx: Connection refused",
                    recipients=[Recipient("a@one.example", status=RCPT_DEFERRED,
                                          last_reply="450 4.2.0 mailbox busy"),
                                Recipient("b@one.example"),
                                Recipient("c@two.example", status=SENT,
                                          last_reply="250 ok")]),
        make_record(4, FAILED, NOW - 90000, sender="",
                    recipients=[Recipient("gone@three.example", status=BOUNCED,
                                          last_reply="550 5.1.1 no such user")]),
        # Control characters in an address or a reply are shown as "?", never printed.
        make_record(5, DEFERRED, NOW - 100, sender="odd\x1b[2J@example.org",
                    recipients=[Recipient("r\u00e9sum\u00e9@four.example",
                                          status=RCPT_DEFERRED,
                                          last_reply="451 line\r\nbreak\x00")]),
        make_record(6, HOLD, NOW - 5, hold=None),     # held before holders were kept
    ]


def test_listing_from_the_index_is_what_the_records_say(index):
    records = varied_records()
    index.put_many(records)
    expected = [listed_from_record(r) for r in sorted(records, key=lambda r: r.queue_id)]

    assert list(iter_listed(index, Selection(now=NOW))) == expected
    # Through the Brief filters, and through the records (address patterns): the same.
    assert list(iter_listed(index, Selection(now=NOW, older_than=3600))) == [
        e for e in expected if e.arrival <= NOW - 3600]
    assert list(iter_listed(index, Selection(now=NOW, domain="one.example"))) == [
        e for e in expected if e.queue_id == queue_id(3)]
    assert list(iter_listed(index, Selection(now=NOW, sender="<>"))) == [
        e for e in expected if e.queue_id == queue_id(4)]

    held, deferred, odd = expected[1], expected[2], expected[4]
    assert held.recipients == (("bob@example.net", "held by clamav: virus found: Eicar"),)
    assert deferred.recipients == (("a@one.example", "450 4.2.0 mailbox busy"),
                                   ("b@one.example", "connect to mx: Connection refused"))
    assert odd.sender == "odd?[2J@example.org"
    assert odd.recipients == (("r\u00e9sum\u00e9@four.example", "451 line??break?"),)


def test_listing_follows_every_change_of_a_message(index):
    first = make_record(1, INCOMING, NOW - 30)
    index.put(first)
    first.state, first.hold = HOLD, Hold("admin", "checking", NOW)
    index.put(first)
    index.put(make_record(2, DEFERRED, NOW - 20))
    index.delete(queue_id(2))
    [listed] = iter_listed(index, Selection(now=NOW))
    assert (listed.state, listed.recipients) == (
        HOLD, (("bob@example.net", "held by admin: checking"),))
    assert list(iter_listed(index, Selection(now=NOW, states=(INCOMING,)))) == []


def test_an_index_written_before_the_listing_gets_one(tmp_path):
    path = str(tmp_path / "index.lmdb")
    records = varied_records()
    old = QueueIndex(path, 1 << 26)
    old.put_many(records)
    with old.env.begin(write=True) as txn:      # as an older Elemta left it
        txn.drop(old.listing, delete=True)
    old.close()

    reopened = QueueIndex(path, 1 << 26)
    try:
        assert list(iter_listed(reopened, Selection(now=NOW))) == [
            listed_from_record(r) for r in sorted(records, key=lambda r: r.queue_id)]
    finally:
        reopened.close()


def test_summary_counted_in_bulk_is_the_per_message_count(index, monkeypatch):
    """Ids out of arrival order, chunks that straddle age buckets and states (a tiny
    chunk size): the bulk count equals counting Brief by Brief."""
    monkeypatch.setattr(index_module, "TALLY_CHUNK", 7)
    rnd = random.Random(20)
    domains = ["d%d.example" % i for i in range(5)] + ["D0.EXAMPLE."]
    records = []
    for n in range(400):
        state = rnd.choice([INCOMING, DEFERRED, HOLD, FAILED])
        recipients = [Recipient("u%d@%s" % (i, rnd.choice(domains)))
                      for i in range(rnd.randint(1, 3))]
        # Half of them exactly on a bucket's edge (5 minutes old is in the second).
        arrival = NOW - rnd.choice([0, 10, 299, 300, 301, 600, 1000, 5000, 40000, 400000]) \
            - rnd.choice([0.0, rnd.random()])
        records.append(make_record(n, state, arrival, sender=rnd.choice(
            ["", "x@s1.example", "y@s2.example"]), recipients=recipients))
    index.put_many(records)

    bulk = summarise(index, Selection(now=NOW))
    # older_than -inf selects every message but is a Brief filter: counted one by one.
    one_by_one = summarise(index, Selection(now=NOW, older_than=float("-inf")))
    assert bulk == one_by_one
    assert bulk.total[0] == sum(len(r.envelope.recipients) for r in records)
    assert sum(t.messages for t in bulk.by_state.values()) == 400
    assert bulk.by_state[HOLD].size == sum(r.envelope.size for r in records
                                           if r.state == HOLD)
    senders = summarise(index, Selection(now=NOW), by_sender=True)
    assert senders == summarise(index, Selection(now=NOW, older_than=float("-inf")),
                                by_sender=True)
    assert senders.domains["MAILER-DAEMON"][0] == sum(1 for r in records
                                                     if r.envelope.sender == "")


@pytest.mark.parametrize("zone", ["UTC", "Europe/Berlin", "America/St_Johns",
                                  "Asia/Kathmandu", "right/Europe/Berlin"])
def test_arrival_times_are_the_c_librarys(zone, monkeypatch):
    """mailq's arrival column, worked out once per minute, is asctime(3)'s, across
    daylight saving changes, zones a fraction of an hour off and leap seconds counted."""
    if not os.path.exists(os.path.join("/usr/share/zoneinfo", zone)):
        pytest.skip("no zone %s here (tzdata)" % zone)
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    monkeypatch.setattr("elemta.cli.queuecmd._MINUTE_TEXTS", {})
    try:
        starts = [1711846800.0, 1729990800.0, NOW]     # around the 2024 EU changes
        for start in starts:
            for step in range(0, 7200 * 4, 97):
                seconds = start - 7200 + step / 4 + 0.5
                assert asctime(seconds) == time.asctime(time.localtime(seconds))[:19]
    finally:
        monkeypatch.undo()
        time.tzset()
