"""Issue 21 req 3: queue priority. Rules set it as mail enters the queue (the real server's
smtpd on two listeners and with AUTH, and the real sendmail command through pickup),
`elemtactl queue priority` changes it, `queue show` and `--json` show it, and a busy queue
delivers higher priorities first: the real server relaying to a slow scripted peer
(tests/peers/sink.py) with one delivery worker and one connection, where messages that
arrive last reach the peer before nearly all that came before them.
See also: elemta.queue.priority (the rules), elemta.queue.index (claim order),
elemta.delivery.concurrency (slot order), tests/test_api_rest.py (the REST route).
"""

import json
import os
import re
import smtplib
import subprocess
import sys
import threading
import time

import gevent
import pytest

from elemta.config import ConfigError, load_config
from elemta.delivery.concurrency import DestinationSlots
from elemta.delivery.routing import Destination
from elemta.delivery.worker import MAX_IN_FLIGHT
from tests.harness import REPO, free_port, wait_for
from tests.peers.sink import ScriptedServer


def elemtactl(server, *args):
    return subprocess.run([sys.executable, "-m", "elemta.cli.elemtactl", "--config",
                           server.config_path, "queue"] + list(args),
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=REPO))


def listed(server):
    """{sender: (priority, state)} from `elemtactl queue list --json`."""
    done = elemtactl(server, "list", "--json")
    assert done.returncode == 0, done.stderr
    return {m["sender"]: (m["priority"], m["queue_name"])
            for m in map(json.loads, done.stdout.splitlines())}


def content(subject):
    return ("Subject: %s\r\n\r\n%s\r\n" % (subject, subject)).encode()


# ---- rules at acceptance ----------------------------------------------------------------

