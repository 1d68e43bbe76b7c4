"""Mail is sacred: an accepted message is never lost, proven over the real `elemta` process.

A 250 after DATA means the message file and its index record are on disk, so `kill -9`
right after it, a deleted index, a full disk or garbage from the client cannot lose it;
and a message that never got its 250 never shows up half-written. (kill -9 keeps the page
cache: these tests prove the order of the steps and start-up repair, not the flush to the
platter, which power loss alone could show.)
"""

import os
import random
import re
import shutil
import smtplib
import socket
import subprocess
import sys
import threading

import pytest

from elemta.queue.queue import INDEX_NAME, Queue
from tests.harness import REPO, wait_for


def message_body(tag, size):
    """A message that tells its tag in the Subject, with about `size` bytes of text lines
    (ending in CRLF, as SMTP content always does)."""
    line = (tag * 80)[:76].encode() + b"\r\n"
    return (b"From: a@client.test\r\nTo: b@example.test\r\nSubject: %s\r\n\r\n"
            % tag.encode() + line * max(1, size // len(line)))


def queued_id(reply):
    """The queue id from '250 2.0.0 Ok: queued as ID'."""
    code, text = reply
    assert code == 250, reply
    return text.decode().rsplit(" ", 1)[1]


def assert_stored(server, qid, sent):
    """The spool file of qid holds exactly `sent`, after our Received header, CRC good."""
    envelope, content = server.message(qid)   # reads to the end: checks the CRC
    assert content.endswith(sent), qid
    header = content[:-len(sent)]
    assert header.startswith(b"Received: from ") and qid.encode() in header, header
    assert envelope.size == len(content)
    return envelope


def tmp_files(server):
    return os.listdir(os.path.join(server.spool, "tmp"))




def read_until_closed(sock, timeout=5):
    """Everything the server sends until it closes the connection (or resets it)."""
    sock.settimeout(timeout)
    chunks = []
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except (ConnectionResetError, socket.timeout):
        pass
    return b"".join(chunks)


def raw_session(port):
    """A connected socket past the greeting and EHLO."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    assert sock.recv(1000).startswith(b"220")
    sock.sendall(b"EHLO client.test\r\n")
    reply = b""
    while b"\r\n250 " not in b"\r\n" + reply:
        reply += sock.recv(1000)
    return sock


def restart(server):
    """Start the server again on its spool and wait for its start-up reconcile: it binds
    its listeners first, so the port answers before the queue is repaired."""
    done = server.log().count("queue reconciled")
    server.start()
    wait_for(lambda: server.log().count("queue reconciled") > done)


def test_every_250_survives_kill_9_under_concurrent_load(elemta_server):
    """10 clients send at once (group commit batches them); the server is killed with -9
    while they are still sending, as soon as 50 messages got their 250."""
    server = elemta_server()
    wanted, threads_n = 50, 10
    acked = {}                      # qid -> content sent, for each 250 the clients read
    lock = threading.Condition()
    go = threading.Barrier(threads_n)

    def client(n):
        try:
            with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as smtp:
                smtp.ehlo()
                go.wait()
                for i in range(10 ** 6):
                    sent = message_body("c%d-m%d-" % (n, i), 3000 + 97 * i)
                    smtp.mail("client%d@client.test" % n)
                    smtp.rcpt("b@example.test")
                    qid = queued_id(smtp.data(sent))
                    with lock:
                        acked[qid] = sent
                        lock.notify()
        except (smtplib.SMTPException, OSError):
            pass                    # the server was killed under us

    threads = [threading.Thread(target=client, args=(n,)) for n in range(threads_n)]
    for t in threads:
        t.start()
    with lock:
        assert lock.wait_for(lambda: len(acked) >= wanted, timeout=20), len(acked)
    server.kill()
    for t in threads:
        t.join(10)
    assert len(acked) >= wanted

    # The index as kill -9 left it, before any repair: every record was committed first.
    left = set(server.queued_ids())
    assert set(acked) <= left, sorted(set(acked) - left)

    restart(server)
    queued = server.queued_ids()
    assert set(acked) <= set(queued), sorted(set(acked) - set(queued))
    for qid, sent in acked.items():
        assert_stored(server, qid, sent)
    # Anything else queued is a message whose 250 the kill swallowed: whole, never partial.
    for qid in set(queued) - set(acked):
        server.message(qid)
    assert tmp_files(server) == []
    # And the restarted server accepts mail again.
    with smtplib.SMTP("127.0.0.1", server.port) as smtp:
        smtp.sendmail("a@client.test", ["b@example.test"], message_body("after", 100))
    assert len(server.queued_ids()) == len(queued) + 1


def test_files_are_the_truth_when_the_index_is_deleted(elemta_server):
    server = elemta_server()
    sent = {}
    with smtplib.SMTP("127.0.0.1", server.port) as smtp:
        smtp.ehlo()
        for i in range(20):
            smtp.mail("sender%d@client.test" % i)
            for r in range(1 + i % 3):
                smtp.rcpt("rcpt%d-%d@example.test" % (i, r))
            content = message_body("idx%d-" % i, 500 + 31 * i)
            sent[queued_id(smtp.data(content))] = content
    with server.queue() as q:
        before = {r.queue_id: r.envelope for r in q.index.iter_records()}
    assert sorted(before) == sorted(sent)
    index_path = os.path.join(server.spool, INDEX_NAME)

    # Start-up reconcile rebuilds the index from the spool files.
    server.stop()
    shutil.rmtree(index_path)
    restart(server)
    with server.queue() as q:
        after = {r.queue_id: (r.envelope, r.state) for r in q.index.iter_records()}
    assert sorted(after) == sorted(sent)
    for qid, (envelope, state) in after.items():
        assert envelope == before[qid]
        assert state == "incoming"
        assert_stored(server, qid, sent[qid])
        assert "%s: file without index record, queued again" % qid in server.log()

    # elemtactl queue reindex: the same from Queue.reindex, with the server stopped.
    server.stop()
    shutil.rmtree(index_path)
    with Queue(server.spool) as q:
        assert q.reindex() == len(sent)
        again = {r.queue_id: r.envelope for r in q.index.iter_records()}
    assert again == before


def test_kill_9_in_the_middle_of_data_leaves_no_partial_message(elemta_server):
    server = elemta_server()
    content = message_body("big-", 5 * 1024 * 1024)
    sock = raw_session(server.port)
    try:
        sock.sendall(b"MAIL FROM:<a@client.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
        reply = b""
        while b"354 " not in reply:
            reply += sock.recv(1000)
        sock.sendall(content[:len(content) // 2])
        # The server is streaming it to tmp/ when the kill comes.
        tmp = os.path.join(server.spool, "tmp")
        wait_for(lambda: any(os.path.getsize(os.path.join(tmp, name)) > 1024 * 1024
                             for name in os.listdir(tmp)))
        server.kill()
        leftover = tmp_files(server)
        assert len(leftover) == 1
        assert b"250" not in read_until_closed(sock)
    finally:
        sock.close()

    restart(server)
    assert server.queued_ids() == []
    assert tmp_files(server) == []
    assert "removed leftover temp file %s (never acknowledged)" % leftover[0] in server.log()
    assert os.listdir(os.path.join(server.spool, "corrupt")) == []


@pytest.fixture
def tiny_spool(tmp_path):
    """A 3 MB tmpfs mounted as a spool directory (root only); unmounted at the end."""
    path = str(tmp_path / "tiny-spool")
    os.makedirs(path)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "tmpfs", path],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs for the full-disk test: %s" % mounted.stderr.strip())
    yield path
    if subprocess.run(["umount", path]).returncode != 0:
        subprocess.run(["umount", "-l", path], check=True)


STORAGE_REFUSALS = ((452, "4.3.1 Error: insufficient system storage"),
                    (451, "4.3.0 Error: queue file write error"))


def fill(smtp, size, tag, limit, recipient="b@example.test"):
    """Send messages of `size` bytes until the server refuses one. Returns ({qid: content}
    of those accepted, the refusal as (code, text))."""
    accepted = {}
    for i in range(limit):
        sent = message_body("%s%d-" % (tag, i), size)
        code, text = smtp.mail("a@client.test")
        if code != 250:        # no byte free at all: refused before the content
            return accepted, (code, text.decode())
        assert smtp.rcpt(recipient)[0] == 250
        try:
            code, text = smtp.data(sent)
        except smtplib.SMTPDataError as refused:     # refused at DATA, before the 354
            code, text = refused.smtp_code, refused.smtp_error
        if code != 250:
            return accepted, (code, text.decode())
        accepted[queued_id((code, text))] = sent
    pytest.fail("%d messages of %d bytes accepted on a 3 MB spool" % (limit, size))


# tiny_spool comes first: it is set up before the server and torn down after it stops.
def test_full_disk_refuses_with_452_and_keeps_what_it_accepted(tiny_spool, elemta_server):
    server = elemta_server(queue={"spool_dir": tiny_spool, "min_free_space": 0})
    server.spool = tiny_spool
    with smtplib.SMTP("127.0.0.1", server.port) as smtp:
        smtp.ehlo()
        # 1 MB messages: the disk fills while the content streams in.
        accepted, refusal = fill(smtp, 1024 * 1024, "big", 10)
        assert accepted, "not even one 1 MB message fit"
        assert refusal in STORAGE_REFUSALS, refusal
        assert smtp.noop()[0] == 250
        # Then 20 KB messages fill the space left to the last block; the session goes on.
        small, refusal = fill(smtp, 20 * 1024, "small", 200)
        assert refusal in STORAGE_REFUSALS, refusal
        assert smtp.noop()[0] == 250
        accepted.update(small)
    assert sorted(server.queued_ids()) == sorted(accepted)
    for qid, sent in accepted.items():
        assert_stored(server, qid, sent)
    assert tmp_files(server) == []           # the refused messages' files were removed
    assert "No space left on device" in server.log()
    # Killed and started again on the full disk, it comes up with everything it accepted.
    server.kill()
    restart(server)
    assert sorted(server.queued_ids()) == sorted(accepted)
    for qid, sent in accepted.items():
        assert_stored(server, qid, sent)


def send_message(sock, content):
    """MAIL, RCPT, DATA over a raw session; returns the queue id from the 250."""
    sock.sendall(b"MAIL FROM:<a@client.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n"
                 + content.replace(b"\r\n.", b"\r\n..") + b".\r\n")
    reply = b""
    while b"queued as" not in reply:
        chunk = sock.recv(1000)
        assert chunk, reply
        reply += chunk
    return reply.split(b"queued as ", 1)[1].split()[0].decode()


def test_garbage_after_a_queued_message_loses_nothing(elemta_server):
    # Enough error budget that the server reads all the garbage and the QUIT.
    server = elemta_server(limits={"errors": 10000})
    rng = random.Random(9)
    garbage = [
        bytes(rng.randrange(256) for _ in range(20000)),          # random bytes
        b"X" * 100000 + b"\r\n",                                   # an overlong line
        b"\0\0\0MAIL FROM:<\0a@b>\r\nRCPT TO:<\0>\r\n\0\r\n",      # NULs in commands
    ]
    assert b"\r\n.\r\n" not in b"".join(garbage)

    # One session: a message gets its 250, then garbage commands, then QUIT.
    first = message_body("first-", 2000)
    sock = raw_session(server.port)
    try:
        qid = send_message(sock, first)
        sock.sendall(b"".join(garbage) + b"\xff\xfe\r\nDATA\r\n.\r\nQUIT\r\n")
        replies = read_until_closed(sock).decode("ascii").splitlines()
    finally:
        sock.close()
    assert replies[-1].startswith("221 "), replies[-3:]
    for reply in replies[:-1]:
        assert reply[:4] in ("500 ", "501 ", "502 ", "503 "), reply
    assert "500 5.5.2 Error: line too long" in replies
    assert "500 5.5.2 Error: NUL character in command" in replies
    assert server.queued_ids() == [qid]
    assert_stored(server, qid, first)

    # Another: a message gets its 250, then a second DATA of garbage and the line drops.
    second = message_body("second-", 2000)
    sock = raw_session(server.port)
    try:
        second_qid = send_message(sock, second)
        sock.sendall(b"MAIL FROM:<a@client.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
        sock.sendall(b"".join(garbage))     # no end of data: the line just drops
    finally:
        sock.close()
    wait_for(lambda: "disconnect from" in server.log().rsplit(second_qid, 1)[1])
    assert sorted(server.queued_ids()) == sorted([qid, second_qid])
    assert_stored(server, qid, first)
    assert_stored(server, second_qid, second)
    assert tmp_files(server) == []        # the unfinished message's file is gone


def test_delivery_waits_out_a_full_disk_and_the_bounce_goes_once_there_is_room(
        tiny_spool, elemta_server):
    """The spool fills while a message waits for its retry: the delivery worker cannot
    write the index (so it claims nothing, and risks nothing) and says so, without dying
    and being respawned in a loop; once there is room, the retry gets its 550 and the
    bounce goes out."""
    from tests.harness import free_port
    from tests.peers.sink import Replies, ScriptedServer
    port = free_port()
    refuse = ScriptedServer(script={"GREETING": Replies("421 4.3.2 not yet", "220 ok"),
                                    "RCPT": "550 5.1.1 no such user"},
                            address="127.0.0.24", port=port)
    notices = ScriptedServer(address="127.0.0.25", port=port)
    with refuse, notices:
        server = elemta_server(queue={"spool_dir": tiny_spool, "min_free_space": 0}, delivery={
            "workers": 1, "min_backoff": 2.0, "max_backoff": 2.0, "lease": 3.0,
            "transport": [{"domain": "refuse.test", "nexthop": "smtp:[127.0.0.24]:%d" % port},
                          {"domain": "sender.test", "nexthop": "smtp:[127.0.0.25]:%d" % port},
                          # Nobody listens there: the fillers wait, deferred, quietly.
                          {"domain": "wait.test", "nexthop": "smtp:[127.0.0.26]:%d" % port}]})
        server.spool = tiny_spool
        with smtplib.SMTP("127.0.0.1", server.port) as smtp:
            smtp.sendmail("me@sender.test", ["x@refuse.test"], message_body("victim", 100))
            wait_for(lambda: "status=deferred (421 4.3.2 not yet" in server.log())
            # Fill the disk to the last page while the victim waits for its retry.
            smtp.ehlo()
            fillers, _ = fill(smtp, 64 * 1024, "filler", 100, "y@wait.test")
            more, _ = fill(smtp, 1024, "last", 4000, "y@wait.test")
            fillers.update(more)
        # LMDB says ENOSPC, or EIO when the full tmpfs took part of a page write.
        wait_for(lambda: re.search(r"cannot take work from the queue: queue index: "
                                   r"mdb_txn_commit: (No space left on device|"
                                   r"Input/output error)", server.log()), timeout=15)
        assert notices.messages == []
        subprocess.run([sys.executable, "-m", "elemta.cli.elemtactl", "queue", "delete",
                        "--spool-dir", tiny_spool] + sorted(fillers), check=True,
                       capture_output=True, env=dict(os.environ, PYTHONPATH=REPO))
        wait_for(lambda: notices.messages, timeout=20)
    assert b"x@refuse.test" in notices.messages[0].content
    assert b"550 5.1.1 no such user" in notices.messages[0].content
