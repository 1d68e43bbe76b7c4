"""The master as an admin meets it: reload, stop, fast stop, crashed, retiring and hung
workers, the spool lock, --daemon, sd_notify and log files. Real processes, real sockets.

See also: tests/test_workers.py (titles, respawn, orphans, shared client limit),
elemta/master.py, elemta/smtpd/worker.py.
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from ruamel.yaml import YAML

from elemta.util import procs
from tests.harness import REPO, ElemtaServer, free_port, wait_for
from tests.test_workers import children_of

# Short enough for the tests, long enough that a session cut before it was cut on purpose.
GRACE = {"stop_grace": 3}
MESSAGE = b"Subject: master test\r\n\r\nhello\r\n"


# ---- a client that can stop anywhere ---------------------------------------------------

class Client:
    """One SMTP session over a raw socket, so a test can pause it anywhere (mid-DATA)."""

    def __init__(self, port, timeout=5, greet=True):
        """Connect; read the banner unless greet is False (read it later with reply())."""
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.file = self.sock.makefile("rb")
        self.banner = self.reply() if greet else None

    def reply(self):
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise EOFError("connection closed after %r" % b"".join(lines))
            lines.append(line)
            if line[3:4] != b"-":
                return b"".join(lines)

    def expect(self, line, code):
        self.sock.sendall(line.encode() + b"\r\n")
        reply = self.reply()
        assert reply.startswith(b"%d " % code) or reply.startswith(b"%d-" % code), (
            "%s -> %r" % (line, reply))
        return reply

    def start_data(self):
        """Banner, EHLO, MAIL, RCPT, DATA: the server now waits for the content."""
        assert self.banner.startswith(b"220 "), self.banner
        self.expect("EHLO client.test", 250)
        self.expect("MAIL FROM:<a@c.test>", 250)
        self.expect("RCPT TO:<b@example.test>", 250)
        self.expect("DATA", 354)

    def end_data(self, content=b""):
        """The rest of the content and the dot; returns the queue id from the 250."""
        self.sock.sendall(content + b".\r\n")
        reply = self.reply()
        assert reply.startswith(b"250 "), reply
        return reply.split(b"queued as ")[1].strip().decode()

    def closed_by_server(self):
        """True if the server has closed this session (EOF or reset, no reply)."""
        try:
            self.sock.sendall(b"NOOP\r\n")
            return self.file.readline() == b""
        except (ConnectionResetError, BrokenPipeError):
            return True

    def worker(self, server_port, pids):
        """Which of pids holds the server side of this connection, by socket inode."""
        client_port = self.sock.getsockname()[1]
        local, remote = "0100007F:%04X" % server_port, "0100007F:%04X" % client_port
        with open("/proc/net/tcp") as f:
            rows = [line.split() for line in f.readlines()[1:]]
        inode = next(int(r[9]) for r in rows if r[1] == local and r[2] == remote)
        target = "socket:[%d]" % inode
        for pid in pids:
            fd_dir = "/proc/%d/fd" % pid
            for fd in os.listdir(fd_dir):
                try:
                    if os.readlink(os.path.join(fd_dir, fd)) == target:
                        return pid
                except OSError:
                    continue
        return None

    def close(self):
        self.file.close()
        self.sock.close()


def transaction(port, content=MESSAGE):
    """A whole session with one message; (queue id, banner)."""
    client = Client(port)
    try:
        client.start_data()
        queue_id = client.end_data(content)
        client.expect("QUIT", 221)
        return queue_id, client.banner
    finally:
        client.close()


class Looper(threading.Thread):
    """Whole transactions back to back; every refusal or failed exchange is recorded."""

    def __init__(self, port, pause=0.0):
        super().__init__(daemon=True)
        self.port, self.pause = port, pause
        self.queued, self.banners, self.failures = [], [], []
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.is_set():
            client, step = None, "connect"
            try:
                client = Client(self.port)
                step = "session from port %d" % client.sock.getsockname()[1]
                client.start_data()
                self.queued.append(client.end_data(MESSAGE))
                client.expect("QUIT", 221)
                self.banners.append(client.banner)
            except Exception as exc:
                self.failures.append("%s %s: %r" % (time.strftime("%H:%M:%S"), step, exc))
            finally:
                if client is not None:
                    client.close()
            self.stopping.wait(self.pause)

    def finish(self):
        self.stopping.set()
        self.join(30)
        return self


# ---- processes --------------------------------------------------------------------------

def smtpd_pids(master_pid):
    return {pid for pid, title in children_of(master_pid).items() if title == "elemta: smtpd"}


def title_of(pid):
    with open("/proc/%d/cmdline" % pid, "rb") as f:
        return f.read().split(b"\0")[0].decode()


def alive(pid):
    """True for a live process (a zombie counts as gone)."""
    fields = procs.stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def rewrite_config(server, change):
    """Load the server's YAML, let change(dict) edit it, write it back."""
    yaml = YAML()
    with open(server.config_path) as f:
        config = yaml.load(f)
    change(config)
    with open(server.config_path, "w") as f:
        yaml.dump(config, f)