def test_rules_set_the_priority_as_mail_arrives_by_smtp_auth_and_sendmail(
        elemta_server, tls_files, credentials):
    cert, key = tls_files
    other_port, submission_port = free_port(), free_port()
    rules = [
        {"sender": "Boss@Client.Test", "priority": 90},          # any case
        {"sasl_username": "alice", "priority": 70},
        {"sender_domain": ".vip.test", "priority": 40},          # subdomains only
        {"recipient_domain": "bücher.example", "priority": 30},  # IDN: as its A-label
        {"listener": "127.0.0.1:%d" % other_port, "priority": 20},
        {"listener": "sendmail", "priority": -20},
        {"sender_domain": "client.test", "recipient_domain": "example.net", "priority": 5},
    ]
    server = elemta_server(
        listeners=[{"mode": "smtp"}, {"mode": "smtp", "port": other_port},
                   {"mode": "submission", "port": submission_port}],
        tls={"cert_file": cert, "key_file": key}, auth={"credentials_file": credentials},
        queue={"priority_rules": rules})
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as smtp:
        smtp.sendmail("boss@client.test", ["r@far.test"], content("boss"))
        smtp.sendmail("c@mail.vip.test", ["r@far.test"], content("vip subdomain"))
        smtp.sendmail("c2@vip.test", ["r@far.test"], content("vip itself"))
        smtp.sendmail("d@elsewhere.test", ["r@far.test", "s@XN--BCHER-KVA.Example"],
                      content("idn"))
        smtp.sendmail("g@client.test", ["r@example.net"], content("both keys"))
        smtp.sendmail("h@client.test", ["r@other.net"], content("one key of two"))
    with smtplib.SMTP("127.0.0.1", other_port, timeout=10) as smtp:
        smtp.sendmail("e@elsewhere.test", ["r@far.test"], content("other listener"))
    with smtplib.SMTP("127.0.0.1", submission_port, timeout=10) as smtp:
        smtp.starttls()
        smtp.login("alice", "wonderland")
        smtp.sendmail("alice@client.test", ["r@example.net"], content("authenticated"))
    sent = subprocess.run([sys.executable, "-m", "elemta.cli.sendmail", "-C",
                           server.config_path, "-f", "f@client.test", "r@example.net"],
                          input=content("cron"), capture_output=True, timeout=30,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert sent.returncode == 0, sent.stderr
    wait_for(lambda: len(server.queued_ids()) == 9)
    assert {sender: priority for sender, (priority, _) in listed(server).items()} == {
        "boss@client.test": 90, "alice@client.test": 70, "c@mail.vip.test": 40,
        "c2@vip.test": 0, "d@elsewhere.test": 30, "e@elsewhere.test": 20,
        "f@client.test": -20, "g@client.test": 5, "h@client.test": 0}
    boss = [qid for qid in server.queued_ids()
            if server.message(qid)[0].sender == "boss@client.test"][0]
    shown = elemtactl(server, "show", boss)
    assert "\nPriority:   90\n" in shown.stdout
    assert re.search(r"%s: client=.*, priority=90" % boss, server.log())


@pytest.mark.parametrize("rule, key, why", [
    ("{priority: 5}", "queue.priority_rules[0]", "a rule matches on nothing"),
    ("{sender_domain: example.org, priority: 500}", "queue.priority_rules[0].priority",
     "must be between -100 and 100, not 500"),
    ("{sender: not-an-address, priority: 5}", "queue.priority_rules[0].sender",
     "must be an address (user@example.org) or <> for the null sender"),
    ("{listener: '127.0.0.1:2626', priority: 5}", "queue.priority_rules[0].listener",
     "127.0.0.1:2626 is not one of the listeners"),
    ("{listener: port25, priority: 5}", "queue.priority_rules[0].listener",
     "must be a listener's address:port"),
    ("{recipient_domain: 'bad domain', priority: 5}",
     "queue.priority_rules[0].recipient_domain", "is not a domain name"),
])
def test_a_bad_rule_is_a_config_error_naming_file_line_and_key(tmp_path, rule, key, why):
    path = tmp_path / "elemta.yaml"
    path.write_text("listeners:\n  - {address: 127.0.0.1, port: 2525}\nqueue:\n"
                    "  priority_rules:\n    - %s\n" % rule)
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    problems = [str(p) for p in error.value.problems]
    assert any(p.startswith("%s:5: %s: " % (path, key)) and why in p for p in problems), \
        problems


def test_sender_rules_match_the_null_sender_and_addresses_in_their_normal_form(tmp_path):
    """<> is the null sender (bounces: no listener); '"boss"@Client.Test.' is the sender
    boss@client.test, as elemta.addressing spells it."""
    from elemta.queue.ids import new_queue_id
    from elemta.queue.model import Envelope, Recipient
    from elemta.queue.queue import Queue
    path = tmp_path / "elemta.yaml"
    path.write_text("queue:\n  spool_dir: %s\n  priority_rules:\n"
                    "    - {sender: '<>', priority: -10}\n"
                    "    - {sender: boss@client.test, priority: 60}\n" % (tmp_path / "spool"))
    config = load_config(str(path))
    with Queue.from_config(config.queue) as queue:
        for sender, expected in (("", -10), ('"boss"@Client.Test.', 60),
                                 ("boss@client.test.example", 0)):
            envelope = Envelope(new_queue_id(), sender, [Recipient("r@far.test")],
                                time.time())
            queue.start_message(envelope).abort()
            assert envelope.priority == expected, sender


# ---- slot order inside a worker ------------------------------------------------------------

def test_waiters_for_a_destination_take_its_slot_by_priority_then_in_turn(tmp_path):
    slots = DestinationSlots(str(tmp_path / "run" / "destinations.lock"), 1)
    destination = Destination("smtp", "one.test", 25, True)
    order = []

    def deliver(name, priority):
        with slots.hold(destination, priority):
            order.append(name)
            gevent.sleep(0.01)
    with slots.hold(destination):
        waiters = [gevent.spawn(deliver, name, priority) for name, priority in
                   (("a", 0), ("b", 0), ("c", 5), ("d", -3), ("e", 9), ("f", 5))]
        gevent.sleep(0.3)                   # all of them wait behind the holder
        assert order == []
    gevent.joinall(waiters, timeout=10)
    assert order == ["e", "c", "f", "a", "b", "d"]
    assert slots.held() == 0 and slots._waiting == {}
    slots.close()


# ---- the busy queue: later mail of higher priority overtakes ----------------------------

class GatedDot:
    """The peer's reply to the final dot: the first waits for `gate` (the queue fills up
    behind it meanwhile), the others take `seconds` each."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.gate = threading.Event()
        self.waiting = threading.Event()

    def __call__(self, session, argument):
        if not self.gate.is_set():
            self.waiting.set()
            self.gate.wait(60)
        time.sleep(self.seconds)
        return "250 2.0.0 Ok: queued"


def subjects_at(sink):
    return [re.search(rb"Subject: (\S+)", m.content).group(1).decode()
            for m in sink.messages]


def test_a_busy_queue_delivers_higher_priorities_first(elemta_server):
    """One delivery worker, one connection to the peer, and a peer that holds the first
    message while 111 more arrive: the worker claims all it can hold (MAX_IN_FLIGHT,
    100), the rest wait in the queue. Then a message a rule makes priority 50 arrives,
    and the admin gives priority 60 to a waiting one: both reach the peer among the
    first few, where arrival order would send them last."""
    normal = MAX_IN_FLIGHT + 11
    dot = GatedDot(0.05)
    with ScriptedServer(script={"DOT": dot}, address="127.0.0.41", port=free_port()) as sink:
        try:
            server = elemta_server(
                delivery={"workers": 1, "destination_concurrency": 1,
                          "relayhost": "[%s]:%d" % (sink.address, sink.port)},
                queue={"priority_rules": [{"sender": "vip@client.test", "priority": 50}]},
                master={"stop_grace": 2.0}, api={"enabled": False})
            wait_for(lambda: "delivery worker started" in server.log())
            with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as smtp:
                for n in range(normal):
                    smtp.sendmail("n%d@client.test" % n, ["r@far.test"], content("n%d" % n))
            assert dot.waiting.wait(30)                     # n0 is held at the peer
            states = wait_for(lambda: _when_active(listed(server), MAX_IN_FLIGHT), 30)
            waiting = sorted(int(sender[1:].split("@")[0])
                             for sender, (_, state) in states.items() if state == "incoming")
            # Claimed in arrival order: the last ones wait in the queue.
            assert waiting == list(range(MAX_IN_FLIGHT, normal)), waiting
            with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as smtp:
                smtp.sendmail("vip@client.test", ["r@far.test"], content("vip"))
            ids = {server.message(qid)[0].sender: qid for qid in server.queued_ids()}
            changed = elemtactl(server, "priority", ids["n107@client.test"], "60")
            assert changed.stdout == ("%s: priority changed\nPriority changed to 60: 1 "
                                      "message\n" % ids["n107@client.test"]), changed.stderr
            # One a worker has already taken and holds waiting for the connection moves
            # up too (the worker asks the index again while it waits).
            taken = elemtactl(server, "priority", ids["n90@client.test"], "70")
            assert "being delivered now" in taken.stdout, taken.stdout
            after = listed(server)
            assert after["vip@client.test"] == (50, "incoming")
            assert after["n107@client.test"] == (60, "incoming")
        finally:
            dot.gate.set()
        wait_for(lambda: {"vip", "n107", "n90"} <= set(subjects_at(sink)), 60)
        order = subjects_at(sink)
    print("\narrival order at the peer: %s ..." % order[:12])
    # Arrival order would send them 91st, 108th and 112th; priority sends n90 (70, claimed
    # already) and n107 (60) first of the waiting ones, then vip (50), right after the few
    # the worker had in hand.
    assert order[0] == "n0", order
    # n90 was claimed before them but may be delivered beside them (the worker sends
    # several at once): on a loaded machine it can arrive after them, yet among the first.
    assert order.index("n107") < order.index("vip") < 10, order
    assert order.index("n90") < 10, order


def _when_active(found, count):
    """found ({sender: (priority, state)}) once `count` of its messages are active."""
    active = sum(1 for _, state in found.values() if state == "active")
    return found if active == count else None
