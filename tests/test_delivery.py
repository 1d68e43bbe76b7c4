"""Delivery end to end: the real server's delivery workers empty the queue into real peers.

Owned by the test suite. The real `elemta` server (tests/conftest.py) with delivery workers;
a private NSD (tests/peers/nsd.py) serves zone dlv.test, whose MX records point at loopback
addresses used as separate hosts, all on one port (delivery.mx_port): a private Postfix on
127.0.0.1 that parks what it receives in its hold queue (it must hold exactly what Elemta
delivered), nothing on 127.0.0.2 (connection refused), and scripted servers
(tests/peers/sink.py) on 127.0.0.3 and up for 450-then-250, 550 and a server that never
answers the final dot. Needs root, nsd and postfix.
See also: elemta.delivery.worker, tests/test_mx.py, tests/test_smtp_client.py.
"""

import email
import email.policy
import mailbox
import os
import re
import subprocess
import sys
import shutil
import signal
import smtplib
import tempfile
import threading
import time

import pytest

from elemta.queue.model import BOUNCED, FAILED, SENT
from tests.harness import free_port, wait_for
from tests.peers.nsd import nsd_available, private_nsd
from tests.peers.postfix import PostfixInstance, postfix_available
from tests.peers.sink import DEFAULT_EXTENSIONS, HANG, Replies, ScriptedServer

pytestmark = pytest.mark.skipif(bool(nsd_available() or postfix_available()),
                                reason=str(nsd_available() or postfix_available()))

ZONE = "dlv.test"
RECORDS = """
remote        MX 10 mx.remote
mx.remote     A  127.0.0.1
fallback      MX 10 down.fallback
fallback      MX 20 mx.fallback
down.fallback A  127.0.0.2
mx.fallback   A  127.0.0.1
nullmx        MX 0 .
retry         MX 10 mx.retry
mx.retry      A  127.0.0.3
reject        MX 10 mx.reject
mx.reject     A  127.0.0.4
slow          MX 10 mx.slow
mx.slow       A  127.0.0.5
refuse        MX 10 mx.refuse
mx.refuse     A  127.0.0.6
stuck         MX 10 mx.stuck
mx.stuck      A  127.0.0.8
busy          MX 10 mx.busy
busy          MX 20 mx.remote
mx.busy       A  127.0.0.18
tlsmay        MX 10 mx.tls
tlsstrict     MX 10 mx.tls
mx.tls        A  127.0.0.19
"""


def message(subject):
    return ("From: s@client.test\r\nTo: r@dlv.test\r\nSubject: %s\r\n\r\nbody of %s\r\n"
            % (subject, subject)).encode()


@pytest.fixture(scope="module")
def nsd():
    with private_nsd({ZONE: RECORDS}) as server:
        yield server


@pytest.fixture(scope="module")
def mx_port():
    return free_port()


@pytest.fixture(scope="module")
def postfix(mx_port):
    """The receiving MX on 127.0.0.1: accepts everything into its hold queue."""
    workdir = tempfile.mkdtemp(prefix="elemta-postfix-")
    with PostfixInstance(workdir, mx_port, hold_only=True) as instance:
        yield instance
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def start(elemta_server, nsd, mx_port):
    """Start the real server with delivery through NSD's MX records on mx_port."""
    def starter(master=None, local=None, relay=None, **delivery):
        settings = {"workers": 1, "mx_port": mx_port, "nameservers": ["127.0.0.1"],
                    "dns_port": nsd.port, "min_backoff": 0.5, "max_backoff": 1.0,
                    "connect_timeout": 2.0, "command_timeout": 5.0, "data_timeout": 5.0}
        settings.update(delivery)
        server = elemta_server(delivery=settings, api={"enabled": False},
                               master=master or {}, **dict(
                                   ({"local": local} if local else {}),
                                   **({"relay": relay} if relay else {})))
        wait_for(lambda: "delivery worker started" in server.log())
        return server
    return starter


def send(server, sender, recipients, subject):
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.sendmail(sender, recipients, message(subject))


