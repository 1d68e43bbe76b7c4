"""The plugin stages beyond helo..data: connection, storage, queue, routing and delivery,
discard end to end, and a plugin that cannot start.

The server tests run `elemta` as a subprocess (tests/conftest.py elemta_server) with the
probe plugin (tests/plugins/probe) pip-installed and found through its `elemta.plugins`
entry point, as a third-party plugin is; the probe records every call it gets (one JSON
line, from whichever process) and answers as its rules say. DeliveryStages is tested
directly, over messages committed to and claimed from a real queue in a temp spool.
See also: elemta/plugins/api.py (the stages), tests/test_plugins.py (the manager).
"""

import importlib
import json
import os
import shutil
import smtplib
import socket
import subprocess
import sys
import tempfile
import time

import pytest
from ruamel.yaml import YAML

from tests.harness import REPO, wait_for

HERE = os.path.dirname(os.path.abspath(__file__))
PROBE = os.path.join(HERE, "plugins", "probe")


@pytest.fixture(scope="module")
def probe_installed(tmp_path_factory):
    """The probe plugin, pip-installed into the running venv for this module's tests."""
    source = str(tmp_path_factory.mktemp("probe") / "probe")
    shutil.copytree(PROBE, source, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    done = subprocess.run(pip + ["install", "--no-deps", source], capture_output=True,
                          timeout=300)
    if done.returncode != 0:
        pytest.skip("cannot pip install the probe plugin: %s" % done.stderr.decode()[-300:])
    importlib.invalidate_caches()
    yield
    subprocess.run(pip + ["uninstall", "-y", "elemta-probe-plugin"], capture_output=True,
                   timeout=120)


def calls(path, stage=None):
    """The probe's recorded calls, oldest first."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        found = [json.loads(line) for line in f]
    return [c for c in found if stage is None or c["stage"] == stage]


def connect_from(source, port):
    """A raw client socket from another loopback address (127.0.0.0/8 is all ours)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10,
                                    source_address=(source, 0))
    return sock, sock.makefile("rb")


def message(sender, rcpt="rcpt@example.test", subject="stages"):
    return (b"From: <%s>\r\nTo: <%s>\r\nSubject: %s\r\nMessage-ID: <%d@client.test>\r\n"
            b"\r\nA short body.\r\n" % (sender.encode(), rcpt.encode(), subject.encode(),
                                        int(time.time() * 1e6)))


def send(server, sender, recipients):
    """The DATA reply (code, text) of one message from 127.0.0.1."""
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as smtp:
        smtp.ehlo("client.test")
        assert smtp.mail(sender)[0] == 250
        for rcpt in recipients:
            assert smtp.rcpt(rcpt)[0] == 250
        return smtp.data(message(sender, recipients[0]))


def queue_id_of(reply):
    assert reply[0] == 250, reply
    return reply[1].decode().rsplit(" ", 1)[1]


# ---- the smtpd: connection, discard, early verdicts, storage, queue ----------------------

