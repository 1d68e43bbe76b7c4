#!/usr/bin/env python3
"""Concurrency benchmark: many idle SMTP sessions at once, and what they cost in memory.

A script, not a pytest test (`make bench` runs it). Starts Elemta (tests/harness.py's
ElemtaServer) with its default smtpd and delivery worker counts on a fresh spool, opens
BENCH_SESSIONS (default 50,000) connections from a gevent client, reads every banner and
the reply to one NOOP on each, holds them all open, then sums the memory of every Elemta
process (master and children: PSS, which counts pages the children share with the master
once, and RSS for reference) and prints whether every session got both replies. Postfix
needs one smtpd process per session (default process limit 100); our target (issue #20)
is 50,000 sessions in under 1 GB.

It raises the file descriptor limit it needs itself, soft and (as root) hard, before it
starts Elemta, which inherits it and raises its own soft limit to it as the daemon always
does (elemta.cli.elemta.raise_fd_limit). Where the hard limit cannot be raised (no
CAP_SYS_RESOURCE, as in some containers) and one worker's share of the sessions would
not fit in it, it runs one smtpd worker more per share, and says so: an extra worker
only adds memory to what is measured. The sessions are held by client processes of
at most that many each, from several loopback addresses (127.0.0.1, .2, ...),
SESSIONS_PER_ADDRESS each: one address has fewer ephemeral ports than that. Only the limits that would refuse the sessions are set: one
worker's sessions (limits.connections_per_worker, default 10,000) and max_use (a
worker that has admitted that many retires, cutting its idle sessions after the grace)
and timeouts.command (the first sessions must not time out while the last are opened).
See also: tests/bench/bench_accept.py, tests/harness.py, ../shared/peers.md.
"""

import os
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from gevent import socket  # noqa: E402
from gevent.pool import Pool  # noqa: E402

from tests.harness import ELEMTA_DEFAULT, ElemtaServer  # noqa: E402

TARGET_MB = 1024
SESSIONS_PER_ADDRESS = 20000      # the ephemeral port range is 28,232 ports by default
IP_BIND_ADDRESS_NO_PORT = 24      # linux/in.h (Python's socket module lacks it)
OPENING_AT_ONCE = 300             # per client process
FD_MARGIN = 1000                  # descriptors besides the sessions (logs, index, pipes)


def raise_fd_limit(needed):
    """Raise RLIMIT_NOFILE to `needed` (the hard limit too, which root may); returns the
    soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
            return needed
        except (ValueError, OSError):
            pass                  # not root: what the hard limit allows
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
        except (OSError, ValueError) as exc:
            if not isinstance(exc, FileNotFoundError):     # not a process that just ended
                print("  cannot read /proc/%s: %s" % (entry, exc))
            continue
        count += 1
        rss += int(fields["Rss"].split()[0]) * 1024
        pss += int(fields["Pss"].split()[0]) * 1024
    return count, rss, pss


def open_session(port, source, sessions, failures):
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # The port is chosen at connect (any not used towards this server), not at bind
        # (one not bound at all): bind's search slows to a crawl as ports fill up.
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))
        sock.settimeout(300)
        sock.connect(("127.0.0.1", port))
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


def hold_sessions(port, first, count):
    """A client process: open sessions first .. first+count-1, print "opened N failed M
    FIRST-FAILURE", hold them until stdin closes."""
    raise_fd_limit(count + FD_MARGIN)
    sessions, failures = [], []
    # A few hundred handshakes under way at a time: all at once overflow the listen
    # queue, and the dropped SYNs come back after ever longer retransmission delays.
    opening = Pool(OPENING_AT_ONCE)
    for i in range(first, first + count):
        source = "127.0.0.%d" % (1 + i // SESSIONS_PER_ADDRESS)
        opening.spawn(open_session, port, source, sessions, failures)
    opening.join()
    print("opened %d failed %d %r" % (len(sessions), len(failures), failures[:1]), flush=True)
    sys.stdin.read()


def start_clients(port, count, per_client):
    """Client processes holding `count` sessions, at most per_client each; returns
    (processes, sessions opened, failures, seconds)."""
    started = time.monotonic()
    clients = []
    for first in range(0, count, per_client):
        clients.append(subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--client", str(port), str(first),
             str(min(per_client, count - first))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, universal_newlines=True))
    opened = failed = 0
    failures = []
    for client in clients:
        words = client.stdout.readline().split(None, 4)
        if len(words) < 4:
            failures.append("a client process ended early")
            continue
        opened += int(words[1])
        failed += int(words[3])
        if int(words[3]):
            failures.append(words[4].strip())
    return clients, opened, failed, failures, time.monotonic() - started


def smtpd_workers(count, limit):
    """The default smtpd worker count (one per CPU), or more when one worker's share of
    the sessions would not fit in the descriptor limit the host allows."""
    default = os.cpu_count() or 1
    return max(default, -(-count // (limit - FD_MARGIN)))


def main():
    count = int(os.environ.get("BENCH_SESSIONS", "50000"))
    limit = raise_fd_limit(count + FD_MARGIN)
    if limit <= 2 * FD_MARGIN:
        print("bench_idle_sessions: the fd limit %d is too low" % limit)
        return 2
    workers = smtpd_workers(count, limit)
    if workers != (os.cpu_count() or 1):
        print("bench_idle_sessions: the hard fd limit is %d here (raising it needs "
              "CAP_SYS_RESOURCE): %d smtpd workers, not the default %d, so that each "
              "worker's share of the sessions fits" % (limit, workers, os.cpu_count() or 1))
    # The process set an installed Elemta runs, not the harness's one smtpd worker and
    # no delivery: their memory is what is measured.
    server = ElemtaServer(tempfile.mkdtemp(prefix="elemta-idle-"),
                          {"smtpd": {"workers": ELEMTA_DEFAULT if workers == os.cpu_count()
                                     else workers, "max_use": 0},
                           "delivery": {"workers": ELEMTA_DEFAULT},
                           "limits": {"connections_per_worker": count},
                           # Idle means idle: no 421 for the first sessions while the
                           # last ones are still being opened.
                           "timeouts": {"command": 3600}})
    clients = []
    try:
        port = server.start(timeout=30).port
        _, idle_rss, idle_pss = process_group_memory(server.process.pid)
        clients, opened, failed, failures, seconds = start_clients(
            port, count, limit - FD_MARGIN)
        time.sleep(1)                 # the last replies are sent: sessions are idle
        processes, rss, pss = process_group_memory(server.process.pid)
        print("bench_idle_sessions: %d sessions opened in %.1fs; %d got banner and NOOP, "
              "%d failed" % (count, seconds, opened, failed))
        print("  elemta: %d processes; memory used (PSS) %.1f MB idle, %.1f MB with the "
              "sessions (target: under %d MB); RSS summed over processes, counting shared "
              "pages again in each: %.1f MB idle, %.1f MB" % (
                  processes, idle_pss / 2 ** 20, pss / 2 ** 20, TARGET_MB,
                  idle_rss / 2 ** 20, rss / 2 ** 20))
        print("  %.1f KB more per session; load average %.2f %.2f %.2f" % (
            (pss - idle_pss) / 1024.0 / max(1, opened), *os.getloadavg()))
        if failures:
            print("  first failures: %s" % failures[:3])
        return 0 if opened == count and pss < TARGET_MB * 2 ** 20 else 1
    finally:
        for client in clients:
            client.stdin.close()
            client.wait()
        server.stop(timeout=60)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--client"]:
        sys.exit(hold_sessions(*map(int, sys.argv[2:5])))
    sys.exit(main())