def queue_id_of(server, sender):
    match = wait_for(lambda: re.search(r"(\w+): from=<%s>" % re.escape(sender), server.log()))
    return match.group(1)


def delivery_lines(server, queue_id):
    return re.findall(r"%s: to=<([^>]*)>, relay=(\S+), delay=([\d.e+-]+), dsn=\S+, "
                      r"status=(\w+) \((.*)\)" % queue_id, server.log())


def wait_for_status(server, queue_id, address, status, timeout=10):
    def seen():
        return [line for line in delivery_lines(server, queue_id)
                if line[0] == address and line[3] == status]
    return wait_for(seen, timeout)[0]


def delivery_pids(server):
    return [pid for pid, title in server.titles().items() if title == "elemta: delivery"]


def test_mail_goes_to_the_mx_at_once_and_postfix_holds_exactly_it(start, postfix):
    server = start()
    held_before = postfix.queue_count("hold")
    senders = ["one@client.test", "two@client.test", "three@client.test"]
    for n, sender in enumerate(senders):
        time.sleep(0.3)     # the worker has nothing to do and sleeps
        send(server, sender, ["user%d@remote.dlv.test" % n], "mx %d" % n)
        queue_id = queue_id_of(server, sender)
        address, relay, delay, _, reply = wait_for_status(
            server, queue_id, "user%d@remote.dlv.test" % n, "sent")
        assert relay.startswith("mx.remote.dlv.test[127.0.0.1]:")
        assert reply.startswith("250 ")
        # Woken by the committer's datagram: the worker's only other timer (reclaiming
        # lapsed leases) is 30 s away with the default lease, and nothing was deferred.
        assert float(delay) < 1.0, delay
        postfix.wait_for_log(r"hold: .*from=<%s> to=<user%d@remote\.dlv\.test>"
                             % (re.escape(sender), n))
    wait_for(lambda: server.queued_ids() == [])
    assert postfix.queue_count("hold") == held_before + 3
    log = postfix.read_log()
    for sender in senders:
        assert len(re.findall(r"hold: .*from=<%s>" % re.escape(sender), log)) == 1


def test_450_then_250_is_retried_after_a_short_backoff(start, mx_port):
    script = {"RCPT": Replies("450 4.2.0 mailbox busy", "250 2.1.5 Ok")}
    with ScriptedServer(script=script, address="127.0.0.3", port=mx_port) as sink:
        server = start()
        send(server, "retry@client.test", ["later@retry.dlv.test"], "retry")
        queue_id = queue_id_of(server, "retry@client.test")
        deferred = wait_for_status(server, queue_id, "later@retry.dlv.test", "deferred")
        assert deferred[4].startswith("450 4.2.0 mailbox busy")
        with server.queue() as q:
            record = q.get(queue_id)
        assert record is None or record.state in ("deferred", "active")
        wait_for_status(server, queue_id, "later@retry.dlv.test", "sent")
        assert [m.rcpts for m in sink.messages] == [["RCPT TO:<later@retry.dlv.test>"]]
        assert b"body of retry" in sink.messages[0].content
        wait_for(lambda: server.queued_ids() == [])


