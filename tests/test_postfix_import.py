"""`elemtactl import-postfix-queue`: a real Postfix's queue handed over to Elemta (issue #13).

Owned by the test suite. A private Debian Postfix (tests/peers/postfix.py) relays to a
scripted server that takes one recipient and answers 451 to every other, so its mail
defers (one message with a recipient already delivered); one message is put on hold with
postsuper -h; with Postfix stopped, Postfix's own sendmail leaves one in its maildrop.
Postfix never leaves a file in incoming or active for long, so two deferred files are
moved there by hand, as a crash of its master would leave them (a finished incoming file,
a message the queue manager had taken). A truncated copy of a queue file is the damaged one.
Then the command moves them into a running Elemta, which delivers them to a sink.
"""

import os
import re
import shutil
import smtplib
import subprocess
import sys
import tempfile

import pytest

from elemta.queue.queue import Queue
from tests.harness import REPO, free_port, wait_for
from tests.peers.postfix import PostfixInstance, postfix_available
from tests.peers.sink import ScriptedServer

pytestmark = pytest.mark.skipif(postfix_available() is not None,
                                reason=str(postfix_available()))


def message(subject, body):
    return ("From: someone@client.test\r\nTo: whoever@far.test\r\nSubject: %s\r\n\r\n%s\r\n"
            % (subject, body)).encode()


def elemtactl(*args):
    return subprocess.run([sys.executable, "-m", "elemta.cli.elemtactl"] + list(args),
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=REPO))


def only_done_accepted(session, argument):
    return "250 2.1.5 Ok" if "done@far.test" in argument else "451 4.3.0 try later"


def queue_files(queue_dir):
    found = {}
    for state in ("maildrop", "incoming", "active", "deferred", "hold"):
        for directory, _, names in os.walk(os.path.join(queue_dir, state)):
            for name in names:
                found[name] = state
    return found


