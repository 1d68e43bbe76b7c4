"""A private Rspamd on loopback: Debian's configuration with a local.d of our own.

Owned by no Elemta process: tests that need a real Rspamd start it (tests/test_dkim.py
checks our DKIM signatures with it, tests/test_rspamd.py runs the rspamd plugin against
it). One normal worker on 127.0.0.1:PORT and on the unix socket
workdir/run/normal.sock, no controller, proxy or fuzzy worker, no Redis
(the modules that need it stay off by themselves), its DNS pointed at `nameserver`
(host:port: a private NSD, or a loopback port where nothing answers, so nothing leaves
the machine and lookups fail at once), its database, run and log directories in
workdir. It runs in the foreground (`rspamd -f`) as a child of the test and is stopped
by SIGTERM to that child alone; the system's Rspamd is never touched.

    with RspamdInstance(workdir, port, nameserver="127.0.0.1:9") as rspamd:
        rspamd.address, rspamd.socket_path      # "127.0.0.1:PORT", ".../run/normal.sock"

local_files: {name: text} written to local.d as well (e.g. actions.conf, settings.conf,
milter_headers.conf), to give a test the Rspamd answers it needs.
See also: tests/test_rspamd.py, tests/test_dkim.py.
"""

import os
import socket
import subprocess
import time

from tests.peers.process import stop_process

RSPAMD, RSPAMC = "/usr/bin/rspamd", "/usr/bin/rspamc"
# The public suffixes this Rspamd knows (in place of the 9,600 of the real list).
TLDS = ("test", "example", "invalid", "localhost", "com", "net", "org")


def rspamd_available():
    """Why a private Rspamd cannot run here, or None when it can."""
    if not os.path.exists(RSPAMD):
        return "rspamd is not installed (apt-get install rspamd)"
    return None


class RspamdError(RuntimeError):
    """Rspamd would not start."""


class RspamdInstance:
    """One private Rspamd; see the module docstring."""

    def __init__(self, workdir, port, nameserver, local_files=None):
        self.workdir = str(workdir)
        self.port = port
        self.address = "127.0.0.1:%d" % port
        self.socket_path = os.path.join(self.workdir, "run", "normal.sock")
        self.nameserver = nameserver
        self.local_files = dict(local_files or {})
        self.log_path = os.path.join(self.workdir, "log", "rspamd.log")
        self.process = None

    def write_files(self):
        local = os.path.join(self.workdir, "local.d")
        for sub in ("local.d", "db", "run", "log"):
            os.makedirs(os.path.join(self.workdir, sub), exist_ok=True)
        # Rspamd compiles its public-suffix list at every start (45 s here); the test
        # domains need only a few suffixes.
        tld = os.path.join(self.workdir, "tld.dat")
        with open(tld, "w") as f:
            f.write("\n".join(TLDS) + "\n")
        files = {
            "options.inc": 'dns { nameserver = ["%s"]; timeout = 2s; retransmits = 1; }\n'
                           'url_tld = "%s";\n' % (self.nameserver, tld),
            "worker-normal.inc": 'bind_socket = ["127.0.0.1:%d", "%s mode=0666"]; '
                                 'count = 1;\n' % (self.port, self.socket_path),
            "logging.inc": 'type = "file"; filename = "%s"; level = "info";\n'
                           % self.log_path,
        }
        for disabled in ("worker-controller.inc", "worker-proxy.inc", "worker-fuzzy.inc",
                         "fuzzy_check.conf"):
            files[disabled] = "enabled = false;\n"
        files.update(self.local_files)
        for name, text in files.items():
            with open(os.path.join(local, name), "w") as f:
                f.write(text)

    def start(self, timeout=60):
        self.write_files()
        variables = []
        for name, sub in (("LOCAL_CONFDIR", ""), ("DBDIR", "db"), ("RUNDIR", "run"),
                          ("LOGDIR", "log")):
            variables += ["--var", "%s=%s" % (name, os.path.join(self.workdir, sub))
                          if sub else "%s=%s" % (name, self.workdir)]
        self.process = subprocess.Popen(
            [RSPAMD, "-f", "-i", "-u", "root", "-g", "root", "-c", "/etc/rspamd/rspamd.conf",
             "-p", os.path.join(self.workdir, "run", "rspamd.pid")] + variables,
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RspamdError("rspamd did not start: see %s" % self.log_path)
                time.sleep(0.2)

    def stop(self):
        stop_process(self.process)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