def test_550_and_null_mx_bounce_at_once_and_the_message_fails(start, mx_port, postfix):
    script = {"RCPT": "550 5.1.1 no such user here"}
    with ScriptedServer(script=script, address="127.0.0.4", port=mx_port):
        aliases = os.path.join(tempfile.mkdtemp(), "aliases")
        with open(aliases, "w") as f:
            f.write("postmaster: root\n")
        server = start(local={"aliases_file": aliases})
        os.mkdir(os.path.join(server.workdir, "mail"))      # the test's /var/mail
        send(server, "", ["nobody@reject.dlv.test", "x@nullmx.dlv.test",
                          "fine@remote.dlv.test"], "bounce")
        queue_id = queue_id_of(server, "")
        bounced = wait_for_status(server, queue_id, "nobody@reject.dlv.test", "bounced")
        assert bounced[4].startswith("550 5.1.1 no such user here")
        null = wait_for_status(server, queue_id, "x@nullmx.dlv.test", "bounced")
        assert null[1] == "none" and null[4].startswith("556 5.1.10")
        wait_for_status(server, queue_id, "fine@remote.dlv.test", "sent")
        wait_for(lambda: "%s: failed" % queue_id in server.log())
        with server.queue() as q:
            record = q.get(queue_id)
        assert record.state == FAILED
        statuses = {r.address: r.status for r in record.envelope.recipients}
        assert statuses == {"nobody@reject.dlv.test": BOUNCED, "x@nullmx.dlv.test": BOUNCED,
                            "fine@remote.dlv.test": SENT}
        # Tried once only: a 5xx is final.
        assert len(delivery_lines(server, queue_id)) == 3
        # Each recipient's result, with the relay that gave it, is in the history that
        # `elemtactl queue show` prints.
        history = {entry[1]: entry for entry in record.history}
        assert set(history) == set(statuses)
        assert history["nobody@reject.dlv.test"][2:4] == [BOUNCED, "mx.reject.dlv.test[127.0.0.4]:%d"
                                                          % mx_port]
        assert history["nobody@reject.dlv.test"][4].startswith("550 5.1.1 no such user")
        shown = subprocess.run(
            [sys.executable, "-m", "elemta.cli.elemtactl", "queue", "show", "--spool-dir",
             server.spool, queue_id], stdout=subprocess.PIPE, universal_newlines=True,
            check=True).stdout
        assert re.search(r"History:\n(.*\n)*.*<nobody@reject\.dlv\.test>  bounced via "
                         r"mx\.reject\.dlv\.test\[127\.0\.0\.4\]:\d+: 550 5\.1\.1 no such user",
                         shown), shown
        # Mail from <> is never bounced to its sender; postmaster gets a double bounce.
        notice = wait_for(lambda: re.search(
            r"%s: sender non-delivery notification: (\w+)" % queue_id, server.log())).group(1)
        wait_for_status(server, notice, "postmaster", "sent")
        [report] = mailbox.mbox(os.path.join(server.workdir, "mail", "root"))
        assert report["Return-Path"] == "<>"
        assert report["Subject"] == "Undelivered Mail Returned to Sender"
        failed = [part for part in report.walk()
                  if part.get_content_type() == "message/delivery-status"][0]
        assert "Final-Recipient: rfc822; nobody@reject.dlv.test" in str(failed)


def test_an_mx_that_refuses_connections_falls_back_to_the_next(start, postfix):
    server = start()
    send(server, "fallback@client.test", ["someone@fallback.dlv.test"], "fallback")
    queue_id = queue_id_of(server, "fallback@client.test")
    sent = wait_for_status(server, queue_id, "someone@fallback.dlv.test", "sent")
    assert sent[1].startswith("mx.fallback.dlv.test[127.0.0.1]:")
    assert re.search(r"%s: connect to down\.fallback\.dlv\.test\[127\.0\.0\.2\]:\d+: "
                     r"Connection refused" % queue_id, server.log())
    postfix.wait_for_log(r"hold: .*from=<fallback@client\.test> to=<someone@fallback")
    assert not [line for line in delivery_lines(server, queue_id) if line[3] != "sent"]


def test_an_mx_that_greets_with_421_falls_back_to_the_next(start, mx_port, postfix):
    script = {"GREETING": "421 4.3.2 too busy, try another"}
    with ScriptedServer(script=script, address="127.0.0.18", port=mx_port) as busy:
        server = start()
        send(server, "busy@client.test", ["someone@busy.dlv.test"], "busy")
        queue_id = queue_id_of(server, "busy@client.test")
        sent = wait_for_status(server, queue_id, "someone@busy.dlv.test", "sent")
    assert sent[1].startswith("mx.remote.dlv.test[127.0.0.1]:")
    assert len(busy.sessions) == 1 and busy.messages == []
    postfix.wait_for_log(r"hold: .*from=<busy@client\.test> to=<someone@busy\.dlv")