def spool_files(server):
    """Message and temp files in the spool (the index and the lock excluded)."""
    found = []
    for sub in ("messages", "tmp"):
        for root, _, files in os.walk(os.path.join(server.spool, sub)):
            found += [os.path.join(root, name) for name in files]
    return found


def elemta_command(*args):
    return [sys.executable, "-m", "elemta.cli.elemta"] + list(args)


def elemta_env(**extra):
    return dict(os.environ, PYTHONPATH=REPO, **extra)


# ---- 1. SIGHUP ----------------------------------------------------------------------------

def test_sighup_applies_a_new_config_without_refusing_a_connection(elemta_server):
    server = elemta_server(smtpd={"hostname": "mx.test", "workers": 2}, master=GRACE)
    master = server.process.pid
    old_workers = wait_for(lambda: len(smtpd_pids(master)) == 2 and smtpd_pids(master))
    assert transaction(server.port)[1].startswith(b"220 mx.test ESMTP Elemta")
    new_port = free_port()

    def change(config):
        config["smtpd"]["banner"] = "ESMTP Reloaded"
        config["listeners"].append({"address": "127.0.0.1", "port": new_port, "mode": "smtp"})

    loopers = [Looper(server.port), Looper(server.port)]
    for looper in loopers:
        looper.start()
    wait_for(lambda: all(len(looper.queued) >= 3 for looper in loopers))
    # A session open on an old worker across the reload finishes its transaction.
    across = Client(server.port)
    across.start_data()
    rewrite_config(server, change)
    os.kill(master, signal.SIGHUP)
    new_workers = wait_for(lambda: len(smtpd_pids(master) - old_workers) == 2
                           and smtpd_pids(master) - old_workers)
    across_id = across.end_data(MESSAGE)
    across.expect("QUIT", 221)
    across.close()
    # Old workers finish and leave; the new generation (titled, two of them) serves.
    wait_for(lambda: not (old_workers & set(children_of(master))))
    assert smtpd_pids(master) == new_workers
    assert all(title_of(pid) == "elemta: smtpd" for pid in new_workers)
    counts = [len(looper.queued) for looper in loopers]
    wait_for(lambda: all(len(l.queued) >= n + 3 for l, n in zip(loopers, counts)))
    for looper in loopers:
        looper.finish()
        assert looper.failures == []
        assert looper.banners[0].startswith(b"220 mx.test ESMTP Elemta")
        assert looper.banners[-1].startswith(b"220 mx.test ESMTP Reloaded")
    # The new listener answers, with the new banner, and takes mail.
    assert transaction(new_port)[1].startswith(b"220 mx.test ESMTP Reloaded")
    assert "reloading the configuration" in server.log()
    queued = set(server.queued_ids())
    assert set(loopers[0].queued + loopers[1].queued + [across_id]) <= queued

    # A broken config is refused, naming its line; the running one keeps serving.
    with open(server.config_path) as f:
        text = f.read()
    with open(server.config_path, "w") as f:
        f.write(text.replace("workers: 2", "workers: -1"))
    line = text.splitlines().index("  workers: 2") + 1
    os.kill(master, signal.SIGHUP)
    wait_for(lambda: "reload refused" in server.log())
    assert "%s:%d: smtpd.workers" % (server.config_path, line) in server.log()
    assert transaction(server.port)[1].startswith(b"220 mx.test ESMTP Reloaded")
    assert transaction(new_port)[1].startswith(b"220 mx.test ESMTP Reloaded")
    assert smtpd_pids(master) == new_workers        # no new generation was started


