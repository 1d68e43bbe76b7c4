"""The test and bench harness: a real Elemta server on loopback, free ports, polling.

One module that pytest fixtures (tests/conftest.py), peers (tests/peers/) and benchmark
scripts (tests/bench/, run without pytest) all import, so there is one way to start Elemta
and one way to wait for a port. A plain module rather than conftest.py: conftest.py is
pytest's plugin file (fixtures, loaded by pytest itself), and a benchmark script that
imported it would load pytest and every fixture just to start a server.

`ElemtaServer(workdir, sections)` writes a YAML config (test defaults below, merged with
the caller's sections), `start()` runs `python -m elemta.cli.elemta --config FILE` with
this checkout's code and waits for its 220 greeting, `stop()` signals it and reports
processes left behind.
"""

import os
import random
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import time

from ruamel.yaml import YAML

from elemta.util import procs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A section value that leaves the option to Elemta's own default instead of the test
# default, e.g. {"smtpd": {"workers": ELEMTA_DEFAULT}} for a benchmark of the real setup.
ELEMTA_DEFAULT = object()


# Ports for the servers tests start come from below the kernel's ephemeral range
# (32768-60999 on Linux): a port taken from that range can be given to some client's
# outgoing connection between the test choosing it and its server binding it ("Address
# already in use"). Each pytest-xdist worker has a band of its own, so two test processes
# never choose the same port; within a process the ports go round the band in turn, so a
# port chosen is not chosen again before a few thousand others.
PORT_BANDS_START, PORT_BAND_SIZE, PORT_BANDS = 10000, 5500, 4
_next_port = [None]


def _port_band():
    """(first port, size) of this process's band: one per xdist worker, the last band for
    a run without xdist (and for other processes, benchmarks say)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    index = (int(worker[2:]) % (PORT_BANDS - 1)) if worker[2:].isdigit() else PORT_BANDS - 1
    return PORT_BANDS_START + index * PORT_BAND_SIZE, PORT_BAND_SIZE


def free_port(address="127.0.0.1"):
    """A TCP port on `address` that nothing is bound to right now, from this process's
    band (see PORT_BANDS_START)."""
    first, size = _port_band()
    if _next_port[0] is None:
        _next_port[0] = random.randrange(size)     # two runs side by side start apart
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    for _ in range(size):
        port = first + _next_port[0] % size
        _next_port[0] += 1
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((address, port))
            except OSError:
                continue                           # in use (or lingering): the next one
            return port
    raise RuntimeError("no free port in %d-%d" % (first, first + size - 1))


def wait_for_greeting(port, process=None, timeout=30.0, name="server", address="127.0.0.1"):
    """Wait until address:port answers with a 220 greeting.

    Raises RuntimeError when `timeout` passes or `process` (a Popen, if given) exits first,
    so a server that dies at start fails at once instead of after the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError("%s exited with status %s before its greeting"
                               % (name, process.returncode))
        try:
            with socket.create_connection((address, port), timeout=5) as conn:
                if conn.recv(512).startswith(b"220"):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("%s did not greet on port %d within %.0fs"
                               % (name, port, timeout))
        time.sleep(0.05)


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


def wait_for_settled(predicate, timeout=30):
    """wait_for(predicate), then once more after every Elemta process has written its
    metric counts again (they do about once a second, elemta.util.metricvalues): a count
    that must be exact may be reached first and exceeded only by the next write."""
    from elemta.util.metricvalues import FLUSH_INTERVAL
    wait_for(predicate, timeout)
    time.sleep(FLUSH_INTERVAL + 0.5)
    value = predicate()
    assert value, "condition met, then no longer once the counts were written again"
    return value


def submit(server, sender, recipient):
    """Send one small message over SMTP to a running ElemtaServer; its queue id."""
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.sendmail(sender, [recipient], b"From: %s\r\nTo: %s\r\nSubject: test\r\n\r\n"
                        b"body\r\n" % (sender.encode(), recipient.encode()))
    match = wait_for(lambda: re.search(r"(\w+): from=<%s>" % re.escape(sender), server.log()))
    return match.group(1)


def delivery_result(server, queue_id, recipient, timeout=15):
    """(status, reply) of the recipient's first delivery log line."""
    pattern = r"%s: to=<%s>, relay=\S+, delay=\S+, dsn=\S+, status=(\w+) \((.*)\)" % (
        queue_id, re.escape(recipient))
    return wait_for(lambda: re.search(pattern, server.log()), timeout).groups()


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
        self.address = listeners[0]["address"]        # where start() waits for the 220
        # One worker unless a test asks for more: kill -9 tests need no orphans on the port.
        # No /etc/mailname: the host's own must not change what tests see as the origin.
        config = {"smtpd": {"hostname": "mx.test", "workers": 1, "mailname_file": None},
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
        # Tests ask only nameservers on loopback (NSD, unbound, given in a dns section).
        # Without one, no client name lookup: it would ask the host's resolver at every
        # connection (one here drops bursts of queries: 3 s stalls under load).
        if "dns" not in sections:
            config["smtpd"]["peername_lookup"] = False
        for section, values in sections.items():
            if isinstance(values, list):          # a list section (milters): as given
                config[section] = values
                continue
            config.setdefault(section, {}).update(values)
            if isinstance(values, dict):
                for name in [n for n, v in values.items() if v is ELEMTA_DEFAULT]:
                    del config[section][name]
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
        try:
            # The port is bound before the queue is reconciled; the 220 comes after.
            wait_for_greeting(self.port, self.process, timeout, name="elemta",
                              address=self.address)
        except RuntimeError as error:
            raise RuntimeError("%s:\n%s" % (error, self.log())) from None
        return self

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


def make_tls_files(directory):
    """(cert, key): a self-signed certificate and key for mx.test in directory (openssl,
    as an admin would make them)."""
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=mx.test", "-keyout", key, "-out", cert],
                   check=True, capture_output=True)
    return cert, key
