"""Draining a node (issue 19, requirement 4): `elemtactl drain`, `drain --to`, `undrain`.

Two real nodes (tests/harness.py) on 127.0.0.2 and 127.0.0.3, each with its own spool.
Messages wait on node A: deferred (its relay host refuses connections) and held. What
an admin sees: a drained A answers 421 4.3.2 to new sessions and its readiness probe
fails; `drain --to B` hands every waiting message to B with its envelope and DSN
parameters (B's queue records say so), none lost or duplicated, held ones staying on
hold until released; B refusing (itself drained) keeps them all on A; `--status` says
how many remain and when the node is empty; undrain, or a restart, takes mail again.
See also: elemta.cli.draincmd, elemta.delivery.handover, elemta.queue.draining.
"""

import http.client
import json
import os
import smtplib
import subprocess
import sys

import pytest

from elemta.queue.model import DEFERRED, HOLD
from tests.harness import REPO, free_port, wait_for

A, B = "127.0.0.2", "127.0.0.3"
EX_OK, EX_TEMPFAIL, EX_UNAVAILABLE = 0, 75, 69


def node(elemta_server, address, **sections):
    return elemta_server(
        listeners=[{"mode": "smtp", "address": address, "port": free_port(address)}],
        api={"address": address, "port": free_port(address)}, **sections)


@pytest.fixture
def nodes(elemta_server):
    """(A, B): A delivers through a relay host that refuses (its mail stays deferred),
    B keeps what it receives (no delivery workers: its queue is what arrived). The
    cluster's nodes relay for each other: the default mynetworks holds 127.0.0.0/8."""
    a = node(elemta_server, A, delivery={"workers": 1, "relayhost": "[127.0.0.1]:%d"
                                         % free_port()})
    b = node(elemta_server, B)
    return a, b


def elemtactl(server, *args):
    done = subprocess.run([sys.executable, "-m", "elemta.cli.elemtactl", "--config",
                           server.config_path] + list(args), capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONPATH=REPO))
    return done.returncode, done.stdout, done.stderr


def ready(server):
    """(HTTP status, problems) of GET /api/v1/health/ready."""
    from ruamel.yaml import YAML
    with open(server.config_path) as f:
        port = YAML(typ="safe").load(f)["api"]["port"]
    connection = http.client.HTTPConnection(server.address, port, timeout=20)
    try:
        connection.request("GET", "/api/v1/health/ready")
        response = connection.getresponse()
        return response.status, json.loads(response.read())["problems"]
    finally:
        connection.close()


def greeting(server):
    """(code, text) of the server's first reply."""
    try:
        with smtplib.SMTP(server.address, server.port, timeout=20):
            return 220, ""
    except smtplib.SMTPConnectError as error:
        return error.smtp_code, error.smtp_error.decode()


# What each message carries: (sender, [(recipient, NOTIFY, ORCPT)], MAIL parameters).
MESSAGES = [
    ("one@sender.test", [("x@remote.test", "SUCCESS,FAILURE", "rfc822;x-orig@remote.test"),
                         ("y@remote.test", "NEVER", None)],
     ["RET=HDRS", "ENVID=env+2Bone"]),
    ("two@sender.test", [("z@remote.test", "DELAY", "rfc822;z@remote.test")],
     ["RET=FULL", "BODY=8BITMIME"]),
    ("drei@sender.test", [("ü@remote.test", None, None)], ["SMTPUTF8", "BODY=8BITMIME"]),
    ("", [("w@remote.test", "FAILURE", None)], ["ENVID=bounce-4"]),
]


def content(number):
    body = "\xe9t\xe9" if "BODY=8BITMIME" in MESSAGES[number][2] else "plain"
    return ("Subject: drain %d\r\n\r\nbody %s\r\n" % (number, body)).encode("utf-8")


def queue_messages(server):
    """Queue MESSAGES on server; {Subject: queue id}."""
    with smtplib.SMTP(server.address, server.port, timeout=20) as client:
        client.ehlo("client.test")
        for number, (sender, recipients, options) in enumerate(MESSAGES):
            client.mail(sender, options)
            for address, notify, orcpt in recipients:
                params = (["NOTIFY=" + notify] if notify else []) + (
                    ["ORCPT=" + orcpt] if orcpt else [])
                assert client.rcpt(address, params)[0] == 250
            assert client.data(content(number))[0] == 250
    with server.queue() as queue:
        return {_subject(server, r.queue_id): r.queue_id for r in queue.index.iter_records()}


def _subject(server, queue_id):
    lines = server.message(queue_id)[1].split(b"\r\n")
    return next(line for line in lines if line.startswith(b"Subject: ")).decode()