def test_a_killed_delivery_worker_loses_nothing(start, mx_port):
    script = {"DOT": Replies(HANG, "250 2.0.0 Ok: queued the second time")}
    with ScriptedServer(script=script, address="127.0.0.5", port=mx_port) as sink:
        server = start()
        send(server, "crash@client.test", ["victim@slow.dlv.test"], "crash")
        queue_id = queue_id_of(server, "crash@client.test")
        # The worker has sent the whole message and waits for the reply to the final dot.
        wait_for(lambda: sink.sessions and "DATA" in sink.sessions[0].commands)
        time.sleep(0.3)
        with server.queue() as q:
            assert q.get(queue_id).state == "active"
        [pid] = delivery_pids(server)
        os.kill(pid, signal.SIGKILL)
        # Due again as soon as the master has reaped it, not when its lease lapses.
        wait_for(lambda: re.search(r"%s: its delivery worker %d died; due again"
                                   % (queue_id, pid), server.log()), 5)
        wait_for_status(server, queue_id, "victim@slow.dlv.test", "sent", timeout=15)
        wait_for(lambda: server.queued_ids() == [])
        # At most twice, never lost: the first copy was never acknowledged here.
        assert 1 <= len(sink.messages) <= 2
        assert all(b"body of crash" in m.content for m in sink.messages)


