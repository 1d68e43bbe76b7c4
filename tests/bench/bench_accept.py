#!/usr/bin/env python3
"""Acceptance benchmark: how fast Elemta takes mail in, next to Postfix, in one run.

A script, not a pytest test (`make bench` runs it). Three loads, each of N messages from
20 sessions: smtp-source with 5 KB messages, one per connection; the same with 100 KB
messages; and tests/bench/pipeliner.py with 5 KB messages, 10 per connection, pipelined
(MAIL, RCPT and DATA in one write). Each goes first to Elemta (tests/harness.py's
ElemtaServer with Elemta's default smtpd worker count, in a fresh temp dir), then to a
private Postfix that parks everything in its hold queue, with in_flow_delay = 0 (and,
for the first load, once more with the default 1s). Each target's accepted count is read from its own spool, not
from the client. Each target runs BENCH_RUNS times (3); printed for each: messages/s and
the CPU seconds all of its processes spent per 1,000 messages (tests/bench/cpu.py), as
the median with min and max, and the ratios Elemta/Postfix of the medians. Needs root and
the postfix package (smtp-source comes with it).

Environment: BENCH_MESSAGES (default 5000; the 100 KB load sends a fifth as many),
BENCH_RUNS (default 3), BENCH_LOADS (the loads to run, by label, comma-separated: 5KB,
100KB, 5KBx10pipelined), BENCH_REUSE=1 adds runs with smtp-source -d (many messages per
connection), BENCH_KEEP=1 keeps the temp dirs for a look afterwards, BENCH_BREAKDOWN=1
prints each Elemta run's CPU per kind of process (smtpd workers, master, ...).
See also: ../shared/peers.md (the figures seen on this kind of machine), tests/peers/postfix.py,
tests/harness.py.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import List, NamedTuple, Optional

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from tests.bench.cpu import (cpu_seconds, print_breakdown, tree_cpu_by_title,  # noqa: E402
                            tree_cpu_seconds)
from tests.bench.runs import (Spread, first_missing, group, load_average, ratio,  # noqa: E402
                              run_count, shared_scratch, shortfalls)
from tests.harness import ELEMTA_DEFAULT, ElemtaServer, free_port  # noqa: E402
from tests.peers.postfix import PostfixInstance, postfix_available  # noqa: E402

SMTP_SOURCE = "/usr/sbin/smtp-source"
SESSIONS = 20
MESSAGE_BYTES = 5120
SENDER = "sender@bench.test"
RECIPIENT = "rcpt@bench.test"


class Load(NamedTuple):
    """What the client sends: `count_share` of BENCH_MESSAGES messages of `size` bytes,
    `per_connection` on each connection (0: smtp-source -d, all of a session's), pipelined
    or one command at a time (smtp-source)."""
    label: str
    size: int
    per_connection: int = 1
    pipelined: bool = False
    count_share: float = 1.0


LOADS = [Load("5KB", MESSAGE_BYTES), Load("100KB", 100 * 1024, count_share=0.2),
         Load("5KBx10pipelined", MESSAGE_BYTES, per_connection=10, pipelined=True)]
REUSE = Load("5KB -d", MESSAGE_BYTES, per_connection=0)
PIPELINER = os.path.join(REPO, "tests", "bench", "pipeliner.py")


class Result(NamedTuple):
    name: str
    sent: int
    accepted: int
    seconds: float
    cpu_seconds: float = 0.0      # of all the MTA's processes, during the run

    @property
    def rate(self):
        return self.accepted / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_per_1000(self):
        """CPU seconds per 1,000 messages accepted."""
        return 1000.0 * self.cpu_seconds / self.accepted if self.accepted else 0.0


def files_under(top):
    """Number of files below `top` (each one message, in both spools measured here)."""
    return sum(len(files) for _, _, files in os.walk(top))


def drive(port, count, load=LOADS[0]):
    # type: (int, int, Load) -> float
    """Send `count` messages to 127.0.0.1:port as `load` says (smtp-source, or the
    pipeliner); return the seconds it took."""
    if load.pipelined:
        argv = [sys.executable, PIPELINER, "--sessions", str(SESSIONS), "--messages",
                str(count), "--per-connection", str(load.per_connection), "--size",
                str(load.size)]
    else:
        argv = [SMTP_SOURCE, "-s", str(SESSIONS), "-m", str(count), "-l", str(load.size),
                "-f", SENDER, "-t", RECIPIENT] + (["-d"] if load.per_connection == 0 else [])
    argv.append("127.0.0.1:%d" % port)
    started = time.monotonic()
    done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=max(300, count / 20))
    seconds = time.monotonic() - started
    # smtp-source prints only trouble; the pipeliner prints its counts and exits 1 on any.
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or (lines and not load.pipelined):
        print("  %s exit %d, %d lines of output, first: %s"
              % (load.label, done.returncode, len(lines), lines[:3]))
    return seconds


def elemta_sections():
    # Acceptance only, like the hold-only Postfix it is compared with: no delivery workers
    # competing for the CPU and the index (the harness's default), and as many smtpd
    # workers as an installed Elemta runs.
    # No client name lookup, as the Postfix it is compared with (smtpd_peername_lookup
    # = no, tests/peers/postfix.py): a DNS round trip per connection is not what is
    # measured, and the host's resolver here stalls bursts of queries for 3 s.
    return {"smtpd": {"workers": ELEMTA_DEFAULT, "peername_lookup": False},
            # rcpt@bench.test is no user here: the harness accepts it, as the hold-only
            # Postfix does.
            "relay": {"local_domains": ["bench.test"]}}


def named(target, load):
    # type: (str, Load) -> str
    return target if load == LOADS[0] else "%s [%s]" % (target, load.label)


def bench_elemta(scratch, count, load=LOADS[0], name=None, plugins=None):
    # type: (str, int, Load, Optional[str], Optional[dict]) -> Result
    """Start Elemta on a fresh spool (with `plugins`, a plugins section, if given), drive
    it, count the message files it wrote."""
    name = name or named("elemta", load)
    sections = elemta_sections()
    if plugins:
        sections["plugins"] = plugins
    server = ElemtaServer(tempfile.mkdtemp(prefix="elemta-", dir=scratch), sections)
    try:
        try:
            server.start(timeout=30)
        except RuntimeError as error:
            sys.stdout.write(str(error)[-2000:] + "\n")
            raise RuntimeError("elemta did not start") from None
        before = tree_cpu_seconds([server.process.pid])
        by_title = tree_cpu_by_title([server.process.pid])
        seconds = drive(server.port, count, load)
        spent = tree_cpu_seconds([server.process.pid]) - before
        if os.environ.get("BENCH_BREAKDOWN") == "1":
            print_breakdown(by_title, tree_cpu_by_title([server.process.pid]), count)
        accepted = files_under(os.path.join(server.spool, "messages"))
    finally:
        server.stop(timeout=30)
    return Result(name, count, accepted, seconds, spent)


def bench_postfix(scratch, count, in_flow_delay, load=LOADS[0], name=None,
                  extra_main_cf=None):
    # type: (str, int, Optional[str], Load, Optional[str], Optional[dict]) -> Result
    """A fresh hold-only Postfix; in_flow_delay None keeps Postfix's default (1s);
    extra_main_cf: more main.cf settings (milters, say)."""
    if name is None:
        name = named("postfix in_flow_delay=%s" % (in_flow_delay or "1s (default)"), load)
    extra = {} if in_flow_delay is None else {"in_flow_delay": in_flow_delay}
    extra.update(extra_main_cf or {})
    workdir = tempfile.mkdtemp(prefix="postfix-", dir=scratch)
    port = free_port()
    with PostfixInstance(workdir, port, hold_only=True, extra_main_cf=extra) as postfix:
        before = cpu_seconds(postfix.pids())
        seconds = drive(port, count, load)
        spent = cpu_seconds(postfix.pids()) - before
        accepted = postfix.queue_count("hold")
    return Result(name, count, accepted, seconds, spent)


def report(results, pairs=None):
    # type: (List[Result], Optional[List[tuple]]) -> None
    """Each target's median, min and max of msg/s and CPU s per 1,000 messages, then the
    ratios of the medians: of `pairs` (mine, theirs) if given, else of every Elemta
    target to every Postfix one under the same load."""
    print()
    print("%-52s %4s %8s %18s %22s" % ("target", "runs", "accepted", "msg/s (min-max)",
                                         "CPU s/1000 (min-max)"))
    rates, cpu = {}, {}
    for name, runs in group(results).items():
        rates[name] = Spread.of(r.rate for r in runs)
        cpu[name] = Spread.of(r.cpu_per_1000 for r in runs)
        print("%-52s %4d %8d %18s %22s" % (name, len(runs), min(r.accepted for r in runs),
                                           rates[name], cpu[name].format(2)))
    if pairs is None:
        def load_of(name):
            return name.partition(" [")[2]
        pairs = [(mine, theirs) for mine in rates if mine.startswith("elemta")
                 for theirs in rates if theirs.startswith("postfix")
                 and load_of(theirs) == load_of(mine)]
    for mine, theirs in pairs:
        if mine in rates and theirs in rates:
            print("ratio %s / %s: msg/s %s, CPU per message %s"
                  % (mine, theirs, ratio(rates[mine].median, rates[theirs].median),
                     ratio(cpu[mine].median, cpu[theirs].median)))


def main():
    count = int(os.environ.get("BENCH_MESSAGES", "5000"))
    wanted = os.environ.get("BENCH_LOADS")
    loads = [load for load in LOADS if not wanted or load.label in wanted.split(",")]
    if os.environ.get("BENCH_REUSE") == "1":
        loads.append(REUSE)
    reason = postfix_available() or first_missing(SMTP_SOURCE)
    if reason:
        print("bench_accept: cannot run: %s" % reason)
        return 2

    scratch = shared_scratch("elemta-bench-")
    print("bench_accept: %d messages, %d sessions, loads %s, in %s"
          % (count, SESSIONS, ", ".join(load.label for load in loads), scratch))
    print("before: %s" % load_average())
    results = []  # type: List[Result]

    def record(result):
        results.append(result)
        print("  %s: %d accepted in %.2fs, %.2f CPU s" % (result.name, result.accepted,
                                                          result.seconds, result.cpu_seconds))

    failed = False
    try:
        for _ in range(run_count()):
            for load in loads:
                messages = max(1, int(count * load.count_share))
                try:
                    record(bench_elemta(scratch, messages, load))
                except (RuntimeError, OSError, subprocess.SubprocessError) as error:
                    print("  elemta: not measured: %s" % error)
                    failed = True
                record(bench_postfix(scratch, messages, "0", load))
                if load == LOADS[0]:
                    record(bench_postfix(scratch, messages, None, load))
    finally:
        if os.environ.get("BENCH_KEEP") == "1":
            print("kept %s" % scratch)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    print("after: %s" % load_average())
    report(results)
    short = shortfalls(results)
    return 1 if failed or short else 0


if __name__ == "__main__":
    sys.exit(main())
