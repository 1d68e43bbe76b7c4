"""The durable queue (elemta.queue): ids, spool files, the LMDB index, group commit, repair.

Everything runs over real files, a real LMDB environment, real threads and processes, and
(as root) a real tmpfs filled to the last byte.
"""

import hashlib
import multiprocessing
import os
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
import time

import pytest

from elemta.queue.ids import is_queue_id, new_queue_id, queue_id_time
from elemta.queue.model import DEFERRED, HOLD, INCOMING, Envelope, Hold, Recipient
from elemta.queue.queue import Queue
from elemta.queue.store import CorruptSpoolFile, SpoolStore

FORK = multiprocessing.get_context("fork")


def envelope(**fields):
    fields.setdefault("queue_id", new_queue_id())
    fields.setdefault("sender", "alice@example.org")
    fields.setdefault("recipients", [Recipient("bob@example.net")])
    fields.setdefault("arrival", time.time())
    return Envelope(**fields)


def accept(queue, contents, **fields):
    """Receive and commit messages (one batch); returns their envelopes."""
    writers = []
    for content in contents:
        writer = queue.start_message(envelope(**fields))
        writer.write(content)
        writer.finish()
        writers.append(writer)
    queue.commit(writers)
    return [w.envelope for w in writers]


def read_content(queue, queue_id):
    with queue.store.open_content(queue_id) as content:
        return content.read()


def spool_files(spool_dir, sub):
    found = []
    for root, _, files in os.walk(os.path.join(spool_dir, sub)):
        found.extend(files)
    return sorted(found)


@pytest.fixture(params=["syncfs", "fsync"])
def queue(request, tmp_path):
    q = Queue(str(tmp_path / "spool"), sync_method=request.param, map_size=64 << 20)
    yield q
    q.close()


# -- queue ids

def test_ids_sort_in_arrival_order_and_never_repeat():
    before = time.time()
    ids = [new_queue_id() for _ in range(50000)]
    after = time.time()
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert all(is_queue_id(i) and len(i) == 20 for i in ids)
    assert before - 0.001 <= queue_id_time(ids[0]) <= queue_id_time(ids[-1]) <= after + 0.001
    time.sleep(0.002)
    assert new_queue_id() > ids[-1]


def _ids_in_child(count, conn):
    conn.send([(new_queue_id(), time.time()) for _ in range(count)])
    conn.close()


def test_ids_from_many_processes_are_unique_and_carry_their_time():
    pipes, children = [], []
    for _ in range(4):
        parent_end, child_end = FORK.Pipe(duplex=False)
        child = FORK.Process(target=_ids_in_child, args=(20000, child_end))
        child.start()
        pipes.append(parent_end)
        children.append(child)
    results = [p.recv() for p in pipes]
    for child in children:
        child.join()
    all_ids = [qid for result in results for qid, _ in result]
    assert len(set(all_ids)) == len(all_ids) == 80000
    for result in results:
        ids = [qid for qid, _ in result]
        assert ids == sorted(ids)
        for qid, made_at in result[::500]:
            assert abs(queue_id_time(qid) - made_at) < 0.05


def test_only_real_ids_are_accepted_as_ids(queue):
    for bad in ["../../etc/passwd", "1K114CZHMMNGVFJZ12J", "1K114CZHMMNGVFJZ12J1X",
                "1k114czhmmngvfjz12j1", "1K114CZHMMNGVFJZ12JI", "1K114CZHMM/GVFJZ12J1",
                "", None, b"1K114CZHMMNGVFJZ12J1"]:
        assert not is_queue_id(bad)
        with pytest.raises(ValueError):
            queue.store.path(bad)
    with pytest.raises(ValueError):
        queue.get("../index.lmdb/data.mdb")
    with pytest.raises(ValueError):
        queue.start_message(envelope(queue_id="../../../tmp/evil"))


# -- round trip