def test_smtpd_stages_as_a_client_sees_them(probe_installed, elemta_server, tmp_path):
    record = str(tmp_path / "calls.jsonl")
    server = elemta_server(plugins={"probe": {"enabled": True, "record": record, "rules": [
        {"stage": "connection", "when": "127.0.0.2", "action": "reject",
         "text": "Client host rejected: listed by the probe"},
        {"stage": "connection", "when": "127.0.0.3", "action": "tempfail"},
        {"stage": "mail", "when": "hold-at-mail", "action": "quarantine",
         "text": "sender under review"},
        {"stage": "rcpt", "when": "discard-at-rcpt", "action": "discard"},
        {"stage": "data", "when": "discard-at-data", "action": "discard",
         "text": "spam trap hit"},
        {"stage": "data", "action": "header", "value": "X-Probe-Data: seen at data"},
        {"stage": "storage", "action": "header", "value": "X-Probe-Storage: last word"},
        {"stage": "queue", "when": "queue-says-no", "action": "reject"},
    ]}})

    # connection reject: 554 instead of the 220, 503 to anything but QUIT (RFC 5321 3.1).
    sock, replies = connect_from("127.0.0.2", server.port)
    with sock, replies:
        assert replies.readline() == (b"554 5.7.1 mx.test Client host rejected: "
                                      b"listed by the probe\r\n")
        sock.sendall(b"EHLO client.test\r\nMAIL FROM:<a@b.test>\r\n")
        assert replies.readline() == (b"503 5.7.0 Error: access denied for "
                                      b"unknown[127.0.0.2]\r\n")
        assert replies.readline().startswith(b"503 5.7.0 ")
        sock.sendall(b"QUIT\r\n")
        assert replies.readline() == b"221 2.0.0 Bye\r\n"
        assert replies.readline() == b""                      # and the server closed
    # connection tempfail: 421 and close.
    sock, replies = connect_from("127.0.0.3", server.port)
    with sock, replies:
        assert replies.readline() == b"421 4.7.1 mx.test Try again later\r\n"
        assert replies.readline() == b""

    # discard at data: the client hears 250 with a queue id; nothing is queued.
    discarded = queue_id_of(send(server, "discard-at-data@example.org", ["rcpt@example.test"]))
    # discard at rcpt: the whole message, every recipient.
    discarded2 = queue_id_of(send(server, "a@example.org",
                                  ["rcpt@example.test", "discard-at-rcpt@example.test"]))
    # quarantine at mail: queued on hold.
    held = queue_id_of(send(server, "hold-at-mail@example.org", ["rcpt@example.test"]))
    # an ordinary message, whose queue-stage verdict is ignored.
    kept = queue_id_of(send(server, "queue-says-no@example.org", ["rcpt@example.test"]))

    assert server.queued_ids() == sorted([held, kept])
    with server.queue() as queue:
        assert queue.index.get(held).state == "hold"
        assert queue.index.get(kept).state == "incoming"
    log = wait_for(lambda: "answered reject at the queue stage" in server.log()
                   and server.log())
    assert ("NOQUEUE: reject: CONNECT from unknown[127.0.0.2]: 554 5.7.1 Client host "
            "rejected: listed by the probe; proto=SMTP (plugin probe)") in log
    assert ("NOQUEUE: reject: CONNECT from unknown[127.0.0.3]: 421 4.7.1 Try again later; "
            "proto=SMTP (plugin probe)") in log
    assert ("%s: discard: END-OF-MESSAGE from unknown[127.0.0.1]: spam trap hit; "
            "from=<discard-at-data@example.org> nrcpt=1 (plugin probe at data stage)"
            % discarded) in log
    assert ("%s: discard: END-OF-MESSAGE from unknown[127.0.0.1]: discarded; "
            "from=<a@example.org> nrcpt=2 (plugin probe at rcpt stage)" % discarded2) in log
    assert ("%s: hold: END-OF-MESSAGE from unknown[127.0.0.1]: sender under review "
            "(plugin probe at mail stage)" % held) in log
    assert ("%s: plugin probe answered reject at the queue stage: ignored" % kept) in log

    # The stages in order, each seeing what it should.
    seen = [c for c in calls(record) if c["queue_id"] in (None, kept)
            and c["client"] == "127.0.0.1"][-8:]
    assert [c["stage"] for c in seen] == ["connection", "helo", "mail", "rcpt",
                                          "data_command", "data", "storage", "queue"]
    data_command, data, storage, queued = seen[4:]
    assert data_command["recipients"] == ["rcpt@example.test"]
    assert data_command["recipient"] is None and data_command["headers"] is None
    assert data["headers"] == ["From", "To", "Subject", "Message-ID"]
    assert storage["headers"][0] == "X-Probe-Data"          # data's edits came first
    assert queued["headers"] is None and queued["recipients"] == ["rcpt@example.test"]
    assert not data["outbound"] and data["trusted"] and not data["local"]
    content = server.message(kept)[1]
    assert content.startswith(b"Received: from client.test")
    assert b"\r\nX-Probe-Storage: last word\r\nX-Probe-Data: seen at data\r\nFrom: " in content
    # Storage never ran for the message discarded at data.
    assert not [c for c in calls(record, "storage") if c["queue_id"] == discarded]


# ---- a plugin that cannot start ----------------------------------------------------------

