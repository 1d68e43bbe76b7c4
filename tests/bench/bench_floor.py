#!/usr/bin/env python3
"""The floor under Elemta's acceptance figures: what any gevent acceptor pays on this machine.

A script, not a pytest test (`make bench` runs it). Issue #20 asks for acceptance at no
more than 0.75 of Postfix's CPU per message. This measures how much of Elemta's figure the
design itself costs, before any of Elemta's own work, so that the gap left is known:

- "floor sockets": as many forked gevent workers as Elemta's default smtpd (one per CPU)
  sharing one listener, answering smtp-source's dialogue with canned replies and reading
  each message to its end. No parsing, checks, log lines, metrics nor disk.
- "floor durable": the same, and each message written to a file of its own, renamed into
  place and flushed by one syncfs(2) per batch from a pool thread, as elemta.smtpd.committer
  and elemta.queue.queue do (the 250 after the flush). No index record.
- Elemta and the hold-only Postfix (in_flow_delay 0) under the same load, in the same run.

The load is bench_accept's first: smtp-source, 20 sessions, 5 KB messages, one per
connection, BENCH_MESSAGES (5000) of them, BENCH_RUNS (3) times. Printed as bench_accept
prints: msg/s and CPU seconds per 1,000 messages, median (min-max), and the ratios to
Postfix. Needs root (for Postfix) and the postfix package.
See also: tests/bench/bench_accept.py, tests/bench/cpu.py, issue #20.
"""

import ctypes
import itertools
import mmap
import os
import select
import shutil
import socket
import sys
import tempfile

# Imported here, before the forks: the floors' children are not charged for it.
import gevent
import gevent.socket
from gevent.event import AsyncResult, Event
from gevent.server import StreamServer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from tests.bench.bench_accept import (MESSAGE_BYTES, SMTP_SOURCE, Result,  # noqa: E402
                                      bench_elemta, bench_postfix, drive, report)
from tests.bench.cpu import cpu_seconds  # noqa: E402
from tests.bench.runs import (first_missing, load_average, run_count,  # noqa: E402
                              shared_scratch, shortfalls)
from tests.peers.postfix import postfix_available  # noqa: E402

POSTFIX = "postfix in_flow_delay=0"


