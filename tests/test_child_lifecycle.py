"""Crash loops and the one child life cycle, as an admin meets them: a child that cannot
start (its port taken, its TLS key gone) is tried again less and less often with one clear
log line, the rest keeps serving, and it comes back on its own once the cause is gone;
pickup and api live the life every child does (signals, heartbeat, orphan exit, socket
files removed), pickup beats through a big maildrop batch, and the api gives a request
under way master.stop_grace. Real master, real children, real sockets.

See also: elemta/master.py (back-off), elemta/util/child.py (the life cycle),
tests/test_master.py and tests/test_workers.py (smtpd and delivery).
"""

import http.client
import os
import re
import shutil
import signal
import socket
import time

from elemta.util.procs import children as children_of
from tests.harness import ElemtaServer, free_port, wait_for
from tests.test_master import alive, transaction

CANNOT_START = re.compile(r"(\w+) child cannot start: (.*); trying again in ([\d.]+) s$")


def failures(server, kind):
    """[(cause, delay in seconds)] of the master's cannot-start lines about kind."""
    found = []
    for line in server.log().splitlines():
        match = CANNOT_START.search(line)
        if match and match.group(1) == kind:
            found.append((match.group(2), float(match.group(3))))
    return found


def pids_titled(server, title):
    return {pid for pid, t in children_of(server.process.pid).items() if t == title}


