#!/usr/bin/env python3
"""DKIM verification cost: CPU seconds to verify a 26 MB message, dkimpy's relaxed body
canonicalization against Elemta's (elemta.plugins.dkimcanon).

A script, not a pytest test (`make bench` runs it). For three bodies - lines with one
900-space run (tests/security/test_cpu_exhaustion.py LONG_RUNS, quadratic in dkimpy),
short runs (SHORT_RUNS) and ordinary prose - it times verify_message() in this process
(process CPU time, no helper, no server), once with each canonicalization. The key is
handed over directly: DNS is not what is measured. BENCH_DKIM_MB sets the size.
"""

import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import elemta.plugins.dkim as dkim  # noqa: E402
from tests.security.test_cpu_exhaustion import (LONG_RUNS, SHORT_RUNS,  # noqa: E402
                                                costly_message)

PROSE = b"The quick brown fox jumps over the lazy dog, then over the sleeping cat.\r\n"
SIZE = int(os.environ.get("BENCH_DKIM_MB", "26")) * 1024 * 1024


class KeyOnly:
    """Answers every key lookup with the one key the signatures name."""

    def __init__(self, txt):
        self.record = txt.encode("ascii")

    def txt(self, name):
        return [self.record]


def dkimpys(canonicalization, body):
    return canonicalization.canonicalize_body(body)


def main():
    key = dkim.generate_key("signed.test", "s1", os.path.join(tempfile.mkdtemp(), "s1.key"))
    resolver = KeyOnly(key.txt)
    ours = dkim.canonical_body
    print("%-10s %12s %12s   (CPU seconds to verify %d MB, one signature)"
          % ("body", "dkimpy", "elemta", SIZE >> 20))
    for name, line in (("LONG_RUNS", LONG_RUNS), ("SHORT_RUNS", SHORT_RUNS),
                       ("prose", PROSE)):
        raw = costly_message(SIZE, signatures=1, line=line)
        took = []
        for canonical in (dkimpys, ours):
            dkim.canonical_body = canonical
            started = time.process_time()
            results = dkim.verify_message(raw, resolver)
            took.append(time.process_time() - started)
            assert [r.result for r in results] == ["fail"], results    # bh= is wrong
        dkim.canonical_body = ours
        print("%-10s %12.2f %12.2f" % (name, took[0], took[1]), flush=True)


if __name__ == "__main__":
    main()
