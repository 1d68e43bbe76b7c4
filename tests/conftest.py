"""Fixtures that run the real Elemta server as a subprocess on loopback.

`elemta_server(**config)` starts `python -m elemta.cli.elemta --config FILE` with a YAML
config built from the defaults below merged with the test's sections, waits for its 220
greeting and stops it (SIGTERM) at the end of the test. Every server's log is checked
for Python tracebacks at teardown: client input must never reach one.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from ruamel.yaml import YAML

from tests.peers.postfix import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
                  "relay": {"local_domains": ["example.test"]}}
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
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir)
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
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()

    def kill(self):
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


@pytest.fixture
def elemta_server(tmp_path):
    """Factory: elemta_server(section=dict, ...) -> a started ElemtaServer."""
    servers = []

    def start(**sections):
        server = ElemtaServer(tmp_path / ("server%d" % len(servers)), sections)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()
        assert "Traceback" not in server.log(), server.log()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory):
    """A self-signed certificate and key for mx.test (openssl, as an admin would make)."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = str(d / "cert.pem"), str(d / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=mx.test", "-keyout", key, "-out", cert],
                   check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="session")
def credentials(tmp_path_factory):
    """A credentials file with user 'alice', password 'wonderland'."""
    from elemta.util.credentials import set_user
    path = str(tmp_path_factory.mktemp("auth") / "credentials")
    set_user(path, "alice", "wonderland")
    return path
