"""A full spool file system, and a full queue index, while mail flows (issue #11, part 6).

Real Elemta (tests/conftest.py) with its spool on a small tmpfs mounted here (we run as
root; skipped, saying why, only where mounting is impossible), clients sending from several
threads, a big file filling the file system under them. What a user must see: new mail gets
452 4.3.1, never a 250 for a message that was not stored, never a dropped connection or a
traceback; every message that got a 250 is kept intact (in the queue, or delivered to a real
smtp-sink); no worker dies and is respawned; and once space is freed mail flows again by
itself. The same for the LMDB index reaching queue.index_map_size. Also: Postfix's free
space rules at MAIL FROM (queue.min_free_space, SIZE=), metric files on a full disk (they
used to kill the process with SIGBUS), sendmail and pickup on a full spool.
The log stays on the test's own disk (a log on the full disk would lose lines: logging
prints its own complaint to stderr and the process goes on).
See also tests/test_durability.py (a full disk in one session) and tests/test_queue.py.
"""

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

from tests.harness import REPO, free_port, wait_for, wait_for_greeting

SMTP_SINK = "/usr/sbin/smtp-sink"
STORAGE = "4.3.1 Error: insufficient system storage"
MESSAGE_SIZE = 4000


def mount_tmpfs(path, size):
    os.makedirs(path, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%s,mode=0755" % size,
                              "tmpfs", path], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs for the full-disk test: %s" % mounted.stderr.strip())