def test_a_plugin_failing_at_start_leaves_the_worker_serving(probe_installed,
                                                             elemta_server):
    from elemta.util.procs import children
    server = elemta_server(plugins={
        "probe": {"enabled": True, "fail_init": True, "stages": ["rcpt"]},
        "probe2": {"enabled": True, "fail_init": True, "stages": ["mail"],
                   "fail_open": True}})
    smtpd = [pid for pid, title in children(server.process.pid).items()
             if title == "elemta: smtpd"]
    assert len(smtpd) == 1
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as smtp:
        smtp.ehlo("client.test")
        assert smtp.mail("a@example.org")[0] == 250          # probe2: fail-open, left out
        code, text = smtp.rcpt("rcpt@example.test")
        assert (code, text) == (451, b"4.3.0 Temporary local problem, please try again "
                                     b"later")
    time.sleep(1.0)
    # The same worker still serves: not crashed, not respawned.
    assert [pid for pid, title in children(server.process.pid).items()
            if title == "elemta: smtpd"] == smtpd
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as smtp:
        assert smtp.ehlo("client.test")[0] == 250
    log = server.log()
    assert ("plugin probe failed to start: OSError: cannot open /nonexistent/probe.db "
            "(at __init__.py:") in log
    assert "; its stages (rcpt) answer 451 4.3.0 until it starts" in log
    assert "plugin probe2 failed to start: OSError: cannot open /nonexistent/probe.db" in log
    assert "running without it (fail_open)" in log
    assert ("NOQUEUE: plugin probe failed at rcpt stage for client [127.0.0.1]: not "
            "started: OSError: cannot open /nonexistent/probe.db") in log


# ---- pickup: the same data/storage handling; DKIM signs local mail, ARC seals forwards ---

def test_pickup_mail_is_dkim_signed_and_forwarded_mail_is_arc_sealed(probe_installed,
                                                                    elemta_server, tmp_path):
    from tests.peers.nsd import NSDInstance, nsd_available
    if nsd_available() is not None:
        pytest.skip(str(nsd_available()))
    from elemta.plugins.arc import verify_chain
    from elemta.plugins.dkim import generate_key, verify_message
    from elemta.plugins.resolver import Resolver
    dkim_key = generate_key("local.test", "s1", str(tmp_path / "s1.key"))
    arc_key = generate_key("fwd.test", "arc", str(tmp_path / "arc.key"))
    nsd = NSDInstance(tempfile.mkdtemp(prefix="elemta-stages-nsd-"),
                      {"local.test": dkim_key.zone_line + "\n",
                       "fwd.test": arc_key.zone_line + "\n"}, address="127.0.0.1")
    nsd.start()
    try:
        record = str(tmp_path / "calls.jsonl")
        dns = {"nameservers": ["127.0.0.1"], "port": nsd.port, "timeout": 2.0}
        server = elemta_server(dns=dns, plugins={
            "dkim": {"enabled": True, "sign": True, "domain": "local.test",
                     "selector": "s1", "key_file": dkim_key.key_file},
            "arc": {"enabled": True, "seal": True, "domain": "fwd.test", "selector": "arc",
                    "key_file": arc_key.key_file},
            "probe": {"enabled": True, "record": record,
                      "stages": ["data", "storage", "queue"]}})
        resolver = Resolver(["127.0.0.1"], port=nsd.port, timeout=2.0)

        # A cron job's mail, through sendmail and pickup: signed by its sender domain.
        done = subprocess.run(
            [sys.executable, "-m", "elemta.cli.sendmail", "-C", server.config_path, "-i",
             "-f", "cron@local.test", "root@example.test"],
            input=b"From: Cron Daemon <cron@local.test>\nSubject: backup done\n\nok\n",
            capture_output=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=30)
        assert done.returncode == 0, done.stderr
        [local_id] = wait_for(lambda: server.queued_ids())
        envelope, content = server.message(local_id)
        assert envelope.protocol == "local"
        [signed] = verify_message(content, resolver)
        assert (signed.result, signed.domain, signed.selector) == ("pass", "local.test", "s1")
        assert b"ARC-Seal" not in content                 # our users' own mail: not sealed
        # The queue stage is told after the commit, so it may come a moment after the id.
        wait_for(lambda: [(c["stage"], c["local"], c["client"])
                          for c in calls(record) if c["queue_id"] == local_id]
                 == [("data", True, ""), ("storage", True, ""), ("queue", True, "")])

        # A mynetworks host (a list server, say) relaying to another domain: sealed at
        # receive time; the same to a local recipient is not (it does not leave).
        forwarded = queue_id_of(send(server, "list@lists.example", ["member@remote.example"]))
        local_only = queue_id_of(send(server, "list@lists.example", ["rcpt@example.test"]))
        content = server.message(forwarded)[1]
        assert b"\r\nARC-Seal: i=1; " in content and b"cv=none" in content
        assert b"Authentication-Results: mx.test;" in content
        checked = verify_chain(content, resolver)
        assert (checked.cv, checked.instances) == ("pass", 1), checked
        assert b"ARC-Seal" not in server.message(local_only)[1]
        outbound = {c["queue_id"]: c["outbound"] for c in calls(record, "storage")}
        assert (outbound[forwarded], outbound[local_only]) == (True, False)
    finally:
        nsd.stop()
        nsd.remove()


