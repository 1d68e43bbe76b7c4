"""Quarantine is visible (issue 16 req 4): who held a message and why, in `elemtactl
queue show`, the REST API, mailq and the log; release sends it on unscanned; release
--rescan asks the scanners again. The same for a milter's hold: a real clamav-milter
(tests/peers/milters.py) with OnInfected Quarantine in front of the same clamd.

A real clamd (tests/peers/clamd.py: a private EICAR signature, LogClean on so its log
counts every stream it scans) serves the module; Elemta runs as a subprocess with its
api process and one delivery worker relaying remote.test to a scripted SMTP sink
(tests/peers/sink.py). What is checked is what the admin sees: command output, API
JSON, the sink's messages, and clamd's own count of scans.
See also: elemta/plugins/rescan.py, elemta/queue/queue.py (hold, release, rehold),
tests/test_clamav.py.
"""

import json
import os
import re
import subprocess
import sys
import threading

import pytest
from ruamel.yaml import YAML

from tests.harness import REPO, free_port, wait_for
from tests.peers.clamd import EICAR, SIGNATURE, clamd_available, private_clamd
from tests.peers.sink import ScriptedServer
from tests.scanning import message, queue_id_of, send
from tests.test_api_rest import AUTH, TOKEN, call, wait_for_api

pytestmark = pytest.mark.skipif(clamd_available() is not None,
                                reason=str(clamd_available()))

FOUND = SIGNATURE + ".UNOFFICIAL"
VIRUS_REASON = "virus found: " + FOUND


@pytest.fixture(scope="module")
def clamd():
    with private_clamd() as instance:
        yield instance


@pytest.fixture
def sink():
    """The next hop of remote.test; clear sink.accepting to have it answer 450 to RCPT."""
    accepting = threading.Event()
    accepting.set()

    def rcpt(session, argument):
        return "250 2.1.5 Ok" if accepting.is_set() else "450 4.2.0 come back later"
    with ScriptedServer(script={"RCPT": rcpt}, address="127.0.0.1") as server:
        server.accepting = accepting
        yield server


def start(elemta_server, clamd, sink, milters=None, **clamav):
    """Elemta with the native clamav plugin asking clamd, or, given milters, with those
    milters and no native scanner."""
    clamav = dict({"enabled": True, "address": clamd.address, "action": "quarantine"},
                  **clamav)
    sections = {"milters": milters} if milters else {"plugins": {"clamav": clamav}}
    server = elemta_server(
        api={"token": TOKEN}, **sections,
        delivery={"workers": 1, "min_backoff": 0.5, "max_backoff": 1.0,
                  "transport": [{"domain": "remote.test",
                                 "nexthop": "smtp:[127.0.0.1]:%d" % sink.port}]})
    wait_for(lambda: "delivery worker started" in server.log())
    wait_for_api(server)
    return server


def queued(server, body):
    """The queue id of a message for b@remote.test that was accepted."""
    return queue_id_of(send(server, message(body, to="b@remote.test"), ("b@remote.test",)))


def elemtactl(server, *args, config=None):
    return subprocess.run([sys.executable, "-m", "elemta.cli.elemtactl", "--config",
                           config or server.config_path, "queue"] + list(args),
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=REPO))


def state(server, queue_id):
    with server.queue() as queue:
        record = queue.get(queue_id)
        return None if record is None else record.state


def delivered(sink, queue_id):
    """The content the sink received for queue_id (our Received header names it)."""
    for session in sink.sessions:
        for received in session.messages:
            if (" id %s" % queue_id).encode() in received.content:
                return received.content
    return None


