"""Fixtures that run the real Elemta server as a subprocess on loopback.

`elemta_server(**config)` starts `python -m elemta.cli.elemta --config FILE` with a YAML
config built from the defaults below merged with the test's sections, waits for its 220
greeting and stops it (SIGTERM) at the end of the test. Every server's log is checked
for Python tracebacks at teardown: client input must never reach one.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from ruamel.yaml import YAML

from elemta.util import procs
from tests.peers.postfix import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def code_for_everyone(workdir):
    """A PYTHONPATH under workdir (a directory every user may enter) holding our package
    and the venv's site-packages, for processes that drop to user nobody: a clone may
    sit in a directory nobody cannot traverse (mktemp -d makes 0700 ones). Hard links
    where the file system allows, so it is quick; a copy otherwise."""
    import sysconfig
    code = os.path.join(workdir, "code")
    site = os.path.join(workdir, "site-packages")
    for source, target in ((os.path.join(REPO, "elemta"), os.path.join(code, "elemta")),
                           (sysconfig.get_paths()["purelib"], site)):
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        if subprocess.run(["cp", "-al", source, target], capture_output=True).returncode:
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source, target, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
    for directory, dirs, _ in os.walk(workdir):
        os.chmod(directory, 0o755)
    return code + ":" + site


def wait_for(predicate, timeout=10):
    """Poll predicate until it returns something true; return that, or fail the test."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError("condition not met within %ss" % timeout)


class ElemtaServer:
    """A running Elemta: its ports, spool, config file and log."""

    def __init__(self, workdir, sections):
        self.workdir = str(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.spool = os.path.join(self.workdir, "spool")
        self.config_path = os.path.join(self.workdir, "elemta.yaml")
        self.log_path = os.path.join(self.workdir, "elemta.log")
        self.ports = {}
        listeners = sections.pop("listeners", None) or [{"mode": "smtp"}]
        for listener in listeners:
            listener.setdefault("address", "127.0.0.1")
            listener.setdefault("port", free_port())
            self.ports.setdefault(listener["mode"], listener["port"])
        # One worker unless a test asks for more: kill -9 tests need no orphans on the port.
        config = {"smtpd": {"hostname": "mx.test", "workers": 1},
                  "listeners": listeners,
                  "queue": {"spool_dir": self.spool},
                  "relay": {"local_domains": ["example.test"]},
                  "api": {"port": free_port()},
                  # No delivery unless a test asks: receive tests look at the queue as left.
                  "delivery": {"workers": 0},
                  # Tests send to made-up local users (b@example.test): accept them at RCPT
                  # unless a test asks for the check (tests/test_local_delivery.py); local
                  # mail never reaches the host's /var/mail.
                  "local": {"reject_unknown_users": False,
                            "mail_spool_directory": os.path.join(self.workdir, "mail")}}
        for section, values in sections.items():
            config.setdefault(section, {}).update(values)
        with open(self.config_path, "w") as f:
            YAML().dump(config, f)
        self.process = None

    @property
    def port(self):
        return self.ports.get("smtp") or next(iter(self.ports.values()))

    def start(self, timeout=15):
        self._log = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONPATH=REPO)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "elemta.cli.elemta", "--config", self.config_path],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir,
            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("elemta exited with %s:\n%s"
                                   % (self.process.returncode, self.log()))
            try:
                # The port is bound before the queue is reconciled; the 220 comes after.
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                    if s.recv(100).startswith(b"220 "):
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("elemta did not listen within %ss:\n%s" % (timeout, self.log()))

    def stop(self, sig=signal.SIGTERM, timeout=20):
        """Signal the master and wait for it and every child to be gone.

        Returns the pids of the server's process group still alive 5 s after the master
        exited (orphans); they are then killed so no test leaks processes."""
        if self.process is None or self.process.returncode is not None:
            return []
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._log.close()
        orphans = self.group_pids(wait=5)
        if orphans:
            os.killpg(self.process.pid, signal.SIGKILL)
        return orphans

    def titles(self):
        """{pid: process title} of the server's process group ("elemta: delivery", ...)."""
        found = {}
        for pid in self.group_pids():
            try:
                with open("/proc/%d/cmdline" % pid, "rb") as f:
                    found[pid] = f.read().split(b"\0")[0].decode("utf-8", "replace").strip()
            except OSError:
                pass                # gone meanwhile
        return found

    def group_pids(self, wait=0):
        """Live processes of the server's process group, after up to `wait` seconds."""
        deadline = time.monotonic() + wait
        while True:
            pids = []
            for entry in os.listdir("/proc"):
                fields = procs.stat_fields(entry) if entry.isdigit() else None
                if fields and fields[0] != "Z" and int(fields[2]) == self.process.pid:
                    pids.append(int(entry))
            if not pids or time.monotonic() >= deadline:
                return pids
            time.sleep(0.05)

    def kill(self):
        """kill -9 the master and every child at once, as a crash of the host would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.stop(signal.SIGKILL)

    def log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def queue(self):
        """The queue as the server left it (open, read, close: no shared environment)."""
        from elemta.queue.queue import Queue
        return Queue(self.spool)

    def queued_ids(self):
        with self.queue() as q:
            return sorted(r.queue_id for r in q.index.iter_records())

    def message(self, queue_id):
        """(envelope, content bytes) of a queued message, read from its spool file."""
        from elemta.queue.store import SpoolStore
        store = SpoolStore(self.spool)
        with store.open_content(queue_id) as f:
            return store.read_envelope(queue_id), f.read()


def _server_factory(workdir):
    """(start(**sections) -> started ElemtaServer, stop_all()) for servers under workdir."""
    servers = []

    def start(**sections):
        server = ElemtaServer(workdir / ("server%d" % len(servers)), sections)
        servers.append(server)
        return server.start()

    def stop_all():
        for server in servers:
            orphans = server.stop()
            assert not orphans, "processes left after the master exited: %s" % orphans
            assert "Traceback" not in server.log(), server.log()

    return start, stop_all


@pytest.fixture
def elemta_server(tmp_path):
    """Factory: elemta_server(section=dict, ...) -> a started ElemtaServer."""
    start, stop_all = _server_factory(tmp_path)
    yield start
    stop_all()


@pytest.fixture(scope="module")
def elemta_module_server(tmp_path_factory):
    """elemta_server for a whole test module: many probes against one server (its queue
    and log are shared by the module's tests, so they must not depend on each other's)."""
    start, stop_all = _server_factory(tmp_path_factory.mktemp("module"))
    yield start
    stop_all()


def make_tls_files(directory):
    """(cert, key): a self-signed certificate and key for mx.test in directory (openssl,
    as an admin would make them)."""
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=mx.test", "-keyout", key, "-out", cert],
                   check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory):
    """A self-signed certificate and key for mx.test."""
    return make_tls_files(str(tmp_path_factory.mktemp("tls")))


@pytest.fixture(scope="session")
def credentials(tmp_path_factory):
    """A credentials file with user 'alice', password 'wonderland'."""
    from elemta.util.credentials import set_user
    path = str(tmp_path_factory.mktemp("auth") / "credentials")
    set_user(path, "alice", "wonderland")
    return path
