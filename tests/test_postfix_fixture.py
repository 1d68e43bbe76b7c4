"""Proof that the private Postfix peer (tests/peers/postfix.py) does what other tests rely on.

Owned by the test suite. Real Postfix processes on loopback; needs root and the postfix package.
See also: tests/peers/postfix.py, ../shared/peers.md.
"""

import shutil
import smtplib
import socket
import subprocess
import tempfile

import pytest

from tests.peers.postfix import PostfixInstance, postfix_available
from tests.harness import free_port

pytestmark = pytest.mark.skipif(postfix_available() is not None,
                                reason=str(postfix_available()))

MESSAGE = b"From: a@client.test\r\nTo: b@far.test\r\nSubject: fixture\r\n\r\nhello\r\n"


@pytest.fixture
def workdir():
    """A scratch directory the postfix user can reach (pytest's tmp_path is root-only)."""
    path = tempfile.mkdtemp(prefix="elemta-postfix-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def port_is_open(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_hold_only_instance_parks_the_message_and_stop_leaves_nothing_running(workdir):
    port = free_port()
    postfix = PostfixInstance(workdir, port, hold_only=True)
    with postfix:
        assert postfix.pids(), "a running instance has processes"
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            refused = client.sendmail("a@client.test", ["b@far.test"], MESSAGE)
        assert refused == {}
        postfix.wait_for_log(r"hold: END-OF-MESSAGE .*from=<a@client\.test> to=<b@far\.test>")
        assert postfix.queue_count("hold") == 1
        assert postfix.queue_count("deferred") == 0
        assert postfix.queue_count("active") == 0

    assert postfix.pids() == []
    assert not port_is_open(port)
    # The held message outlives the instance, as a queue file should.
    assert postfix.queue_count("hold") == 1


def test_relayhost_instance_forwards_to_the_given_port(workdir):
    sink_port = free_port()
    sink = subprocess.Popen(["/usr/sbin/smtp-sink", "-u", "nobody", "127.0.0.1:%d" % sink_port,
                             "10"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port = free_port()
        with PostfixInstance(workdir, port, relayhost=sink_port) as postfix:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.sendmail("a@client.test", ["b@far.test"], MESSAGE)
            postfix.wait_for_log(r"to=<b@far\.test>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:%d,"
                                 r".* status=sent" % sink_port)
        assert postfix.pids() == []
    finally:
        sink.terminate()
        sink.wait(timeout=10)
