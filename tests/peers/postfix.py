"""A private Postfix instance for tests and benchmarks: the peer Elemta is measured against.

Owned by no Elemta process: test code and tests/bench/bench_accept.py start it.
Each instance lives in its own directory (config, queue, data, maillog), listens only on
127.0.0.1:PORT and never touches the system's Postfix. Runs as root (postfix -c needs it).
See also: ../shared/peers.md (how and why this setup works), tests/test_postfix_fixture.py.
"""

import os
import re
import shutil
import signal
import subprocess
import time
from typing import Dict, List, Optional

from tests.harness import wait_for_greeting

POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"
# Debian's master.cf, or the pristine copy the package keeps when /etc/postfix lacks one.
MASTER_CF_SOURCES = ("/etc/postfix/master.cf", "/usr/share/postfix/master.cf.dist")


def postfix_available():
    """Why a private Postfix cannot run here, or None when it can."""
    if not os.path.exists(POSTFIX):
        return "postfix is not installed (apt-get install postfix)"
    if os.geteuid() != 0:
        return "a private Postfix instance (postfix -c DIR) needs root"
    return None


class PostfixError(RuntimeError):
    """Postfix would not start, stop, or do what a test waited for."""


class PostfixInstance:
    """One private Postfix: `with PostfixInstance(dir, port, hold_only=True) as pf: ...`.

    relayhost:     port on 127.0.0.1 to relay every message to (a sink or Elemta).
    hold_only:     accept every message and park it in the hold queue (nothing delivered).
    extra_main_cf: more main.cf settings, e.g. {"in_flow_delay": "0"}; they win over ours.
    extra_listeners: more smtpd listeners on 127.0.0.1, {port: {setting: value}}: each
                   with its own -o overrides, e.g. {2526: {"smtpd_tls_security_level":
                   "none"}} for a port without STARTTLS beside one with it.
    """

    def __init__(self, workdir, smtpd_port, relayhost=None, hold_only=False,
                 extra_main_cf=None, extra_listeners=None):
        # type: (str, int, Optional[int], bool, Optional[Dict[str, str]], Optional[Dict[int, Dict[str, str]]]) -> None
        # Config beside the queue, not above it: postfix check wants root to own the config
        # tree and postfix to own the queue.
        self.workdir = os.path.abspath(workdir)
        self.config_dir = os.path.join(self.workdir, "etc")
        self.queue_dir = os.path.join(self.workdir, "queue")
        self.data_dir = os.path.join(self.workdir, "data")
        self.maillog = os.path.join(self.workdir, "maillog")
        self.smtpd_port = smtpd_port
        self.relayhost = relayhost
        self.hold_only = hold_only
        self.extra_main_cf = dict(extra_main_cf or {})
        self.extra_listeners = dict(extra_listeners or {})
        self._started = False

    # -- configuration ------------------------------------------------------------------

    def main_cf(self):
        # type: () -> Dict[str, str]
        """The main.cf settings this instance runs with."""
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": self.queue_dir,
            "data_directory": self.data_dir,
            # Programs, postfix-files and dynamicmaps.cf stay where the package put them.
            "meta_directory": "/etc/postfix",
            "command_directory": "/usr/sbin",
            "daemon_directory": "/usr/lib/postfix/sbin",
            "shlib_directory": "/usr/lib/postfix",
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            # No syslog here: postlogd writes this file, which must pass the prefix check.
            "maillog_file": self.maillog,
            "maillog_file_prefixes": self.workdir,
            "myhostname": "postfix.peer.test",
            "mydomain": "peer.test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "local_transport": "error:5.1.1 local delivery is off in this test instance",
            "alias_maps": "",
            "alias_database": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "smtp_dns_support_level": "disabled",
            "smtpd_peername_lookup": "no",
            "biff": "no",
        }
        if self.relayhost is not None:
            settings["relayhost"] = "[127.0.0.1]:%d" % self.relayhost
        if self.hold_only:
            # Every client gets HOLD after its message is in: cleanup files it straight into
            # the hold queue, and the queue manager never sees it.
            settings["smtpd_end_of_data_restrictions"] = "check_client_access static:HOLD"
        settings.update(self.extra_main_cf)
        return settings

    def _write_config(self):
        # The postfix user must reach the queue through this directory (mkdtemp makes 0700).
        os.makedirs(self.workdir, exist_ok=True)
        os.chmod(self.workdir, 0o755)
        self._check_reachable()
        for directory in (self.config_dir, self.queue_dir):
            os.makedirs(directory, mode=0o755, exist_ok=True)
        source = next((path for path in MASTER_CF_SOURCES if os.path.exists(path)), None)
        if source is None:
            raise PostfixError("no master.cf to copy (looked at %s)" % ", ".join(MASTER_CF_SOURCES))
        shutil.copyfile(source, os.path.join(self.config_dir, "master.cf"))
        with open(os.path.join(self.config_dir, "main.cf"), "w") as main_cf:
            for name, value in self.main_cf().items():
                main_cf.write("%s = %s\n" % (name, value))
        # A private queue directory has none of the files a chroot needs.
        self._postconf("-F", "*/*/chroot = n")
        # Our listener replaces the system's port 25 service.
        self._postconf("-M#", "smtp/inet")
        self._postconf("-Me", "127.0.0.1:%d/inet = 127.0.0.1:%d inet n - n - - smtpd"
                       % (self.smtpd_port, self.smtpd_port))
        for port, overrides in self.extra_listeners.items():
            # master.cf's { } form lets a value hold spaces (Postfix 3.0 and later).
            options = "".join(" -o { %s = %s }" % item for item in overrides.items())
            self._postconf("-Me", "127.0.0.1:%d/inet = 127.0.0.1:%d inet n - n - - smtpd%s"
                           % (port, port, options))
        # Postfix re-reads a config file until its mtime is older than the read began
        # (300 ms naps); backdating the fresh files saves seconds per start.
        backdated = time.time() - 2
        for name in ("main.cf", "master.cf"):
            os.utime(os.path.join(self.config_dir, name), (backdated, backdated))

    def _check_reachable(self):
        """Fail clearly when the postfix user cannot reach the workdir (pytest's tmp_path)."""
        parent = os.path.dirname(self.workdir)
        while parent != os.path.dirname(parent):
            if not os.stat(parent).st_mode & 0o001:
                raise PostfixError("the postfix user cannot enter %s: put the instance in a "
                                   "directory others may traverse, e.g. tempfile.mkdtemp()"
                                   % parent)
            parent = os.path.dirname(parent)

    def _postconf(self, *args):
        self._run([POSTCONF, "-c", self.config_dir] + list(args))

    def _postfix(self, *args):
        self._run([POSTFIX, "-c", self.config_dir] + list(args))

    @staticmethod
    def _run(argv):
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              universal_newlines=True)
        if done.returncode != 0:
            raise PostfixError("%s failed (exit %d): %s"
                               % (" ".join(argv), done.returncode, done.stdout.strip()))
        return done.stdout

    # -- life cycle ---------------------------------------------------------------------

    def start(self, timeout=15.0):
        """Write the config, start the master and wait until the SMTP port greets."""
        reason = postfix_available()
        if reason:
            raise PostfixError(reason)
        self._write_config()
        self._postfix("set-permissions")
        self._postfix("start")
        self._started = True
        try:
            self._wait_for_greeting(timeout)
        except Exception:
            self.stop()
            raise
        return self

    def _wait_for_greeting(self, timeout):
        try:
            wait_for_greeting(self.smtpd_port, timeout=timeout, name="Postfix")
        except RuntimeError as error:
            raise PostfixError("%s; maillog:\n%s" % (error, self.read_log()[-2000:])) from None

    def stop(self, timeout=15.0):
        """Stop the master and wait until none of this instance's processes is left."""
        if not self._started:
            return
        self._started = False
        try:
            self._postfix("stop")
        except PostfixError:
            pass  # Already gone; the process sweep below still makes sure.
        deadline = time.monotonic() + timeout
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in self.pids():  # Stragglers of our own instance only, by pid.
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def pids(self):
        # type: () -> List[int]
        """Processes of this instance: the master passes MAIL_CONFIG to every child."""
        marker = ("MAIL_CONFIG=%s" % self.config_dir).encode()
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open("/proc/%s/environ" % entry, "rb") as environ:
                    if marker in environ.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:
                continue  # Gone meanwhile, or a kernel thread.
        return found

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    # -- observation --------------------------------------------------------------------

    def read_log(self):
        """The maillog so far ('' before the first line)."""
        try:
            with open(self.maillog, errors="replace") as log:
                return log.read()
        except FileNotFoundError:
            return ""

    def wait_for_log(self, regex, timeout=10.0):
        """The first match of `regex` in the maillog, waiting up to `timeout` seconds for it."""
        pattern = re.compile(regex)
        deadline = time.monotonic() + timeout
        while True:
            match = pattern.search(self.read_log())
            if match:
                return match
            if time.monotonic() > deadline:
                raise PostfixError("no %r in the maillog within %.0fs; tail:\n%s"
                                   % (regex, timeout, self.read_log()[-2000:]))
            time.sleep(0.05)

    def queue_count(self, queue="hold"):
        """How many messages are in one of Postfix's queues (incoming, active, deferred, hold)."""
        top = os.path.join(self.queue_dir, queue)
        return sum(len(files) for _, _, files in os.walk(top))
