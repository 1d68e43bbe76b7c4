"""Root never follows a link the service user planted in the spool (issue 10 req 1).

The spool belongs to master.user (nobody here), who can put a symbolic link under any
name in it. Each test plants one, as that user, pointing at a root-owned target, runs
what root runs (mailq / elemtactl, the master's start-up, the local agent's socket and
queue-file reading, elemtactl stop) and shows the target is untouched.
"""

import os
import pathlib
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

from tests.harness import REPO, ElemtaServer, code_for_everyone

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="needs root and user nobody")

NOBODY = pwd.getpwnam("nobody")


@pytest.fixture
def tmp_path():
    """A work directory nobody can reach (pytest's own is under a 0700 directory)."""
    path = tempfile.mkdtemp()
    os.chmod(path, 0o755)
    yield pathlib.Path(path)
    shutil.rmtree(path, ignore_errors=True)


def as_nobody(function, *args):
    """Run function(*args) in a child that became nobody (the attacker)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(NOBODY.pw_gid)
            os.setuid(NOBODY.pw_uid)
            function(*args)
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def root_target(tmp_path, name="target", content=b"root's own\n"):
    path = tmp_path / "rootonly" / name
    path.parent.mkdir(mode=0o700, exist_ok=True)
    path.write_bytes(content)
    os.chmod(path, 0o600)
    return str(path)


def untouched(path, content=b"root's own\n"):
    st = os.lstat(path)
    return st.st_uid == 0 and open(path, "rb").read() == content


def make_spool(tmp_path):
    """A spool with an index, owned by nobody like a packaged install's."""
    from elemta.queue.queue import Queue
    spool = tmp_path / "spool"
    with Queue(str(spool)):
        pass
    for directory, dirs, files in os.walk(spool):
        for name in [directory] + [os.path.join(directory, n) for n in dirs + files]:
            os.lchown(name, NOBODY.pw_uid, NOBODY.pw_gid)
    os.chmod(tmp_path, 0o755)
    return str(spool)


@pytest.fixture(scope="module")
def everyone_python():
    """(interpreter, PYTHONPATH) that still work once elemtactl became nobody: Debian's
    Python and a copy of the code every user can read, as a packaged install has."""
    python = "/usr/bin/python%d.%d" % sys.version_info[:2]
    if not os.path.exists(python):
        pytest.skip("no %s for user nobody" % python)
    path = tempfile.mkdtemp()
    os.chmod(path, 0o755)
    yield python, code_for_everyone(path)
    shutil.rmtree(path, ignore_errors=True)


def elemtactl(python, *args, timeout=30):
    interpreter, pythonpath = python
    # cwd "/": python -m puts the working directory first on the path, and the
    # clone's may be one nobody cannot read.
    return subprocess.run([interpreter, "-m", "elemta.cli.elemtactl"] + list(args),
                          capture_output=True, text=True, timeout=timeout, cwd="/",
                          env=dict(os.environ, PYTHONPATH=pythonpath))


@pytest.mark.parametrize("planted", ["index.lmdb/zz", "index.lmdb/lock.mdb"])
def test_queue_commands_as_root_never_chown_a_planted_link(tmp_path, planted,
                                                           everyone_python):
    spool = make_spool(tmp_path)
    target = root_target(tmp_path)
    link = os.path.join(spool, planted)

    def plant():
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(target, link)
    as_nobody(plant)
    for command in (["queue", "list"], ["queue", "summary"]):
        done = elemtactl(everyone_python, *command, "--spool-dir", spool)
        assert untouched(target), command
        # The queue works (a stray link), or the link nobody made for its own lock file
        # leaves nobody's own index unusable, said plainly.
        assert "Traceback" not in done.stderr and "internal error" not in done.stderr
        assert done.returncode == 0 or (planted.endswith("lock.mdb") and done.returncode == 74
                                        and "Permission denied" in done.stderr), done.stderr


