"""mailq for ordinary users: the showq process lists the queue on spool/public/showq, as
Postfix's showq does, while the spool stays private to root and Elemta's user.

A real server (tests/harness.py) holds mail it cannot deliver (no delivery workers), and
mailq runs as user nobody (setpriv) with Debian's Python and a copy of our code nobody
can read. The listing must be byte for byte what root's mailq prints from the index."""

import json
import os
import pwd
import shutil
import smtplib
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from elemta.queue import showq
from tests.harness import REPO, ElemtaServer, code_for_everyone
from tests.test_privileges import interpreter_for_nobody

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="running as user nobody needs root")

MESSAGE = b"From: a@client.test\r\nSubject: secret subject\r\n\r\nsecret body\r\n"


@pytest.fixture(scope="module")
def nobody_env():
    """(interpreter, environment, workdir) for running our programs as user nobody."""
    python = interpreter_for_nobody()
    if python is None:
        pytest.skip("no Python interpreter that user nobody can read")
    workdir = tempfile.mkdtemp()
    os.chmod(workdir, 0o755)                # nobody must reach the spool's public/ inside
    env = dict(os.environ, PYTHONPATH=code_for_everyone(os.path.join(workdir, "python")))
    yield python, env, workdir
    shutil.rmtree(workdir, ignore_errors=True)


def start_server(workdir, name, **sections):
    server = ElemtaServer(os.path.join(workdir, name), sections)
    os.chmod(server.workdir, 0o755)
    os.mkdir(server.spool, 0o711)           # as the packages make /var/spool/elemta
    return server.start()


def stop_server(server):
    assert server.stop() == []
    assert "Traceback" not in server.log(), server.log()


def send(server, count=1):
    with smtplib.SMTP("127.0.0.1", server.port) as smtp:
        for n in range(count):
            smtp.sendmail("alice@client.test", ["bob%d@example.test" % n, "carol@far.test"],
                          MESSAGE)


def mailq_as_nobody(nobody_env, server, *args):
    python, env, _ = nobody_env
    nobody = pwd.getpwnam("nobody")
    return subprocess.run(["setpriv", "--reuid", str(nobody.pw_uid), "--regid",
                           str(nobody.pw_gid), "--clear-groups", python, "-m",
                           "elemta.cli.mailq", "--config", server.config_path] + list(args),
                          capture_output=True, text=True, env=env, timeout=60,
                          cwd=server.workdir)


def mailq_as_root(server, *args):
    return subprocess.run([sys.executable, "-m", "elemta.cli.mailq", "--config",
                           server.config_path] + list(args), capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO), timeout=60)