def test_pickup_verdicts_nobody_hears(probe_installed, elemta_server, tmp_path):
    server = elemta_server(plugins={"probe": {"enabled": True, "rules": [
        {"stage": "data", "when": "discard-local", "action": "discard", "text": "noise"},
        {"stage": "data", "when": "reject-local", "action": "reject", "text": "no way"},
        {"stage": "storage", "when": "later-local", "action": "tempfail"}]}})

    def sendmail(sender):
        done = subprocess.run(
            [sys.executable, "-m", "elemta.cli.sendmail", "-C", server.config_path, "-i",
             "-f", sender, "root@example.test"], input=b"Subject: cron\n\nok\n",
            capture_output=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=30)
        assert done.returncode == 0, done.stderr

    maildrop = os.path.join(server.spool, "maildrop")
    for sender in ("discard-local@example.org", "reject-local@example.org",
                   "later-local@example.org"):
        sendmail(sender)
    log = wait_for(lambda: server.log().count("tried again in 60s") == 1
                   and "held for the admin" in server.log() and server.log())
    # A reject: nobody to refuse it to, so it is kept on hold for the admin.
    [held] = server.queued_ids()
    with server.queue() as queue:
        record = queue.index.get(held)
        assert (record.state, record.envelope.sender) == ("hold", "reject-local@example.org")
    assert ("%s: hold: 550 5.7.1 no way (plugin probe at data stage); held for the admin"
            % held) in log
    # A discard: gone, and said so. A tempfail: the file waits in the maildrop.
    assert "discard: local mail from=<discard-local@example.org> nrcpt=1: noise " \
           "(plugin probe at data stage)" in log
    assert "451 4.7.1 Try again later (plugin probe at storage stage); tried again in " \
           "60s" in log
    assert len(os.listdir(maildrop)) == 1


# ---- the delivery worker's stages, over a real queue -------------------------------------

def delivery_setup(tmp_path, plugins):
    """(config, queue) with a spool in tmp_path and these plugin tables."""
    from elemta.config.loader import load_config
    from elemta.queue.queue import Queue
    path = str(tmp_path / "elemta.yaml")
    with open(path, "w") as f:
        YAML().dump({"smtpd": {"hostname": "mx.test"},
                     "queue": {"spool_dir": str(tmp_path / "spool")},
                     "relay": {"local_domains": ["example.test"]},
                     "delivery": {"transport": [
                         {"domain": "lmtp.test", "nexthop": "lmtp:unix:/run/lmtp"}]},
                     "plugins": plugins}, f)
    config = load_config(path)
    return config, Queue.from_config(config.queue)


def commit_and_claim(queue, sender, recipients, content=b"Subject: hi\r\n\r\nbody\r\n"):
    from elemta.queue.ids import new_queue_id
    from elemta.queue.model import Envelope, Recipient
    envelope = Envelope(queue_id=new_queue_id(), sender=sender,
                        recipients=[Recipient(r) for r in recipients], arrival=time.time(),
                        client_address="192.0.2.1", client_helo="client.test",
                        auth_user="alice")
    writer = queue.start_message(envelope)
    writer.write(content)
    writer.finish()
    queue.commit([writer])
    [record] = queue.claim("test:1", 10, 60.0)
    assert record.queue_id == envelope.queue_id
    return record