# ---- 2, 3. SIGTERM drains, SIGQUIT cuts ---------------------------------------------------

HALF = b"Subject: drained\r\n\r\n" + b"first half of the message\r\n" * 50
REST = b"second half of the message\r\n" * 50


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_lets_a_session_mid_data_finish(elemta_server, signum):
    server = elemta_server(master=GRACE)
    client = Client(server.port)
    client.start_data()
    client.sock.sendall(HALF)
    os.kill(server.process.pid, signum)
    signalled = time.monotonic()
    wait_for(lambda: "smtpd stopping: 1 session(s) get 3s to finish" in server.log())
    # No new session begins (whether refused outright is the next test's business).
    try:
        late = Client(server.port, timeout=0.5)
        late.close()
        raise AssertionError("a new connection got a banner while stopping: %r" % late.banner)
    except (OSError, EOFError):
        pass
    time.sleep(max(0.0, signalled + 1.0 - time.monotonic()))
    queue_id = client.end_data(REST)
    client.expect("QUIT", 221)
    client.close()
    assert server.process.wait(10) == 0
    assert server.group_pids(wait=5) == []
    assert server.queued_ids() == [queue_id]
    assert server.message(queue_id)[1].endswith(HALF + REST)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_sent_to_the_whole_process_group_ends_cleanly(elemta_server, signum):
    """Issue 21 req 4: Ctrl-C in `make run` (SIGINT to the foreground group) or
    `kill -- -PGID` reaches every child as well as the master. The children must not be
    taken for crashed ones: no "starting another", no warning, the master's stop line,
    exit 0, nothing left running."""
    server = elemta_server(smtpd={"workers": 2}, api={"enabled": True},
                           delivery={"workers": 2}, master=GRACE)
    wait_for(lambda: len(server.group_pids()) >= 9, timeout=20)    # master + 8 children
    wait_for(lambda: "delivery worker started" in server.log(), timeout=60)
    queue_id, _ = transaction(server.port)
    wait_for(lambda: "%s: to=<" % queue_id in server.log(), timeout=60)   # one attempt
    time.sleep(1.5)             # all quiet: the master waits for signals in its loop
    os.killpg(server.process.pid, signum)
    assert server.process.wait(15) == 0
    assert server.group_pids(wait=5) == []
    log = server.log()
    assert "master stopping 8 child(ren)" in log, log
    assert "starting another" not in log, log
    # (The api's warning that no token is set is about the config, not the stop.)
    assert [line for line in log.splitlines() if ": warning: " in line
            and "no api.token" not in line] == [], log
    assert "stopped" in log.splitlines()[-1], log
    assert queue_id in server.queued_ids()     # failed (unknown user b), kept: not lost


def test_connection_greeted_while_a_worker_stops_is_drained(elemta_server):
    server = elemta_server(master=GRACE)
    worker, = wait_for(lambda: smtpd_pids(server.process.pid))
    # Line up the events: a connection waits in the backlog while the worker is stopped,
    # so accepting it and the stop request reach the worker in one event-loop turn.
    os.kill(worker, signal.SIGSTOP)
    client = Client(server.port, greet=False)
    os.kill(server.process.pid, signal.SIGTERM)
    wait_for(lambda: "master stopping" in server.log())
    os.kill(worker, signal.SIGCONT)
    try:
        client.banner = client.reply()
    except (EOFError, ConnectionResetError):
        return                              # never greeted: not accepted, fine
    client.start_data()                     # greeted: it must be drained like any session
    queue_id = client.end_data(MESSAGE)
    client.expect("QUIT", 221)
    client.close()
    assert server.process.wait(10) == 0
    assert server.queued_ids() == [queue_id]


def test_stop_refuses_new_connections_at_once(elemta_server):
    server = elemta_server(master=GRACE)
    client = Client(server.port)
    client.start_data()
    os.kill(server.process.pid, signal.SIGTERM)
    wait_for(lambda: "smtpd stopping: 1 session(s)" in server.log())
    try:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
    finally:
        client.end_data(REST)
        client.close()


