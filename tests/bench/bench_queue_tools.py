#!/usr/bin/env python3
"""Queue tools benchmark: elemtactl on a million-message index, Postfix's mailq beside it.

A script, not a pytest test (`make bench` runs it after bench_accept.py). It:

1. seeds a fresh index with BENCH_QUEUE_MESSAGES (default 1,000,000) records written
   straight into LMDB through elemta.queue.index (no spool files: only the index is read
   by these commands): 10% on hold, the rest incoming or deferred, 200 recipient domains,
   arrivals spread over three days;
2. times, as an admin runs them (a new process each, page cache warm):
   `elemtactl queue summary`, `elemtactl queue list --state hold | head`, and the whole
   `elemtactl queue list --state hold` (100,000 messages at the default size);
3. starts a private hold-only Postfix (tests/peers/postfix.py), puts one message in its hold
   queue over SMTP, then fills the hold queue to BENCH_POSTFIX_MESSAGES (default 100,000)
   by copying that queue file under new queue ids (owner postfix, mode 0700, as cleanup
   leaves them): a few seconds, where smtp-source takes about 100 s at Postfix's ~1,100
   messages/s (BENCH_POSTFIX_FILL=smtp does it that way);
4. times Postfix's `mailq` (postqueue -p through the showq service) on that queue, whole
   and `| head`, and `qshape hold`.

Each command runs BENCH_RUNS times (3): the median with min and max, and the load average
before and after. Postfix parts need root and the postfix package; without them only
Elemta is timed. BENCH_KEEP=1 keeps the temp dirs.
See also: elemta.queue.listing, elemta.cli.queuecmd.
"""

import os
import random
import shutil
import smtplib
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from elemta.queue.ids import ALPHABET  # noqa: E402
from elemta.queue.index import QueueIndex, QueueRecord  # noqa: E402
from elemta.queue.model import (DEFERRED, HOLD, INCOMING, PENDING, RCPT_DEFERRED,  # noqa: E402
                                Envelope, Recipient)
from tests.bench.runs import Spread, load_average, run_count  # noqa: E402
from tests.peers.postfix import PostfixInstance, postfix_available  # noqa: E402
from tests.harness import free_port  # noqa: E402

MESSAGES = int(os.environ.get("BENCH_QUEUE_MESSAGES", "1000000"))
POSTFIX_MESSAGES = int(os.environ.get("BENCH_POSTFIX_MESSAGES", "100000"))
POSTFIX_FILL = os.environ.get("BENCH_POSTFIX_FILL", "clone")
HOLD_EVERY = 10                 # one message in ten on hold: 100,000 of a million
DOMAINS = ["dest%03d.example" % i for i in range(200)]
MESSAGE_BYTES = 5120
BATCH = 10000
ENV = dict(os.environ, PYTHONPATH=REPO)
ELEMTACTL = "%s -m elemta.cli.elemtactl" % sys.executable


def queue_id(arrival, rnd):
    """A queue id for an arrival time (same layout as elemta.queue.ids)."""
    value = int(arrival * 1e6)
    chars = []
    for _ in range(11):
        chars.append(ALPHABET[value & 31])
        value >>= 5
    tail = "".join(rnd.choice(ALPHABET) for _ in range(9))
    return "".join(reversed(chars)) + tail


def seed(spool_dir, count):
    """Write `count` index records in batches; returns seconds taken."""
    os.makedirs(spool_dir)
    index = QueueIndex(os.path.join(spool_dir, "index.lmdb"), 16 << 30, metasync=False)
    rnd = random.Random(5)
    now = time.time()
    started = time.monotonic()
    batch = []
    for n in range(count):
        arrival = now - 3 * 86400 * (1 - n / count)
        state = HOLD if n % HOLD_EVERY == 0 else (INCOMING if rnd.random() < 0.2 else DEFERRED)
        domain = DOMAINS[min(int(rnd.paretovariate(1.2)) - 1, len(DOMAINS) - 1)]
        deferred = state == DEFERRED
        envelope = Envelope(
            queue_id(arrival, rnd), "sender%d@bench.example" % (n % 1000),
            [Recipient("user%d@%s" % (n % 5000, domain),
                       status=RCPT_DEFERRED if deferred else PENDING,
                       last_reply="450 4.7.1 greylisted, try again later" if deferred
                       else None)],
            arrival, size=MESSAGE_BYTES, client_address="192.0.2.1",
            client_helo="client.example")
        batch.append(QueueRecord(
            envelope, state, 3 if deferred else 0, arrival + 3600,
            "connect to mx.%s[192.0.2.7]:25: Connection refused" % domain if deferred
            else None))
        if len(batch) == BATCH:
            index.put_many(batch)
            batch = []
    if batch:
        index.put_many(batch)
    index.env.sync(True)
    index.close()
    return time.monotonic() - started


def timed(command, env=None):
    """Run a shell command BENCH_RUNS times (3); (Spread of its seconds, its stdout's
    last line)."""
    times = []
    for _ in range(run_count()):
        started = time.monotonic()
        done = subprocess.run(command, shell=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, env=env or ENV)
        times.append(time.monotonic() - started)
        if done.returncode != 0 or done.stderr.strip():
            print("  (%s: exit %d, %s)" % (command, done.returncode, done.stderr.strip()[:300]))
    lines = done.stdout.strip().splitlines()
    return Spread.of(times), lines[-1] if lines else ""