def test_commit_keeps_every_envelope_field_and_the_exact_bytes(queue, tmp_path):
    original = envelope(
        sender="θσ@παράδειγμα.ελ",
        recipients=[Recipient("one@example.net", notify=("SUCCESS", "FAILURE"),
                              orcpt="rfc822;one@example.net"),
                    Recipient("two@example.net", notify=("NEVER",)),
                    Recipient("line\nbreak\"quote@example.net")],
        body="8BITMIME", smtputf8=True, ret="HDRS", envid="env+2Bid", requiretls=True,
        client_address="::1",
        client_helo="client.example", protocol="ESMTPSA", auth_user="alice", priority=7,
        extra={"plugin": {"score": 1.5, "tags": ["a", "b"]}, "null": None})
    content = (b"Received: from client\r\n.\r\n..leading dots\r\nbare\nlf\rcr\r\n"
               + bytes(range(256)) + b"\r\n")
    writer = queue.start_message(original)
    writer.write(content[:10])
    writer.write(b"")
    writer.write(memoryview(content[10:]))
    assert writer.size == len(content)
    writer.finish()
    queue.commit([writer])

    expected = envelope(**dict(original.__dict__, size=len(content)))
    record = queue.get(original.queue_id)
    assert record.envelope == expected
    assert (record.state, record.attempts, record.last_error) == (INCOMING, 0, None)
    assert record.next_attempt == original.arrival
    assert queue.store.read_envelope(original.queue_id) == expected
    assert read_content(queue, original.queue_id) == content
    assert list(queue.index.iter_due()) == [(round(original.arrival, 3), original.queue_id)]

    # Another process-like handle (fresh environment) sees the same.
    spool_dir = queue.spool_dir
    queue.close()
    with Queue(spool_dir) as again:
        assert again.get(original.queue_id).envelope == expected
        assert read_content(again, original.queue_id) == content


