#!/usr/bin/env python3
"""End-to-end relay benchmark: smtp-source -> MTA -> smtp-sink, Elemta next to Postfix, one run.

A script, not a pytest test (`make bench` runs it). smtp-source sends N messages of 5 KB from
20 sessions, one message per connection, to an MTA that relays everything (the recipient
domain is not local) to its relay host, a fresh smtp-sink on loopback that dumps each message
to a file. The clock starts with smtp-source; the acceptance time is when smtp-source is done,
the end-to-end time is when the sink holds all N messages (its files are counted, not the
client's word). Targets: Elemta (tests/harness.py's ElemtaServer, fresh spool, 2 delivery
workers) and a private
Postfix with default settings and with in_flow_delay = 0. Each target runs BENCH_RUNS times
(3); printed for each: end-to-end messages/s and the CPU seconds all of the MTA's
processes spent per 1,000 messages relayed (tests/bench/cpu.py; smtp-source and smtp-sink
are charged to neither), as the median with min and max, and the ratios Elemta/Postfix of
the medians. Needs root and the postfix package (smtp-source and smtp-sink come with it).

Environment: BENCH_MESSAGES (default 3000), BENCH_RUNS (default 3), BENCH_KEEP=1 keeps the
temp dirs for a look afterwards, BENCH_BREAKDOWN=1 prints each Elemta run's CPU per kind of
process (smtpd and delivery workers, master, ...).
See also: tests/bench/bench_accept.py (acceptance alone), ../shared/peers.md (the figures seen
on this kind of machine), tests/peers/postfix.py.
"""

import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable, List, NamedTuple, Optional

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from tests.bench.cpu import (cpu_seconds, print_breakdown, tree_cpu_by_title,  # noqa: E402
                            tree_cpu_seconds)
from tests.bench.runs import (Spread, first_missing, group, load_average, ratio,  # noqa: E402
                              run_count, shared_scratch)
from tests.harness import ELEMTA_DEFAULT, ElemtaServer, free_port, wait_for_greeting  # noqa: E402
from tests.peers.postfix import PostfixInstance, postfix_available  # noqa: E402

SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"
SESSIONS = 20
MESSAGE_BYTES = 5120
SENDER = "sender@bench.test"
RECIPIENT = "rcpt@sink.test"  # Not a local domain of either MTA: everything is relayed.
DELIVERY_WORKERS = 2
# Give up when the sink's count has not moved for this long: retries come minutes later.
STALL_SECONDS = 30.0


class Result(NamedTuple):
    name: str
    sent: int
    delivered: int
    accept_seconds: float
    end_to_end_seconds: float
    cpu_seconds: float = 0.0      # of all the MTA's processes, from start to the last one

    @property
    def cpu_per_1000(self):
        """CPU seconds per 1,000 messages relayed."""
        return 1000.0 * self.cpu_seconds / self.delivered if self.delivered else 0.0

    @property
    def accept_rate(self):
        return self.sent / self.accept_seconds if self.accept_seconds > 0 else 0.0

    @property
    def end_to_end_rate(self):
        if self.end_to_end_seconds <= 0:
            return 0.0
        return self.delivered / self.end_to_end_seconds


def files_under(top):
    """Number of files below `top`."""
    return sum(len(files) for _, _, files in os.walk(top))


