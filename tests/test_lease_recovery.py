"""Issue 11 req 1: the messages a dead delivery worker had claimed are due again within
seconds, not when delivery.lease (15 minutes) runs out; a live worker, however stuck,
keeps them. Req 2: a delivered message's record is deleted with the next batch of results
(elemta.delivery.recorder), and is never sent again meanwhile.

The lease-holder rule (elemta.queue.holders) against real processes (a `sleep` child
killed, stopped, left a zombie), Queue.free_gone_leases on a real LMDB queue, then the
real server (tests/conftest.py) relaying to a slow scripted peer (tests/peers/sink.py)
while a delivery worker is killed with SIGKILL, or stopped with SIGSTOP.
See also: tests/test_local_delivery.py (a killed local agent), elemta.delivery.worker.
"""

import os
import re
import signal
import smtplib
import socket
import subprocess
import threading
import time

import pytest

from elemta.delivery.recorder import AttemptRecorder
from elemta.delivery.worker import DeliveryWorker, orphan_delay
from elemta.queue import holders
from elemta.queue.model import ACTIVE, DEFERRED
from elemta.queue.queue import (ATTEMPT_REMOVED, HELD, HOLDER_GONE, LEASE_LAPSED, RELEASED,
                                REQUEUED, Attempt, Queue)
from tests.harness import free_port, wait_for
from tests.peers.sink import ScriptedServer
from tests.test_queue import accept

HOST = socket.gethostname()


@pytest.fixture
def sleeper():
    """A live child process (sleep), killed and reaped at the end if still there."""
    process = subprocess.Popen(["sleep", "60"])
    yield process
    if process.poll() is None:
        os.kill(process.pid, signal.SIGCONT)
        process.kill()
        process.wait()


# ---- the rule -------------------------------------------------------------------------

def test_a_name_tells_the_holder_from_a_new_process_with_its_pid(sleeper):
    name = holders.holder_name(sleeper.pid)
    host, pid, start, boot = name.split(":")
    with open("/proc/sys/kernel/random/boot_id") as boot_id:
        assert boot == boot_id.read(8)
    assert host == HOST and int(pid) == sleeper.pid and start.isdigit()
    assert holders.holder_pid(name) == sleeper.pid
    assert not holders.holder_gone(name)
    assert not holders.holder_gone("%s:%s:%s" % (host, pid, start))   # the older form
    assert not holders.holder_gone(holders.holder_name())       # ourselves
    # The same pid started at another time is another process: the holder is gone.
    assert holders.holder_gone("%s:%d:%d:%s" % (HOST, sleeper.pid, int(start) + 1, boot))
    # The same pid and start time in an earlier boot (a deterministic boot) is gone too.
    other_boot = "%08x" % ((int(boot, 16) + 1) % (1 << 32))
    assert holders.holder_gone("%s:%s:%s:%s" % (host, pid, start, other_boot))


def test_a_stopped_holder_is_alive_a_zombie_or_reaped_one_is_gone(sleeper):
    name = holders.holder_name(sleeper.pid)
    os.kill(sleeper.pid, signal.SIGSTOP)
    wait_for(lambda: holders.process_start(sleeper.pid)[0] == "T")
    assert not holders.holder_gone(name)
    os.kill(sleeper.pid, signal.SIGKILL)
    # Dead, not yet reaped: only its exit status is left.
    wait_for(lambda: holders.process_start(sleeper.pid)[0] == "Z")
    assert holders.holder_gone(name)
    sleeper.wait()
    assert holders.holder_gone(name)


def test_old_names_are_checked_by_pid_and_other_hosts_are_left_to_expiry(sleeper):
    old = "%s:%d" % (HOST, sleeper.pid)
    assert not holders.holder_gone(old)
    sleeper.kill()
    sleeper.wait()
    assert holders.holder_gone(old)
    assert not holders.holder_gone("elsewhere.test:%d" % sleeper.pid)
    assert not holders.holder_gone("elsewhere.test:%d:1" % sleeper.pid)
    for garbage in ("", "nonsense", "%s:x:1" % HOST, "%s:%d:x" % (HOST, sleeper.pid),
                    "%s:0:1" % HOST, "%s:1:2:3" % HOST,
                    "%s:%d:1:ABCDEF01" % (HOST, sleeper.pid), "%s:1:2:3:4" % HOST):
        assert not holders.holder_gone(garbage), garbage


