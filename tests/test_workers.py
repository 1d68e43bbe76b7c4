"""Several smtpd worker processes under the master: shared listeners, titles in ps,
respawn after a crash, clean stop with no orphans."""

import os
import signal
import smtplib
import time

import pytest

from elemta.config import default_config
from elemta.master import Master
from elemta.services import Service
from elemta.util.procs import children as children_of
from tests.harness import wait_for


def smtpd_workers(master):
    """{pid: title} of the master's smtpd children (the api child aside)."""
    return {pid: title for pid, title in children_of(master).items()
            if title.startswith("elemta: smtpd")}


def fork_one_child(run_child):
    """Fork one real child of a one-row service table ("probe") running run_child;
    returns its pid."""
    probe = Service("probe", count=lambda config: 1, slots=lambda config: 1,
                    main="nowhere:main", privileged=True)
    master = Master(default_config(), [], lambda: None, None, run_child=run_child,
                    services=[probe])
    return master.spawn_child(probe, 0)


def test_a_forked_child_has_its_title_before_its_main_runs(tmp_path):
    """Building a child may take a while (imports, under load); meanwhile `ps` and
    `elemtactl status` must not show it as a second master."""
    seen = tmp_path / "cmdline"

    def run_child(service, config, listening, slot, scoreboard, master_pid, shared):
        with open("/proc/self/cmdline", "rb") as f:
            seen.write_bytes(f.read())
        return 0

    pid = fork_one_child(run_child)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert seen.read_bytes().split(b"\0")[0] == b"elemta: probe"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGQUIT])
def test_a_child_stopped_while_it_builds_itself_exits_cleanly(tmp_path, signum):
    """A stop that comes before the child's own handlers (a quick reload or stop after
    a start) ends it with status 0, not by the signal."""
    building = tmp_path / "building"

    def run_child(service, config, listening, slot, scoreboard, master_pid, shared):
        building.touch()
        time.sleep(30)                     # imports and files, under load
        return 1

    pid = fork_one_child(run_child)
    wait_for(building.exists)
    os.kill(pid, signum)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def send(port, n=1):
    with smtplib.SMTP("127.0.0.1", port) as smtp:
        for _ in range(n):
            smtp.sendmail("a@c.test", ["b@example.test"], b"Subject: w\r\n\r\nx\r\n")


def test_master_runs_titled_workers_and_respawns_them(elemta_server):
    server = elemta_server(smtpd={"hostname": "mx.test", "workers": 2})
    master = server.process.pid
    workers = wait_for(lambda: len(smtpd_workers(master)) == 2 and smtpd_workers(master))
    assert set(workers.values()) == {"elemta: smtpd"}
    with open("/proc/%d/cmdline" % master, "rb") as f:
        assert f.read().startswith(b"elemta: master")
    for _ in range(10):
        send(server.port)
    victim = next(iter(workers))
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(smtpd_workers(master)) == 2 and victim not in smtpd_workers(master))
    send(server.port, 3)
    assert len(server.queued_ids()) == 13
    # An exited child loses its title (zombie) a moment before the master reaps and logs it.
    wait_for(lambda: "smtpd child %d ended with signal 9; starting another" % victim
             in server.log())
    server.stop()
    assert server.process.returncode == 0
    survivors = [pid for pid in workers if os.path.exists("/proc/%d" % pid)]
    assert survivors == []


def test_workers_exit_when_the_master_is_killed(elemta_server):
    server = elemta_server(smtpd={"hostname": "mx.test", "workers": 2})
    master = server.process.pid
    wait_for(lambda: len(smtpd_workers(master)) == 2 and smtpd_workers(master))
    send(server.port)
    os.kill(master, signal.SIGKILL)
    wait_for(lambda: not server.group_pids())     # the workers leave on their own


def test_connection_limit_per_client_holds_across_workers(elemta_server):
    import socket
    server = elemta_server(smtpd={"hostname": "mx.test", "workers": 2},
                           limits={"connections_per_client": 3},
                           relay={"mynetworks": ["127.0.0.1/32"]})
    wait_for(lambda: len(smtpd_workers(server.process.pid)) == 2)

    def connect():
        s = socket.create_connection(("127.0.0.1", server.port),
                                     source_address=("127.0.0.2", 0))
        s.settimeout(5)
        return s, s.recv(200)

    held = [connect() for _ in range(3)]
    assert all(greeting.startswith(b"220 ") for _, greeting in held)
    for _ in range(6):         # whichever worker takes them, the limit is shared
        extra, greeting = connect()
        assert greeting.startswith(b"421 4.7.0"), greeting
        extra.close()
    for s, _ in held:
        s.close()
    def greeted():
        s, greeting = connect()
        s.close()
        return greeting.startswith(b"220 ")

    wait_for(greeted)     # closed sessions are counted down again


def delivery_workers(master):
    return {pid for pid, title in children_of(master).items()
            if title.startswith("elemta: delivery")}


def test_delivery_worker_retires_after_max_use_messages(elemta_server):
    server = elemta_server(delivery={"workers": 1, "max_use": 2})
    master = server.process.pid
    first, = wait_for(lambda: delivery_workers(master))
    send(server.port, 2)             # local mail: taken, then deferred (no local delivery)
    wait_for(lambda: delivery_workers(master) - {first})
    # The replacement may start before the retiring worker's line reaches the log.
    wait_for(lambda: "elemta/delivery[%d]: delivery retiring: took 2 messages (max_use)"
             % first in server.log())
    wait_for(lambda: first not in delivery_workers(master))
    wait_for(lambda: "delivery child %d ended (retired)" % first in server.log())