class Sink:
    """smtp-sink on a free loopback port, dumping each message to its own file under dump_dir."""

    def __init__(self, workdir):
        self.dump_dir = os.path.join(workdir, "sink")
        os.makedirs(self.dump_dir)
        nobody = pwd.getpwnam("nobody")
        os.chown(self.dump_dir, nobody.pw_uid, nobody.pw_gid)
        self.port = free_port()
        self.process = None  # type: Optional[subprocess.Popen]

    def __enter__(self):
        # -u nobody: smtp-sink refuses to run as root. The 256 is its listen backlog.
        self.process = subprocess.Popen(
            [SMTP_SINK, "-u", "nobody", "-d", os.path.join(self.dump_dir, "%M."),
             "127.0.0.1:%d" % self.port, "256"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_greeting(self.port, self.process, name="smtp-sink")
        return self

    def __exit__(self, *exc_info):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def count(self):
        return files_under(self.dump_dir)

    def wait_for(self, count):
        # type: (int) -> int
        """Wait until the sink holds `count` messages or stops gaining; return what it holds."""
        seen = self.count()
        last_change = time.monotonic()
        while seen < count and time.monotonic() - last_change < STALL_SECONDS:
            time.sleep(0.02)
            now = self.count()
            if now != seen:
                seen, last_change = now, time.monotonic()
        return seen


def drive(port, count):
    # type: (int, int) -> None
    """Run smtp-source against 127.0.0.1:port until it has sent `count` messages."""
    argv = [SMTP_SOURCE, "-s", str(SESSIONS), "-m", str(count), "-l", str(MESSAGE_BYTES),
            "-f", SENDER, "-t", RECIPIENT, "127.0.0.1:%d" % port]
    done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=max(300, count / 20))
    complaints = done.stdout.strip().splitlines()
    if done.returncode != 0 or complaints:
        print("  smtp-source exit %d, %d lines of complaint, first: %s"
              % (done.returncode, len(complaints), complaints[:3]))


def measure(name, sink, port, count, charged):
    # type: (str, Sink, int, int, Callable[[], float]) -> Result
    """Drive the MTA on `port`; time acceptance and the sink's receipt of every message;
    charged() gives the CPU seconds the MTA has spent so far."""
    before = charged()
    started = time.monotonic()
    drive(port, count)
    accepted = time.monotonic() - started
    delivered = sink.wait_for(count)
    end_to_end = time.monotonic() - started
    spent = charged() - before
    if delivered < count:
        end_to_end -= STALL_SECONDS  # Time the last message arrived, not when we gave up.
    return Result(name, count, delivered, accepted, end_to_end, spent)


def elemta_sections(sink_port):
    # bench.test is local, sink.test is relayed; smtpd workers as an installed Elemta runs.
    # No client name lookup, as the Postfix it is compared with (bench_accept).
    return {"smtpd": {"workers": ELEMTA_DEFAULT, "peername_lookup": False},
            "relay": {"local_domains": ["bench.test"]},
            "delivery": {"workers": DELIVERY_WORKERS,
                         "relayhost": "[127.0.0.1]:%d" % sink_port}}


def show_elemta_trouble(log_path, spool_dir):
    """What Elemta says went wrong: its log's complaints and what is still queued."""
    with open(log_path, errors="replace") as log:
        lines = log.read().splitlines()
    trouble = [line for line in lines
               if re.search(r"(?i)error|warn|defer|bounce|fail|traceback", line)]
    print("  elemta log: %d lines, %d about trouble; last ones:" % (len(lines), len(trouble)))
    for line in (trouble or lines)[-15:]:
        print("    " + line[:300])
    print("  elemta spool still holds %d files under messages/"
          % files_under(os.path.join(spool_dir, "messages")))


def bench_elemta(scratch, count):
    # type: (str, int) -> Result
    """Elemta on a fresh spool relaying to a fresh sink."""
    workdir = tempfile.mkdtemp(prefix="elemta-", dir=scratch)
    os.chmod(workdir, 0o755)  # smtp-sink runs as nobody and writes below here.
    with Sink(workdir) as sink:
        server = ElemtaServer(os.path.join(workdir, "elemta"), elemta_sections(sink.port))
        try:
            try:
                server.start(timeout=30)
            except RuntimeError as error:
                sys.stdout.write(str(error)[-2000:] + "\n")
                raise RuntimeError("elemta did not start") from None
            by_title = tree_cpu_by_title([server.process.pid])
            result = measure("elemta (%d delivery workers)" % DELIVERY_WORKERS, sink,
                             server.port, count,
                             lambda: tree_cpu_seconds([server.process.pid]))
            if os.environ.get("BENCH_BREAKDOWN") == "1":
                print_breakdown(by_title, tree_cpu_by_title([server.process.pid]), count)
        finally:
            server.stop(timeout=30)
    if result.delivered < count:
        show_elemta_trouble(server.log_path, server.spool)
    return result


def bench_postfix(scratch, count, in_flow_delay):
    # type: (str, int, Optional[str]) -> Result
    """A fresh private Postfix relaying to a fresh sink; in_flow_delay None keeps the 1s."""
    name = "postfix in_flow_delay=%s" % (in_flow_delay or "1s (default)")
    extra = {} if in_flow_delay is None else {"in_flow_delay": in_flow_delay}
    workdir = tempfile.mkdtemp(prefix="postfix-", dir=scratch)
    os.chmod(workdir, 0o755)
    port = free_port()
    with Sink(workdir) as sink:
        with PostfixInstance(os.path.join(workdir, "postfix"), port, relayhost=sink.port,
                             extra_main_cf=extra) as postfix:
            result = measure(name, sink, port, count, lambda: cpu_seconds(postfix.pids()))
            if result.delivered < count:
                print("  postfix maillog tail:\n" + postfix.read_log()[-1500:])
    return result


def report(results):
    # type: (List[Result]) -> None
    """Each target's median, min and max (accept msg/s, end-to-end msg/s, CPU s per 1,000
    messages), then the ratios of the medians, Elemta to each Postfix."""
    print()
    print("%-34s %4s %9s %16s %16s %20s" % ("target", "runs", "delivered", "accept msg/s",
                                             "e2e msg/s", "CPU s/1000"))
    e2e, cpu = {}, {}
    for name, runs in group(results).items():
        e2e[name] = Spread.of(r.end_to_end_rate for r in runs)
        cpu[name] = Spread.of(r.cpu_per_1000 for r in runs)
        print("%-34s %4d %9d %16s %16s %20s"
              % (name, len(runs), min(r.delivered for r in runs),
                 Spread.of(r.accept_rate for r in runs), e2e[name], cpu[name].format(2)))
    for mine in (name for name in e2e if name.startswith("elemta")):
        for theirs in (name for name in e2e if name.startswith("postfix")):
            print("ratio %s / %s: end-to-end msg/s %s, CPU per message %s"
                  % (mine, theirs, ratio(e2e[mine].median, e2e[theirs].median),
                     ratio(cpu[mine].median, cpu[theirs].median)))


def main():
    count = int(os.environ.get("BENCH_MESSAGES", "3000"))
    reason = postfix_available() or first_missing(SMTP_SOURCE, SMTP_SINK)
    if reason:
        print("bench_relay: cannot run: %s" % reason)
        return 2
    scratch = shared_scratch("elemta-bench-relay-")
    print("bench_relay: %d messages of %d bytes, %d sessions, relayed to smtp-sink, in %s"
          % (count, MESSAGE_BYTES, SESSIONS, scratch))
    print("before: %s" % load_average())
    results = []  # type: List[Result]

    def record(result):
        results.append(result)
        print("  %s: accepted in %.2fs, %d at the sink after %.2fs, %.2f CPU s"
              % (result.name, result.accept_seconds, result.delivered,
                 result.end_to_end_seconds, result.cpu_seconds))

    failed = False
    try:
        for _ in range(run_count()):
            try:
                record(bench_elemta(scratch, count))
            except (RuntimeError, OSError, subprocess.SubprocessError) as error:
                print("  elemta: not measured: %s" % error)
                failed = True
            record(bench_postfix(scratch, count, None))
            record(bench_postfix(scratch, count, "0"))
    finally:
        if os.environ.get("BENCH_KEEP") == "1":
            print("kept %s" % scratch)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    print("after: %s" % load_average())
    report(results)
    short = [r for r in results if r.delivered != r.sent]
    for result in short:
        print("%s delivered %d of %d" % (result.name, result.delivered, result.sent))
    return 1 if failed or short else 0


if __name__ == "__main__":
    sys.exit(main())