# ---- the queue ------------------------------------------------------------------------

def test_the_queue_frees_only_the_messages_of_holders_that_ended(tmp_path, sleeper):
    stuck = subprocess.Popen(["sleep", "60"])
    try:
        with Queue(str(tmp_path / "spool"), map_size=64 << 20) as queue:
            accept(queue, [b"x\r\n"] * 5)
            dead_name = holders.holder_name(sleeper.pid)
            stuck_name = holders.holder_name(stuck.pid)
            dead = [r.queue_id for r in queue.claim(dead_name, 2, 900.0)]
            kept = [r.queue_id for r in queue.claim(stuck_name, 2, 900.0)]
            elsewhere = [r.queue_id for r in queue.claim("elsewhere.test:%d:1" % sleeper.pid,
                                                         1, 900.0)]
            os.kill(stuck.pid, signal.SIGSTOP)
            assert queue.free_gone_leases() == []
            sleeper.kill()
            sleeper.wait()
            before = time.time()
            freed = queue.free_gone_leases()
            assert sorted(qid_owner for *qid_owner, _ in freed) == sorted(
                [qid, dead_name] for qid in dead)
            for queue_id in dead:
                record = queue.get(queue_id)
                assert record.state == DEFERRED and record.lease_owner is None
                assert record.next_attempt <= time.time() and record.next_attempt >= before
                assert record.last_error == HOLDER_GONE
            for queue_id in kept:
                assert queue.get(queue_id).lease_owner == stuck_name
            for queue_id in elsewhere:
                assert queue.get(queue_id).state == ACTIVE
            assert queue.free_gone_leases() == []
            # Due again: the next claim takes them.
            assert sorted(r.queue_id for r in queue.claim("next:1:1", 10, 900.0)) == \
                sorted(dead)
    finally:
        os.kill(stuck.pid, signal.SIGCONT)
        stuck.kill()
        stuck.wait()


def _die_holding(queue, queue_id, retry_delay):
    """A fresh holder claims queue_id and dies; free_gone_leases then frees it.
    Returns the (queue id, holder, next attempt) triples freed."""
    holder = subprocess.Popen(["sleep", "60"])
    assert [r.queue_id for r in queue.claim(holders.holder_name(holder.pid), 1, 900.0)] \
        == [queue_id]
    holder.kill()
    holder.wait()
    return queue.free_gone_leases(retry_delay)


def test_orphan_delay_starts_small_and_grows_to_the_normal_backoff():
    """None at the first death, then 5 s doubling up to min_backoff, then the backoff
    after failed attempts (doubling) up to max_backoff: a message caught twice under
    chaos waits seconds, not min_backoff, and a poison message slows to max_backoff."""
    assert [orphan_delay(n, 300.0, 4000.0) for n in range(1, 15)] == [
        0, 5, 10, 20, 40, 80, 160, 300, 600, 1200, 2400, 4000, 4000, 4000]
    assert [orphan_delay(n, 60.0, 1000.0) for n in range(1, 12)] == [
        0, 5, 10, 20, 40, 60, 120, 240, 480, 960, 1000]
    # A min_backoff below the first step: never more than min_backoff at the start.
    assert [orphan_delay(n, 2.0, 10.0) for n in range(1, 6)] == [0, 2, 4, 8, 10]
    assert orphan_delay(10 ** 6, 300.0, 4000.0) == 4000