def test_sigquit_cuts_a_session_mid_data_quickly(elemta_server):
    server = elemta_server(master={"stop_grace": 10})
    client = Client(server.port, timeout=10)
    client.start_data()
    client.sock.sendall(HALF)
    started = time.monotonic()
    os.kill(server.process.pid, signal.SIGQUIT)
    try:
        assert client.file.readline() == b""       # closed, no reply
    except ConnectionResetError:
        pass
    assert time.monotonic() - started < 2          # stop_grace is 10
    assert server.process.wait(3) == 0
    assert server.group_pids(wait=5) == []
    client.close()
    assert server.queued_ids() == []
    assert [f for f in spool_files(server) if "/messages/" in f] == []


def test_sigquit_leaves_no_temp_file(elemta_server):
    server = elemta_server(master=GRACE)
    client = Client(server.port)
    client.start_data()
    client.sock.sendall(HALF)
    wait_for(lambda: spool_files(server))
    os.kill(server.process.pid, signal.SIGQUIT)
    assert server.process.wait(3) == 0
    client.close()
    assert spool_files(server) == []


# ---- 4, 5. a worker's death -------------------------------------------------------------

def test_killing_one_worker_leaves_the_other_workers_sessions_alone(elemta_server):
    server = elemta_server(smtpd={"hostname": "mx.test", "workers": 2}, master=GRACE)
    master = server.process.pid
    workers = wait_for(lambda: len(smtpd_pids(master)) == 2 and smtpd_pids(master))
    held = {pid: [] for pid in workers}
    for _ in range(60):                   # ~10 sessions, until both workers hold some
        client = Client(server.port)
        client.expect("EHLO client.test", 250)
        held[client.worker(server.port, workers)].append(client)
        if sum(map(len, held.values())) >= 10 and all(len(c) >= 2 for c in held.values()):
            break
    assert all(len(c) >= 2 for c in held.values()), {p: len(c) for p, c in held.items()}
    victim, survivor = sorted(workers, key=lambda pid: len(held[pid]))
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: not alive(victim))
    for client in held[victim]:
        assert client.closed_by_server()
    for client in held[survivor]:
        client.expect("NOOP", 250)
        client.expect("MAIL FROM:<a@c.test>", 250)
        client.expect("RCPT TO:<b@example.test>", 250)
        client.expect("DATA", 354)
        client.end_data(MESSAGE)
        client.expect("QUIT", 221)
    for client in held[victim] + held[survivor]:
        client.close()
    assert len(server.queued_ids()) == len(held[survivor])
    wait_for(lambda: "smtpd child %d ended with signal 9" % victim in server.log())
    assert survivor in wait_for(lambda: len(smtpd_pids(master)) == 2 and smtpd_pids(master))


def test_accepted_message_survives_kill_9_of_its_worker_then_of_everything(elemta_server):
    server = elemta_server(master=GRACE)
    master = server.process.pid
    worker, = wait_for(lambda: smtpd_pids(master))
    client = Client(server.port)
    assert client.worker(server.port, [worker]) == worker
    client.start_data()
    content = b"Subject: durable\r\n\r\nkeep me\r\n"
    first = client.end_data(content)
    os.kill(worker, signal.SIGKILL)                 # 250 sent, session still open
    assert client.closed_by_server()
    client.close()
    replacement, = wait_for(lambda: smtpd_pids(master) - {worker} and smtpd_pids(master))
    second, _ = transaction(server.port)
    assert server.queued_ids() == sorted([first, second])
    assert alive(master)

    server.kill()                                  # master and all children at once
    assert server.group_pids() == []
    server.start()
    assert server.queued_ids() == sorted([first, second])
    assert server.message(first)[1].endswith(content)
    third, _ = transaction(server.port)
    assert server.queued_ids() == sorted([first, second, third])


# ---- 6. retirement ------------------------------------------------------------------------

def test_worker_retires_after_max_use_sessions_with_no_gap(elemta_server):
    # max_use 3: the jitter (up to 10%) rounds to 0.
    server = elemta_server(smtpd={"hostname": "mx.test", "workers": 1, "max_use": 3},
                           master=GRACE)
    master = server.process.pid
    first, = wait_for(lambda: smtpd_pids(master))
    for _ in range(2):          # the fixture's readiness probe was the first session
        transaction(server.port)
    wait_for(lambda: "elemta/smtpd[%d]: smtpd retiring: served 3 sessions (max_use)"
             % first in server.log(), timeout=5)
    wait_for(lambda: smtpd_pids(master) and first not in smtpd_pids(master), timeout=5)
    wait_for(lambda: "smtpd child %d ended (retired)" % first in server.log())

    # A client going on meanwhile sees every worker change as nothing at all.
    seen = set()

    def three_generations():
        seen.update(smtpd_pids(master))
        return len(seen) >= 3

    looper = Looper(server.port, pause=0.02)
    looper.start()
    wait_for(three_generations, timeout=10)
    looper.finish()
    assert looper.failures == []
    assert len(looper.queued) >= 6
    assert server.log().count("smtpd retiring: served") >= 3
    assert "ended with" not in server.log()