def test_delivery_stages_route_refuse_and_discard(probe_installed, tmp_path):
    from elemta.delivery.routing import LOCAL_DESTINATION, SMTP, Destination, Router
    from elemta.delivery.stages import DeliveryStages
    from elemta.queue.model import BOUNCED, RCPT_DEFERRED, SENT
    record_path = str(tmp_path / "calls.jsonl")
    config, queue = delivery_setup(tmp_path, {"probe": {
        "enabled": True, "record": record_path, "rules": [
            {"stage": "routing", "when": "@elsewhere.test", "action": "route",
             "value": "smtp:[127.0.0.1]:2525"},
            {"stage": "routing", "when": "@lost.test", "action": "route",
             "value": "smtp:[bad_host!]"},
            {"stage": "routing", "when": "bounce-at-routing", "action": "reject",
             "code": 550, "status": "5.1.1", "text": "no such user here"},
            {"stage": "delivery", "when": "discard-me", "action": "discard"},
            {"stage": "delivery", "when": "later", "action": "tempfail"},
            {"stage": "delivery", "when": "refuse", "action": "reject",
             "text": "not to that address"},
            {"stage": "delivery", "when": "hold", "action": "quarantine",
             "text": "under review"},
            {"stage": "delivery", "when": "broken", "action": "raise"}]}})
    stages = DeliveryStages(config)
    router = Router(config)
    try:
        record = commit_and_claim(queue, "alice@example.org", [
            "a@elsewhere.test", "b@lost.test", "bounce-at-routing@remote.test",
            "discard-me@remote.test", "later@remote.test", "refuse@remote.test",
            "hold@remote.test", "broken@remote.test", "fine@remote.test",
            "user@lmtp.test", "postmaster@example.test"])
        # Routing: as the worker groups recipients.
        groups = {}
        for index, recipient in enumerate(record.envelope.recipients):
            destination = stages.routing(record, recipient,
                                         router.destination(recipient.address))
            groups.setdefault(destination, []).append((index, recipient))
        remote = router.destination("x@remote.test")
        assert list(groups) == [Destination(SMTP, "127.0.0.1", 2525, False),
                                router.destination("b@lost.test"), remote,
                                router.destination("user@lmtp.test"), LOCAL_DESTINATION]
        # Delivery: per group, before the transport.
        results = {}
        for destination, items in groups.items():
            results.update(stages.delivery(record, destination, items) or {})
        assert results == {
            1: (RCPT_DEFERRED, "451 4.3.0 Temporary local problem, please try again later",
                "none"),
            2: (BOUNCED, "550 5.1.1 no such user here", "none"),
            3: (SENT, "250 2.0.0 discarded by probe", "none"),
            4: (RCPT_DEFERRED, "451 4.7.1 Try again later", "none"),
            5: (BOUNCED, "550 5.7.1 not to that address", "none"),
            6: (RCPT_DEFERRED, "451 4.7.0 held back by probe: under review", "none"),
            7: (RCPT_DEFERRED, "451 4.3.0 Temporary local problem, please try again later",
                "none")}
        # What the plugins saw: the next hop in transport-map syntax, the content.
        seen = calls(record_path, "delivery")
        nexthops = {c["recipient"]: c["nexthop"] for c in seen}
        assert nexthops["a@elsewhere.test"] == "smtp:[127.0.0.1]:2525"
        assert nexthops["fine@remote.test"] == "smtp:remote.test:25"
        assert nexthops["user@lmtp.test"] == "lmtp:unix:/run/lmtp"
        assert nexthops["postmaster@example.test"] == "local"
        assert "bounce-at-routing@remote.test" not in nexthops   # decided at routing
        fine = [c for c in seen if c["recipient"] == "fine@remote.test"][0]
        assert fine["headers"] == ["Subject"] and fine["queue_id"] == record.queue_id
        assert fine["auth_user"] == "alice" and fine["client"] == "192.0.2.1"
        assert fine["recipients"] == [r.address for _, r in groups[remote]]
        # A second attempt starts clean: nothing left over from the first.
        assert stages.delivery(record, remote, [(8, record.envelope.recipients[8])]) is None
    finally:
        stages.close()
        queue.close()


def test_delivery_stages_cost_nothing_without_plugins_for_them(probe_installed, tmp_path):
    from elemta.delivery.routing import Router
    from elemta.delivery.stages import DeliveryStages
    # Greylisting serves rcpt only: not loaded here. The probe's class serves every stage,
    # so it is loaded, but this one is configured for rcpt only.
    config, queue = delivery_setup(tmp_path, {
        "probe": {"enabled": True, "stages": ["rcpt"]},
        "greylist": {"enabled": True, "database": str(tmp_path / "greylist")}})
    stages = DeliveryStages(config)
    try:
        assert stages.plugins.names == ["probe"]
        assert not stages.routes and not stages.delivers
        record = commit_and_claim(queue, "a@example.org", ["b@remote.test"])
        recipient = record.envelope.recipients[0]
        destination = Router(config).destination(recipient.address)
        started = time.perf_counter()
        for _ in range(10000):
            assert stages.routing(record, recipient, destination) is destination
            assert stages.delivery(record, destination, [(0, recipient)]) is None
        assert time.perf_counter() - started < 1.0
        assert not os.path.exists(str(tmp_path / "greylist"))    # never opened here
    finally:
        stages.close()
        queue.close()