def test_a_message_that_keeps_killing_its_holders_waits_a_backoff(tmp_path):
    """The first holder that dies with a message most likely died of something else: the
    message is due at once. From the second in a row it waits, a few seconds at first,
    doubling up to min_backoff and beyond, so a message that crashes every worker cannot
    keep them in a crash loop; a recorded attempt starts the count again."""
    delay = lambda orphaned: orphan_delay(orphaned, 60.0, 1000.0)   # noqa: E731
    with Queue(str(tmp_path / "spool"), map_size=64 << 20) as queue:
        [message] = accept(queue, [b"x\r\n"])
        qid = message.queue_id
        [(_, _, due)] = _die_holding(queue, qid, delay)
        assert due <= time.time() and queue.get(qid).last_error == HOLDER_GONE
        for orphaned, wait in ((2, 5), (3, 10), (4, 20), (5, 40), (6, 60), (7, 120)):
            before = time.time()
            [(_, _, due)] = _die_holding(queue, qid, delay)
            # Not due: only a claim with the clock moved past the backoff takes it.
            assert queue.claim("next:1:1", 1, 900.0) == []
            record = queue.get(qid)
            assert before + wait <= due == record.next_attempt <= time.time() + wait
            assert record.last_error == "%s (%d times in a row)" % (HOLDER_GONE, orphaned)
            record.next_attempt = time.time()
            queue.index.put(record)
        owner = holders.holder_name(os.getpid())
        assert [r.queue_id for r in queue.claim(owner, 1, 900.0)] == [qid]
        queue.record_attempt(owner, qid, {}, time.time(), "451 4.3.0 try later")
        assert queue.get(qid).orphaned == 0
        [(_, _, due)] = _die_holding(queue, qid, delay)
        assert due <= time.time()



def test_an_admins_requeue_or_release_and_a_restart_leave_no_orphan_backoff(tmp_path,
                                                                            sleeper):
    """elemtactl queue requeue and release mean "try now": the count of holders that died
    with the message starts again, so its next holder's death costs no wait. A restart
    (start-up frees every lease) is not the message's doing: it is not counted."""
    delay = lambda orphaned: orphan_delay(orphaned, 60.0, 1000.0)   # noqa: E731
    with Queue(str(tmp_path / "spool"), map_size=64 << 20) as queue:
        [message] = accept(queue, [b"x\r\n"])
        qid = message.queue_id
        _die_holding(queue, qid, delay)
        [(_, _, due)] = _die_holding(queue, qid, delay)
        assert due > time.time()                        # the second death: a wait
        assert list(queue.requeue([qid])) == [(qid, REQUEUED)]
        [(_, _, due)] = _die_holding(queue, qid, delay)
        assert due <= time.time() and queue.get(qid).last_error == HOLDER_GONE
        [(_, _, due)] = _die_holding(queue, qid, delay)
        assert due > time.time()
        assert list(queue.hold([qid])) == [(qid, HELD)]
        assert list(queue.release([qid])) == [(qid, RELEASED)]
        [(_, _, due)] = _die_holding(queue, qid, delay)
        assert due <= time.time() and queue.get(qid).last_error == HOLDER_GONE
        # Held by a live worker when the server stopped; start-up frees it, uncounted.
        assert [r.queue_id for r in queue.claim(holders.holder_name(sleeper.pid), 1,
                                                  900.0)] == [qid]
        assert queue.reconcile().reclaimed == [qid]
        record = queue.get(qid)
        assert record.state == DEFERRED and record.next_attempt <= time.time()
        assert record.last_error == LEASE_LAPSED and record.orphaned == 1


# ---- the real server ------------------------------------------------------------------

class SlowDot:
    """A reply to the final dot that takes `seconds` (the slow peer); counts copies."""

    def __init__(self, seconds):
        self.seconds = seconds

    def __call__(self, session, argument):
        time.sleep(self.seconds)
        return "250 2.0.0 Ok: queued"


def send_many(server, count, tag):
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        for n in range(count):
            client.sendmail("lease@client.test", ["r%d@far.test" % n],
                            ("Subject: %s %d\r\n\r\n%s %d\r\n" % (tag, n, tag, n)).encode())