def records(server):
    """{Subject: index record} of the server's queue."""
    with server.queue() as queue:
        return {_subject(server, r.queue_id): r for r in queue.index.iter_records()}


def test_drain_to_another_node_hands_over_every_waiting_message_with_its_envelope(nodes):
    a, b = nodes
    queued = queue_messages(a)
    assert len(queued) == len(MESSAGES)
    # A tries them once through the relay host that refuses: all deferred.
    wait_for(lambda: all(r.state == DEFERRED for r in records(a).values()), 30)
    held = queued["Subject: drain 1"]
    assert elemtactl(a, "queue", "hold", held)[0] == 0
    before = records(a)

    # B refuses for now (drained itself): nothing leaves A. Its smtpd reads the drain flag
    # within a second: wait until B says so.
    assert elemtactl(b, "drain")[0] == 0
    wait_for(lambda: greeting(b)[0] == 421, 10)
    code, out, err = elemtactl(a, "drain", "--to", "%s:%d" % (B, b.port))
    assert code == EX_UNAVAILABLE, (out, err)
    assert "cannot reach %s:%d" % (B, b.port) in err and "421 4.3.2" in err, err
    assert sorted(records(a)) == sorted(before) and records(b) == {}
    # A drains meanwhile: 421 to new sessions, not ready.
    wait_for(lambda: greeting(a)[0] == 421, 10)
    assert "4.3.2" in greeting(a)[1] and "drained" in greeting(a)[1]
    status, problems = ready(a)
    assert status == 503 and any("drained" in p for p in problems), problems

    assert elemtactl(b, "undrain")[0] == 0
    wait_for(lambda: greeting(b)[0] == 220, 10)
    code, out, err = elemtactl(a, "drain", "--to", "%s:%d" % (B, b.port))
    assert code == EX_OK and err == "", (out, err)
    assert "3 message(s) handed over to %s:%d, 0 stayed here" % (B, b.port) in out, out
    assert "the node is empty" in out and "1 message(s) on hold stay here" in out, out
    left = records(a)
    assert list(left) == ["Subject: drain 1"] and left["Subject: drain 1"].state == HOLD

    # The held message goes once released, and nothing else is sent twice.
    assert elemtactl(a, "queue", "release", held)[0] == 0
    code, out, err = elemtactl(a, "drain", "--to", "%s:%d" % (B, b.port), "--wait")
    assert code == EX_OK, (out, err)
    assert records(a) == {}
    code, out, _ = elemtactl(a, "drain", "--status")
    assert code == EX_OK and "draining since" in out and "the node is empty" in out, out

    arrived = records(b)
    assert sorted(arrived) == sorted(before)           # each message once
    for subject, old in before.items():
        new = arrived[subject].envelope
        old = old.envelope
        assert (new.sender, new.ret, new.envid, new.smtputf8, new.body) == (
            old.sender, old.ret, old.envid, old.smtputf8, old.body), subject
        assert [(r.address, r.notify, r.orcpt) for r in new.recipients] == [
            (r.address, r.notify, r.orcpt) for r in old.recipients], subject
        # A's Received header and then the content as the client sent it.
        text = b.message(new.queue_id)[1]
        assert text.endswith(content(int(subject.rsplit(" ", 1)[1]))), subject
        assert text.count(b"Received: ") == 2, text


def test_a_drained_node_delivering_itself_reports_what_remains_and_undrain_reverses_it(
        elemta_server):
    a = node(elemta_server, A)            # no delivery workers: its queue stays
    with smtplib.SMTP(a.address, a.port, timeout=20) as client:
        client.sendmail("s@sender.test", ["b@example.test"], b"Subject: stay\r\n\r\nx\r\n")
    code, out, err = elemtactl(a, "drain")
    assert code == EX_OK, (out, err)
    assert "takes no new mail" in out and "1 message(s) remain (incoming 1)" in out, out
    code, out, _ = elemtactl(a, "drain", "--wait", "--timeout", "1")
    assert code == EX_TEMPFAIL and "1 message(s) remain" in out, out
    code, out, _ = elemtactl(a, "drain", "--status", "--json")
    state = json.loads(out)
    assert code == EX_TEMPFAIL and state["draining"] and state["waiting"] == 1, out
    wait_for(lambda: greeting(a)[0] == 421, 10)

    assert elemtactl(a, "undrain")[0] == EX_OK
    wait_for(lambda: greeting(a)[0] == 220, 10)
    assert ready(a)[0] == 200
    # A drain ends with the run it was made for: a restart takes mail again.
    assert elemtactl(a, "drain")[0] == EX_OK
    a.stop()
    a.start()
    assert greeting(a)[0] == 220
    code, out, _ = elemtactl(a, "drain", "--status")
    assert "not draining" in out and code == EX_TEMPFAIL, out
