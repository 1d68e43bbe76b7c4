"""A private systemd-journald (Debian's systemd package) for the tests of the journal log
target: the real daemon, run for a journal namespace of its own, so nothing reaches the
host's journal and no other test's entries are read back.

`systemd-journald NAMESPACE` listens on /run/systemd/journal.NAMESPACE/socket and keeps
its files in /var/log/journal/MACHINE_ID.NAMESPACE; `journalctl --namespace=NAMESPACE`
reads them. The namespace's name is unique per instance, and stop() removes both
directories. Needs root (it writes under /run and /var/log) and no systemd as PID 1.

    with JournaldInstance() as journal:
        ... log to journal.socket ...
        entries = journal.entries(SYSLOG_IDENTIFIER="elemta/delivery")

See also: tests/test_log_journal.py.
"""

import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid

from tests.peers.process import stop_process

JOURNALD = "/lib/systemd/systemd-journald"
JOURNALCTL = "/usr/bin/journalctl"


def journald_available():
    """Why a private journald cannot run here, or None when it can."""
    if not (os.path.exists(JOURNALD) and os.path.exists(JOURNALCTL)):
        return "systemd-journald is not installed (apt-get install systemd)"
    if os.geteuid() != 0:
        return "a journald namespace needs root (it writes under /run and /var/log)"
    return None


def _machine_id():
    with open("/etc/machine-id") as f:
        return f.read().strip()


class JournaldInstance:
    """One private journald; see the module docstring."""

    def __init__(self):
        self.namespace = "elemtatest%s" % uuid.uuid4().hex[:12]
        self.runtime_dir = "/run/systemd/journal.%s" % self.namespace
        self.socket = os.path.join(self.runtime_dir, "socket")
        self.journal_dirs = ["%s/%s.%s" % (base, _machine_id(), self.namespace)
                             for base in ("/var/log/journal", "/run/log/journal")]
        self.process = None

    def start(self, timeout=30):
        self.output = tempfile.TemporaryFile()
        self.process = subprocess.Popen([JOURNALD, self.namespace], stdin=subprocess.DEVNULL,
                                        stdout=self.output, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.socket):
            if self.process.poll() is not None:
                self.output.seek(0)
                raise RuntimeError("systemd-journald exited: %s"
                                   % self.output.read().decode(errors="replace"))
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("systemd-journald made no socket at %s" % self.socket)
            time.sleep(0.05)
        return self

    def entries(self, **matches):
        """Every entry of the namespace's journal matching FIELD=value matches, as
        journalctl -o json gives them (values as strings; --all: long ones too)."""
        command = [JOURNALCTL, "--namespace=" + self.namespace, "-o", "json", "--all",
                   "--no-pager"] + ["%s=%s" % item for item in sorted(matches.items())]
        output = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                check=True, timeout=60).stdout
        return [json.loads(line) for line in output.decode().splitlines() if line]

    def short(self):
        """The namespace's journal as journalctl -o short prints it."""
        return subprocess.run([JOURNALCTL, "--namespace=" + self.namespace, "-o", "short",
                               "--no-pager"], stdout=subprocess.PIPE, check=True,
                              timeout=60).stdout.decode(errors="replace")

    def stop(self):
        stop_process(self.process)
        if self.process is not None:
            self.output.close()
        for directory in [self.runtime_dir] + self.journal_dirs:
            shutil.rmtree(directory, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()
