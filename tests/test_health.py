"""The health routes of a running Elemta: /api/v1/health says which children run, the
queue and its oldest message, the spool's disk; /live answers while the api does;
/ready is 503, naming the problem, when mail cannot come in."""

import json
import os
import signal
import smtplib
import time
import urllib.error
import urllib.request

from tests.harness import wait_for
from tests.test_metrics import BODY, sessions_on_every_worker, smtpd_workers, start_server


def get(api_port, path):
    """(status, JSON body) of GET path; no token: health needs none."""
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d%s" % (api_port, path),
                                    timeout=10) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def test_health_tells_children_queue_and_disk(elemta_server, tmp_path, monkeypatch):
    server, api_port = start_server(elemta_server, tmp_path, monkeypatch)
    with smtplib.SMTP("127.0.0.1", server.port) as smtp:
        smtp.sendmail("a@c.test", ["b@example.test"], BODY)
    queue_id = server.queued_ids()[0]
    with server.queue() as queue:
        list(queue.hold([queue_id]))
    arrival = server.message(queue_id)[0].arrival

    status, health = get(api_port, "/api/v1/health")
    assert (status, health["status"], health["ready"], health["problems"]) == \
        (200, "ok", True, [])
    children = health["children"]
    assert children["smtpd"] == {"up": 2, "hung": 0, "expected": 2}
    assert children["api"] == {"up": 1, "hung": 0, "expected": 1}
    assert children["pickup"] == {"up": 1, "hung": 0, "expected": 1}
    assert children["delivery"] == {"up": 0, "hung": 0, "expected": 0}  # delivery.workers 0
    assert children["acme"] == children["acme-http"] == children["acme-tls"] == {
        "up": 0, "hung": 0, "expected": 0}                                         # no acme
    assert set(children) == {"smtpd", "api", "delivery", "pickup", "local", "showq", "acme",
                             "acme-http", "acme-tls"}
    assert health["queue"]["messages"] == 1
    assert health["queue"]["by_state"] == {"hold": 1}
    age = health["queue"]["oldest_age_seconds"]["hold"]
    assert abs(age - (time.time() - arrival)) < 5
    disk = os.statvfs(server.spool)
    spool = health["spool"]
    assert spool["size_bytes"] == disk.f_blocks * disk.f_frsize
    assert abs(spool["available_bytes"] - disk.f_bavail * disk.f_frsize) < 64 << 20
    assert spool["min_free_bytes"] > 0

    assert get(api_port, "/api/v1/health/live") == (200, {"status": "ok"})
    status, ready = get(api_port, "/api/v1/health/ready")
    assert (status, ready["status"], ready["problems"]) == (200, "ready", [])

    # What runs, not what the configuration says: with the master stopped (it cannot
    # replace a child meanwhile) the children killed are missing from the count, and
    # back once the master goes on and replaces them.
    pickup = [pid for pid, title in server.titles().items()
              if title == "elemta: pickup"][0]
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        os.kill(pickup, signal.SIGKILL)
        wait_for(lambda: pickup_count(api_port) == {"up": 0, "hung": 0, "expected": 1})
        status, ready = get(api_port, "/api/v1/health/ready")
        assert status == 200                  # pickup is not needed to receive mail
        # No smtpd worker: not ready, whatever else is fine.
        for pid in smtpd_workers(server.process.pid):
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: get(api_port, "/api/v1/health/ready")[0] == 503)
        status, ready = get(api_port, "/api/v1/health/ready")
        assert ready["problems"] == ["no smtpd worker is running"]
        assert ready["children"]["smtpd"] == {"up": 0, "hung": 0, "expected": 2}
        assert get(api_port, "/api/v1/health/live")[0] == 200
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    wait_for(lambda: pickup_count(api_port) == {"up": 1, "hung": 0, "expected": 1})
    wait_for(lambda: get(api_port, "/api/v1/health/ready")[0] == 200)


def test_a_worker_without_heartbeat_is_hung_not_up(elemta_server, tmp_path, monkeypatch):
    """A worker whose loop stands still (stopped here) is counted hung once its heartbeat
    is older than half of master.heartbeat_timeout; with every smtpd worker hung the
    node is not ready. The master is stopped too, so it cannot kill them meanwhile."""
    server, api_port = start_server(elemta_server, tmp_path, monkeypatch,
                                    master={"heartbeat_timeout": 4})
    workers = smtpd_workers(server.process.pid)
    # Both serving (a worker still starting is counted up: it beats once booted).
    for sessions in sessions_on_every_worker(server.port, workers).values():
        for smtp in sessions:
            smtp.close()
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        os.kill(workers[0], signal.SIGSTOP)
        seen = []
        try:
            wait_for(lambda: seen.append(get(api_port, "/api/v1/health")[1]["children"]
                                         ["smtpd"]) or seen[-1] == {
                "up": 1, "hung": 1, "expected": 2}, timeout=30)
        except AssertionError:
            raise AssertionError("smtpd workers seen: %s" % seen[-3:]) from None
        assert get(api_port, "/api/v1/health/ready")[0] == 200    # one still serves
        os.kill(workers[1], signal.SIGSTOP)
        wait_for(lambda: get(api_port, "/api/v1/health/ready")[0] == 503)
        status, ready = get(api_port, "/api/v1/health/ready")
        assert ready["children"]["smtpd"] == {"up": 0, "hung": 2, "expected": 2}
        assert ready["problems"] == [
            "every smtpd worker is hung: no heartbeat for over 2s (the master kills one "
            "at master.heartbeat_timeout, 4s)"]
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
        wait_for(lambda: get(api_port, "/api/v1/health/ready")[0] == 200)
    finally:
        for pid in workers:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        os.kill(server.process.pid, signal.SIGCONT)


def pickup_count(api_port):
    return get(api_port, "/api/v1/health")[1]["children"]["pickup"]


def test_a_full_spool_is_not_ready_and_says_why(elemta_server, tmp_path, monkeypatch):
    reserve = 1 << 60                         # more than any disk here has free
    server, api_port = start_server(elemta_server, tmp_path, monkeypatch,
                                    queue={"min_free_space": reserve})
    status, ready = get(api_port, "/api/v1/health/ready")
    assert (status, ready["status"], ready["ready"]) == (503, "not ready", False)
    [problem] = ready["problems"]
    assert problem.startswith("the spool's file system has ")
    assert problem.endswith("no more than the %d it keeps back: new mail is refused"
                            % reserve)
    # Liveness is another matter: the api answers, nothing to restart.
    assert get(api_port, "/api/v1/health/live") == (200, {"status": "ok"})
    status, health = get(api_port, "/api/v1/health")
    assert (status, health["status"], health["ready"]) == (200, "ok", False)
    [said] = health["problems"]               # the same (the free bytes move)
    assert said.startswith("the spool's file system has ") and said.endswith(
        "no more than the %d it keeps back: new mail is refused" % reserve)
    assert health["spool"]["min_free_bytes"] == reserve
    # And the server means it: MAIL FROM is refused for want of room.
    with smtplib.SMTP("127.0.0.1", server.port) as smtp:
        smtp.ehlo()
        code, _ = smtp.mail("a@c.test")
    assert code == 452
