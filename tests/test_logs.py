"""Log targets: syslog with the mail facility (to a real datagram socket standing in for
/dev/log), a file reopened on request, and a clear refusal when no syslog daemon runs.
And what the lines say (issue 21 req 5): a message's life followed with grep QUEUEID
through a real server and a scripted peer, admin actions, and no Python reprs."""

import logging
import os
import re
import smtplib
import socket
import subprocess
import sys

import pytest

from elemta.config.schema import LoggingSettings
from elemta.util import logs
from tests.harness import REPO, ElemtaServer, wait_for
from tests.peers.sink import Replies, ScriptedServer


@pytest.fixture
def restore_logging():
    root = logging.getLogger("elemta")
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_syslog_lines_use_the_mail_facility(tmp_path, monkeypatch, restore_logging):
    path = str(tmp_path / "log")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslogd:
        syslogd.bind(path)
        syslogd.settimeout(5)
        monkeypatch.setattr(logs, "SYSLOG_SOCKET", path)
        logs.setup(LoggingSettings(target="syslog"))
        logging.getLogger("elemta.smtpd").info("1K114F: from=<a@b.test>, size=10, nrcpt=1")
        line = syslogd.recv(1000)
    # <22> is facility mail (2) * 8 + severity info (6), as Postfix's lines are.
    assert line.startswith(b"<22>elemta/smtpd[%d]: 1K114F: from=<a@b.test>"
                           % os.getpid())


def test_no_syslog_daemon_is_a_clear_error(tmp_path, monkeypatch, restore_logging):
    monkeypatch.setattr(logs, "SYSLOG_SOCKET", str(tmp_path / "nothing"))
    with pytest.raises(OSError, match="no syslog daemon at .*nothing"):
        logs.setup(LoggingSettings(target="syslog"))


def test_file_target_reopens(tmp_path, restore_logging):
    path = tmp_path / "elemta.log"
    logs.setup(LoggingSettings(target=str(path)))
    log = logging.getLogger("elemta.master")
    log.info("before rotation")
    os.rename(path, tmp_path / "elemta.log.1")
    logs.reopen()
    log.info("after rotation")
    assert "before rotation" in (tmp_path / "elemta.log.1").read_text()
    assert "after rotation" in path.read_text()


# ---- issue 21 req 5: lines an admin can read and grep -------------------------------------

# What a Python repr looks like in a line: Name(field=..., an empty list or dict, an
# object's default repr, an OSError's "[Errno 13]", a bytes literal.
REPR = re.compile(r"\b[A-Z]\w*\(\w+=|\[\]|\{\}|object at 0x|\[Errno \d+\]|\bb'|\bb\"")


def assert_no_reprs(log):
    bad = [line for line in log.splitlines() if REPR.search(line)]
    assert bad == [], "Python reprs in the log:\n" + "\n".join(bad)


def message_lines(log, queue_id):
    """grep QUEUEID: the text after "elemta/name[pid]: " of each line naming it."""
    return [line.split(": ", 1)[1] for line in log.splitlines() if queue_id in line]


def test_one_messages_life_can_be_followed_with_grep_queue_id(elemta_server):
    """Accepted, each delivery attempt (a 450, then a 250), removed: in order, and every
    line about the message starts with its queue id, as Postfix's do."""
    script = {"RCPT": Replies("450 4.2.0 mailbox busy", "250 2.1.5 Ok")}
    with ScriptedServer(script=script) as sink:
        server = elemta_server(delivery={
            "workers": 1, "relayhost": "[127.0.0.1]:%d" % sink.port,
            "min_backoff": 0.5, "max_backoff": 1.0})
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
            client.sendmail("a@client.test", ["x@remote.test"],
                            b"Subject: grep me\r\n\r\nhello\r\n")
        queue_id = wait_for(lambda: re.search(r"(\w+): from=<a@client\.test>",
                                              server.log())).group(1)
        wait_for(lambda: "%s: removed" % queue_id in server.log(), timeout=20)
    server.stop()
    lines = message_lines(server.log(), queue_id)
    assert all(line.startswith(queue_id + ": ") for line in lines), lines
    expected = [r"client=unknown\[127\.0\.0\.1\]",
                r"from=<a@client\.test>, size=\d+, nrcpt=1 \(queue active\)",
                r"to=<x@remote\.test>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:%d, delay=\S+, "
                r"dsn=4\.2\.0, status=deferred \(450 4\.2\.0 mailbox busy\)" % sink.port,
                r"to=<x@remote\.test>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:%d, delay=\S+, "
                r"dsn=2\.0\.0, status=sent \(250 " % sink.port,
                r"removed$"]
    assert len(lines) == len(expected), "\n".join(lines)
    for line, pattern in zip(lines, expected):
        assert re.match(queue_id + ": " + pattern, line), (pattern, lines)
    assert_no_reprs(server.log())