def subjects_at(sink, tag):
    found = []
    for message in sink.messages:
        match = re.search(rb"Subject: %s (\d+)" % tag.encode(), message.content)
        if match:
            found.append(int(match.group(1)))
    return found


def holding(server):
    """{delivery worker pid: [queue ids it holds a lease on]} from the index."""
    held = {}
    with server.queue() as queue:
        for record in queue.index.iter_records(ACTIVE):
            held.setdefault(holders.holder_pid(record.lease_owner), []).append(
                record.queue_id)
    return held


def relay_server(elemta_server, sink, workers, master=None):
    server = elemta_server(
        delivery={"workers": workers, "relayhost": "[%s]:%d" % (sink.address, sink.port),
                  "connect_timeout": 5.0},
        master=master or {},
        api={"enabled": False})
    wait_for(lambda: server.log().count("delivery worker started") >= workers)
    return server


@pytest.mark.parametrize("workers", [2, 1])
def test_a_killed_workers_messages_are_delivered_within_seconds(elemta_server, workers):
    """kill -9 of a delivery worker in the middle of deliveries to a slow peer, with the
    default 15-minute lease: another worker (with one worker: its replacement) sends what
    the dead one held within seconds."""
    count = 12
    with ScriptedServer(script={"DOT": SlowDot(1.0)}, address="127.0.0.31",
                        port=free_port()) as sink:
        server = relay_server(elemta_server, sink, workers)
        send_many(server, count, "kill")
        held = wait_for(lambda: {pid: ids for pid, ids in holding(server).items()
                                 if len(ids) >= 2}, 15)
        pid = next(iter(held))
        wait_for(lambda: len(sink.sessions) >= 2)        # deliveries under way
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        freed = wait_for(lambda: re.findall(r"(\w+): its delivery worker %d died; due again"
                                            % pid, server.log()), 10)
        freed_after = time.monotonic() - killed
        wait_for(lambda: server.queued_ids() == [], 20)
        emptied_after = time.monotonic() - killed
        freed = re.findall(r"(\w+): its delivery worker %d died; due again" % pid,
                           server.log())
        copies = subjects_at(sink, "kill")
        print("\nworkers=%d: %d message(s) of the killed worker freed after %.2f s, queue "
              "empty %.2f s after the kill; %d copies at the peer for %d messages (%s)"
              % (workers, len(freed), freed_after, emptied_after, len(copies), count,
                 sorted(copies)))
    assert freed
    # Every message arrived; a message the peer had taken when the worker died twice.
    assert sorted(set(subjects_at(sink, "kill"))) == list(range(count))
    assert "lease lapsed" not in server.log()


def test_a_stopped_worker_keeps_its_messages_until_it_goes_on(elemta_server):
    """SIGSTOP is not death: the other worker does not take a stopped worker's messages
    (that would send them twice); after SIGCONT the stopped worker finishes them."""
    count = 8
    with ScriptedServer(script={"DOT": SlowDot(1.0)}, address="127.0.0.32",
                        port=free_port()) as sink:
        # The master must not kill the silent worker: this test is about the rule.
        server = relay_server(elemta_server, sink, 2, master={"heartbeat_timeout": 300})
        send_many(server, count, "stop")
        held = wait_for(lambda: {pid: ids for pid, ids in holding(server).items()
                                 if len(ids) >= 2}, 15)
        pid, stopped_ids = next(iter(held.items()))
        os.kill(pid, signal.SIGSTOP)
        try:
            # The others finish theirs and look for gone holders every 2 s meanwhile.
            wait_for(lambda: set(holding(server)) == {pid}, 20)
            time.sleep(5)
            assert sorted(holding(server)[pid]) == sorted(stopped_ids)
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_for(lambda: server.queued_ids() == [], 20)
    assert "died; due again" not in server.log()
    assert sorted(subjects_at(sink, "stop")) == list(range(count))     # once each


# ---- issue 11 req 2: the records of delivered messages go with the next batch ----------