def test_worker_serves_no_more_than_max_use_sessions(elemta_server):
    server = elemta_server(smtpd={"hostname": "mx.test", "workers": 1, "max_use": 3},
                           master=GRACE)
    master = server.process.pid
    served = {}
    for _ in range(10):
        client = Client(server.port)
        pid = client.worker(server.port, wait_for(lambda: smtpd_pids(master)))
        served[pid] = served.get(pid, 0) + 1
        client.start_data()
        client.end_data(MESSAGE)
        client.expect("QUIT", 221)
        client.close()
    assert max(served.values()) <= 3, served


def test_idle_worker_is_replaced(elemta_server):
    server = elemta_server(smtpd={"hostname": "mx.test", "workers": 1, "max_idle": 1},
                           master=GRACE)
    master = server.process.pid
    first, = wait_for(lambda: smtpd_pids(master))
    second, = wait_for(lambda: smtpd_pids(master) - {first} and smtpd_pids(master),
                       timeout=5)
    assert "elemta/smtpd[%d]: smtpd retiring: idle for 1s (max_idle)" % first \
        in server.log()
    assert transaction(server.port)[1].startswith(b"220 ")


# ---- 7. heartbeat ---------------------------------------------------------------------

def test_worker_without_heartbeat_is_killed_and_replaced(elemta_server):
    server = elemta_server(master={"stop_grace": 3, "heartbeat_timeout": 2})
    master = server.process.pid
    hung, = wait_for(lambda: smtpd_pids(master))
    os.kill(hung, signal.SIGSTOP)
    try:
        waiting = Client(server.port, timeout=15, greet=False)   # the replacement greets it
        wait_for(lambda: "smtpd child %d sent no heartbeat for 2s; killing it" % hung
                 in server.log(), timeout=5)
        # SIGABRT waits in a stopped process; SIGKILL KILL_AFTER (5 s) later does it.
        wait_for(lambda: not alive(hung), timeout=8)
    finally:
        if alive(hung):
            os.kill(hung, signal.SIGKILL)
    wait_for(lambda: "smtpd child %d ended with signal 9" % hung in server.log())
    replacement, = wait_for(lambda: smtpd_pids(master))
    assert replacement != hung
    assert waiting.reply().startswith(b"220 ")
    waiting.close()
    assert transaction(server.port)[1].startswith(b"220 ")
    # The healthy children (the api among them) beat all along: only the hung one died.
    assert server.log().count("sent no heartbeat") == 1
    assert server.log().count("ended with") == 1


# ---- 8. one master per spool ----------------------------------------------------------------

def test_second_master_on_the_same_spool_refuses_to_start(elemta_server, tmp_path):
    server = elemta_server(master=GRACE)
    other_port = free_port()

    def change(config):
        config["listeners"] = [{"address": "127.0.0.1", "port": other_port, "mode": "smtp"}]
        config["api"]["port"] = free_port()

    rewrite_config(server, change)      # the running master read its copy already
    second = subprocess.run(elemta_command("--config", server.config_path),
                            env=elemta_env(), capture_output=True, timeout=15)
    assert second.returncode == 1
    assert ("another master (pid %d) is running on spool %s"
            % (server.process.pid, server.spool)) in second.stderr.decode()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", other_port), timeout=1)
    assert transaction(server.port)[1].startswith(b"220 ")


# ---- 9. --daemon ------------------------------------------------------------------------------