def unmount(path):
    if subprocess.run(["umount", path], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", path], check=True)


@pytest.fixture
def small_fs(tmp_path):
    """A 32 MB tmpfs (the spool goes in its spool/); unmounted after the server stops."""
    path = str(tmp_path / "small-fs")
    mount_tmpfs(path, "32m")
    yield path
    unmount(path)


def fill(directory, leave=0):
    """Take every free page of the file system but `leave` bytes with one big file;
    returns its path."""
    path = os.path.join(directory, "filler")
    chunk = b"\0" * (1024 * 1024)
    with open(path, "wb", buffering=0) as f:
        while chunk:
            try:
                f.write(chunk)
            except OSError:
                chunk = chunk[:len(chunk) // 2] if len(chunk) > 4096 else b""
        if leave:
            f.truncate(max(0, f.tell() - leave))
    return path


def message(tag):
    """A message naming itself in the Subject, about MESSAGE_SIZE bytes."""
    line = (tag * 80)[:76].encode() + b"\r\n"
    return (b"From: a@client.test\r\nTo: b@sink.test\r\nSubject: %s\r\n\r\n" % tag.encode()
            + line * (MESSAGE_SIZE // len(line)))


class Senders:
    """Client threads sending messages one after another until stopped; every outcome is
    kept: accepted {queue id: (tag, content, when)}, refused [(stage, reply, when)],
    broken [what went wrong] (a dropped connection, a reply that is neither)."""

    def __init__(self, port, threads=8, recipient="b@sink.test", pause=0.02):
        self.port = port
        self.recipient = recipient
        self.pause = pause
        self.accepted = {}
        self.refused = []
        self.broken = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(n,), daemon=True)
                        for n in range(threads)]

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info):
        self.stop()

    def stop(self):
        self.stopping.set()
        for thread in self.threads:
            thread.join(30)

    def accepted_since(self, when):
        with self.lock:
            return [qid for qid, (_, _, at) in self.accepted.items() if at >= when]

    def refused_since(self, when):
        with self.lock:
            return [r for r in self.refused if r[2] >= when]

    def _run(self, number):
        sent = 0
        smtp = None
        while not self.stopping.is_set():
            try:
                if smtp is None:
                    smtp = smtplib.SMTP("127.0.0.1", self.port, timeout=30)
                    smtp.ehlo()
                tag = "t%d-%d-" % (number, sent)
                sent += 1
                if not self._send(smtp, tag, message(tag)):
                    # As an MTA does: after a 4xx, QUIT, and try again later.
                    smtp.quit()
                    smtp = None
            except Exception as error:       # a dropped connection, a timeout
                with self.lock:
                    self.broken.append("%s: %r" % (type(error).__name__, error))
                smtp = None
            time.sleep(self.pause)
        if smtp is not None:
            try:
                smtp.quit()
            except Exception as error:
                with self.lock:
                    self.broken.append("QUIT: %r" % error)

    def _send(self, smtp, tag, content):
        for stage, command in (("MAIL", lambda: smtp.mail("a@client.test")),
                               ("RCPT", lambda: smtp.rcpt(self.recipient))):
            code, text = command()
            if code != 250:
                return self._refused(stage, code, text)
        try:
            code, text = smtp.data(content)
        except smtplib.SMTPDataError as refused:       # before the 354
            code, text = refused.smtp_code, refused.smtp_error
        if code != 250:
            return self._refused("DATA", code, text)
        queue_id = text.decode().rsplit(" ", 1)[1]
        with self.lock:
            self.accepted[queue_id] = (tag, content, time.monotonic())
        return True

    def _refused(self, stage, code, text):
        with self.lock:
            self.refused.append((stage, "%d %s" % (code, text.decode()), time.monotonic()))
        return False


def children(server):
    """{pid: title} of the server's workers (everything but the master)."""
    return {pid: title for pid, title in server.titles().items()
            if pid != server.process.pid}


def started_children(server, count):
    """children(), once `count` of them run and each has set its own title."""
    def settled():
        found = children(server)
        return len(found) >= count and "elemta: master" not in found.values()
    wait_for(settled)
    return children(server)


def assert_clean(server, senders, workers_before):
    """No dropped connection, no reply but 250 and 452 4.3.1, no worker replaced."""
    assert senders.broken == [], (senders.broken[:5], senders.refused[:5])
    odd = [r for r in senders.refused if r[1] != "452 " + STORAGE]
    assert odd == [], odd[:5]
    log = server.log()
    assert "Traceback" not in log
    assert " ended with " not in log, re.findall(r".* ended with .*", log)
    assert children(server) == workers_before


def assert_in_queue(server, accepted):
    """Every message that got a 250 is in the queue, its content intact (CRC checked)."""
    assert sorted(server.queued_ids()) == sorted(accepted)
    for queue_id, (_, sent, _) in accepted.items():
        _, content = server.message(queue_id)
        assert content.endswith(sent), queue_id


def wait_for_250_after(senders, when, count=20, timeout=30):
    """Mail flows again by itself: `count` messages accepted after `when`."""
    wait_for(lambda: len(senders.accepted_since(when)) >= count, timeout=timeout)


# 1 MiB kept free: refused at MAIL. 0: the disk fills to the last page, and the sessions
# meet it writing or committing their message, at the end of DATA.
@pytest.mark.parametrize("min_free_space", [1024 * 1024, 0])
def test_a_full_spool_under_load_refuses_with_452_and_keeps_every_250(small_fs, elemta_server,
                                                                       min_free_space):
    spool = os.path.join(small_fs, "spool")
    server = elemta_server(
        smtpd={"hostname": "mx.test", "workers": 2},
        queue={"spool_dir": spool, "min_free_space": min_free_space},
        limits={"message_size": 512 * 1024})
    server.spool = spool
    workers = started_children(server, 4)      # two smtpd, pickup, api
    with Senders(server.port) as senders:
        wait_for(lambda: len(senders.accepted) >= 50)
        # Without a reserve, leave room for a few messages: the last pages go while
        # messages stream in, and those sessions meet the full disk at the end of DATA.
        filler = fill(small_fs, leave=0 if min_free_space else 256 * 1024)
        full = time.monotonic()
        wait_for(lambda: len(senders.refused_since(full)) >= 30)
        time.sleep(0.5)       # the sessions that passed the MAIL check have finished
        refusing = time.monotonic()
        time.sleep(1.0)
        assert senders.accepted_since(refusing) == [], "250 on a full disk"
        assert len(senders.refused_since(refusing)) >= 10
        os.unlink(filler)
        freed = time.monotonic()
        wait_for_250_after(senders, freed)
    print("\naccepted %d, refused %d (%d at MAIL, %d at DATA)" % (
        len(senders.accepted), len(senders.refused),
        sum(1 for r in senders.refused if r[0] == "MAIL"),
        sum(1 for r in senders.refused if r[0] == "DATA")))
    assert_clean(server, senders, workers)
    at_mail_line = ("bytes free in the spool's file system, queue.min_free_space keeps %d"
                    % min_free_space)
    if min_free_space:
        assert at_mail_line in server.log()
    else:
        # No reserve: the sessions meet the full disk writing their message (452 after
        # DATA), or, once not one byte is left, at MAIL; which of the two a loaded machine
        # shows varies, so each refusal is checked against its own log line.
        stages = {stage for stage, _, _ in senders.refused}
        assert stages and stages <= {"MAIL", "DATA"}, stages
        if "DATA" in stages:
            assert "No space left on device" in server.log()
        if "MAIL" in stages:
            assert at_mail_line in server.log()
    assert_in_queue(server, senders.accepted)
    assert os.listdir(os.path.join(spool, "tmp")) == []     # refused messages left nothing


@pytest.fixture
def smtp_sink():
    """smtp-sink writing one file per message into a fresh directory: (port, directory)."""
    if not os.path.exists(SMTP_SINK):
        pytest.skip("smtp-sink is not installed (apt-get install postfix)")
    directory = tempfile.mkdtemp(prefix="elemta-sink-")
    os.chmod(directory, 0o777)    # smtp-sink -u nobody writes its dumps here
    port = free_port()
    process = None

    def start():
        nonlocal process
        process = subprocess.Popen([SMTP_SINK, "-u", "nobody", "-d",
                                    os.path.join(directory, "%M."), "127.0.0.1:%d" % port,
                                    "64"])
        wait_for_greeting(port, process, timeout=10, name="smtp-sink")
    yield port, directory, start
    if process is not None:
        process.terminate()
        process.wait()
    shutil.rmtree(directory, ignore_errors=True)


def delivered(directory):
    """{Subject tag: [dump contents]} of the messages complete at the sink."""
    found = {}
    for name in os.listdir(directory):
        try:
            with open(os.path.join(directory, name), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            continue
        match = re.search(rb"\nSubject: (\S+)\r?\n", data)
        if match:
            found.setdefault(match.group(1).decode(), []).append(data)
    return found


def assert_delivered(directory, accepted, timeout=60):
    """Every message that got a 250 reached the sink whole (duplicates allowed, counted)."""
    tags = {tag: content for tag, content, _ in accepted.values()}
    wait_for(lambda: set(tags) <= set(delivered(directory)), timeout=timeout)
    at_sink = delivered(directory)
    for tag, content in tags.items():
        body = content.split(b"\r\n\r\n", 1)[1].replace(b"\r\n", b"\n")
        assert any(body.rstrip() in dump.replace(b"\r\n", b"\n") for dump in at_sink[tag]), tag
    duplicates = sum(len(dumps) - 1 for tag, dumps in at_sink.items() if tag in tags)
    print("delivered %d, duplicates %d" % (len(tags), duplicates))


def relay_to(port, workers=2, **delivery):
    settings = {"workers": workers, "min_backoff": 1.0, "max_backoff": 1.0,
                "transport": [{"domain": "sink.test", "nexthop": "smtp:[127.0.0.1]:%d" % port}]}
    settings.update(delivery)
    return settings


def test_a_full_spool_while_delivering_loses_nothing_and_recovers(small_fs, smtp_sink,
                                                                  elemta_server):
    port, directory, start_sink = smtp_sink
    start_sink()
    spool = os.path.join(small_fs, "spool")
    server = elemta_server(
        smtpd={"hostname": "mx.test", "workers": 2}, api={"enabled": False},
        queue={"spool_dir": spool, "min_free_space": 1024 * 1024},
        limits={"message_size": 512 * 1024}, delivery=relay_to(port))
    server.spool = spool
    wait_for(lambda: "delivery worker started" in server.log())
    workers = started_children(server, 6)      # two smtpd, two delivery, pickup, local
    with Senders(server.port) as senders:
        wait_for(lambda: len(senders.accepted) >= 50)
        filler = fill(small_fs)
        full = time.monotonic()
        wait_for(lambda: len(senders.refused_since(full)) >= 30)
        time.sleep(2.0)        # deliveries go on meanwhile, on whatever room they find
        os.unlink(filler)
        wait_for_250_after(senders, time.monotonic())
    print("\naccepted %d, refused %d" % (len(senders.accepted), len(senders.refused)))
    assert_clean(server, senders, workers)
    assert_delivered(directory, senders.accepted)
    wait_for(lambda: server.queued_ids() == [], timeout=30)
    assert_clean(server, senders, workers)


def test_a_full_queue_index_refuses_with_452_and_recovers_as_mail_leaves(tmp_path, smtp_sink,
                                                                        elemta_server):
    """A 4 MB index fills while the next hop is down: new mail gets 452 4.3.1 (at MAIL,
    once all but 1 MiB is used: that is delivery's); the delivery workers go on retrying in the
    reserve, the next hop comes back, the queue empties and mail is accepted again."""
    port, directory, start_sink = smtp_sink
    server = elemta_server(
        smtpd={"hostname": "mx.test", "workers": 2}, api={"enabled": False},
        queue={"index_map_size": 4 * 1024 * 1024}, delivery=relay_to(port))
    wait_for(lambda: "delivery worker started" in server.log())
    workers = started_children(server, 6)
    with Senders(server.port, threads=4, pause=0.01) as senders:
        wait_for(lambda: any(r[1] == "452 " + STORAGE for r in senders.refused), timeout=60)
        refusing = time.monotonic()
        time.sleep(1.0)
        accepted_while_full = len(senders.accepted_since(refusing))
        start_sink()                   # the next hop is back: the queue drains
        try:
            wait_for_250_after(senders, time.monotonic(), count=50, timeout=120)
        except AssertionError:
            # Seen once, in a full run on a loaded machine, not since: say where it stood.
            raise AssertionError("mail never flowed again: %d delivered, %d queued; log:\n%s"
                                 % (len(delivered(directory)), len(server.queued_ids()),
                                    server.log()[-6000:])) from None
    print("\naccepted %d (%d while full), refused %d" % (
        len(senders.accepted), accepted_while_full, len(senders.refused)))
    assert "queue index" in server.log() and "bytes are kept for delivery" in server.log()
    assert_clean(server, senders, workers)
    assert_delivered(directory, senders.accepted)
    wait_for(lambda: server.queued_ids() == [], timeout=30)


def send_pipelined(smtp, recipients, content):
    """MAIL, every RCPT and DATA in one write (PIPELINING), then the content: returns
    the final reply (code, text)."""
    smtp.send(b"MAIL FROM:<a@client.test>\r\n"
              + b"".join(b"RCPT TO:<%s>\r\n" % r.encode() for r in recipients)
              + b"DATA\r\n")
    replies = [smtp.getreply() for _ in range(len(recipients) + 2)]
    assert [code for code, _ in replies[:-1]] == [250] * (len(recipients) + 1), replies[:3]
    assert replies[-1][0] == 354, replies[-1]
    smtp.send(content + b".\r\n")
    return smtp.getreply()


def test_an_index_too_full_for_one_big_record_answers_452_at_the_end_of_data(tmp_path,
                                                                           elemta_server):
    """A record bigger than the room left (10,000 long recipients: about 1.3 MB) fails its
    commit with LMDB's MapFullError although MAIL found room: 452 4.3.1 after the content,
    nothing half queued, and once room is made (a message deleted) the same message is
    accepted."""
    server = elemta_server(queue={"index_map_size": 4 * 1024 * 1024},
                           limits={"recipients": 10000})
    recipients = ["%s%05d@example.test" % ("r" * 58, n) for n in range(10000)]
    content = b"Subject: many\r\n\r\nhello\r\n"
    accepted, refusal = [], None
    with smtplib.SMTP("127.0.0.1", server.port) as smtp:
        smtp.ehlo()
        for _ in range(10):
            code, text = send_pipelined(smtp, recipients, content)
            if code != 250:
                refusal = "%d %s" % (code, text.decode())
                break
            accepted.append(text.decode().rsplit(" ", 1)[1])
        assert refusal == "452 " + STORAGE, refusal
        assert accepted
        assert "queue index full (queue.index_map_size is 4194304 bytes)" in server.log()
        assert sorted(server.queued_ids()) == sorted(accepted)
        assert os.listdir(os.path.join(server.spool, "tmp")) == []
        subprocess.run([sys.executable, "-m", "elemta.cli.elemtactl", "queue", "delete",
                        "--spool-dir", server.spool, accepted[0]], check=True,
                       capture_output=True, env=dict(os.environ, PYTHONPATH=REPO))
        # At once: LMDB reuses pages freed by the last write only from the next-but-one
        # write on, and the queue makes that write itself (QueueIndex.nudge).
        code, text = send_pipelined(smtp, recipients, content)
        assert code == 250, text


METRICS_ON_A_FULL_DISK = r"""
import sys
from elemta import metrics
metrics.setup(sys.argv[1])
with open(sys.argv[2], "wb", buffering=0) as filler:     # take every free page
    chunk = b"\0" * 65536
    while chunk:
        try:
            filler.write(chunk)
        except OSError:
            chunk = chunk[:len(chunk) // 2] if len(chunk) > 4096 else b""
for n in range(3000):          # new keys: the file must grow past its first 64 KB
    metrics.count_reply(452, "4.3.1", "MAIL%d" % n)
    metrics.DELIVERIES.labels("sent%d" % n, "smtp", "remote").inc()
print("alive")
"""


def test_metric_files_on_a_full_disk_never_kill_the_process(tmp_path):
    """prometheus-client's metric files are sparse and written through a mapping: on a
    full disk a new page meant SIGBUS (a full spool killed the master this way). Now the
    process lives on, its metrics in memory, and says so."""
    fs = str(tmp_path / "fs")
    mount_tmpfs(fs, "1m")
    try:
        done = subprocess.run([sys.executable, "-c", METRICS_ON_A_FULL_DISK,
                               os.path.join(fs, "metrics"), os.path.join(fs, "filler")],
                              capture_output=True, text=True, timeout=60,
                              env=dict(os.environ, PYTHONPATH=REPO))
    finally:
        unmount(fs)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.strip() == "alive"
    assert "keeps its metrics in memory" in done.stderr


FOLD_ON_A_FULL_DISK = r"""
import os, sys
from prometheus_client.mmap_dict import MmapedDict
from elemta import metrics
from elemta.util.metricfiles import AllocatedDict, read_entries, write_value
directory, filler_path = sys.argv[1:]
metrics.setup(directory)
pid = 2 ** 22 + 17                      # a dead child with 3000 counters
dead = MmapedDict(os.path.join(directory, "counter_%d.db" % pid))
for n in range(3000):
    write_value(dead, "key%05d" % n, n + 1.0)
dead.close()
archive_path = os.path.join(directory, "counter_archive.db")
AllocatedDict(archive_path, strict=True).close()    # made while there is room
with open(filler_path, "wb", buffering=0) as filler:  # then take every free page
    chunk = b"\0" * 65536
    while chunk:
        try:
            filler.write(chunk)
        except OSError:
            chunk = chunk[:len(chunk) // 2] if len(chunk) > 4096 else b""
metrics.worker_exited(pid)        # the archive cannot grow: the fold stops part way
partly = dict((k, v) for k, v, _ in read_entries(archive_path))
os.remove(filler_path)
metrics.worker_exited(pid)        # room again: the rest is folded
folded = dict((k, v) for k, v, _ in read_entries(archive_path))
wrong = [k for k in folded if folded[k] != int(k[3:]) + 1]
print(0 < len(partly) < 3000, len(folded), wrong[:5],
      os.path.exists(os.path.join(directory, "counter_%d.db" % pid)))
"""


def test_a_fold_stopped_by_a_full_disk_counts_nothing_twice(tmp_path):
    """The master folds a dead child's counters into the archive; a full disk can stop
    it part way, and the dead file stays for a later fold. What was already folded must
    not be added again then."""
    fs = str(tmp_path / "fs")
    mount_tmpfs(fs, "1m")
    try:
        done = subprocess.run([sys.executable, "-c", FOLD_ON_A_FULL_DISK,
                               os.path.join(fs, "metrics"), os.path.join(fs, "filler")],
                              capture_output=True, text=True, timeout=60,
                              env=dict(os.environ, PYTHONPATH=REPO))
    finally:
        unmount(fs)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "cannot fold the counters of pid" in done.stderr
    assert done.stdout.split() == ["True", "3000", "[]", "False"], done.stdout


def sendmail(server, content):
    """elemta's sendmail -t as root: (exit status, stderr)."""
    done = subprocess.run([sys.executable, "-m", "elemta.cli.sendmail", "-C",
                           server.config_path, "-t", "-i"], input=content,
                          capture_output=True, timeout=30,
                          env=dict(os.environ, PYTHONPATH=REPO))
    return done.returncode, done.stderr.decode()


def test_sendmail_and_pickup_on_a_full_spool(small_fs, elemta_server):
    """sendmail on a full disk fails with a clear message and exit 75 (EX_TEMPFAIL),
    leaving nothing behind; a submission already in the maildrop that cannot be queued
    stays there, and pickup, alive all along, queues it once there is room."""
    spool = os.path.join(small_fs, "spool")
    server = elemta_server(queue={"spool_dir": spool, "min_free_space": 0})
    server.spool = spool
    workers = started_children(server, 3)          # smtpd, pickup, api
    maildrop = os.path.join(spool, "maildrop")
    assert sendmail(server, message("before-"))[0] == 0
    wait_for(lambda: len(server.queued_ids()) == 1)
    # Pickup removes the maildrop file just after it queued the message.
    wait_for(lambda: [n for n in os.listdir(maildrop) if not n.startswith(".")] == [])

    filler = fill(small_fs)
    status, stderr = sendmail(server, message("refused-"))
    assert status == 75, stderr
    assert "No space left on device" in stderr, stderr
    assert [n for n in os.listdir(maildrop) if not n.startswith(".")] == []

    # Room for the maildrop file only: pickup cannot queue it, and keeps it.
    os.unlink(filler)
    big = message("waiting-") * 20
    filler = fill(small_fs, leave=len(big) + 8192)
    server_log = len(server.log())
    assert sendmail(server, big)[0] == 0
    wait_for(lambda: "No space left on device" in server.log()[server_log:], timeout=15)
    assert len([n for n in os.listdir(maildrop) if not n.startswith(".")]) == 1
    assert len(server.queued_ids()) == 1
    os.unlink(filler)
    wait_for(lambda: len(server.queued_ids()) == 2, timeout=30)
    wait_for(lambda: all(n.startswith(".") for n in os.listdir(maildrop)))
    assert "Traceback" not in server.log()
    assert children(server) == workers


def test_mail_from_is_refused_when_the_message_could_not_fit(small_fs, elemta_server):
    """Postfix's rules at MAIL FROM: by default the spool keeps 1.5 times
    limits.message_size free; with queue.min_free_space set, a SIZE= that does not fit
    in two thirds of the free space (or in the free space less the reserve) gets 452."""
    spool = os.path.join(small_fs, "spool")
    default = elemta_server(queue={"spool_dir": spool})         # 30 MB messages
    with smtplib.SMTP("127.0.0.1", default.port) as smtp:
        smtp.ehlo()
        assert smtp.mail("a@client.test") == (452, STORAGE.encode())
    assert "1.5 times limits.message_size keeps 47185920" in default.log()
    default.stop()

    sized = elemta_server(queue={"spool_dir": spool, "min_free_space": 0})
    with smtplib.SMTP("127.0.0.1", sized.port) as smtp:
        smtp.ehlo()
        assert smtp.mail("a@client.test", ["SIZE=20000000"])[0] == 250    # 32 MB free
        smtp.rset()
        assert smtp.mail("a@client.test", ["SIZE=25000000"]) == (452, STORAGE.encode())
    assert "SIZE=25000000 does not fit" in sized.log()