def test_a_quarantined_message_says_who_held_it_and_why_everywhere(elemta_server, clamd,
                                                                   sink):
    server = start(elemta_server, clamd, sink)
    queue_id = queued(server, EICAR)
    assert state(server, queue_id) == "hold"

    shown = elemtactl(server, "show", queue_id)
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"\nHold:       held by clamav: %s \(since \w{3} .*\d{4}\)\n"
                     % re.escape(VIRUS_REASON), shown.stdout), shown.stdout
    data = json.loads(elemtactl(server, "show", "--json", queue_id).stdout)
    assert (data["hold"]["by"], data["hold"]["reason"]) == ("clamav", VIRUS_REASON)

    status, _, body = call(server, "GET", "/api/v1/queue/" + queue_id, AUTH)
    assert status == 200 and body["queue_name"] == "hold"
    assert (body["hold"]["by"], body["hold"]["reason"]) == ("clamav", VIRUS_REASON)
    assert body["hold"]["since"] == data["hold"]["since"] > 0
    listed = call(server, "GET", "/api/v1/queue", AUTH, {"state": "hold"})[2]["messages"]
    assert [m["hold"]["by"] for m in listed] == ["clamav"]

    mailq = subprocess.run([sys.executable, "-m", "elemta.cli.mailq", "--config",
                            server.config_path], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=REPO), timeout=60).stdout
    assert re.search(r"^%s! " % queue_id, mailq, re.M), mailq     # as Postfix marks it
    assert "(held by clamav: %s)\n" % VIRUS_REASON in mailq
    assert ("%s: hold: END-OF-MESSAGE from unknown[127.0.0.1]: %s (plugin clamav at data "
            "stage)" % (queue_id, VIRUS_REASON)) in server.log()


def test_release_sends_the_message_on_without_scanning_it_again(elemta_server, clamd, sink):
    server = start(elemta_server, clamd, sink)
    queue_id = queued(server, EICAR)
    scans = clamd.scans()
    status, _, body = call(server, "POST", "/api/v1/queue/%s/release" % queue_id, AUTH)
    assert (status, body) == (200, {"queue_id": queue_id, "outcome": "released from hold",
                                    "changed": True})
    content = wait_for(lambda: delivered(sink, queue_id), timeout=30)
    assert EICAR in content                       # the admin's call: sent as it was
    wait_for(lambda: state(server, queue_id) is None)
    assert clamd.scans() == scans                 # clamd never saw it again
    assert server.log().count("%s: clamav: " % queue_id) == 1


def test_release_rescan_keeps_what_is_still_found_and_releases_what_is_clean(
        elemta_server, clamd, sink):
    server = start(elemta_server, clamd, sink)
    virus = queued(server, EICAR)
    sink.accepting.clear()                        # the clean one waits in the queue...
    clean = queued(server, b"Nothing to see here.")
    wait_for(lambda: "%s: to=<b@remote.test>," % clean in server.log(), timeout=30)
    held = elemtactl(server, "hold", "--reason", "checking", clean)   # ...and is held
    sink.accepting.set()
    assert held.returncode == 0, held.stderr
    before = json.loads(elemtactl(server, "show", "--json", virus).stdout)["hold"]
    scans = clamd.scans()

    rescanned = elemtactl(server, "release", "--rescan", virus, clean)
    assert rescanned.returncode == 0, rescanned.stderr
    assert rescanned.stdout == (
        "%s: rescanned: still on hold: held by clamav: %s\n"
        "%s: rescanned: nothing found; released from hold\n"
        "Released from hold: 1 message\n" % (virus, VIRUS_REASON, clean))
    assert clamd.scans() == scans + 2             # one scan each, at the real clamd
    assert wait_for(lambda: delivered(sink, clean), timeout=30)
    after = json.loads(elemtactl(server, "show", "--json", virus).stdout)
    assert after["queue_name"] == "hold"
    assert (after["hold"]["by"], after["hold"]["reason"]) == ("clamav", VIRUS_REASON)
    assert after["hold"]["since"] > before["since"]   # the new verdict, not the old one
    assert delivered(sink, virus) is None

    # The REST API does the same.
    status, _, body = call(server, "POST", "/api/v1/queue/%s/release" % virus, AUTH,
                           {"rescan": "true"})
    assert (status, body["changed"]) == (200, False)
    assert body["outcome"] == "rescanned: still on hold: held by clamav: " + VIRUS_REASON
    assert clamd.scans() == scans + 3
    status, _, body = call(server, "POST", "/api/v1/queue/%s/release" % virus, AUTH,
                           {"rescan": "maybe"})
    assert status == 400 and "rescan" in body["error"]
    assert state(server, virus) == "hold"


