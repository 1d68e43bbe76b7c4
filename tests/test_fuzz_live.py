"""A short run of the live-server fuzzer (tests/smtp_fuzzer.py) in the suite.

`make fuzz` (tests/bench/fuzz_sessions.py) runs a million sessions; here the same
generator runs a few thousand against a real Elemta with two smtpd workers, STARTTLS,
smtps, submission and AUTH (no delivery: what is accepted stays in the test's spool).
Every reply must be well formed and present, and the server's log free of tracebacks and
worker respawns. The seed is new each run (FUZZ_SEED fixes it) and a failure names it and
the session, for `tests/bench/fuzz_sessions.py --seed S --replay K`.
"""

import os
import random

from tests import smtp_fuzzer

SESSIONS = int(os.environ.get("FUZZ_CI_SESSIONS", 3000))


def test_fuzzed_sessions_get_well_formed_replies(elemta_server, tls_files, tmp_path):
    cert, key = tls_files
    credentials = smtp_fuzzer.write_credentials(str(tmp_path / "credentials"))
    server = elemta_server(**smtp_fuzzer.server_sections(cert, key, credentials, None))
    seed = int(os.environ.get("FUZZ_SEED") or random.randrange(10 ** 9))
    stats = smtp_fuzzer.run_sessions(server.ports, seed, range(SESSIONS), concurrency=20,
                                     timeout=30)
    failures = "\n".join("%s in session %d: %s\n    %s" % (
        kind, index, detail, "\n    ".join("%s %r" % step for step in transcript[-8:]))
        for kind, index, detail, transcript in stats.failures[:5])
    where = "seed %d; replay: tests/bench/fuzz_sessions.py --seed %d --replay K\n%s" % (
        seed, seed, failures)
    assert stats.sessions == SESSIONS, where
    assert (stats.malformed, stats.missing, stats.unexpected, stats.client_errors) == (
        0, 0, 0, 0), where
    # The fuzzer got deep enough to mean something.
    assert stats.replies > 10 * SESSIONS and stats.tls_handshakes and \
        stats.messages_accepted, stats.as_dict()
    log = server.log()
    assert "Traceback" not in log and " ended with " not in log, where
