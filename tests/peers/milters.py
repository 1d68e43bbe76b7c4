"""Real milters from Debian packages, each a private instance on loopback: OpenDKIM in
milter mode (signing), clamav-milter (in front of a private clamd, tests/peers/clamd.py)
and a milter of our own on libmilter (python3-milter), doing every action on demand.
Rspamd's proxy worker in milter mode is a RspamdInstance with its proxy enabled
(tests/peers/rspamd.py, local_files) and needs nothing here.

Owned by no Elemta process: tests/test_milter_peers.py starts them. Each runs in the
foreground as a child of the test with a config of its own in its work directory, never
the system's, and is stopped by SIGTERM to that child alone.

    with OpenDKIMMilter(workdir, port, "milter.test", "sel", key_file) as dkim:
        dkim.address                    # "inet:127.0.0.1:PORT", as Elemta's config says
    with ClamavMilter(workdir, port, clamd) as clamav: ...
    with LibMilter(workdir, port) as milter: ...   # tests/peers/libmilter_milter.py
"""

import os
import socket
import subprocess
import time

from tests.peers.process import stop_process

OPENDKIM = "/usr/sbin/opendkim"
CLAMAV_MILTER = "/usr/sbin/clamav-milter"


class MilterPeerError(RuntimeError):
    """The milter would not start."""


class _Daemon:
    program = ""

    def __init__(self, workdir, port):
        self.workdir = str(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.port = port
        self.address = "inet:127.0.0.1:%d" % port
        self.log_path = os.path.join(self.workdir, "milter.log")
        self.process = None

    def command(self):
        raise NotImplementedError

    def start(self, timeout=30):
        self.process = subprocess.Popen(self.command(), stdout=open(self.log_path, "ab"),
                                        stderr=subprocess.STDOUT, cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while not self._listening():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise MilterPeerError("%s did not start: %s" % (self.program, self.log()))
            time.sleep(0.1)
        return self

    def _listening(self):
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def stop(self):
        stop_process(self.process)

    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError as error:
            return "(no log: %s)" % error

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class OpenDKIMMilter(_Daemon):
    """opendkim in sign-and-verify mode, signing mail of `domain` with `key_file` under
    `selector` (relaxed/relaxed) for clients in `internal_hosts` (its InternalHosts,
    loopback by default), and, given `macro_list` (its MacroList: "name" or
    "name=value|value"), for any client whose session has that macro from the MTA."""
    program = OPENDKIM

    def __init__(self, workdir, port, domain, selector, key_file,
                 internal_hosts="127.0.0.0/8", macro_list=None):
        super().__init__(workdir, port)
        self.config = os.path.join(self.workdir, "opendkim.conf")
        with open(self.config, "w") as f:
            f.write("\n".join([
                "Mode sv", "Domain %s" % domain, "Selector %s" % selector,
                "KeyFile %s" % key_file, "Socket inet:%d@127.0.0.1" % port,
                "Background no", "Syslog no", "LogWhy yes",
                "Canonicalization relaxed/relaxed", "InternalHosts %s" % internal_hosts,
                "RequireSafeKeys no", "PidFile %s" % os.path.join(self.workdir, "pid"),
                "UserID root"] + (["MacroList %s" % macro_list] if macro_list else [])
                + [""]))

    def command(self):
        return [OPENDKIM, "-f", "-x", self.config]


class ClamavMilter(_Daemon):
    """clamav-milter asking `clamd` (a tests/peers/clamd.py ClamdInstance over TCP),
    doing `on_infected` (its OnInfected: Reject, Quarantine, ...) with infected mail."""
    program = CLAMAV_MILTER

    def __init__(self, workdir, port, clamd, on_infected="Reject"):
        super().__init__(workdir, port)
        self.config = os.path.join(self.workdir, "clamav-milter.conf")
        with open(self.config, "w") as f:
            f.write("\n".join([
                "MilterSocket inet:%d@127.0.0.1" % port, "ClamdSocket tcp:%s" % clamd.address,
                "Foreground yes", "OnInfected %s" % on_infected, "LogFile %s" % self.log_path,
                "LogVerbose yes", "LogInfected Basic",
                "PidFile %s" % os.path.join(self.workdir, "pid"), "User root", ""]))

    def command(self):
        return [CLAMAV_MILTER, "-c", self.config]


SYSTEM_PYTHON = "/usr/bin/python3"
LIBMILTER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "libmilter_milter.py")


def libmilter_available():
    """None when the system python has python3-milter (libmilter), else why not."""
    try:
        subprocess.run([SYSTEM_PYTHON, "-c", "import Milter"], check=True,
                       capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "%s cannot import Milter (apt-get install python3-milter)" % SYSTEM_PYTHON
    return None


class LibMilter(_Daemon):
    """tests/peers/libmilter_milter.py (libmilter through python3-milter, run by the
    system python) on loopback; what it was told is in `told()`, one line each."""
    program = LIBMILTER_SCRIPT

    def __init__(self, workdir, port):
        super().__init__(workdir, port)
        self.told_path = os.path.join(self.workdir, "told.log")

    def command(self):
        # -I: not the script's directory on sys.path, where tests/peers/milter.py would
        # hide libmilter's own `milter` module.
        return ["env", "MILTER_LOG=%s" % self.told_path, SYSTEM_PYTHON, "-I",
                LIBMILTER_SCRIPT, str(self.port)]

    def told(self):
        try:
            with open(self.told_path) as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return []