def test_a_delivered_message_stays_leased_until_the_next_batch_deletes_its_record(tmp_path,
                                                                                sleeper):
    with Queue(str(tmp_path / "spool"), map_size=64 << 20) as queue:
        first, second, third = accept(queue, [b"x\r\n"] * 3)
        owner = holders.holder_name(sleeper.pid)
        assert len(queue.claim(owner, 3, 900.0)) == 3
        sent = {0: ("sent", "250 2.0.0 Ok", "sink")}
        outcomes = queue.record_attempts(
            owner, [Attempt(first.queue_id, sent, 0.0, None)], forget_later=True)
        assert outcomes == {first.queue_id: ATTEMPT_REMOVED}
        # Its file is gone at once; its record stays active, leased, so no one claims it.
        assert not os.path.exists(queue.store.path(first.queue_id))
        record = queue.get(first.queue_id)
        assert record.state == ACTIVE and record.lease_owner == owner
        assert queue.reclaim(time.time()) == [] and queue.free_gone_leases() == []
        # The next batch deletes it in its own transaction.
        queue.record_attempts(owner, [Attempt(second.queue_id, sent, 0.0, None)],
                              forget=[first.queue_id], forget_later=True)
        assert queue.get(first.queue_id) is None
        assert queue.get(second.queue_id).state == ACTIVE
        # Its worker died before the record was deleted: freed, claimed, and only removed
        # (every recipient was sent: nothing goes out again).
        sleeper.kill()
        sleeper.wait()
        assert sorted(qid for qid, _, _ in queue.free_gone_leases()) == sorted(
            [second.queue_id, third.queue_id])
        [again] = [r for r in queue.claim("next:1:1", 3, 900.0)
                   if r.queue_id == second.queue_id]
        assert [r.status for r in again.envelope.recipients] == ["sent"]
        assert queue.record_attempt("next:1:1", second.queue_id, {}, 0.0, None) == \
            ATTEMPT_REMOVED
        assert queue.get(second.queue_id) is None


# ---- a stopping worker gives back only what cannot be recorded twice -------------------

def test_a_worker_stopping_while_results_are_still_written_gives_nothing_back(tmp_path):
    """A stopping worker records the results waiting, then gives its unfinished claims
    back (due now). If the recorder is still writing when its wait runs out, a result may
    yet land after another worker took a message given back: nothing is given back; the
    leases stay until the worker is gone."""
    import gevent
    from elemta.config import default_config
    with Queue(str(tmp_path / "spool"), map_size=64 << 20) as queue:
        sent, unfinished = accept(queue, [b"a\r\n", b"b\r\n"])
        worker = DeliveryWorker(default_config(), 0, None, os.getpid())
        worker.queue, worker.owner = queue, holders.holder_name(os.getpid())
        assert len(queue.claim(worker.owner, 2, 900.0)) == 2
        writing, go_on = threading.Event(), threading.Event()
        record_attempts = queue.record_attempts

        def slow_record_attempts(*args):
            writing.set()
            go_on.wait(30)            # a slow disk
            return record_attempts(*args)
        queue.record_attempts = slow_record_attempts
        worker.recorder = AttemptRecorder(queue, worker.owner)
        result = gevent.spawn(worker.recorder.record, Attempt(
            sent.queue_id, {0: ("sent", "250 2.0.0 Ok", "sink")}, 0.0, None))
        while not writing.is_set():
            gevent.sleep(0.01)
        try:
            assert worker.give_back([unfinished.queue_id], timeout=0.2) == []
            record = queue.get(unfinished.queue_id)
            assert record.state == ACTIVE and record.lease_owner == worker.owner
        finally:
            go_on.set()
        assert result.get(timeout=30) == ATTEMPT_REMOVED
        # With the recorder done, the same stop gives the claim back: due now.
        worker.recorder = AttemptRecorder(queue, worker.owner)
        assert worker.give_back([unfinished.queue_id]) == [unfinished.queue_id]
        record = queue.get(unfinished.queue_id)
        assert record.state == DEFERRED and record.next_attempt <= time.time()