def test_daemon_detaches_writes_a_pid_file_and_stops_on_sigterm(tmp_path):
    pid_file = str(tmp_path / "elemta.pid")
    log_file = str(tmp_path / "daemon.log")
    server = ElemtaServer(tmp_path / "d", {"master": dict(GRACE, pid_file=pid_file),
                                           "logging": {"target": log_file}})
    with open(str(tmp_path / "output"), "wb") as output:
        started = time.monotonic()
        status = subprocess.run(elemta_command("--daemon", "--config", server.config_path),
                                env=elemta_env(), stdout=output, stderr=output,
                                cwd=server.workdir, timeout=15).returncode
        returned_after = time.monotonic() - started
    master = None
    try:
        assert status == 0, open(str(tmp_path / "output")).read()
        assert returned_after < 5
        master = wait_for(lambda: os.path.exists(pid_file)
                          and int(open(pid_file).read() or 0), timeout=5)
        wait_for(lambda: alive(master) and title_of(master) == "elemta: master")
        assert os.getsid(master) != os.getsid(0)          # detached from our session
        assert wait_for(lambda: smtpd_pids(master))
        queue_id, _ = wait_for(lambda: _try_transaction(server.port))
        assert server.queued_ids() == [queue_id]
        family = set(children_of(master)) | {master}
        os.kill(master, signal.SIGTERM)
        wait_for(lambda: not any(alive(pid) for pid in family))
        assert not os.path.exists(pid_file)
    finally:
        if master and alive(master):
            for pid in list(children_of(master)) + [master]:
                os.kill(pid, signal.SIGKILL)
    with open(log_file) as f:
        log = f.read()
    assert "elemta/master[%d]: stopped" % master in log
    assert "Traceback" not in log


def _try_transaction(port):
    try:
        return transaction(port)
    except OSError:
        return None


# ---- 10. sd_notify --------------------------------------------------------------------------

def test_sd_notify_ready_reloading_stopping(tmp_path):
    server = ElemtaServer(tmp_path / "n", {"master": GRACE})
    notify_path = str(tmp_path / "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(notify_path)
    listener.settimeout(15)
    server._log = open(server.log_path, "ab")
    server.process = subprocess.Popen(
        elemta_command("--config", server.config_path), env=elemta_env(
            NOTIFY_SOCKET=notify_path), stdout=server._log, stderr=subprocess.STDOUT,
        cwd=server.workdir, start_new_session=True)

    def next_message():
        return set(listener.recv(4096).decode().split("\n"))

    try:
        ready = next_message()
        # Ready means listening: the port takes the connection and a worker greets it.
        assert Client(server.port).banner.startswith(b"220 ")
        assert ready == {"READY=1", "MAINPID=%d" % server.process.pid}
        os.kill(server.process.pid, signal.SIGHUP)
        assert "RELOADING=1" in next_message()
        assert "READY=1" in next_message()
        os.kill(server.process.pid, signal.SIGTERM)
        assert "STOPPING=1" in next_message()
        assert server.process.wait(10) == 0
        assert server.group_pids(wait=5) == []
    finally:
        orphans = server.stop()
        listener.close()
    assert orphans == []
    assert "Traceback" not in server.log()


# ---- 11. log file and SIGUSR1 -------------------------------------------------------------

def test_log_file_is_reopened_on_sigusr1(elemta_server, tmp_path):
    log_path = str(tmp_path / "mail.log")
    server = elemta_server(master=GRACE, logging={"target": log_path})
    master = server.process.pid
    worker, = wait_for(lambda: smtpd_pids(master))
    first, _ = transaction(server.port)

    def read(path):
        with open(path) as f:
            return f.read()

    assert "elemta/master[%d]: elemta" % master in read(log_path)
    wait_for(lambda: "elemta/queue[%d]: %s: from=<a@c.test>" % (worker, first)
             in read(log_path))
    os.rename(log_path, log_path + ".1")
    os.kill(master, signal.SIGUSR1)
    time.sleep(0.5)
    second, _ = transaction(server.port)
    os.kill(master, signal.SIGHUP)                # makes the master say something
    wait_for(lambda: os.path.exists(log_path)
             and "elemta/master[%d]: reloading the configuration" % master
             in read(log_path))
    wait_for(lambda: "elemta/queue[%d]: %s: from=<a@c.test>" % (worker, second)
             in read(log_path))
    rotated = read(log_path + ".1")
    assert second not in rotated and "reloading" not in rotated
    assert "ended with" not in read(log_path)     # SIGUSR1 killed no child
    assert "Traceback" not in rotated + read(log_path)
