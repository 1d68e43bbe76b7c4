"""A private clamd (ClamAV's daemon) on loopback, with its own signature database.

Owned by no Elemta process: tests of the clamav plugin start it. No signature download is
possible here, so the instance writes its own database directory: one .ndb signature that
matches the EICAR test string anywhere in what it scans (named Eicar-Test-Signature;
clamd reports it as Eicar-Test-Signature.UNOFFICIAL, as it does every signature not
signed by the ClamAV project). It runs in the foreground as a child of the test, with a
config of its own (LocalSocket in its directory and TCPSocket on 127.0.0.1, both given),
never the system's clamd. Started as root, it drops to the clamav user (clamd.conf User)
when that user exists, so the scanner runs unprivileged as it does in production.

    with ClamdInstance(workdir, stream_max_length="1M") as clamd:
        clamd.socket_path, clamd.address    # "/.../clamd.sock", "127.0.0.1:PORT"
        clamd.scans()                       # streams scanned so far, from its log

    with private_clamd(stream_max_length="2M") as clamd:   # a fresh directory and port,
        ...                                                # removed afterwards

See also: tests/test_clamav.py, elemta.plugins.clamav.
"""

import contextlib
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time

from tests.harness import free_port
from tests.peers.process import stop_process

CLAMD = "/usr/sbin/clamd"
EICAR = (b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*")
SIGNATURE = "Eicar-Test-Signature"


def clamd_available():
    """Why a private clamd cannot run here, or None when it can."""
    if not os.path.exists(CLAMD):
        return "clamd is not installed (apt-get install clamav-daemon)"
    return None


class ClamdError(RuntimeError):
    """clamd would not start."""


class ClamdInstance:
    """One private clamd; see the module docstring."""

    def __init__(self, workdir, port, stream_max_length="25M"):
        self.workdir = str(workdir)
        self.port = port
        self.address = "127.0.0.1:%d" % port
        self.socket_path = os.path.join(self.workdir, "clamd.sock")
        self.log_path = os.path.join(self.workdir, "clamd.log")
        self.stream_max_length = stream_max_length
        self.process = None

    def write_files(self):
        database = os.path.join(self.workdir, "db")
        os.makedirs(database, exist_ok=True)
        # Target type 0 (any file), offset * (anywhere): the string in a mail body.
        with open(os.path.join(database, "elemta-test.ndb"), "w") as f:
            f.write("%s:0:*:%s\n" % (SIGNATURE, EICAR.hex()))
        user = None
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("clamav")
            except KeyError:
                user = None
        lines = ["DatabaseDirectory %s" % database,
                 "LocalSocket %s" % self.socket_path,
                 "TCPSocket %d" % self.port,
                 "TCPAddr 127.0.0.1",
                 "Foreground yes",
                 "LogFile %s" % self.log_path,
                 "LogTime yes",
                 "LogClean yes",          # a line per scan, clean ones too: scans()
                 "PidFile %s" % os.path.join(self.workdir, "clamd.pid"),
                 "StreamMaxLength %s" % self.stream_max_length,
                 "User %s" % (user.pw_name if user else pwd.getpwuid(os.geteuid()).pw_name)]
        config = os.path.join(self.workdir, "clamd.conf")
        with open(config, "w") as f:
            f.write("\n".join(lines) + "\n")
        if user is not None:
            # The unprivileged clamd writes its log, pid file and socket here.
            for directory, dirs, files in os.walk(self.workdir):
                os.chown(directory, user.pw_uid, user.pw_gid)
                os.chmod(directory, 0o755)
                for name in files:
                    os.chown(os.path.join(directory, name), user.pw_uid, user.pw_gid)
        return config

    def start(self, timeout=60):
        config = self.write_files()
        self.process = subprocess.Popen(
            [CLAMD, "--config-file=%s" % config], stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT, cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while not (self.answers_ping() and os.path.exists(self.socket_path)):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ClamdError("clamd did not start: %s" % self.log())
            time.sleep(0.1)
        return self

    def answers_ping(self):
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
                sock.sendall(b"zPING\0")
                return sock.recv(64).startswith(b"PONG")
        except OSError:
            return False

    def stop(self):
        stop_process(self.process)

    def scans(self):
        """How many streams clamd has scanned so far (its log has a line for each:
        "instream(...): OK" or "...: NAME FOUND")."""
        return sum(1 for line in self.log().splitlines()
                   if re.search(r"stream\(.*\): (OK|.+ FOUND)$", line))

    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError as error:
            return "(no log: %s)" % error

    def remove(self):
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


@contextlib.contextmanager
def private_clamd(**options):
    """A started ClamdInstance in a fresh directory on a free port (options: those of
    ClamdInstance), stopped and its directory removed afterwards."""
    instance = ClamdInstance(tempfile.mkdtemp(prefix="elemta-clamd-"), free_port(), **options)
    try:
        with instance:
            yield instance
    finally:
        instance.remove()
