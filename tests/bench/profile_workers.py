#!/usr/bin/env python3
"""Where the smtpd and delivery workers spend their CPU under load (`make profile`).

A script, not a pytest test. Elemta (tests/harness.py's ElemtaServer, the default smtpd
worker count, 2 delivery workers relaying to a fresh smtp-sink, as bench_relay runs it)
takes smtp-source's load (5 KB messages, 20 sessions, one message per connection) for
PROFILE_SECONDS (20) while py-spy samples every smtpd and delivery worker at once. For
each kind of worker it prints the functions with the most samples of their own (where the
CPU went) and with the most samples in all (what the time was spent under), and keeps
py-spy's collapsed stacks and a flame graph of each worker under PROFILE_DIR (./profiles).
Samples are of threads py-spy sees as busy, which includes waits inside C: Hub.run is
the event loop waiting for sockets, acquire_with_timeout a pool thread waiting for work,
LMDB's put_many and _syncfs mostly the disk's flush. Read them as where time goes, not
only CPU; `make bench` has the CPU figures.
Needs root (py-spy attaches with ptrace) and the postfix package (smtp-source, smtp-sink).

Environment: PROFILE_SECONDS, PROFILE_DIR, PY_SPY (the py-spy binary; make profile
installs it in a venv of its own), PROFILE_TOP (25 lines per table), PROFILE_LOAD=accept
(Elemta as bench_accept runs it: smtpd workers only, no delivery), PROFILE_GIL=1 (only
samples of threads holding the GIL: the Python CPU alone, without the waits in C),
PROFILE_SIZE (bytes per message, 5120).
See also: tests/bench/bench_relay.py (the same load, timed), issue #20.
"""

import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, Iterable, List, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from tests.bench.bench_relay import (MESSAGE_BYTES, RECIPIENT, SENDER, SESSIONS,  # noqa: E402
                                     SMTP_SINK, SMTP_SOURCE, Sink, elemta_sections)
from tests.bench.bench_accept import elemta_sections as accept_sections  # noqa: E402
from tests.bench.runs import load_average  # noqa: E402
from tests.harness import ElemtaServer  # noqa: E402

KINDS = ("smtpd", "delivery")


def workers(server):
    # type: (ElemtaServer) -> Dict[str, List[int]]
    """{kind: pids} of the server's smtpd and delivery workers, by their process titles."""
    found = {kind: [] for kind in KINDS}  # type: Dict[str, List[int]]
    for pid, title in server.titles().items():
        for kind in KINDS:
            if title.startswith("elemta: %s" % kind):
                found[kind].append(pid)
    return found


def message_bytes():
    # type: () -> int
    return int(os.environ.get("PROFILE_SIZE", MESSAGE_BYTES))


def keep_loading(port, seconds):
    # type: (int, float) -> int
    """smtp-source runs of 2,000 messages, one after another, for `seconds`; returns the
    number of messages sent."""
    sent = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        subprocess.run([SMTP_SOURCE, "-s", str(SESSIONS), "-m", "2000", "-l",
                        str(message_bytes()), "-f", SENDER, "-t", RECIPIENT,
                        "127.0.0.1:%d" % port], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=600)
        sent += 2000
    return sent


def record(py_spy, pid, seconds, base):
    # type: (str, int, float, str) -> List[subprocess.Popen]
    """py-spy sampling `pid` for `seconds`: collapsed stacks (base.txt) and a flame graph
    (base.svg), from two recorders at once (one attach each)."""
    common = ["record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200",
              "--nonblocking"] + (["--gil"] if os.environ.get("PROFILE_GIL") == "1" else [])
    return [subprocess.Popen([py_spy] + common + ["--format", form, "--output", base + ext],
                             stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            for form, ext in (("raw", ".txt"), ("flamegraph", ".svg"))]


def read_stacks(paths):
    # type: (Iterable[str]) -> List[Tuple[List[str], int]]
    """(frames, outermost first; samples) of each line of py-spy's collapsed stacks."""
    stacks = []
    for path in paths:
        try:
            with open(path) as f:
                for line in f:
                    frames, _, count = line.rstrip("\n").rpartition(" ")
                    if frames and count.isdigit():
                        stacks.append((frames.split(";"), int(count)))
        except OSError:
            continue
    return stacks


def tables(stacks):
    # type: (List[Tuple[List[str], int]]) -> Tuple[collections.Counter, collections.Counter, int]
    """(samples per function on top of the stack, samples per function anywhere in the
    stack (once per stack), total samples)."""
    own, anywhere = collections.Counter(), collections.Counter()
    total = 0
    for frames, count in stacks:
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            anywhere[frame] += count
    return own, anywhere, total


def print_table(title, counter, total, top):
    print("  %s" % title)
    for frame, count in counter.most_common(top):
        print("    %5.1f%%  %s" % (100.0 * count / total, frame[:150]))


def main():
    seconds = float(os.environ.get("PROFILE_SECONDS", "20"))
    out_dir = os.path.abspath(os.environ.get("PROFILE_DIR", "profiles"))
    top = int(os.environ.get("PROFILE_TOP", "25"))
    py_spy = os.environ.get("PY_SPY") or shutil.which("py-spy")
    missing = [p for p in (SMTP_SOURCE, SMTP_SINK) if not os.path.exists(p)]
    if not py_spy or missing:
        print("profile: cannot run: %s is missing" % ", ".join(missing or ["py-spy"]))
        return 2
    os.makedirs(out_dir, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="elemta-profile-")
    os.chmod(scratch, 0o755)     # smtp-sink runs as nobody and writes below here
    print("profile: %ds of smtp-source load, %d sessions, %d-byte messages, %s; %s; output "
          "in %s" % (seconds, SESSIONS, message_bytes(), "accepted only"
                     if os.environ.get("PROFILE_LOAD") == "accept" else "relayed to smtp-sink",
                     "samples of threads holding the GIL only (PROFILE_GIL=1)"
                     if os.environ.get("PROFILE_GIL") == "1"
                     else "every busy sample, waits in C included", out_dir))
    print("before: %s" % load_average())
    files = {kind: [] for kind in KINDS}  # type: Dict[str, List[str]]
    try:
        with Sink(scratch) as sink:
            sections = (accept_sections() if os.environ.get("PROFILE_LOAD") == "accept"
                        else elemta_sections(sink.port))
            server = ElemtaServer(os.path.join(scratch, "elemta"), sections)
            server.start(timeout=30)
            try:
                recorders = []
                for kind, pids in workers(server).items():
                    for pid in pids:
                        base = os.path.join(out_dir, "%s-%d" % (kind, pid))
                        files[kind].append(base + ".txt")
                        recorders += record(py_spy, pid, seconds, base)
                sent = keep_loading(server.port, seconds)
                for recorder in recorders:
                    recorder.wait(timeout=120)
            finally:
                server.stop(timeout=30)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print("after: %s; %d messages sent" % (load_average(), sent))
    for kind in KINDS:
        own, anywhere, total = tables(read_stacks(files[kind]))
        print("\n%s workers (%d): %d samples" % (kind, len(files[kind]), total))
        if total:
            print_table("most samples of their own:", own, total, top)
            print_table("most samples in all (the function and what it called):",
                        anywhere, total, top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