@pytest.fixture(scope="module")
def server(nobody_env):
    """One server for the module, authorized_users at its default (anyone), holding
    three messages: two waiting (no delivery workers) and one on hold."""
    server = start_server(nobody_env[2], "open")
    send(server, 3)
    ids = server.queued_ids()
    held = subprocess.run([sys.executable, "-m", "elemta.cli.elemtactl", "queue", "hold",
                           "--config", server.config_path, ids[1]], capture_output=True,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert held.returncode == 0, held.stderr
    yield server
    stop_server(server)


def test_nobody_lists_the_queue_as_root_sees_it(server, nobody_env):
    assert os.stat(server.spool).st_mode & 0o777 == 0o711   # nobody cannot read it
    assert "elemta: showq" in server.titles().values()
    public = os.stat(showq.socket_path(server.spool))
    assert oct(public.st_mode & 0o777) == "0o666"
    assert oct(os.stat(os.path.dirname(showq.socket_path(server.spool))).st_mode
               & 0o7777) == "0o711"

    ids = server.queued_ids()
    by_root = mailq_as_root(server)
    by_nobody = mailq_as_nobody(nobody_env, server)
    assert (by_nobody.returncode, by_nobody.stderr) == (0, "")
    assert by_nobody.stdout == by_root.stdout
    lines = by_nobody.stdout.splitlines()
    assert lines[0].startswith("-------Queue ID------ --Size--")
    assert lines[1].startswith(ids[0] + " ") and "alice@client.test" in lines[1]
    assert any(line.startswith(ids[1] + "!") for line in lines)     # the held one
    assert lines[-1].startswith("-- ") and lines[-1].endswith(" in 3 Requests.")
    assert "secret" not in by_nobody.stdout

    # --json and the filters go through the socket too, with the same answer.
    as_json = mailq_as_nobody(nobody_env, server, "--json", "--state", "hold")
    assert as_json.returncode == 0, as_json.stderr
    assert as_json.stdout == mailq_as_root(server, "--json", "--state", "hold").stdout
    listed = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [(m["queue_id"], m["queue_name"]) for m in listed] == [(ids[1], "hold")]
    assert sorted(r["address"] for r in listed[0]["recipients"]) == [
        "bob1@example.test", "carol@far.test"]
    assert "secret" not in as_json.stdout

    bad = mailq_as_nobody(nobody_env, server, "--state", "nonsense")
    assert bad.returncode == os.EX_USAGE and "not a queue state" in bad.stderr


def exchange(server, data, wait=10.0):
    """What the showq socket answers to data (sent as root, who is always allowed)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(wait)
        sock.connect(showq.socket_path(server.spool))
        if data:
            sock.sendall(data)
        reply = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return reply
            reply += chunk


def test_garbage_gets_a_reason_and_stallers_stall_only_themselves(server, nobody_env):
    for data, reason in ((b"\x00\xffgarbage\n", b"not one line of ASCII JSON"),
                         (b"[1, 2]\n", b"not a JSON object"),
                         (b'{"version": 1, "states": ["gone"]}\n', b"states must be"),
                         (b'{"version": 7}\n', b"unknown request version"),
                         (b"x" * (showq.MAX_REQUEST + 100), b"no complete request line")):
        reply = exchange(server, data)
        assert reply.count(b"\n") == 1 and reason in reply, (data, reply)
        assert json.loads(reply)["status"] == showq.BAD_REQUEST

    # A client that connects and says nothing holds its own connection only, and is let
    # go after REQUEST_TIMEOUT with a reason.
    stallers = []
    for _ in range(3):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(showq.socket_path(server.spool))
        stallers.append(sock)
    try:
        started = time.monotonic()
        listing = mailq_as_nobody(nobody_env, server)
        assert listing.returncode == 0 and "in 3 Requests." in listing.stdout
        assert time.monotonic() - started < showq.REQUEST_TIMEOUT
        stallers[0].settimeout(showq.REQUEST_TIMEOUT + 10)
        assert b"no complete request line" in stallers[0].recv(4096)
    finally:
        for sock in stallers:
            sock.close()
    log = server.log()
    assert "bad request" in log and "Traceback" not in log


def test_a_user_left_out_of_authorized_users_is_refused(nobody_env):
    server = start_server(nobody_env[2], "closed", mailq={"authorized_users": ["daemon"]})
    try:
        send(server)
        refused = mailq_as_nobody(nobody_env, server)
        assert refused.returncode == os.EX_NOPERM
        assert refused.stdout == ""
        assert refused.stderr == ("mailq: user nobody (uid %d) is not allowed to view the "
                                  "mail queue (mailq.authorized_users)\n"
                                  % pwd.getpwnam("nobody").pw_uid)
        # root is always allowed (and reads the spool itself).
        assert "in 1 Request." in mailq_as_root(server).stdout
        assert "refused a queue listing to user nobody" in server.log()
    finally:
        stop_server(server)
    # With Elemta stopped, nobody hears why there is no listing.
    down = mailq_as_nobody(nobody_env, server)
    assert down.returncode == os.EX_UNAVAILABLE
    assert down.stderr.startswith("mailq: cannot ask the showq service at %s"
                                  % showq.socket_path(server.spool))
    assert "is Elemta running?" in down.stderr


def test_authorized_users_names_users_by_name_or_uid():
    """Postfix's user_acl: a user name, or the uid when it has none; root and Elemta's
    user always pass (they read the spool themselves)."""
    import dataclasses
    from elemta.config import Config
    from elemta.config.schema import MailqSettings
    from elemta.showq.server import ShowqServer
    nobody = pwd.getpwnam("nobody").pw_uid
    config = dataclasses.replace(Config(), mailq=MailqSettings(("nobody", "4242")))
    server = ShowqServer(config, 0, None, os.getpid())
    server.always_allowed = {0, 7777}
    assert [server.refusal(uid) for uid in (0, 7777, nobody, 4242)] == [None] * 4
    assert server.refusal(4243) == "uid 4243"
    daemon = pwd.getpwnam("daemon").pw_uid
    assert server.refusal(daemon) == "user daemon (uid %d)" % daemon