def api_health(port):
    """The api's answer to GET /api/v1/health, or None while it does not listen."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return s.recv(200)
    except OSError:
        return None


# ---- a child that cannot start -------------------------------------------------------------

def test_api_port_taken_is_backed_off_and_comes_up_once_freed(elemta_server):
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen(1)
    port = squatter.getsockname()[1]
    try:
        server = elemta_server(api={"port": port})
        expected = ("cannot listen on 127.0.0.1 port %d: Address already in use" % port, 2.0)
        wait_for(lambda: failures(server, "api"), timeout=10)
        first_seen = time.monotonic()
        assert failures(server, "api")[0] == expected
        # Over the next 10 s: tries after 2 and 4 more seconds, then none for 8 (a child
        # respawned every 2 s would have failed five or six times by then).
        time.sleep(10)
        assert failures(server, "api") == [(expected[0], 2.0), (expected[0], 4.0),
                                           (expected[0], 8.0)]
        # One line per failure: no generic "ended with" warning, no traceback.
        assert "api child" not in server.log().replace("api child cannot start", "")
        # The rest keeps serving meanwhile.
        assert transaction(server.port)[1].startswith(b"220 ")
    finally:
        squatter.close()
    # The next try (at most 8 s away) finds the port free: no restart needed.
    answer = wait_for(lambda: api_health(port), timeout=20)
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert time.monotonic() - first_seen < 2 + 4 + 8 + 5
    assert len(failures(server, "api")) == 3
    assert pids_titled(server, "elemta: api")


def test_smtpd_whose_tls_key_is_gone_is_backed_off_while_the_others_serve(
        elemta_server, tls_files, tmp_path):
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    shutil.copy(tls_files[0], cert)
    shutil.copy(tls_files[1], key)
    server = elemta_server(smtpd={"hostname": "mx.test", "workers": 2},
                           tls={"cert_file": cert, "key_file": key})
    master = server.process.pid
    workers = wait_for(lambda: len(pids_titled(server, "elemta: smtpd")) == 2
                       and pids_titled(server, "elemta: smtpd"))
    # The key is gone (a renewal script half done); then a worker dies (past the crash
    # window, so that death alone holds nothing back): its replacement must read the key
    # again and cannot.
    time.sleep(5.5)
    os.rename(key, key + ".away")
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    cause = ("cannot load tls.cert_file %s with tls.key_file %s: No such file or directory"
             % (cert, key))
    wait_for(lambda: len(failures(server, "smtpd")) >= 2, timeout=15)
    assert failures(server, "smtpd")[:2] == [(cause, 2.0), (cause, 4.0)]
    # The surviving worker serves all along.
    assert transaction(server.port)[1].startswith(b"220 mx.test")
    assert pids_titled(server, "elemta: smtpd") == workers - {victim}
    os.rename(key + ".away", key)
    # Back to two workers at the next try (at most 8 s after the last failure).
    wait_for(lambda: len(pids_titled(server, "elemta: smtpd")) == 2, timeout=20)
    assert len(failures(server, "smtpd")) <= 3
    log = server.log()
    assert "smtpd child failed" not in log and "Traceback" not in log
    assert master == server.process.pid and alive(master)


# ---- pickup and api on the shared life cycle ----------------------------------------------

def _fill_maildrop(server, count, size):
    """count submissions of about size bytes waiting in the maildrop of a stopped server
    (one written as sendmail writes it, the rest copies of it)."""
    from elemta.queue import maildrop
    from elemta.queue.model import Recipient
    writer = maildrop.MaildropWriter(server.spool)
    writer.write(b"From: Cron Daemon <cron@example.org>\r\nSubject: a big batch\r\n\r\n"
                 + b"x" * size + b"\r\n")
    name = writer.finish("cron@example.org", [Recipient("root@example.test")])
    directory = maildrop.maildrop_dir(server.spool)
    with open(os.path.join(directory, name), "rb") as f:
        data = f.read()
    for i in range(count - 1):
        with open(os.path.join(directory, "%s-%05d" % (name, i)), "wb") as f:
            f.write(data)
    return directory


def test_pickup_beats_through_a_big_batch(tmp_path):
    """500 cron messages waiting at start, each DKIM-signed by pickup (a batch of 100
    takes seconds), with heartbeat_timeout 1 s: pickup must not look hung."""
    from elemta.plugins.dkim import generate_key
    count = 500
    key = generate_key("example.org", "s1", str(tmp_path / "s1.key"))
    server = ElemtaServer(tmp_path / "server", {
        "master": {"heartbeat_timeout": 1},
        "plugins": {"dkim": {"enabled": True, "sign": True, "domain": "example.org",
                             "selector": "s1", "key_file": key.key_file}},
        "api": {"enabled": False}})
    server.start()
    server.stop()
    try:
        directory = _fill_maildrop(server, count, 60000)
        earlier = len(server.log())
        server.start()
        wait_for(lambda: not os.listdir(directory), timeout=120)
        assert len(server.queued_ids()) == count
        log = server.log()[earlier:]
        assert "pickup child" not in log, [l for l in log.splitlines() if "pickup child" in l]
        assert b"DKIM-Signature: " in server.message(server.queued_ids()[-1])[1]
    finally:
        assert server.stop() == []


def test_pickup_stops_between_messages_and_loses_none(tmp_path):
    count = 3000
    server = ElemtaServer(tmp_path / "server", {"api": {"enabled": False}})
    server.start()
    server.stop()
    directory = _fill_maildrop(server, count, 100)
    server.start()
    wait_for(lambda: len(os.listdir(directory)) < count, timeout=30)
    start = time.monotonic()
    assert server.stop() == []
    assert time.monotonic() - start < 5           # not after the whole maildrop
    assert server.process.returncode == 0
    queued, waiting = len(server.queued_ids()), len(os.listdir(directory))
    assert queued + waiting == count and waiting > 0, (queued, waiting)
    assert "Traceback" not in server.log()


def test_api_stops_within_master_stop_grace(elemta_server):
    """A client in the middle of a request holds the api until master.stop_grace (1 s
    here), not a grace of its own."""
    api_port = free_port()
    server = elemta_server(master={"stop_grace": 1}, api={"port": api_port,
                                                          "read_timeout": 60})
    wait_for(lambda: api_health(api_port))
    slow = socket.create_connection(("127.0.0.1", api_port))
    slow.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n")     # and nothing more
    time.sleep(0.3)
    started = time.monotonic()
    try:
        assert server.stop() == []
    finally:
        slow.close()
    assert time.monotonic() - started < 4
    assert server.process.returncode == 0
    assert "did not stop" not in server.log()


def test_api_answers_a_request_in_flight_at_sigterm_within_master_stop_grace(elemta_server):
    """A client half-way through its request when the master is told to stop: the api
    takes no new connection, but the request, finished a second later, is answered
    (master.stop_grace 10 s here), and then everything stops cleanly."""
    api_port = free_port()
    server = elemta_server(master={"stop_grace": 10}, api={"port": api_port,
                                                           "read_timeout": 60})
    wait_for(lambda: api_health(api_port))
    api, = wait_for(lambda: pids_titled(server, "elemta: api"))
    slow = socket.create_connection(("127.0.0.1", api_port), timeout=10)
    try:
        slow.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n")
        time.sleep(0.3)                     # the api has read the first lines
        os.kill(server.process.pid, signal.SIGTERM)
        wait_for(lambda: api_health(api_port) is None)     # no new connections
        time.sleep(1)
        assert alive(api)
        slow.sendall(b"Connection: close\r\n\r\n")
        answer = b""
        while True:
            part = slow.recv(4096)
            if not part:
                break
            answer += part
    finally:
        slow.close()
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    server.process.wait(10)
    assert server.process.returncode == 0
    assert "api child %d ended (exit status 0)" % api in server.log()
    assert "did not stop" not in server.log()


def test_api_closes_idle_keep_alive_connections_when_it_stops(elemta_server):
    """A keep-alive connection idle after its answer holds nothing up: it is closed at
    once, and the api stops long before master.stop_grace (30 s here); a request sent
    on it before the stop was still answered."""
    api_port = free_port()
    server = elemta_server(master={"stop_grace": 30}, api={"port": api_port,
                                                           "read_timeout": 60})
    wait_for(lambda: api_health(api_port))
    api, = wait_for(lambda: pids_titled(server, "elemta: api"))
    idle = http.client.HTTPConnection("127.0.0.1", api_port, timeout=20)
    try:
        idle.request("GET", "/api/v1/health")
        answer = idle.getresponse()
        assert answer.status == 200 and answer.read() and not answer.will_close
        started = time.monotonic()
        os.kill(server.process.pid, signal.SIGTERM)
        assert idle.sock.recv(4096) == b""              # closed by the api, not by us
        server.process.wait(20)
    finally:
        idle.close()
    assert time.monotonic() - started < 15
    assert server.process.returncode == 0
    assert "api child %d ended (exit status 0)" % api in server.log()


def test_api_and_pickup_stop_at_once_on_sigquit(elemta_server):
    api_port = free_port()
    server = elemta_server(master={"stop_grace": 30}, api={"port": api_port,
                                                           "read_timeout": 60})
    wait_for(lambda: api_health(api_port))
    api, = wait_for(lambda: pids_titled(server, "elemta: api"))
    pickup, = wait_for(lambda: pids_titled(server, "elemta: pickup"))
    slow = socket.create_connection(("127.0.0.1", api_port))
    slow.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n")
    started = time.monotonic()
    try:
        assert server.stop(signal.SIGQUIT) == []
    finally:
        slow.close()
    assert time.monotonic() - started < 5
    log = server.log()
    assert "api child %d ended (exit status 0)" % api in log
    assert "pickup child %d ended (exit status 0)" % pickup in log


def test_api_and_pickup_reopen_their_log_on_sigusr1(elemta_server, tmp_path):
    log_path = str(tmp_path / "mail.log")
    api_port = free_port()
    server = elemta_server(logging={"target": log_path}, api={"port": api_port})
    wait_for(lambda: api_health(api_port))
    watched = [next(iter(wait_for(lambda: pids_titled(server, title))))
               for title in ("elemta: api", "elemta: pickup")]

    def logged():
        with open(log_path) as f:
            return f.read()

    wait_for(lambda: "elemta/pickup[%d]: pickup started" % watched[1] in logged())

    def open_logs(pid):
        names = set()
        for fd in os.listdir("/proc/%d/fd" % pid):
            try:
                names.add(os.readlink("/proc/%d/fd/%s" % (pid, fd)))
            except OSError:
                pass
        return {name for name in names if name.startswith(log_path)}

    assert all(open_logs(pid) == {log_path} for pid in watched)
    os.rename(log_path, log_path + ".1")
    os.kill(server.process.pid, signal.SIGUSR1)
    wait_for(lambda: all(open_logs(pid) == {log_path} for pid in watched))
    assert all(alive(pid) for pid in watched)
    assert "ended with" not in logged()


def test_hung_api_and_pickup_are_killed_and_replaced(elemta_server):
    api_port = free_port()
    server = elemta_server(master={"heartbeat_timeout": 2, "stop_grace": 3},
                           api={"port": api_port})
    wait_for(lambda: api_health(api_port))
    hung = [next(iter(wait_for(lambda: pids_titled(server, title))))
            for title in ("elemta: api", "elemta: pickup")]
    # Serving, not booting (a starting child has longer before its first beat is due).
    wait_for(lambda: "elemta/pickup[%d]: pickup started" % hung[1] in server.log())
    for pid in hung:
        os.kill(pid, signal.SIGSTOP)
    try:
        for kind, pid in zip(("api", "pickup"), hung):
            wait_for(lambda: "%s child %d sent no heartbeat for 2s; killing it" % (kind, pid)
                     in server.log(), timeout=6)
        # SIGABRT waits in a stopped process; SIGKILL KILL_AFTER (5 s) later does it.
        wait_for(lambda: not any(alive(pid) for pid in hung), timeout=10)
    finally:
        for pid in hung:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    wait_for(lambda: pids_titled(server, "elemta: api") - set(hung)
             and pids_titled(server, "elemta: pickup") - set(hung))
    assert wait_for(lambda: api_health(api_port)).startswith(b"HTTP/1.1 200 ")


def test_every_child_kind_leaves_when_the_master_is_killed(elemta_server):
    server = elemta_server(delivery={"workers": 1})
    titles = {"elemta: smtpd", "elemta: delivery", "elemta: local", "elemta: pickup",
              "elemta: api", "elemta: showq"}
    wait_for(lambda: set(children_of(server.process.pid).values()) == titles)
    os.kill(server.process.pid, signal.SIGKILL)
    wait_for(lambda: not server.group_pids(), timeout=10)


def test_children_remove_their_sockets_when_they_stop_but_not_a_newer_childs(
        elemta_server):
    """pickup, the delivery worker and the local agent each bind a socket in spool/run;
    after a reload the old ones leave the new ones' sockets of the same name alone, and
    after a stop nothing is left."""
    server = elemta_server(delivery={"workers": 1})
    run = os.path.join(server.spool, "run")

    def sockets():
        return {name for name in os.listdir(run) if name.endswith(".sock")}

    first = wait_for(lambda: len(sockets()) == 3 and sockets())
    assert {"pickup.sock", "local.sock"} < first
    old = set(children_of(server.process.pid))
    os.kill(server.process.pid, signal.SIGHUP)
    wait_for(lambda: not old & set(children_of(server.process.pid)))
    after_reload = wait_for(lambda: len(sockets()) == 3 and sockets())
    assert {"pickup.sock", "local.sock"} < after_reload and after_reload != first
    assert server.stop() == []
    assert sockets() == set()
