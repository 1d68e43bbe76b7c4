#!/usr/bin/env python3
"""Concurrency benchmark: many idle SMTP sessions at once, and what they cost in memory.

A script, not a pytest test (`make bench` runs it). Starts Elemta (tests/harness.py's
ElemtaServer) with its default smtpd and delivery worker counts on a fresh spool, opens
BENCH_SESSIONS (default 10,000) connections from a gevent client, reads every banner and
the reply to one NOOP on each, holds them all open, then sums the memory of every Elemta process (master and children: PSS, which counts pages
the children share with the master once, and RSS for reference) and prints whether every
session got both replies. Postfix needs one smtpd process per session
(default process limit 100); our target is 10,000 sessions in under 300 MB.
See also: tests/bench/bench_accept.py, tests/harness.py, ../shared/peers.md.
"""

import os
import resource
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import gevent  # noqa: E402
from gevent import socket  # noqa: E402

from tests.harness import ELEMTA_DEFAULT, ElemtaServer  # noqa: E402

TARGET_MB = 300


def raise_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def process_group_memory(pgid):
    """(processes, RSS bytes, PSS bytes) of a process group, from /proc.

    RSS counts the pages forked children share with the master once per process; PSS
    divides each shared page among its sharers, so the PSS sum is the memory really used."""
    count, rss, pss = 0, 0, 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                stat = f.read()
            if int(stat[stat.rindex(")") + 2:].split()[2]) != pgid:
                continue
            with open("/proc/%s/smaps_rollup" % entry) as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except (OSError, ValueError):
            continue
        count += 1
        rss += int(fields["Rss"].split()[0]) * 1024
        pss += int(fields["Pss"].split()[0]) * 1024
    return count, rss, pss


def open_session(port, sessions, failures):
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        sock.settimeout(60)
        banner = sock.recv(512)
        sock.sendall(b"NOOP\r\n")
        noop = sock.recv(512)
        if banner.startswith(b"220 ") and noop.startswith(b"250 "):
            sessions.append(sock)
        else:
            failures.append((banner + noop)[:80])
            sock.close()
    except OSError as exc:
        failures.append(str(exc))


def main():
    count = int(os.environ.get("BENCH_SESSIONS", "10000"))
    limit = raise_fd_limit()
    if limit < count + 100:
        print("bench_idle_sessions: the fd limit %d is too low for %d sessions" % (limit, count))
        return 2
    # The process set an installed Elemta runs, not the harness's one smtpd worker and
    # no delivery: their memory is what is measured.
    server = ElemtaServer(tempfile.mkdtemp(prefix="elemta-idle-"),
                          {"smtpd": {"workers": ELEMTA_DEFAULT},
                           "delivery": {"workers": ELEMTA_DEFAULT}})
    try:
        port = server.start(timeout=30).port
        _, idle_rss, idle_pss = process_group_memory(server.process.pid)
        sessions, failures = [], []
        started = time.monotonic()
        pool = []
        for i in range(count):
            pool.append(gevent.spawn(open_session, port, sessions, failures))
            if i % 500 == 499:
                gevent.sleep(0)           # let the accept queue drain as we go
        gevent.joinall(pool)
        seconds = time.monotonic() - started
        processes, rss, pss = process_group_memory(server.process.pid)
        print("bench_idle_sessions: %d sessions opened in %.1fs; %d got banner and NOOP, "
              "%d failed" % (count, seconds, len(sessions), len(failures)))
        print("  elemta: %d processes; memory used (PSS) %.1f MB idle, %.1f MB with the "
              "sessions (target: under %d MB); RSS summed over processes, counting shared "
              "pages again in each: %.1f MB idle, %.1f MB" % (
                  processes, idle_pss / 2 ** 20, pss / 2 ** 20, TARGET_MB,
                  idle_rss / 2 ** 20, rss / 2 ** 20))
        if failures:
            print("  first failures: %s" % failures[:3])
        for sock in sessions:
            sock.close()
        return 0 if not failures and pss < TARGET_MB * 2 ** 20 else 1
    finally:
        server.stop(timeout=60)


if __name__ == "__main__":
    sys.exit(main())