class Floor:
    """One gevent acceptor worker's dialogue; `spool` set: each message made durable.
    Each 250 is counted in `counts[slot]` (memory shared with the parent)."""

    def __init__(self, counts, slot, spool=None):
        self.counts, self.slot = counts, slot
        self.spool = spool
        self._numbers = itertools.count()
        self._waiting = []          # (temp path, AsyncResult) of messages to flush

    def serve(self, listener, ready):
        """Run in a forked child: serve `listener` until killed; a byte to the pipe end
        `ready` once it is serving."""
        gevent.reinit()
        listener = gevent.socket.socket(fileno=os.dup(listener.fileno()))
        if self.spool:
            self._wakeup = Event()
            gevent.spawn(self._committer, os.open(self.spool, os.O_RDONLY))
        server = StreamServer(listener, self._session)
        server.start()
        os.write(ready, b"!")
        server.serve_forever()

    def _session(self, sock, _address):
        sock.sendall(b"220 floor ESMTP\r\n")
        pending, in_data = b"", False
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return
            pending += chunk
            while True:
                if in_data:
                    end = pending.find(b"\r\n.\r\n")
                    if end < 0:
                        pending = pending[-4:]      # the end mark may straddle reads
                        break
                    pending, in_data = pending[end + 5:], False
                    if self.spool:
                        self._keep(MESSAGE_BYTES)      # what smtp-source sends
                    sock.sendall(b"250 2.0.0 Ok: queued\r\n")
                    self.counts[self.slot] += 1
                    continue
                end = pending.find(b"\r\n")
                if end < 0:
                    break
                verb, pending = pending[:4].upper(), pending[end + 2:]
                if verb in (b"EHLO", b"HELO"):
                    sock.sendall(b"250-floor\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
                elif verb == b"DATA":
                    in_data = True
                    sock.sendall(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                elif verb == b"QUIT":
                    sock.sendall(b"221 2.0.0 Bye\r\n")
                    return
                else:
                    sock.sendall(b"250 2.1.0 Ok\r\n")

    def _keep(self, size):
        """Write the message's file and wait until a batch flush has made it durable."""
        path = os.path.join(self.spool, "tmp", "%d-%d" % (os.getpid(), next(self._numbers)))
        with open(path, "wb") as f:
            f.write(b"x" * size)
        done = AsyncResult()
        self._waiting.append((path, done))
        self._wakeup.set()
        done.get()

    def _committer(self, spool_fd):
        libc = ctypes.CDLL(None, use_errno=True)
        while True:
            if not self._waiting:
                self._wakeup.clear()
                self._wakeup.wait()
                continue
            batch, self._waiting = self._waiting, []

            def flush():
                for path, _ in batch:
                    os.rename(path, os.path.join(self.spool, "new", os.path.basename(path)))
                if libc.syncfs(spool_fd) != 0:
                    raise OSError(ctypes.get_errno(), "syncfs")
            gevent.get_hub().threadpool.apply(flush)
            for _, done in batch:
                done.set(None)


def bench_floor(scratch, count, durable):
    # type: (str, int, bool) -> Result
    spool = tempfile.mkdtemp(prefix="floor-", dir=scratch) if durable else None
    if spool:
        os.mkdir(os.path.join(spool, "tmp"))
        os.mkdir(os.path.join(spool, "new"))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    workers = os.cpu_count() or 1
    shared = mmap.mmap(-1, 8 * workers)        # MAP_SHARED: the children's 250 counts
    counts = memoryview(shared).cast("q")
    children = []
    ready_read, ready_write = os.pipe()
    try:
        for slot in range(workers):
            pid = os.fork()
            if pid == 0:
                try:
                    os.close(ready_read)
                    Floor(counts, slot, spool).serve(listener, ready_write)
                finally:
                    os._exit(1)
            children.append(pid)
        os.close(ready_write)               # EOF once every worker has started or died
        started = b""
        while len(started) < workers:       # their start is not the floor's cost
            if not select.select([ready_read], [], [], 30)[0]:
                raise RuntimeError("a floor worker did not start in 30 s")
            got = os.read(ready_read, workers)
            if not got:
                raise RuntimeError("a floor worker exited before it started")
            started += got
        before = cpu_seconds(children)
        seconds = drive(listener.getsockname()[1], count)
        spent = cpu_seconds(children) - before
        accepted = sum(counts)
        if spool and len(os.listdir(os.path.join(spool, "new"))) != accepted:
            raise RuntimeError("floor durable: %d files for %d replies 250"
                               % (len(os.listdir(os.path.join(spool, "new"))), accepted))
    finally:
        for pid in children:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        listener.close()
        os.close(ready_read)
    return Result("floor durable" if durable else "floor sockets", count, accepted, seconds,
                  spent)


def main():
    count = int(os.environ.get("BENCH_MESSAGES", "5000"))
    reason = postfix_available() or first_missing(SMTP_SOURCE)
    if reason:
        print("bench_floor: cannot run: %s" % reason)
        return 2
    scratch = shared_scratch("elemta-floor-")
    print("bench_floor: %d messages, in %s" % (count, scratch))
    print("before: %s" % load_average())
    results = []
    try:
        for _ in range(run_count()):
            for result in (bench_floor(scratch, count, durable=False),
                           bench_floor(scratch, count, durable=True),
                           bench_elemta(scratch, count),
                           bench_postfix(scratch, count, "0", name=POSTFIX)):
                results.append(result)
                print("  %s: %d accepted in %.2fs, %.2f CPU s"
                      % (result.name, result.accepted, result.seconds, result.cpu_seconds))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print("after: %s" % load_average())
    report(results, [(name, POSTFIX) for name in ("floor sockets", "floor durable", "elemta")])
    short = shortfalls(results)
    return 1 if short else 0


if __name__ == "__main__":
    sys.exit(main())
