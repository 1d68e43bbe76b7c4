"""Benchmark: how many 5 KB messages per second Queue.commit makes durable.

A script, not a test: `PYTHONPATH=. .venv/bin/python tests/bench/bench_queue_commit.py`.
For each sync method (syncfs, fsync) and batch size (1, 5, 20) it receives and commits
messages for a few seconds on a fresh spool, one thread, and prints messages/s, the time one
commit takes, and per message the commit's share and the receive side's (creating, writing
and sealing the temp file: on a file system with much create/delete churn, allocating the
new inode can cost more than the group commit). The first row is the one-fsync-per-message design that design.md measured
(write + fsync + rename + fsync(dir)), on the same disk in the same run, as the yardstick.
See also elemta.queue.queue (group commit).
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

from elemta.queue.ids import new_queue_id
from elemta.queue.model import Envelope, Recipient
from elemta.queue.queue import Queue

MESSAGE = (b"Received: from client.example ([127.0.0.1])\r\nSubject: bench\r\n\r\n"
           + b"0123456789abcdef" * 316 + b"\r\n")[:5 * 1024]


def envelope():
    return Envelope(new_queue_id(), "sender@example.org", [Recipient("rcpt@example.net")],
                    time.time())


def bench_one_fsync_per_message(spool_dir, seconds):
    """The baseline: each message made durable on its own, no index."""
    tmp = os.path.join(spool_dir, "tmp")
    final = os.path.join(spool_dir, "messages")
    os.makedirs(tmp)
    os.makedirs(final)
    dir_fd = os.open(final, os.O_RDONLY | os.O_DIRECTORY)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        name = new_queue_id()
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(MESSAGE)
            f.flush()
            os.fsync(f.fileno())
        os.rename(os.path.join(tmp, name), os.path.join(final, name))
        os.fsync(dir_fd)
        count += 1
    elapsed = time.perf_counter() - start
    os.close(dir_fd)
    return count, count, elapsed, 0.0, elapsed


def bench_queue(spool_dir, sync_method, batch, seconds):
    """Receive `batch` messages, commit them together, repeat for `seconds`. Returns
    (messages, commits, elapsed, seconds spent receiving, seconds spent committing)."""
    count = commits = 0
    receiving = committing = 0.0
    with Queue(spool_dir, sync_method=sync_method) as queue:
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            began = time.perf_counter()
            writers = []
            for _ in range(batch):
                writer = queue.start_message(envelope())
                writer.write(MESSAGE)
                writer.finish()
                writers.append(writer)
            received = time.perf_counter()
            queue.commit(writers)
            receiving += received - began
            committing += time.perf_counter() - received
            count += batch
            commits += 1
        elapsed = time.perf_counter() - start
    return count, commits, elapsed, receiving, committing


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=tempfile.gettempdir(),
                        help="where to make the fresh spools (default %(default)s)")
    parser.add_argument("--seconds", type=float, default=3.0, help="per configuration")
    args = parser.parse_args()
    same_disk = os.stat(args.dir).st_dev == os.stat("/work").st_dev
    print("spools under %s (%s /work's file system), 5 KB messages, one thread, %.0f s each"
          % (args.dir, "same as" if same_disk else "NOT", args.seconds))
    print("%-22s %5s %8s %10s %12s %12s" % ("configuration", "batch", "msg/s", "ms/commit",
                                            "commit ms/msg", "receive ms/msg"))
    runs = [("one fsync per message", None, 1)]
    runs += [(method, method, batch) for method in ("syncfs", "fsync") for batch in (1, 5, 20)]
    for label, method, batch in runs:
        spool_dir = tempfile.mkdtemp(prefix="elemta-bench-", dir=args.dir)
        try:
            if method is None:
                result = bench_one_fsync_per_message(spool_dir, args.seconds)
            else:
                result = bench_queue(spool_dir, method, batch, args.seconds)
        finally:
            shutil.rmtree(spool_dir)
        count, commits, elapsed, receiving, committing = result
        print("%-22s %5d %8.0f %10.2f %12.3f %12.3f"
              % (label, batch, count / elapsed, 1000.0 * committing / commits,
                 1000.0 * committing / count, 1000.0 * receiving / count))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