def test_master_start_refuses_a_planted_lock_and_metrics_links(tmp_path):
    server = ElemtaServer(tmp_path / "server", {"master": {"user": "nobody"}})
    os.makedirs(server.spool)
    os.chown(server.spool, NOBODY.pw_uid, NOBODY.pw_gid)
    os.chmod(server.workdir, 0o755)
    target = root_target(tmp_path)
    as_nobody(os.symlink, target, os.path.join(server.spool, "master.lock"))
    done = subprocess.run([sys.executable, "-m", "elemta.cli.elemta", "--config",
                           server.config_path], capture_output=True, text=True, timeout=30,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert done.returncode == 1
    assert "master.lock is a symbolic link or not a regular file, refused" in done.stderr
    assert untouched(target)

    # The metrics directory: a link to a root-owned directory holding *.db files.
    os.unlink(os.path.join(server.spool, "master.lock"))
    rootdir = tmp_path / "rootdir"
    rootdir.mkdir(mode=0o700)
    (rootdir / "counter_1.db").write_bytes(b"root's own\n")
    as_nobody(os.symlink, str(rootdir), os.path.join(server.spool, "metrics"))
    done = subprocess.run([sys.executable, "-m", "elemta.cli.elemta", "--config",
                           server.config_path], capture_output=True, text=True, timeout=30,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert done.returncode == 1
    assert "metrics" in done.stderr and "refused" in done.stderr
    assert os.stat(rootdir).st_uid == 0 and (rootdir / "counter_1.db").exists()
    # The lock file root made is a plain file, nobody's links aside.
    assert untouched(target)


FOLD_SCRIPT = """
import os, sys
from elemta import metrics
directory, target = sys.argv[1:]
uid, gid = %d, %d
metrics.setup(directory, uid, gid)
child = os.fork()
if child == 0:                  # a worker, as nobody: counts, then plants the links
    os.setgroups([]); os.setgid(gid); os.setuid(uid)
    metrics.CONNECTIONS.labels("127.0.0.1:25", "smtp", "accepted").inc()
    os.symlink(target, os.path.join(directory, "counter_archive.db"))
    os.symlink(target, os.path.join(directory, "counter_%%d.db" %% os.getppid()))
    os._exit(0)
os.waitpid(child, 0)
metrics.worker_exited(child)               # the fold, as the master does after reaping
metrics.worker_restarted("smtpd", "crashed")   # the master's own counter file
print("master carried on")
"""


def test_master_metrics_files_are_never_opened_as_root(tmp_path):
    """The fold of a dead child's counters and the master's own counter: links planted
    under their names must not make root create the target."""
    spool = make_spool(tmp_path)
    directory = os.path.join(spool, "metrics")
    target = str(tmp_path / "rootonly" / "new")
    os.makedirs(os.path.dirname(target), mode=0o700)
    done = subprocess.run([sys.executable, "-c",
                           FOLD_SCRIPT % (NOBODY.pw_uid, NOBODY.pw_gid), directory, target],
                          capture_output=True, text=True, timeout=30,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert "master carried on" in done.stdout, done.stderr
    assert not os.path.lexists(target)
    assert "cannot fold the counters of pid" in done.stderr
    assert os.stat(directory).st_uid == NOBODY.pw_uid


def test_maildrop_prepare_never_chowns_through_a_link(tmp_path):
    from elemta.queue import maildrop
    from elemta.util.eugid import UnsafePath
    spool = make_spool(tmp_path)
    rootdir = tmp_path / "rootdir"
    rootdir.mkdir(mode=0o700)
    as_nobody(os.symlink, str(rootdir), os.path.join(spool, "maildrop"))
    with pytest.raises(UnsafePath) as caught:
        maildrop.prepare(spool, NOBODY.pw_uid, NOBODY.pw_gid)
    assert "maildrop is a symbolic link or not a directory, refused" in str(caught.value)
    st = os.stat(rootdir)
    assert st.st_uid == 0 and st.st_mode & 0o7777 == 0o700


def test_stop_never_signals_a_pid_the_service_user_wrote(tmp_path, everyone_python):
    """nobody holds the lock on a master.lock of its own naming a root process."""
    spool = make_spool(tmp_path)
    # A root process that merely names elemta in its arguments.
    victim = subprocess.Popen(["sh", "-c", "sleep 60; :", "elemta"])
    lock = os.path.join(spool, "master.lock")
    reader, writer = os.pipe()
    holder = os.fork()
    if holder == 0:
        import fcntl
        os.close(reader)
        os.setgroups([])
        os.setgid(NOBODY.pw_gid)
        os.setuid(NOBODY.pw_uid)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        os.write(fd, b"%d\n" % victim.pid)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(writer, b"!")
        signal.pause()
        os._exit(0)
    os.close(writer)
    try:
        assert os.read(reader, 1) == b"!"
        done = elemtactl(everyone_python, "stop", "--spool-dir", spool)
        assert "not an Elemta master" in done.stdout + done.stderr
        assert victim.poll() is None                     # still alive
    finally:
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)
        victim.kill()
        victim.wait()


AGENT_SCRIPT = """
import sys
from elemta.addressing import local_protocol as protocol
from elemta.local.agent import LocalAgent
agent = LocalAgent.__new__(LocalAgent)
agent.spool = sys.argv[1]
agent.path = protocol.socket_path(agent.spool)
agent._socket_files = []     # what GeventChild.__init__ sets
try:
    agent.open_spool()
except OSError as exc:
    print("refused:", exc)
else:
    print("bound")
"""


def test_local_agent_binds_its_socket_as_the_spool_owner(tmp_path):
    """spool/run planted as a link to a root directory: the root agent neither removes
    a file there nor creates its socket there."""
    spool = make_spool(tmp_path)
    rootdir = tmp_path / "rootdir"
    rootdir.mkdir(mode=0o700)
    (rootdir / "local.sock").write_bytes(b"root's own\n")
    run = os.path.join(spool, "run")
    if os.path.lexists(run):
        shutil.rmtree(run)
    as_nobody(os.symlink, str(rootdir), run)
    done = subprocess.run([sys.executable, "-c", AGENT_SCRIPT, spool], capture_output=True,
                          text=True, timeout=30, env=dict(os.environ, PYTHONPATH=REPO))
    assert "refused: [Errno 13] Permission denied" in done.stdout, done.stdout + done.stderr
    assert untouched(str(rootdir / "local.sock"))
    # Without the link the agent binds, and the socket is the spool owner's, mode 0600.
    os.unlink(run)
    done = subprocess.run([sys.executable, "-c", AGENT_SCRIPT, spool], capture_output=True,
                          text=True, timeout=30, env=dict(os.environ, PYTHONPATH=REPO))
    assert "bound" in done.stdout, done.stderr
    st = os.stat(os.path.join(run, "local.sock"))
    assert st.st_uid == NOBODY.pw_uid and st.st_mode & 0o777 == 0o600


def test_root_never_reads_a_queue_file_through_a_link(tmp_path):
    """The local agent reads queue files as root: a message file swapped for a link to
    a root-only file (or a hard link) is refused, not delivered."""
    from elemta.queue.ids import new_queue_id
    from elemta.queue.store import SpoolStore
    from elemta.util.eugid import UnsafePath
    spool = make_spool(tmp_path)
    store = SpoolStore(spool)
    target = root_target(tmp_path)
    queue_id = new_queue_id()
    as_nobody(os.symlink, target, store.path(queue_id))
    with pytest.raises(UnsafePath, match="symbolic link"):
        store.read_envelope(queue_id)
    with pytest.raises(UnsafePath, match="symbolic link"):
        store.open_content(queue_id)
    assert untouched(target)


def test_sendmail_as_root_never_writes_through_a_planted_maildrop_link(tmp_path):
    """cron mails as root: a maildrop swapped for a link to a root directory (say
    /etc/cron.d) must not get a root-owned file there."""
    spool = make_spool(tmp_path)
    maildrop = os.path.join(spool, "maildrop")
    if os.path.lexists(maildrop):
        shutil.rmtree(maildrop)
    rootdir = tmp_path / "rootdir"
    rootdir.mkdir(mode=0o700)
    as_nobody(os.symlink, str(rootdir), maildrop)
    config = tmp_path / "elemta.yaml"
    config.write_text("queue: {spool_dir: %s}\n" % spool)
    done = subprocess.run([sys.executable, "-m", "elemta.cli.sendmail", "-C", str(config),
                           "root@localhost"], input=b"Subject: cron\n\nhello\n",
                          capture_output=True, timeout=30,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert done.returncode == 75, done.stderr
    assert b"maildrop: is a symbolic link or not a directory, refused" in done.stderr
    assert os.listdir(rootdir) == []