@pytest.fixture
def workdir():
    path = tempfile.mkdtemp(prefix="elemta-pfimport-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def postfix_queue(workdir):
    """A stopped Postfix's queue with a message in each state: {subject: queue id}."""
    relay = ScriptedServer({"RCPT": only_done_accepted})
    relay.start()
    postfix = PostfixInstance(workdir, free_port(), relayhost=relay.port, extra_main_cf={
        "in_flow_delay": "0", "queue_run_delay": "1h", "minimal_backoff_time": "1h",
        "maximal_backoff_time": "1h"})
    ids = {}
    try:
        with postfix:
            sends = (("partly-done", "a@client.test", ["done@far.test", "later1@far.test"]),
                     ("bounce-to-active", "", ["later2@far.test"]),
                     ("to-incoming", "c@client.test", ["later3@far.test"]),
                     ("held", "h@client.test", ["held@far.test"]))
            for subject, sender, recipients in sends:
                with smtplib.SMTP("127.0.0.1", postfix.smtpd_port, timeout=10) as client:
                    client.sendmail(sender, recipients, message(subject, "body of " + subject))
                ids[subject] = postfix.wait_for_log(
                    r"(\w+): to=<%s>.*status=deferred" % re.escape(recipients[-1]),
                    timeout=30).group(1)
            postfix.wait_for_log(r"to=<done@far\.test>.*status=sent")
            subprocess.run(["postsuper", "-c", postfix.config_dir, "-h", ids["held"]],
                           check=True, capture_output=True)
        # Master stopped: Postfix's sendmail leaves the message in the maildrop.
        # No -f: Postfix leaves the sender as the bare login name, for cleanup to qualify.
        subprocess.run(["/usr/sbin/sendmail", "dropped@far.test"],
                       input=message("maildrop", "body of maildrop").replace(b"\r\n", b"\n"),
                       env=dict(os.environ, MAIL_CONFIG=postfix.config_dir),
                       check=True, capture_output=True, timeout=30)
    finally:
        postfix.stop()
        relay.stop()
    queue = postfix.queue_dir
    files = queue_files(queue)
    assert sorted(files.values()) == ["deferred"] * 3 + ["hold", "maildrop"]
    ids["maildrop"] = next(n for n, s in files.items() if s == "maildrop")
    for subject, state in (("bounce-to-active", "active"), ("to-incoming", "incoming")):
        source = next(os.path.join(d, ids[subject]) for d, _, names in
                      os.walk(os.path.join(queue, "deferred")) if ids[subject] in names)
        os.rename(source, os.path.join(queue, state, ids[subject]))
    # The damaged one: the first half of a real queue file, its end record gone.
    with open(os.path.join(queue, "hold", ids["held"]), "rb") as f:
        data = f.read()
    with open(os.path.join(queue, "deferred", "BADFILE01"), "wb") as f:
        f.write(data[:len(data) // 2])
    return queue, ids


def test_import_moves_every_state_and_elemta_delivers_them(postfix_queue, elemta_server):
    queue, ids = postfix_queue
    with ScriptedServer() as sink:
        server = elemta_server(delivery={"workers": 1, "relayhost": "[127.0.0.1]:%d" % sink.port,
                                         "min_backoff": 0.5, "max_backoff": 1.0},
                               api={"enabled": False})
        config = ("--config", server.config_path)

        dry = elemtactl(*config, "import-postfix-queue", "--dry-run", queue)
        assert dry.returncode == 65, dry
        assert "would move 5 message(s)" in dry.stdout
        assert len(queue_files(queue)) == 6, "a dry run changes nothing"

        done = elemtactl(*config, "import-postfix-queue", queue)
        assert done.returncode == 65, done
        assert "Traceback" not in done.stderr
        assert re.search(r"BADFILE01: truncated.*left in place", done.stderr), done.stderr
        lines = done.stdout.splitlines()
        for subject, state, sender, count in (
                ("partly-done", "deferred", "a@client.test", 1),
                ("bounce-to-active", "active", "", 1),
                ("to-incoming", "incoming", "c@client.test", 1),
                ("held", "hold", "h@client.test", 1),
                ("maildrop", "maildrop", "root@mx.test", 1)):
            assert any(line.startswith(ids[subject] + " -> elemta ")
                       and " %s from=<%s> nrcpt=%d" % (state, sender, count) in line
                       for line in lines), (subject, done.stdout)
        assert lines[-1].startswith("moved 5 message(s) from %s" % queue)
        assert "1 damaged file(s) left in place" in lines[-1]
        assert queue_files(queue) == {"BADFILE01": "deferred"}, "only the damaged one stays"

        wait_for(lambda: len(sink.messages) == 4, timeout=30)
        got = {re.search(rb"Subject: (\S+)", m.content).group(1).decode(): m
               for m in sink.messages}
        assert sorted(got) == ["bounce-to-active", "maildrop", "partly-done", "to-incoming"]
        for subject, sender, recipient in (
                ("partly-done", "a@client.test", "later1@far.test"),
                ("bounce-to-active", "", "later2@far.test"),
                ("to-incoming", "c@client.test", "later3@far.test"),
                ("maildrop", "root@mx.test", "dropped@far.test")):
            m = got[subject]
            assert "<%s>" % sender in m.mail, (subject, m.mail)
            assert [r.split("<")[1].split(">")[0] for r in m.rcpts] == [recipient], subject
            assert m.content.endswith(b"\r\nbody of %s\r\n" % subject.encode()), m.content
        # The maildrop message went through Elemta's pickup, as a local submission does.
        assert b"(Elemta) with" in got["maildrop"].content
        with server.queue() as q:
            held = [r for r in q.index.iter_records() if r.state == "hold"]
        assert [r.envelope.sender for r in held] == ["h@client.test"]
        assert [r.address for r in held[0].envelope.recipients] == ["held@far.test"]

        again = elemtactl(*config, "import-postfix-queue", queue)
        assert again.returncode == 65 and "moved 0 message(s)" in again.stdout


def test_import_refuses_while_postfix_runs(workdir):
    postfix = PostfixInstance(workdir, free_port(), hold_only=True)
    with postfix:
        result = elemtactl("import-postfix-queue", "--spool-dir",
                           os.path.join(workdir, "spool"), postfix.queue_dir)
    assert result.returncode == 75, result
    assert "Postfix's master (pid" in result.stderr and "stop it first" in result.stderr


HANDOVER = os.path.join(REPO, "debian", "elemta-postfix-handover.sh")


def handover(queue, log, elemtactl_program):
    return subprocess.run(["sh", HANDOVER, queue, log], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, ELEMTACTL=elemtactl_program))


def test_package_handover_moves_postfix_mail_and_never_fails_the_install(postfix_queue,
                                                                          workdir):
    """debian/elemta.postinst's step (/usr/lib/elemta/postfix-handover): with Postfix's
    queue holding mail, it runs import-postfix-queue, logs every message, prints one
    line, and exits 0 whatever happens."""
    queue, ids = postfix_queue
    spool = os.path.join(workdir, "elemta-spool")
    os.mkdir(spool)
    config = os.path.join(workdir, "elemta.yaml")
    with open(config, "w") as f:
        f.write("queue: {spool_dir: %s}\nsmtpd: {hostname: mx.test, mailname_file: null}\n"
                % spool)
    program = os.path.join(workdir, "elemtactl")
    with open(program, "w") as f:
        f.write("#!/bin/sh\nELEMTA_CONFIG=%s PYTHONPATH=%s exec %s -m elemta.cli.elemtactl "
                "\"$@\"\n" % (config, REPO, sys.executable))
    os.chmod(program, 0o755)
    log = os.path.join(workdir, "log", "postfix-handover.log")
    damaged = os.path.join(queue, "deferred", "BADFILE01")
    os.rename(damaged, os.path.join(workdir, "BADFILE01"))

    done = handover(queue, log, program)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == ("elemta: Postfix's queued mail handed over: moved 5 message(s) "
                           "from %s: maildrop 1, incoming 1, active 1, deferred 1, hold 1 "
                           "(each message: %s)\n" % (queue, log))
    assert queue_files(queue) == {}
    with open(log) as f:
        logged = f.read()
    assert all(ids[subject] + " -> elemta " in logged for subject in ids)
    assert oct(os.stat(log).st_mode & 0o777) == "0o640"
    with Queue(spool) as elemta_queue:
        assert len(list(elemta_queue.index.iter_records())) == 4   # + 1 in the maildrop

    # Nothing left: nothing done, nothing said.
    assert handover(queue, log, program).stdout == ""

    # A damaged file, or no elemtactl at all: a warning saying what to do, still exit 0.
    os.rename(os.path.join(workdir, "BADFILE01"), damaged)
    partial = handover(queue, log, program)
    assert partial.returncode == 0 and partial.stdout == ""
    assert "was not all handed over (exit status 65; moved 0 message(s)" in partial.stderr
    assert "then run elemtactl import-postfix-queue %s" % queue in partial.stderr
    missing = handover(queue, log, os.path.join(workdir, "no-such-elemtactl"))
    assert missing.returncode == 0 and "exit status 127" in missing.stderr
