#!/usr/bin/env python3
"""`make fuzz`: a million random and grammar-based SMTP sessions against a live Elemta.

A benchmark, not a CI test (tests/test_fuzz_live.py runs a few thousand sessions of the
same generator in the suite). Starts a real Elemta as the test suite does
(tests/harness.py ElemtaServer) in a fresh temp dir: several smtpd workers, listeners for
smtp, submission and smtps, a self-signed certificate so STARTTLS is offered, AUTH with a
credentials file, small message and recipient limits (tests/smtp_fuzzer.py
server_sections). Everything the server accepts is relayed by one delivery worker to a
discarding smtp-sink (no -d: it stores nothing), so the spool stays small however long
the run. Then client processes (one per CPU by default, forked before any gevent hub
exists) each run many concurrent sessions in gevent greenlets from four loopback source
addresses (127.0.0.1 is in mynetworks, .2-.4 are not; the per-client cap is raised to 500
so it never refuses the fuzzer). tests/smtp_fuzzer.py describes the sessions and the
checks on every reply.

Prints, at the end: sessions, sessions/s, replies checked, malformed replies, replies
missing (closed or silent where one was due), unexpected replies, Python tracebacks and
worker respawns ("ended with") in the server's log, /proc/loadavg, and the seed. The exit
status is 1 if any of those counts is not zero.

Environment / options: FUZZ_SESSIONS (--sessions, default 1000000), FUZZ_SEED (--seed,
default random), FUZZ_MINUTES (--minutes, default 0 = no cap: stop starting sessions after
that many minutes), --clients, --concurrency, --workers, --keep (keep the temp dir).
A failure prints its session number; `fuzz_sessions.py --seed S --replay K` plays that
session alone against a fresh server and prints its transcript and the server's log.
The server logs at info level, about 550 bytes per session (some 550 MB for a million);
the temp dir is removed after a clean run and kept (its path printed) otherwise.
Needs smtp-sink (postfix package) for runs that relay; --replay does without.
"""

import argparse
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from tests.harness import (ElemtaServer, free_port, make_tls_files,  # noqa: E402
                            wait_for_greeting)
from tests import smtp_fuzzer  # noqa: E402

SMTP_SINK = "/usr/sbin/smtp-sink"
PROGRESS_EVERY = 30.0       # seconds between progress lines
REPLY_TIMEOUT = 60.0        # seconds a due reply may take on a loaded machine


