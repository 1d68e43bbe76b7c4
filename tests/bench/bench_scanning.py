#!/usr/bin/env python3
"""What content scanning costs: Elemta with Rspamd and ClamAV, next to Postfix with the
same two scanners as milters, in one run (issue 16).

A script, not a pytest test (`make bench` runs it). One private clamd (tests/peers/
clamd.py, the EICAR signature only) and one private Rspamd (tests/peers/rspamd.py: one
normal worker, its DNS pointed where nothing answers, thresholds high enough that every
bench message passes) serve every run. smtp-source sends N messages of 5 KB from 20
sessions, one message per connection, to:

    elemta                 no plugins (the baseline)
    elemta+scanners        the rspamd and clamav plugins (each message to both daemons)
    postfix                hold-only Postfix, in_flow_delay = 0, no milters
    postfix+milters        the same with smtpd_milters: Rspamd's proxy worker in milter
                           mode (forwarding to the same normal worker) and clamav-milter
                           (to the same clamd); milter_default_action = tempfail

Each target counts what it accepted from its own spool. Prints messages/s, the ratios,
and the machine's load (uptime) before and after. Needs root and the postfix, rspamd,
clamav-daemon and clamav-milter packages.

Environment: BENCH_SCAN_MESSAGES (default 2000), BENCH_KEEP=1 keeps the temp dirs.
See also: tests/bench/bench_accept.py (the same driver without scanners).
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import List

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from tests.bench.bench_accept import (SMTP_SOURCE, Result, bench_elemta,  # noqa: E402
                                      bench_postfix, report)
from tests.bench.runs import (first_missing, load_average, run_count,  # noqa: E402
                              shared_scratch, shortfalls)
from tests.harness import free_port  # noqa: E402
from tests.peers.clamd import ClamdInstance, clamd_available  # noqa: E402
from tests.peers.postfix import postfix_available  # noqa: E402
from tests.peers.rspamd import RspamdInstance, rspamd_available  # noqa: E402

CLAMAV_MILTER = "/usr/sbin/clamav-milter"
# Every bench message passes: a score never reaches an action.
RSPAMD_ACTIONS = "reject = 1500; add_header = 1000; rewrite_subject = 1100; greylist = 900;\n"


def start_rspamd(scratch, milter_port):
    """The private Rspamd: its normal worker, and a proxy worker in milter mode on
    milter_port that hands every message to that same normal worker."""
    port = free_port()
    proxy = ('enabled = true; milter = yes; timeout = 120s; count = 1; '
             'bind_socket = "127.0.0.1:%d"; '
             'upstream "local" { default = yes; hosts = "127.0.0.1:%d"; }\n'
             % (milter_port, port))
    rspamd = RspamdInstance(tempfile.mkdtemp(prefix="rspamd-", dir=scratch), port,
                            "127.0.0.1:9", {"actions.conf": RSPAMD_ACTIONS,
                                            "worker-proxy.inc": proxy})
    return rspamd.start()


def start_clamav_milter(scratch, clamd, port):
    workdir = tempfile.mkdtemp(prefix="clamav-milter-", dir=scratch)
    config = os.path.join(workdir, "clamav-milter.conf")
    with open(config, "w") as f:
        f.write("MilterSocket inet:%d@127.0.0.1\nClamdSocket tcp:127.0.0.1:%d\n"
                "Foreground yes\nOnInfected Reject\nOnFail Defer\nAddHeader No\n"
                "LogFile %s\nPidFile %s\nMaxFileSize 25M\n"
                % (port, clamd.port, os.path.join(workdir, "milter.log"),
                   os.path.join(workdir, "milter.pid")))
    process = subprocess.Popen([CLAMAV_MILTER, "--config-file=%s" % config],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("clamav-milter did not start (see %s)" % workdir)
            time.sleep(0.2)


def milter_settings(milters):
    """Postfix's main.cf settings for these milters, failing as Elemta's default does."""
    return {"smtpd_milters": ", ".join(milters), "milter_default_action": "tempfail",
            "milter_protocol": "6"}


# The ratios printed: what scanning costs each MTA, and the two side by side. The CPU
# figures are the MTAs' own: Rspamd and clamd serve both and are charged to neither.
PAIRS = [("elemta+scanners", "elemta"), ("elemta+scanners", "postfix+milters"),
         ("elemta", "postfix"), ("postfix+milters", "postfix")]


def main():
    count = int(os.environ.get("BENCH_SCAN_MESSAGES", "2000"))
    missing = (postfix_available() or rspamd_available() or clamd_available()
               or first_missing(SMTP_SOURCE, CLAMAV_MILTER))
    if missing:
        print("bench_scanning: cannot run: %s" % missing)
        return 2
    scratch = shared_scratch("elemta-bench-scan-")
    print("bench_scanning: %d messages of 5120 bytes, 20 sessions, in %s" % (count, scratch))
    print("before: %s" % load_average())
    results = []  # type: List[Result]
    clamd = ClamdInstance(tempfile.mkdtemp(prefix="clamd-", dir=scratch), free_port())
    rspamd_milter, clamav_milter_port = free_port(), free_port()
    milter = None
    rspamd = None
    try:
        clamd.start()
        rspamd = start_rspamd(scratch, rspamd_milter)
        milter = start_clamav_milter(scratch, clamd, clamav_milter_port)
        scanners = {"clamav": {"enabled": True, "address": clamd.address},
                    "rspamd": {"enabled": True, "address": rspamd.address}}
        milters = milter_settings(["inet:127.0.0.1:%d" % rspamd_milter,
                                   "inet:127.0.0.1:%d" % clamav_milter_port])
        targets = (lambda: bench_elemta(scratch, count, name="elemta"),
                   lambda: bench_elemta(scratch, count, name="elemta+scanners",
                                        plugins=scanners),
                   lambda: bench_postfix(scratch, count, "0", name="postfix"),
                   lambda: bench_postfix(scratch, count, "0", name="postfix+milters",
                                         extra_main_cf=milters))
        for run in run_count() * targets:
            result = run()
            results.append(result)
            print("  %s: %d accepted in %.2fs" % (result.name, result.accepted,
                                                   result.seconds))
        scans = clamd.scans()
    finally:
        if milter is not None:
            milter.terminate()
            milter.wait(15)
        if rspamd is not None:
            rspamd.stop()
        clamd.stop()
        if os.environ.get("BENCH_KEEP") == "1":
            print("kept %s" % scratch)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    print("after: %s" % load_average())
    report(results, PAIRS)
    # Both scanning runs went through the one clamd: one scan per accepted message.
    scanned = sum(r.accepted for r in results if r.name in ("elemta+scanners",
                                                            "postfix+milters"))
    print("clamd scanned %d streams for %d messages accepted with scanners" % (scans, scanned))
    short = shortfalls(results)
    return 1 if short else 0


if __name__ == "__main__":
    sys.exit(main())