def test_a_big_message_is_streamed_to_disk_not_kept_in_memory(queue):
    chunk = 64 * 1024
    blocks = [hashlib.sha512(b"%d" % i).digest() * (chunk // 64) for i in range(12 * 16)]
    writer = queue.start_message(envelope())
    digest = hashlib.sha256()
    for i, block in enumerate(blocks):
        writer.write(block)
        digest.update(block)
        if i == 32:  # 2 MB in: nearly all of it must already be in the temp file
            assert os.path.getsize(writer.temp_path) > 2 * 1024 * 1024 - 128 * 1024
    writer.finish()
    queue.commit([writer])
    assert queue.get(writer.queue_id).envelope.size == 12 * 1024 * 1024
    read_back = hashlib.sha256()
    with queue.store.open_content(writer.queue_id) as content:
        while True:
            data = content.read(100000)
            if not data:
                break
            read_back.update(data)
    assert read_back.hexdigest() == digest.hexdigest()


def test_damaged_content_is_caught_when_read_to_the_end(queue):
    original = b"Subject: hi\r\n\r\n" + b"x" * 10000
    [env] = accept(queue, [original])
    with open(queue.store.path(env.queue_id), "r+b") as f:
        f.seek(-5000, os.SEEK_END)  # a block that never reached the disk reads as zeros
        f.write(b"\0" * 100)
    assert queue.store.is_complete(env.queue_id)  # same length: framing alone cannot tell
    with queue.store.open_content(env.queue_id) as content:
        with pytest.raises(CorruptSpoolFile):
            while content.read(1000):
                pass
    with queue.store.open_content(env.queue_id) as content:  # a partial read cannot check
        content.seek(13)
        damaged = content.read()
    assert len(damaged) == len(original) - 13 and b"\0" * 100 in damaged


def test_an_aborted_message_leaves_nothing(queue):
    writer = queue.start_message(envelope())
    writer.write(b"half a message")
    writer.abort()
    writer.abort()
    assert spool_files(queue.spool_dir, "tmp") == []
    with pytest.raises(ValueError):
        writer.write(b"more")
    unfinished = queue.start_message(envelope())
    with pytest.raises(ValueError):
        queue.commit([unfinished])
    unfinished.abort()
    assert spool_files(queue.spool_dir, "tmp") == []
    assert spool_files(queue.spool_dir, "messages") == []


def test_committing_a_writer_again_cannot_undo_its_acceptance(queue):
    writer = queue.start_message(envelope())
    writer.write(b"accepted once\r\n")
    writer.finish()
    queue.commit([writer])
    other = queue.start_message(envelope())
    other.write(b"x")
    other.finish()
    for batch in ([writer], [other, writer], [other, other]):
        with pytest.raises(ValueError):
            queue.commit(batch)
    writer.abort()
    assert read_content(queue, writer.queue_id) == b"accepted once\r\n"
    assert queue.get(writer.queue_id).state == INCOMING
    queue.commit([other])
    assert queue.index.count_by_state() == {INCOMING: 2}


# -- reindex and reconcile

def test_reindex_rebuilds_a_deleted_index_from_the_files(tmp_path):
    spool_dir = str(tmp_path / "spool")
    with Queue(spool_dir) as queue:
        envelopes = []
        for batch in range(10):
            envelopes += accept(queue, [b"message %d.%d\r\n" % (batch, i) for i in range(5)],
                                recipients=[Recipient("r%d@example.net" % batch)])
    shutil.rmtree(os.path.join(spool_dir, "index.lmdb"))
    with Queue(spool_dir) as queue:
        assert list(queue.index.iter_records()) == []
        assert queue.reindex() == 50
        assert queue.index.count_by_state() == {INCOMING: 50}
        for env in envelopes:
            assert queue.get(env.queue_id).envelope == env
        assert [r.queue_id for r in queue.index.iter_records()] == sorted(
            e.queue_id for e in envelopes)


def test_reindex_starts_every_message_over(queue):
    [env] = accept(queue, [b"x\r\n"])
    record = queue.get(env.queue_id)
    record.state, record.attempts, record.next_attempt = HOLD, 3, time.time() + 3600
    queue.index.put(record)
    assert list(queue.index.iter_due()) == []
    assert queue.reindex() == 1
    assert queue.get(env.queue_id).state == INCOMING
    assert [qid for _, qid in queue.index.iter_due()] == [env.queue_id]


def _start_and_die(spool_dir, ready):
    # Only the spool: LMDB refuses an environment the parent had open before the fork.
    writer = SpoolStore(spool_dir).create(envelope())
    writer.write(b"Subject: interrupted\r\n" * 1000)
    writer._file.flush()
    ready.set()
    time.sleep(60)


def test_reconcile_repairs_what_a_crash_leaves(queue):
    kept = accept(queue, [b"kept %d\r\n" % i for i in range(5)])
    [truncated, cut_in_header, record_only, file_only] = accept(
        queue, [b"y" * 3000 for _ in range(4)])
    with open(queue.store.path(truncated.queue_id), "r+b") as f:
        f.truncate(2000)
    with open(queue.store.path(cut_in_header.queue_id), "r+b") as f:
        f.truncate(30)
    os.unlink(queue.store.path(record_only.queue_id))
    queue.index.delete(file_only.queue_id)
    garbage_id = new_queue_id()
    with open(queue.store.path(garbage_id), "wb") as f:
        f.write(b"not a spool file at all")
    # A sender killed with kill -9 in the middle of DATA:
    ready = FORK.Event()
    child = FORK.Process(target=_start_and_die, args=(queue.spool_dir, ready))
    child.start()
    assert ready.wait(10)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    # A message still being received right now, in this process, is left alone:
    live = queue.start_message(envelope())
    live.write(b"still arriving")
    assert len(spool_files(queue.spool_dir, "tmp")) == 2

    summary = queue.reconcile()

    assert len(summary.tmp_removed) == 1
    assert spool_files(queue.spool_dir, "tmp") == [os.path.basename(live.temp_path)]
    assert sorted(summary.corrupt) == sorted(
        [truncated.queue_id, cut_in_header.queue_id, garbage_id])
    assert spool_files(queue.spool_dir, "corrupt") == sorted(summary.corrupt)
    assert queue.get(truncated.queue_id) is None
    assert queue.get(record_only.queue_id) is None
    assert record_only.queue_id in summary.dropped
    assert summary.added == [file_only.queue_id]
    assert queue.get(file_only.queue_id).envelope == file_only
    assert queue.get(file_only.queue_id).state == INCOMING
    for env in kept:
        assert queue.get(env.queue_id).envelope == env
    assert summary.messages == 6
    assert queue.index.count_by_state() == {INCOMING: 6}
    live.finish()
    queue.commit([live])
    assert queue.reconcile().messages == 7


def _commit_until_killed(spool_dir, sync_method, conn):
    queue = Queue(spool_dir, sync_method=sync_method)
    while True:
        envelopes = accept(queue, [b"Subject: sacred\r\n\r\n" + b"z" * 5000] * 5)
        conn.send([e.queue_id for e in envelopes])  # the "250": sent only after commit


@pytest.mark.parametrize("sync_method", ["syncfs", "fsync"])
def test_kill_9_never_loses_an_acknowledged_message(tmp_path, sync_method):
    spool_dir = str(tmp_path / "spool")
    parent_end, child_end = FORK.Pipe(duplex=False)
    child = FORK.Process(target=_commit_until_killed, args=(spool_dir, sync_method, child_end))
    child.start()
    acknowledged = []
    deadline = time.time() + 0.5
    while time.time() < deadline or len(acknowledged) < 20:
        acknowledged += parent_end.recv()
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    while parent_end.poll():
        acknowledged += parent_end.recv()
    with Queue(spool_dir, sync_method=sync_method) as queue:
        summary = queue.reconcile()
        assert summary.corrupt == []
        for queue_id in acknowledged:
            assert queue.get(queue_id).state == INCOMING
            assert len(read_content(queue, queue_id)) == 5019
        assert spool_files(spool_dir, "tmp") == []
        assert summary.messages >= len(acknowledged)


# -- concurrency

def test_commits_from_many_threads_at_once_are_all_kept(queue):
    errors = []

    def sender(n):
        try:
            for batch in range(20):
                accept(queue, [b"thread %d batch %d msg %d\r\n" % (n, batch, i)
                               for i in range(5)])
        except Exception as e:  # reported below; a thread's exception is otherwise lost
            errors.append(e)

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        queue.index.count_by_state()  # readers keep working meanwhile
    for t in threads:
        t.join()
    assert errors == []
    assert queue.index.count_by_state() == {INCOMING: 800}
    ids = list(queue.store.iter_queue_ids())
    assert len(ids) == 800
    assert all(queue.store.is_complete(qid) for qid in ids)
    assert queue.reconcile().added == []


def _commit_in_child(spool_dir, n, conn):
    with Queue(spool_dir) as queue:
        ids = []
        for batch in range(20):
            ids += [e.queue_id for e in accept(queue, [b"p%d b%d\r\n" % (n, batch)] * 5)]
    conn.send(ids)


def test_commits_from_several_processes_share_one_queue(tmp_path):
    spool_dir = str(tmp_path / "spool")
    pipes, children = [], []
    for n in range(3):
        parent_end, child_end = FORK.Pipe(duplex=False)
        child = FORK.Process(target=_commit_in_child, args=(spool_dir, n, child_end))
        child.start()
        pipes.append(parent_end)
        children.append(child)
    ids = [qid for p in pipes for qid in p.recv()]
    for child in children:
        child.join()
        assert child.exitcode == 0
    with Queue(spool_dir) as queue:
        assert sorted(r.queue_id for r in queue.index.iter_records()) == sorted(ids)
        assert len(ids) == 300


def _hold_queue_open(spool_dir, opened, done):
    with Queue(spool_dir):
        opened.set()
        done.wait(30)


def test_an_open_index_keeps_its_lmdb_locks(tmp_path):
    """LMDB resets its lock file (reader table, writer mutex) when the next process to
    open the index finds no other user holding the shared lock on its first byte. A
    process that has the index open must keep that lock: once it dropped it (by closing
    a descriptor of lock.mdb), a second opener reset the lock file under a running
    writer and committed records were lost."""
    import fcntl
    spool_dir = str(tmp_path / "spool")
    for _ in range(2):          # the first opener creates lock.mdb, the second finds it
        opened, done = FORK.Event(), FORK.Event()
        holder = FORK.Process(target=_hold_queue_open, args=(spool_dir, opened, done))
        holder.start()
        try:
            assert opened.wait(30)
            fd = os.open(os.path.join(spool_dir, "index.lmdb", "lock.mdb"), os.O_RDWR)
            try:
                with pytest.raises(BlockingIOError):
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
            finally:
                os.close(fd)
        finally:
            done.set()
            holder.join()


def test_due_entries_follow_the_state(queue):
    [a, b] = accept(queue, [b"a\r\n", b"b\r\n"])
    record = queue.get(a.queue_id)
    record.state, record.next_attempt = DEFERRED, a.arrival + 600
    queue.index.put(record)
    assert [qid for _, qid in queue.index.iter_due()] == [b.queue_id, a.queue_id]
    assert [qid for _, qid in queue.index.iter_due(until=time.time() + 1)] == [b.queue_id]
    record.state = HOLD
    queue.index.put(record)
    assert [qid for _, qid in queue.index.iter_due()] == [b.queue_id]
    assert queue.index.delete(b.queue_id)
    assert list(queue.index.iter_due()) == []
    assert queue.index.count_by_state() == {HOLD: 1}


# -- full disk

@pytest.fixture
def small_disk():
    mount_point = tempfile.mkdtemp(prefix="elemta-full-")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", mount_point],
                            capture_output=True)
    if result.returncode != 0:
        os.rmdir(mount_point)
        pytest.skip("cannot mount a tmpfs here: %s" % result.stderr.decode().strip())
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", mount_point], check=True)
        os.rmdir(mount_point)


def fill(directory, name="filler"):
    """Take every free byte of the file system; returns the filler's path."""
    path = os.path.join(directory, name)
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                f.write(b"\0" * 4096)
            except OSError:
                break
    with open(path, "ab", buffering=0) as f:
        while True:
            try:
                f.write(b"\0")
            except OSError:
                return path


@pytest.mark.parametrize("sync_method", ["syncfs", "fsync"])
def test_a_full_disk_fails_commit_and_leaves_nothing_half_accepted(small_disk, sync_method):
    spool_dir = os.path.join(small_disk, "spool")
    queue = Queue(spool_dir, sync_method=sync_method)
    try:
        [before] = accept(queue, [b"accepted before the disk filled\r\n"])

        # Received in full, then the disk fills before the commit: the index cannot grow.
        many = [Recipient("rcpt%04d@example.net" % i) for i in range(100)]
        writers = []
        for i in range(40):
            writer = queue.start_message(envelope(recipients=many))
            writer.write(b"message %d\r\n" % i)
            writer.finish()
            writers.append(writer)
        filler = fill(spool_dir)
        with pytest.raises(OSError):
            queue.commit(writers)
        for writer in writers:
            assert queue.get(writer.queue_id) is None
        assert spool_files(spool_dir, "messages") == [before.queue_id]
        assert spool_files(spool_dir, "tmp") == []

        # The disk fills in the middle of DATA: write (or finish) fails, abort cleans up.
        writer = queue.start_message(envelope())
        with pytest.raises(OSError):
            for _ in range(1000):
                writer.write(b"x" * 4096)
            writer.finish()
        writer.abort()
        assert spool_files(spool_dir, "tmp") == []

        os.unlink(filler)
        [after] = accept(queue, [b"accepted once there was room again\r\n"])
    finally:
        queue.close()
    with Queue(spool_dir, sync_method=sync_method) as queue:
        summary = queue.reconcile()
        assert (summary.corrupt, summary.added, summary.dropped) == ([], [], [])
        assert sorted(r.queue_id for r in queue.index.iter_records()) == sorted(
            [before.queue_id, after.queue_id])
        assert read_content(queue, after.queue_id) == b"accepted once there was room again\r\n"


def test_commit_can_put_a_message_straight_on_hold(queue):
    """A quarantined message is never claimable, not even between commit and hold."""
    writers = []
    for content in (b"quarantined\r\n", b"fine\r\n"):
        writer = queue.start_message(envelope())
        writer.write(content)
        writer.finish()
        writers.append(writer)
    held, free = writers
    held.hold = Hold("clamav", "virus found: Eicar-Test-Signature", 1700000000.0)
    queue.commit(writers)
    assert queue.get(held.queue_id).state == HOLD and queue.store.is_held(held.queue_id)
    assert queue.get(held.queue_id).hold == held.hold
    assert queue.get(free.queue_id).hold is None
    assert [r.queue_id for r in queue.claim("test-owner", 10, 60)] == [free.queue_id]
    queue.reindex()                       # the marker on disk is the truth, reason included
    assert queue.get(held.queue_id).state == HOLD
    assert queue.get(held.queue_id).hold == held.hold


def test_who_held_a_message_and_why_is_kept_until_it_is_released(queue):
    """Issue 16 req 4: the admin's hold says "admin" (and a reason when given); a
    second hold keeps the first one's; release forgets it; rehold replaces it."""
    first, second = (e.queue_id for e in accept(queue, [b"a\r\n", b"b\r\n"]))
    assert dict(queue.hold([first], reason="looks odd")) == {first: "placed on hold"}
    hold = queue.get(first).hold
    assert (hold.by, hold.reason) == ("admin", "looks odd") and hold.since > 0
    assert queue.store.read_hold(first) == hold
    assert dict(queue.hold([first], by="someone else")) == {first: "already on hold"}
    assert queue.get(first).hold == hold
    new = Hold("clamav", "virus found: X", 1.0)
    assert dict(queue.rehold([first, second], new)) == {
        first: "rescanned: still on hold: held by clamav: virus found: X",
        second: "not on hold"}
    assert queue.get(first).hold == new == queue.store.read_hold(first)
    assert queue.get(second).hold is None and not queue.store.is_held(second)
    assert dict(queue.release([first])) == {first: "released from hold"}
    assert queue.get(first).hold is None and queue.get(first).state == INCOMING


def test_a_record_and_a_marker_of_the_previous_version_still_read(queue):
    """Upgrades keep queued mail: a held record written before holds had a reason (no
    "hold" key) and its empty marker read as held by unknown, and reconcile and reindex
    keep such a message on hold."""
    import json
    from elemta.queue.index import decode_record, encode_record
    [queue_id] = (e.queue_id for e in accept(queue, [b"old\r\n"]))
    list(queue.hold([queue_id]))
    record = queue.get(queue_id)
    old = json.loads(encode_record(record))
    del old["hold"]
    assert decode_record(json.dumps(old).encode()).hold is None
    open(queue.store.hold_path(queue_id), "w").close()          # an empty, old marker
    assert queue.store.read_hold(queue_id) is None
    queue.reindex()
    rebuilt = queue.get(queue_id)
    assert rebuilt.state == HOLD
    assert (rebuilt.hold.by, rebuilt.hold.reason) == ("unknown", "")


def test_a_record_from_before_requiretls_reads_as_without_it(queue):
    """Records and spool files written before RFC 8689 support have no requiretls key:
    they read as messages that did not ask for it."""
    import json
    from elemta.queue.index import decode_record, encode_record
    from elemta.queue.store import envelope_from_dict, envelope_to_dict
    [sent] = accept(queue, [b"old\r\n"], requiretls=True)
    old = json.loads(encode_record(queue.get(sent.queue_id)))
    del old["requiretls"]
    assert decode_record(json.dumps(old).encode()).envelope.requiretls is False
    data = envelope_to_dict(sent)
    assert envelope_from_dict(data).requiretls is True
    del data["requiretls"]
    assert envelope_from_dict(data).requiretls is False


def test_claim_takes_the_highest_priority_first_then_the_earliest_due(queue):
    """Issue 21 req 3: among the messages due now the highest priority goes first, then
    the soonest due (issue 4 ordered by due time first: a high-priority message then
    waited behind the whole backlog that came before it). A message not yet due waits,
    whatever its priority."""
    now = time.time()
    [early] = accept(queue, [b"x\r\n"], arrival=now - 60)
    same_moment = [accept(queue, [b"x\r\n"], arrival=now - 10, priority=p)[0]
                   for p in (0, 5, 2)]
    [urgent] = accept(queue, [b"x\r\n"], arrival=now - 1, priority=50)
    [later] = accept(queue, [b"x\r\n"], arrival=now - 1, priority=100)
    record = queue.get(later.queue_id)
    record.state, record.next_attempt = DEFERRED, now + 600
    queue.index.put(record)
    claimed = queue.claim("worker:1", 3, 60.0)
    assert [r.queue_id for r in claimed] == [
        urgent.queue_id, same_moment[1].queue_id, same_moment[2].queue_id]
    claimed = queue.claim("worker:1", 10, 60.0)
    assert [r.queue_id for r in claimed] == [early.queue_id, same_moment[0].queue_id]
    assert [qid for _, qid in queue.index.iter_due()] == [later.queue_id]


def test_due_times_come_soonest_first_across_priorities(queue):
    """iter_due (the worker's sleep until the next due message) is by time alone."""
    now = time.time()
    envelopes = [accept(queue, [b"x\r\n"], arrival=now - age, priority=p)[0]
                 for age, p in ((50, 0), (40, 9), (30, -3), (20, 9), (10, 0))]
    assert [qid for _, qid in queue.index.iter_due()] == [e.queue_id for e in envelopes]
    assert queue.next_due_time() == pytest.approx(now - 50, abs=0.002)


def test_an_index_from_before_priorities_gets_its_due_entries_rewritten(tmp_path):
    """An index written by an Elemta whose due keys had no priority byte: opened again,
    its due entries are rebuilt and claims honour the priorities of its records."""
    spool = str(tmp_path / "spool")
    with Queue(spool, map_size=64 << 20) as queue:
        now = time.time()
        [low] = accept(queue, [b"x\r\n"], arrival=now - 20)
        [high] = accept(queue, [b"x\r\n"], arrival=now - 10, priority=7)
        index = queue.index
        with index.env.begin(write=True) as txn:      # the old layout: time + id
            txn.drop(index.due, delete=False)
            for envelope in (low, high):
                old_key = struct.pack(">Q", int(round(envelope.arrival * 1000)))
                txn.put(old_key + envelope.queue_id.encode("ascii"), b"", db=index.due)
    with Queue(spool, map_size=64 << 20) as queue:
        assert [qid for _, qid in queue.index.iter_due()] == [low.queue_id, high.queue_id]
        assert [r.queue_id for r in queue.claim("worker:1", 1, 60.0)] == [high.queue_id]


def test_a_priority_out_of_range_in_a_spool_file_still_gets_delivered(queue):
    """A priority written by hand into a spool file: beyond the range it counts as the
    nearest bound, not a whole number as 0; reindex and claims go on."""
    now = time.time()
    [top] = accept(queue, [b"x\r\n"], arrival=now - 20, priority=100)
    [beyond] = accept(queue, [b"x\r\n"], arrival=now - 10, priority=1000)
    [text] = accept(queue, [b"x\r\n"], arrival=now - 30, priority="high")
    assert queue.reindex() == 3
    assert [r.queue_id for r in queue.claim("worker:1", 10, 60.0)] == [
        top.queue_id, beyond.queue_id, text.queue_id]