class Sink:
    """smtp-sink on a free loopback port, discarding everything (as user nobody)."""

    def __init__(self):
        self.port = free_port()
        self.process = None

    def __enter__(self):
        self.process = subprocess.Popen(
            [SMTP_SINK, "-u", "nobody", "127.0.0.1:%d" % self.port, "256"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_greeting(self.port, self.process, timeout=10, name="smtp-sink")
        return self

    def __exit__(self, *exc_info):
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def start_server(workdir, sink_port, workers, log_level="info"):
    cert, key = make_tls_files(workdir)
    credentials = smtp_fuzzer.write_credentials(os.path.join(workdir, "credentials"))
    sections = smtp_fuzzer.server_sections(cert, key, credentials, sink_port, workers=workers,
                                           log_level=log_level)
    return ElemtaServer(os.path.join(workdir, "elemta"), sections).start()


def log_trouble(log_text):
    """(tracebacks, respawns, logging errors) counted in the server's log."""
    return (log_text.count("Traceback"), log_text.count(" ended with "),
            log_text.count("--- Logging error ---"))


def client_process(ports, seed, first, step, total, concurrency, deadline, done, results):
    """One client process: sessions first, first+step, ... below total, until deadline."""
    from tests.smtp_fuzzer import Stats, run_sessions
    stats = Stats()

    def indexes():
        for index in range(first, total, step):
            if deadline and time.time() >= deadline:
                return
            yield index
            done.value += 1
    run_sessions(ports, seed, indexes(), concurrency, REPLY_TIMEOUT, stats)
    results.put(stats.as_dict())


def run(args):
    seed = args.seed if args.seed is not None else random.randrange(10 ** 9)
    print("fuzz_sessions: seed %d, %d sessions, %d client processes x %d concurrent, "
          "%d smtpd workers%s" % (seed, args.sessions, args.clients, args.concurrency,
                                  args.workers,
                                  ", at most %g minutes" % args.minutes if args.minutes
                                  else ""), flush=True)
    if not os.path.exists(SMTP_SINK):
        sys.exit("fuzz_sessions: %s is missing (apt-get install postfix)" % SMTP_SINK)
    scratch = tempfile.mkdtemp(prefix="elemta-fuzz-")
    os.chmod(scratch, 0o755)
    load_before = open("/proc/loadavg").read().strip()
    context = multiprocessing.get_context("fork")
    with Sink() as sink:
        server = start_server(scratch, sink.port, args.workers)
        try:
            results = context.Queue()
            deadline = time.time() + args.minutes * 60 if args.minutes else 0
            counters = [context.Value("l", 0, lock=False) for _ in range(args.clients)]
            started = time.monotonic()
            clients = [context.Process(target=client_process, args=(
                server.ports, seed, i, args.clients, args.sessions, args.concurrency,
                deadline, counters[i], results)) for i in range(args.clients)]
            for client in clients:
                client.start()
            collected = []
            last_progress = started
            while len(collected) < len(clients):
                try:
                    collected.append(results.get(timeout=1))
                except Exception:
                    pass
                if time.monotonic() - last_progress >= PROGRESS_EVERY:
                    last_progress = time.monotonic()
                    count = sum(c.value for c in counters)
                    print("  %7.0f s: %d sessions started, %.0f/s, load %s" % (
                        last_progress - started, count, count / (last_progress - started),
                        open("/proc/loadavg").read().split(" ", 3)[:3]), flush=True)
            elapsed = time.monotonic() - started
            for client in clients:
                client.join()
            load_after = open("/proc/loadavg").read().strip()
        finally:
            orphans = server.stop()
    stats = smtp_fuzzer.Stats()
    for result in collected:
        stats.add(smtp_fuzzer.Stats.from_dict(result))
    tracebacks, respawns, logging_errors = log_trouble(server.log())
    report(seed, args, stats, elapsed, tracebacks, respawns, logging_errors, orphans,
           load_before, load_after, server.log_path)
    bad = (stats.malformed + stats.missing + stats.unexpected + stats.client_errors
           + tracebacks + respawns + logging_errors + len(orphans))
    if args.keep or bad:
        print("kept %s (server log: %s)" % (scratch, server.log_path))
    else:
        shutil.rmtree(scratch, ignore_errors=True)
    return 1 if bad else 0


def report(seed, args, stats, elapsed, tracebacks, respawns, logging_errors, orphans,
           load_before, load_after, log_path):
    rows = [
        ("sessions", "%d" % stats.sessions),
        ("seconds", "%.1f" % elapsed),
        ("sessions/s", "%.0f" % (stats.sessions / elapsed if elapsed else 0)),
        ("replies checked", "%d (%d lines)" % (stats.replies, stats.reply_lines)),
        ("malformed replies", "%d" % stats.malformed),
        ("missing replies (closed/silent)", "%d" % stats.missing),
        ("unexpected replies", "%d" % stats.unexpected),
        ("fuzzer errors", "%d" % stats.client_errors),
        ("tracebacks in the log", "%d" % tracebacks),
        ("respawns (ended with)", "%d" % respawns),
        ("logging errors", "%d" % logging_errors),
        ("processes left over", "%d" % len(orphans)),
        ("messages accepted", "%d" % stats.messages_accepted),
        ("TLS handshakes", "%d" % stats.tls_handshakes),
        ("our early disconnects", "%d" % stats.our_disconnects),
        ("sessions ended by 221/421", "%d" % stats.server_closes),
        ("load before", load_before),
        ("load after", load_after),
        ("seed", "%d" % seed),
    ]
    if stats.sessions < args.sessions and stats.sessions:
        rows.append(("%d sessions would take" % args.sessions, "%.0f s at this rate" % (
            args.sessions * elapsed / stats.sessions)))
    print("\n| measure | value |\n|---|---|")
    for name, value in rows:
        print("| %s | %s |" % (name, value))
    for kind, index, detail, transcript in stats.failures[:10]:
        print("\n%s in session %d: %s\n  replay: %s %s --seed %d --replay %d" % (
            kind, index, detail, sys.executable, os.path.relpath(__file__), seed, index))
        for direction, text in transcript[-12:]:
            print("    %s %r" % (direction, text[:200]))


def replay(args):
    """Play one session against a fresh server (no relaying) and show both sides."""
    scratch = tempfile.mkdtemp(prefix="elemta-fuzz-replay-")
    os.chmod(scratch, 0o755)
    server = start_server(scratch, None, 1, log_level="debug")
    try:
        stats, transcript = smtp_fuzzer.replay(server.ports, args.seed, args.replay)
    finally:
        server.stop()
    for direction, text in transcript:
        print("%s %r" % (direction, text[:500]))
    print("failures:", [(f[0], f[2]) for f in stats.failures])
    print("--- server log (%s) ---" % server.log_path)
    print(server.log()[-6000:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    env = os.environ.get
    parser.add_argument("--sessions", type=int, default=int(env("FUZZ_SESSIONS", 1000000)))
    parser.add_argument("--seed", type=int,
                        default=int(env("FUZZ_SEED")) if env("FUZZ_SEED") else None)
    parser.add_argument("--minutes", type=float, default=float(env("FUZZ_MINUTES", 0)))
    parser.add_argument("--clients", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--concurrency", type=int, default=25)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--replay", type=int, default=None)
    args = parser.parse_args()
    if args.replay is not None:
        if args.seed is None:
            sys.exit("--replay needs --seed")
        return replay(args)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