def test_a_bounce_reaches_the_sender_as_an_rfc3464_report(start, mx_port, postfix):
    script = {"RCPT": "550 5.1.1 no such user here"}
    # Its own address: a stopped sink's port stays bound while its accept thread waits.
    with ScriptedServer(script=script, address="127.0.0.6", port=mx_port):
        server = start()
        send(server, "owner@remote.dlv.test", ["nobody@refuse.dlv.test"], "to bounce")
        queue_id = queue_id_of(server, "owner@remote.dlv.test")
        wait_for_status(server, queue_id, "nobody@refuse.dlv.test", "bounced")
        match = postfix.wait_for_log(r"(\w+): hold: .*from=<> to=<owner@remote\.dlv\.test>")
    raw = subprocess.run(["postcat", "-c", postfix.config_dir, "-h", "-b", "-q",
                          match.group(1)], stdout=subprocess.PIPE, check=True).stdout
    report = email.message_from_bytes(raw, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    text, status, original = report.get_payload()
    assert "nobody@refuse.dlv.test" in text.get_content()
    assert status.get_content_type() == "message/delivery-status"
    per_message, per_recipient = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; mx.test"
    assert per_recipient["Final-Recipient"] == "rfc822; nobody@refuse.dlv.test"
    assert per_recipient["Action"] == "failed"
    assert per_recipient["Status"] == "5.1.1"
    assert "550 5.1.1 no such user here" in per_recipient["Diagnostic-Code"]
    assert original.get_content_type() == "text/rfc822-headers"
    assert b"Subject: to bounce" in original.get_payload(decode=True) or \
        "Subject: to bounce" in str(original.get_payload())
    # The DSN itself was delivered and removed; the bounced message stays failed.
    wait_for(lambda: server.queued_ids() == [queue_id])


def test_transport_map_wins_over_relayhost_which_wins_over_mx(start, mx_port, postfix):
    with ScriptedServer(address="127.0.0.7", port=mx_port) as sink:
        server = start(relayhost="[127.0.0.1]:%d" % mx_port,
                       transport=[{"domain": ".mapped.test",
                                   "nexthop": "smtp:[127.0.0.7]:%d" % mx_port}])
        send(server, "routes@client.test", ["a@nowhere.test", "b@sub.mapped.test",
                                            "c@nullmx.dlv.test"], "routes")
        queue_id = queue_id_of(server, "routes@client.test")
        relayed = wait_for_status(server, queue_id, "a@nowhere.test", "sent")
        assert relayed[1] == "127.0.0.1[127.0.0.1]:%d" % mx_port
        # The relay host takes even a null-MX domain's mail: no MX lookup is made.
        wait_for_status(server, queue_id, "c@nullmx.dlv.test", "sent")
        mapped = wait_for_status(server, queue_id, "b@sub.mapped.test", "sent")
        assert mapped[1] == "127.0.0.7[127.0.0.7]:%d" % mx_port
        assert [m.rcpts for m in sink.messages] == [["RCPT TO:<b@sub.mapped.test>"]]
        postfix.wait_for_log(r"hold: .*from=<routes@client\.test>")
        wait_for(lambda: server.queued_ids() == [])


def test_a_stopping_worker_gives_back_what_it_could_not_finish(start, mx_port):
    with ScriptedServer(script={"DOT": HANG}, address="127.0.0.8", port=mx_port) as sink:
        server = start(master={"stop_grace": 0.5})
        send(server, "stuck@client.test", ["x@stuck.dlv.test"], "stuck")
        queue_id = queue_id_of(server, "stuck@client.test")
        wait_for(lambda: sink.sessions and "DATA" in sink.sessions[0].commands)
        assert server.stop() == []
    assert "%s: delivery cut short by the stop; due again" % queue_id in server.log()
    with server.queue() as q:
        record = q.get(queue_id)
    # Due now, not after the 15-minute lease: the next worker sends it at once.
    assert record.state == "deferred" and record.next_attempt <= time.time()


def test_one_connection_carries_messages_sent_one_after_another(start, mx_port):
    """Like Postfix's connection cache: the next message to the same server reuses the
    connection (after an RSET) instead of a new TCP, greeting and EHLO."""
    with ScriptedServer(address="127.0.0.9", port=mx_port) as sink:
        server = start(relayhost="[127.0.0.9]:%d" % mx_port)
        for n in range(3):
            sender = "reuse%d@client.test" % n
            send(server, sender, ["r%d@far.test" % n], "reuse %d" % n)
            wait_for_status(server, queue_id_of(server, sender), "r%d@far.test" % n, "sent")
        assert len(sink.messages) == 3
        assert len(sink.sessions) == 1
        assert sink.sessions[0].commands.count("RSET") == 2


class ConcurrencyGauge:
    """A DOT reply that takes its time and notes how many transactions overlap."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.now = self.most = 0
        self.lock = threading.Lock()

    def __call__(self, session, argument):
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(self.seconds)
        with self.lock:
            self.now -= 1
        return "250 2.0.0 Ok: queued"


@pytest.mark.parametrize("address, limits, expected", [
    ("127.0.0.10", {}, 3),
    ("127.0.0.11", {"destination_limits": [{"domain": "127.0.0.11", "limit": 1}]}, 1)])
def test_a_destination_limit_holds_across_all_delivery_workers(start, mx_port, address,
                                                               limits, expected):
    gauge = ConcurrencyGauge(0.3)
    with ScriptedServer(script={"DOT": gauge}, address=address, port=mx_port) as sink:
        server = start(workers=2, destination_concurrency=3,
                       relayhost="[%s]:%d" % (address, mx_port), **limits)
        wait_for(lambda: len(delivery_pids(server)) == 2)
        senders = ["limit%d@client.test" % n for n in range(8)]
        for sender in senders:
            send(server, sender, ["x@limited.test"], "limit")
        wait_for(lambda: len(sink.messages) == 8, timeout=20)
    # Neither a share per worker (3 // 2 = 1 each) nor one limit per worker: the limit
    # itself, whichever workers took the messages (test_a_killed_worker_cannot_keep_a_
    # destination_slot shows two processes sharing slots).
    assert gauge.most == expected


def test_a_killed_worker_cannot_keep_a_destination_slot(tmp_path):
    from elemta.delivery.concurrency import DestinationSlots
    from elemta.delivery.routing import Destination
    path = str(tmp_path / "run" / "destinations.lock")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from elemta.delivery.concurrency import DestinationSlots\n"
         "from elemta.delivery.routing import Destination\n"
         "slots = DestinationSlots(sys.argv[1], 1)\n"
         "with slots.hold(Destination('smtp', 'one.test', 25, True)):\n"
         "    print('held', flush=True); time.sleep(60)\n", path],
        stdout=subprocess.PIPE, universal_newlines=True)
    try:
        assert holder.stdout.readline() == "held\n"
        slots = DestinationSlots(path, 1)
        one, other = (Destination("smtp", "one.test", 25, True),
                      Destination("smtp", "other.test", 25, True))
        assert slots._try(one.key, 1) is None            # the other process has it
        with slots.hold(other):                          # other destinations are free
            assert slots.held() == 1
        holder.kill()
        holder.wait()
        with slots.hold(one):                            # its lock died with it
            assert slots.held() == 1
    finally:
        holder.kill()
        holder.wait()


def test_a_delivery_longer_than_its_lease_is_not_taken_for_a_dead_workers(start, mx_port):
    """The worker renews the lease while the slow server takes its time, so neither it nor
    the other worker reclaims the message and sends it a second time."""
    slow = ConcurrencyGauge(3.0)
    with ScriptedServer(script={"DOT": slow}, address="127.0.0.12", port=mx_port) as sink:
        server = start(workers=2, lease=1.0, relayhost="[127.0.0.12]:%d" % mx_port)
        send(server, "slow@client.test", ["x@slow.test"], "slow")
        queue_id = queue_id_of(server, "slow@client.test")
        wait_for_status(server, queue_id, "x@slow.test", "sent", timeout=15)
        time.sleep(1.0)         # a second delivery would have begun by now
    assert "lease lapsed" not in server.log()
    assert len(sink.messages) == 1


def reports_at(sink):
    """The DSNs a sink received: (per-recipient fields, the report) each."""
    found = []
    for message in sink.messages:
        report = email.message_from_bytes(message.content, policy=email.policy.default)
        status = [p for p in report.walk()
                  if p.get_content_type() == "message/delivery-status"][0]
        found.append((status.get_payload()[1], report))
    return found


def test_the_sender_is_warned_once_of_a_delay_then_told_when_the_message_expires(
        start, mx_port):
    notices = ScriptedServer(address="127.0.0.13", port=mx_port)
    busy = ScriptedServer(script={"RCPT": "450 4.2.0 mailbox busy"}, address="127.0.0.14",
                          port=mx_port)
    with notices, busy:
        server = start(delay_warning_time=1.0, queue_lifetime=3.0, transport=[
            {"domain": "sender.test", "nexthop": "smtp:[127.0.0.13]:%d" % mx_port},
            {"domain": "busy.test", "nexthop": "smtp:[127.0.0.14]:%d" % mx_port}])
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
            client.ehlo()
            client.sendmail("me@sender.test", ["x@busy.test"], message("patience"),
                            mail_options=["RET=FULL"])
        queue_id = queue_id_of(server, "me@sender.test")
        wait_for(lambda: len(notices.messages) == 2, timeout=20)
        wait_for(lambda: server.queued_ids() == [queue_id])
    (delayed, first), (failed, second) = reports_at(notices)
    assert first["Subject"] == "Delayed Mail (still being retried)"
    assert delayed["Action"] == "delayed" and delayed["Status"] == "4.2.0"
    assert "Will-Retry-Until" in delayed
    assert delayed["Final-Recipient"] == "rfc822; x@busy.test"
    assert failed["Action"] == "failed"
    assert "message expired after 3 seconds in the queue" in failed["Diagnostic-Code"]
    assert "450 4.2.0 mailbox busy" in failed["Diagnostic-Code"]
    assert [m.rcpts for m in notices.messages] == [["RCPT TO:<me@sender.test>"]] * 2
    # RET=FULL returns the whole message with the failure only; the warning has headers.
    first_original, second_original = first.get_payload()[2], second.get_payload()[2]
    assert first_original.get_content_type() == "text/rfc822-headers"
    assert "body of patience" not in first_original.as_string()
    assert second_original.get_content_type() == "message/rfc822"
    assert "body of patience" in second_original.as_string()


def test_notify_success_gets_a_relayed_notice_only_when_the_next_hop_lacks_dsn(
        start, mx_port):
    no_dsn = [e for e in DEFAULT_EXTENSIONS if e != "DSN"]
    notices = ScriptedServer(address="127.0.0.15", port=mx_port)
    plain = ScriptedServer(extensions=no_dsn, address="127.0.0.16", port=mx_port)
    capable = ScriptedServer(address="127.0.0.17", port=mx_port)
    with notices, plain, capable:
        server = start(transport=[
            {"domain": "sender.test", "nexthop": "smtp:[127.0.0.15]:%d" % mx_port},
            {"domain": "plain.test", "nexthop": "smtp:[127.0.0.16]:%d" % mx_port},
            {"domain": "capable.test", "nexthop": "smtp:[127.0.0.17]:%d" % mx_port}])
        for n, domain in enumerate(["plain.test", "capable.test"]):
            with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
                client.ehlo()
                client.sendmail("me@sender.test", ["y@%s" % domain], message("ok %d" % n),
                                rcpt_options=["NOTIFY=SUCCESS"])
        wait_for(lambda: len(plain.messages) == 1 and len(capable.messages) == 1)
        wait_for(lambda: len(notices.messages) == 1 and server.queued_ids() == [])
        time.sleep(0.5)         # a notice for capable.test would have come by now
    [(relayed, report)] = reports_at(notices)
    assert report["Subject"] == "Successful Mail Delivery Report"
    assert relayed["Final-Recipient"] == "rfc822; y@plain.test"
    assert relayed["Action"] == "relayed" and relayed["Status"] == "2.0.0"
    assert capable.messages[0].rcpts == ["RCPT TO:<y@capable.test> NOTIFY=SUCCESS"]


def test_a_tls_policy_entry_requires_tls_for_its_domain_only(start, mx_port):
    """Postfix's smtp_tls_policy_maps: the same MX host takes mail for a domain with the
    default "may" in clear, and not for one whose policy says "encrypt", not even over
    the connection the first message left open."""
    with ScriptedServer(address="127.0.0.19", port=mx_port) as plain:   # no STARTTLS
        server = start(tls_policy=[{"domain": "tlsstrict.dlv.test", "level": "encrypt"}])
        send(server, "tls@client.test", ["a@tlsmay.dlv.test"], "may")
        wait_for_status(server, queue_id_of(server, "tls@client.test"), "a@tlsmay.dlv.test",
                        "sent")
        send(server, "tls2@client.test", ["b@tlsstrict.dlv.test"], "strict")
        deferred = wait_for_status(server, queue_id_of(server, "tls2@client.test"),
                                   "b@tlsstrict.dlv.test", "deferred")
        assert "TLS" in deferred[4], deferred
        assert [m.rcpts for m in plain.messages] == [["RCPT TO:<a@tlsmay.dlv.test>"]]


def test_an_idn_local_domain_is_delivered_locally_however_it_is_spelled(start, mx_port):
    """The smtpd accepts <root@XN--FSQU00A.TEST> as local when local_domains has
    例子.test; routing must agree and deliver it here, not hand it to the relay host."""
    with ScriptedServer(address="127.0.0.20", port=mx_port) as relay:
        server = start(relayhost="[127.0.0.20]:%d" % mx_port,
                       relay={"local_domains": ["例子.test"]})
        os.mkdir(os.path.join(server.workdir, "mail"))      # the test's /var/mail
        send(server, "idn@client.test", ["root@XN--FSQU00A.TEST"], "idn")
        queue_id = queue_id_of(server, "idn@client.test")
        sent = wait_for_status(server, queue_id, "root@XN--FSQU00A.TEST", "sent")
    assert sent[1] == "local"
    assert relay.sessions == []
    [delivered] = mailbox.mbox(os.path.join(server.workdir, "mail", "root"))
    assert delivered["Subject"] == "idn"


def test_a_failed_message_is_removed_after_failed_retention(start, mx_port):
    """Bounced and told of, a failed message stays for the admin to look at, then goes
    (Postfix removes it at once): the queue does not grow with every 5xx."""
    with ScriptedServer(script={"RCPT": "550 5.1.1 no such user"}, address="127.0.0.21",
                        port=mx_port):
        server = start(failed_retention=1.0, relayhost="[127.0.0.21]:%d" % mx_port)
        send(server, "", ["gone@far.test"], "gone")
        queue_id = queue_id_of(server, "")
        wait_for(lambda: "%s: failed" % queue_id in server.log())
        with server.queue() as q:
            assert q.get(queue_id).state == FAILED
        wait_for(lambda: "%s: removed (failed 1 seconds ago or more)" % queue_id
                 in server.log(), timeout=15)
    assert queue_id not in server.queued_ids()      # (its double bounce may wait still)
    with server.queue() as q:
        assert q.get(queue_id) is None


def test_a_delivery_that_breaks_unexpectedly_waits_a_backoff_not_its_lease(start, mx_port):
    """Whatever breaks inside one delivery (here its spool file became a directory)
    leaves the message deferred with the reason, to be tried after a backoff, rather
    than active and untouched until its 15-minute lease lapses."""
    script = {"GREETING": Replies("421 4.3.2 busy", "220 fake.test ESMTP")}
    with ScriptedServer(script=script, address="127.0.0.22", port=mx_port):
        server = start(min_backoff=3.0, max_backoff=3.0,
                       relayhost="[127.0.0.22]:%d" % mx_port)
        send(server, "vanish@client.test", ["x@vanish.test"], "vanish")
        queue_id = queue_id_of(server, "vanish@client.test")
        wait_for_status(server, queue_id, "x@vanish.test", "deferred")
        with server.queue() as q:
            os.unlink(q.store.path(queue_id))
            os.mkdir(q.store.path(queue_id))
        wait_for(lambda: "%s: delivery failed" % queue_id in server.log(), timeout=10)

        def deferred():
            with server.queue() as q:
                record = q.get(queue_id)
            return record.state == "deferred" and record
        record = wait_for(deferred)
    assert "is not a regular file" in record.last_error
    assert record.next_attempt > time.time()


def test_a_message_whose_file_is_gone_is_dropped_not_retried_forever(start, mx_port):
    """The files are the truth: a record left without its file (its removal could not
    reach a full index, say) is dropped when next claimed, as reconcile would."""
    script = {"GREETING": Replies("421 4.3.2 busy", "220 fake.test ESMTP")}
    with ScriptedServer(script=script, address="127.0.0.41", port=mx_port):
        server = start(min_backoff=1.0, max_backoff=1.0,
                       relayhost="[127.0.0.41]:%d" % mx_port)
        send(server, "vanish@client.test", ["x@vanish.test"], "vanish")
        queue_id = queue_id_of(server, "vanish@client.test")
        wait_for_status(server, queue_id, "x@vanish.test", "deferred")
        with server.queue() as q:
            os.unlink(q.store.path(queue_id))
        wait_for(lambda: server.queued_ids() == [], timeout=10)
    # The record goes first, then the log line is written.
    wait_for(lambda: "%s: message file gone (removed before its record could be); record "
             "dropped" % queue_id in server.log(), timeout=5)


def test_a_recipient_delivered_once_is_never_sent_again(start, mx_port):
    """Issue 4 req 5: results are per recipient; the retry carries only the one that
    waited."""
    later = Replies("450 4.2.0 mailbox busy", "250 2.1.5 Ok")

    def rcpt(session, argument):
        return later(session, argument) if "later@" in argument else "250 2.1.5 Ok"
    with ScriptedServer(script={"RCPT": rcpt}, address="127.0.0.23", port=mx_port) as sink:
        server = start(relayhost="[127.0.0.23]:%d" % mx_port)
        send(server, "split@client.test", ["now@split.test", "later@split.test"], "split")
        queue_id = queue_id_of(server, "split@client.test")
        wait_for_status(server, queue_id, "later@split.test", "sent")
        wait_for(lambda: server.queued_ids() == [])
    # (a message lists the recipients the server accepted for it)
    assert [m.rcpts for m in sink.messages] == [["RCPT TO:<now@split.test>"],
                                                ["RCPT TO:<later@split.test>"]]