def test_a_rescan_that_would_reject_keeps_the_message_held_saying_so(elemta_server, clamd,
                                                                     sink):
    """clamav set to reject: a virus found on rescan cannot be refused any more (the
    message was accepted); it stays held, held by clamav, the reply it would have had
    as the reason. Mail from sendmail is held the same way when it comes in."""
    from tests.test_sendmail import queued, sendmail
    server = start(elemta_server, clamd, sink, action="reject")
    status, _, err = sendmail(server, "root", stdin=b"Subject: cron\n\n" + EICAR + b"\n")
    assert status == 0, err
    [(envelope, _)] = queued(server, 1)
    queue_id = envelope.queue_id
    assert state(server, queue_id) == "hold"
    first = json.loads(elemtactl(server, "show", "--json", queue_id).stdout)["hold"]
    assert first["by"] == "clamav"
    assert first["reason"].startswith("554 5.7.1 Message rejected: %s (plugin clamav at data "
                                      "stage); held for the admin" % VIRUS_REASON)
    rescanned = elemtactl(server, "release", "--rescan", queue_id)
    assert rescanned.stdout.splitlines()[0] == (
        "%s: rescanned: still on hold: held by clamav: would reject: 554 5.7.1 Message "
        "rejected: %s" % (queue_id, VIRUS_REASON))
    assert state(server, queue_id) == "hold"


def test_a_rescan_with_the_scanner_down_leaves_the_message_as_it_was(elemta_server, clamd,
                                                                     sink, tmp_path):
    server = start(elemta_server, clamd, sink)
    queue_id = queued(server, EICAR)
    yaml = YAML()
    with open(server.config_path) as f:
        config = yaml.load(f)
    config["plugins"]["clamav"]["address"] = str(tmp_path / "no-clamd.sock")
    broken = str(tmp_path / "elemta.yaml")
    with open(broken, "w") as f:
        yaml.dump(config, f)
    rescanned = elemtactl(server, "release", "--rescan", queue_id, config=broken)
    assert rescanned.returncode == 75, rescanned              # EX_TEMPFAIL: try again
    assert rescanned.stdout.startswith(
        "%s: rescan failed: left on hold as it was: 451 4.3.0 " % queue_id)
    assert "(plugin clamav)\n" in rescanned.stdout
    assert "Traceback" not in rescanned.stderr
    hold = json.loads(elemtactl(server, "show", "--json", queue_id).stdout)["hold"]
    assert (hold["by"], hold["reason"]) == ("clamav", VIRUS_REASON)


# ---- a milter's quarantine: clamav-milter with OnInfected Quarantine ---------------------

@pytest.fixture
def clamav_milter(clamd, tmp_path):
    """A real clamav-milter in front of the module's clamd, holding infected mail
    (SMFIR_QUARANTINE) instead of rejecting it."""
    from tests.peers.milters import CLAMAV_MILTER, ClamavMilter
    from tests.test_milter_peers import needs
    needs(CLAMAV_MILTER, "clamav-milter")
    with ClamavMilter(tmp_path / "clamav-milter", free_port(), clamd,
                      on_infected="Quarantine") as milter:
        yield milter


def start_with_milter(elemta_server, clamd, sink, milter):
    return start(elemta_server, clamd, sink,
                 milters=[{"socket": milter.address, "name": "clamav-milter"}])


def milter_hold(server, queue_id):
    """(by, reason) of the hold `elemtactl queue show --json` reports."""
    shown = elemtactl(server, "show", "--json", queue_id)
    assert shown.returncode == 0, shown.stderr
    hold = json.loads(shown.stdout)["hold"]
    return hold["by"], hold["reason"]