def bench_elemta(workdir):
    spool = os.path.join(workdir, "elemta-spool")
    print("Elemta: seeding %d index records (1 in %d on hold) ..." % (MESSAGES, HOLD_EVERY))
    seconds = seed(spool, MESSAGES)
    print("  seeded in %.1f s (%.0f records/s)" % (seconds, MESSAGES / seconds))
    ctl = "%s queue %%s --spool-dir %s" % (ELEMTACTL, spool)
    results = {}
    for label, command in (
            ("queue summary", ctl % "summary"),
            ("queue list --state hold | head", ctl % "list --state hold" + " | head -n 20"),
            ("queue list --state hold (all)", ctl % "list --state hold" + " | tail -n 1")):
        seconds, last = timed(command)
        results[label] = seconds
        print("  elemtactl %-32s %s s   %s" % (label, seconds.format(2), last))
    return results


def fill_postfix_by_cloning(postfix, count):
    """Copy the one held queue file to `count` files under new hex queue ids."""
    hold_dir = os.path.join(postfix.queue_dir, "hold")
    [original] = os.listdir(hold_dir)
    source = os.path.join(hold_dir, original)
    with open(source, "rb") as f:
        data = f.read()
    stat = os.stat(source)
    for n in range(1, count):
        path = os.path.join(hold_dir, "%011X" % (0x10000000000 + n))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, data)
        os.fchown(fd, stat.st_uid, stat.st_gid)
        os.fchmod(fd, 0o700)      # "ready": what showq and qshape list
        os.close(fd)


def fill_postfix_by_smtp(postfix, count):
    subprocess.run(["/usr/sbin/smtp-source", "-s", "20", "-m", str(count - 1),
                    "-l", str(MESSAGE_BYTES), "-f", "sender@bench.example",
                    "-t", "user@dest000.example", "127.0.0.1:%d" % postfix.smtpd_port],
                   check=True, timeout=3600)
    deadline = time.monotonic() + 120
    while postfix.queue_count("hold") < count and time.monotonic() < deadline:
        time.sleep(0.5)


def bench_postfix(workdir):
    reason = postfix_available()
    if reason:
        print("Postfix: skipped (%s)" % reason)
        return None
    pf_dir = tempfile.mkdtemp(prefix="elemta-bench-pf-")
    os.chmod(pf_dir, 0o755)
    port = free_port()
    results = {}
    with PostfixInstance(pf_dir, port, hold_only=True,
                         extra_main_cf={"in_flow_delay": "0"}) as postfix:
        body = ("Subject: bench\r\n\r\n" + "x" * 76 + "\r\n") * (MESSAGE_BYTES // 80)
        with smtplib.SMTP("127.0.0.1", port) as client:
            client.sendmail("sender@bench.example", ["user@dest000.example"], body)
        postfix.wait_for_log(r"hold: END-OF-MESSAGE")
        started = time.monotonic()
        print("Postfix: filling its hold queue to %d messages (%s) ..."
              % (POSTFIX_MESSAGES, POSTFIX_FILL))
        if POSTFIX_FILL == "smtp":
            fill_postfix_by_smtp(postfix, POSTFIX_MESSAGES)
        else:
            fill_postfix_by_cloning(postfix, POSTFIX_MESSAGES)
        held = postfix.queue_count("hold")
        print("  %d messages in hold/ after %.1f s" % (held, time.monotonic() - started))
        env = dict(os.environ, MAIL_CONFIG=postfix.config_dir)
        for label, command in (("mailq | head", "mailq | head -n 20"),
                               ("mailq (all)", "mailq | tail -n 1"),
                               ("qshape hold", "qshape -c %s hold | head -n 3"
                                % postfix.config_dir)):
            seconds, last = timed(command, env)
            results[label] = seconds
            print("  postfix %-34s %s s   %s" % (label, seconds.format(2), last))
    if not os.environ.get("BENCH_KEEP"):
        shutil.rmtree(pf_dir, ignore_errors=True)
    return results


def main():
    workdir = tempfile.mkdtemp(prefix="elemta-bench-queue-")
    print("before: %s" % load_average())
    try:
        elemta = bench_elemta(workdir)
        postfix = bench_postfix(workdir)
    finally:
        if os.environ.get("BENCH_KEEP"):
            print("kept %s" % workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print("after: %s" % load_average())
    print()
    print("Summary (%d messages in Elemta's index, %d of them on hold; %d in Postfix's "
          "hold queue; warm page cache; seconds, median (min-max) of %d runs):"
          % (MESSAGES, MESSAGES // HOLD_EVERY, POSTFIX_MESSAGES, run_count()))
    rows = [("elemtactl queue summary", elemta["queue summary"]),
            ("elemtactl queue list --state hold | head", elemta["queue list --state hold | head"]),
            ("elemtactl queue list --state hold, all listed",
             elemta["queue list --state hold (all)"])]
    if postfix:
        rows += [("postfix mailq | head", postfix["mailq | head"]),
                 ("postfix mailq, all listed", postfix["mailq (all)"]),
                 ("postfix qshape hold", postfix["qshape hold"])]
    for label, seconds in rows:
        print("  %-48s %s s" % (label, seconds.format(2)))
    if postfix:
        print("  listing every held message: Postfix's mailq / elemtactl = %.2f (medians)"
              % (postfix["mailq (all)"].median / elemta["queue list --state hold (all)"].median))
    return 0


if __name__ == "__main__":
    sys.exit(main())
