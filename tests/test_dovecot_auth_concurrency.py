"""One guesser does not hold up the other AUTHs of an smtpd worker (auth.backend dovecot).

Owned by the test suite. Dovecot delays every failed authentication (auth_failure_delay,
2 s by default) before it answers. Elemta's worker shares one connection to Dovecot among
all its sessions, with requests multiplexed by id: while a wrong password waits out
Dovecot's delay, a right one on another session of the same worker is answered at once.
Its own private Dovecot (tests/peers/dovecot.py) with that delay; needs root and
dovecot-core.
See also: elemta.smtpd.dovecot_auth, tests/test_dovecot_auth.py.
"""

import base64
import os
import shutil
import smtplib
import tempfile
import threading
import time

import pytest

from tests.peers.dovecot import DovecotInstance, DovecotUser, dovecot_available

DELAY = 2


@pytest.fixture(scope="module")
def dovecot():
    why = dovecot_available()
    if why:
        pytest.skip(why)
    workdir = tempfile.mkdtemp(prefix="elemta-dovecot-delay-")
    os.chmod(workdir, 0o755)
    instance = DovecotInstance(os.path.join(workdir, "dovecot"),
                               {"alice": DovecotUser("wonderland")}, auth_socket=True,
                               auth_failure_delay=DELAY)
    instance.start()
    yield instance
    instance.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def auth_plain(port, password, source):
    """(code, seconds) of one AUTH PLAIN as alice from 127.0.0.x `source`."""
    with smtplib.SMTP("127.0.0.1", port, timeout=20, source_address=(source, 0)) as smtp:
        smtp.ehlo()
        started = time.monotonic()
        code, _ = smtp.docmd("AUTH", "PLAIN " + base64.b64encode(
            b"\0alice\0" + password.encode()).decode())
        return code, time.monotonic() - started


def test_a_failing_auth_does_not_delay_the_others(elemta_server, dovecot):
    server = elemta_server(smtpd={"workers": 1}, auth={
        "backend": "dovecot", "dovecot_socket": dovecot.auth_socket,
        "allow_plaintext": True})
    results = {}
    guesser = threading.Thread(target=lambda: results.update(
        wrong=auth_plain(server.port, "guess", "127.0.0.2")))
    guesser.start()
    time.sleep(0.3)                     # the guess is now waiting in Dovecot
    results["right"] = auth_plain(server.port, "wonderland", "127.0.0.3")
    guess_still_waiting = guesser.is_alive()
    guesser.join()
    assert results["right"][0] == 235 and results["right"][1] < 1.0, results
    assert guess_still_waiting, results
    assert results["wrong"][0] == 535, results