def test_a_message_a_milter_held_says_which_milter_and_why(elemta_server, clamd, sink,
                                                           clamav_milter):
    server = start_with_milter(elemta_server, clamd, sink, clamav_milter)
    queue_id = queued(server, EICAR)
    assert state(server, queue_id) == "hold"
    by, reason = milter_hold(server, queue_id)
    # clamav-milter's own words for its SMFIR_QUARANTINE.
    assert (by, reason) == ("milter clamav-milter", "quarantined by clamav-milter")

    shown = elemtactl(server, "show", queue_id)
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"\nHold:       held by milter clamav-milter: %s \(since \w{3} .*"
                     r"\d{4}\)\n" % re.escape(reason), shown.stdout), shown.stdout
    status, _, body = call(server, "GET", "/api/v1/queue/" + queue_id, AUTH)
    assert status == 200 and body["queue_name"] == "hold"
    assert (body["hold"]["by"], body["hold"]["reason"]) == (by, reason)
    log = server.log()
    assert ("%s: milter clamav-milter: EOM from unknown[127.0.0.1]: quarantine: %s"
            % (queue_id, reason)) in log
    assert ("%s: hold: END-OF-MESSAGE from unknown[127.0.0.1]: %s (milter clamav-milter)"
            % (queue_id, reason)) in log
    assert delivered(sink, queue_id) is None


def test_release_rescan_asks_the_milter_again(elemta_server, clamd, sink, clamav_milter):
    """The held EICAR stays held by the milter; a clean message held by the admin is
    released; both went through clamav-milter to clamd again."""
    server = start_with_milter(elemta_server, clamd, sink, clamav_milter)
    virus = queued(server, EICAR)
    sink.accepting.clear()                        # the clean one waits in the queue...
    clean = queued(server, b"Nothing to see here.")
    wait_for(lambda: "%s: to=<b@remote.test>," % clean in server.log(), timeout=30)
    held = elemtactl(server, "hold", "--reason", "checking", clean)   # ...and is held
    sink.accepting.set()
    assert held.returncode == 0, held.stderr
    by, reason = milter_hold(server, virus)
    scans = clamd.scans()

    rescanned = elemtactl(server, "release", "--rescan", virus, clean)
    assert rescanned.returncode == 0, rescanned.stderr
    assert rescanned.stdout == (
        "%s: rescanned: still on hold: held by milter clamav-milter: %s\n"
        "%s: rescanned: nothing found; released from hold\n"
        "Released from hold: 1 message\n" % (virus, reason, clean))
    assert clamd.scans() == scans + 2             # the milter asked clamd, once each
    assert wait_for(lambda: delivered(sink, clean), timeout=30)
    assert state(server, virus) == "hold"
    assert milter_hold(server, virus) == (by, reason)
    assert delivered(sink, virus) is None

    # The REST API does the same.
    status, _, body = call(server, "POST", "/api/v1/queue/%s/release" % virus, AUTH,
                           {"rescan": "true"})
    assert (status, body["changed"]) == (200, False), body
    assert body["outcome"] == "rescanned: still on hold: held by milter clamav-milter: " \
        + reason
    assert clamd.scans() == scans + 3


def test_a_rescan_with_the_milter_down_leaves_the_message_as_it_was(
        elemta_server, clamd, sink, clamav_milter):
    """A milter that cannot be reached leaves a held message as it was, even when its
    default_action would accept mail coming in: a rescan judges, it does not guess."""
    server = start_with_milter(elemta_server, clamd, sink, clamav_milter)
    queue_id = queued(server, EICAR)
    before = milter_hold(server, queue_id)
    clamav_milter.stop()
    yaml = YAML()
    with open(server.config_path) as f:
        config = yaml.load(f)
    config["milters"][0]["default_action"] = "accept"
    lenient = os.path.join(os.path.dirname(server.config_path), "lenient.yaml")
    with open(lenient, "w") as f:
        yaml.dump(config, f)
    rescanned = elemtactl(server, "release", "--rescan", queue_id, config=lenient)
    assert rescanned.returncode == 75, rescanned
    assert rescanned.stdout.startswith(
        "%s: rescan failed: left on hold as it was: milter clamav-milter failed at "
        "connect: cannot connect to %s" % (queue_id, clamav_milter.address)), rescanned.stdout
    assert "Traceback" not in rescanned.stderr
    assert state(server, queue_id) == "hold"
    assert milter_hold(server, queue_id) == before