def test_a_bounce_and_admin_actions_are_logged_under_their_queue_ids(elemta_server):
    """The bounce gets its own "NEWID: from=<>" line and the original names it; hold,
    release, requeue and delete by elemtactl reach the daemon's log file, one line per
    message, the id first (as postsuper's do)."""
    with ScriptedServer(script={"RCPT": "550 5.1.1 no such user"}) as sink:
        server = elemta_server(delivery={
            "workers": 1, "relayhost": "[127.0.0.1]:%d" % sink.port})
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
            client.sendmail("a@client.test", ["x@remote.test"], b"Subject: no\r\n\r\nhi\r\n")
        queue_id = wait_for(lambda: re.search(r"(\w+): from=<a@client\.test>",
                                              server.log())).group(1)
        notice = wait_for(lambda: re.search(
            r"%s: sender non-delivery notification: (\w+)" % queue_id, server.log())).group(1)
        wait_for(lambda: "%s: to=<a@client.test>" % notice in server.log())
    assert re.search(r"%s: from=<>, size=\d+, nrcpt=1 \(queue active\)" % notice,
                     server.log())
    server.stop()
    # The same spool, now with nothing delivering, and a log file elemtactl can reach.
    held = ElemtaServer(server.workdir + "-admin", {
        "logging": {"target": os.path.join(server.workdir + "-admin", "elemta.log")}})
    held.start()
    try:
        with smtplib.SMTP("127.0.0.1", held.port, timeout=10) as client:
            client.sendmail("b@client.test", ["y@remote.test"], b"Subject: hold\r\n\r\nhi\r\n")
        kept = wait_for(lambda: re.search(r"(\w+): from=<b@client\.test>",
                                          held.log())).group(1)
        for action in (["hold"], ["release"], ["requeue"], ["priority", "40"], ["delete"]):
            done = subprocess.run(
                [sys.executable, "-m", "elemta.cli.elemtactl", "--config", held.config_path,
                 "queue", action[0], kept] + action[1:], capture_output=True, text=True,
                env=dict(os.environ, PYTHONPATH=REPO))
            assert done.returncode == 0, done.stderr
    finally:
        held.stop()
    lines = message_lines(held.log(), kept)
    assert lines[-5:] == ["%s: placed on hold (admin action)" % kept,
                          "%s: released from hold (admin action)" % kept,
                          "%s: requeued (admin action)" % kept,
                          "%s: priority set to 40 (admin action)" % kept,
                          "%s: removed (admin action)" % kept], lines
    assert_no_reprs(server.log() + held.log())


def test_the_reconcile_summary_is_a_sentence(elemta_server):
    server = elemta_server()
    assert "queue reconciled: 0 messages, nothing repaired" in server.log()


def test_errors_passed_to_a_log_call_read_as_text():
    error = FileNotFoundError(2, "No such file or directory", "/var/spool/elemta/x")
    assert logs.error_text(error) == "/var/spool/elemta/x: No such file or directory"
    assert logs.error_text(KeyError("master.user")) == "master.user"
    assert logs.error_text(ValueError()) == "ValueError"
