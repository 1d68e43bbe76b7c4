"""A private Dovecot for tests: LMTP (RFC 2033) into Maildirs, and SASL for Postfix.

Owned by no Elemta process: tests/test_lmtp.py delivers to it, tests/test_relay_auth.py lets
a private Postfix check SMTP AUTH passwords with it. Everything lives under one directory:
its own config file (the system's /etc/dovecot is never read), base_dir, state_dir, log, a
passwd-file with the users (so no system accounts are needed) and their Maildirs. Only the
LMTP service listens: on 127.0.0.1:PORT and on a unix socket in the directory; with
auth_socket=True also an auth socket that Postfix's smtpd_sasl_type=dovecot (and Elemta's
auth.backend dovecot) can use, and with auth_port=N the same auth service on
127.0.0.1:N. auth_debug=True logs every request the auth service reads ("client in:
AUTH ..."; passwords hidden); auth_failure_delay=S delays each failure S seconds (0 here,
2 in Dovecot's default). imap_port=N adds IMAP (no TLS, plaintext LOGIN allowed) on
127.0.0.1:N, so a test reads a mailbox as a mail client does. full_addresses=True names
the users by address ("bob@two.test"), as a host serving several domains must: the same
name in two domains is two users.
Runs as root (Dovecot's master needs it to switch to its own users); the mail is stored as
`nobody`, never as root.

    users = {"alice": DovecotUser("wonderland"), "carol": DovecotUser(quota="1B")}
    with DovecotInstance(tempfile.mkdtemp(), users) as dovecot:
        ...lmtp:unix:dovecot.lmtp_socket or lmtp:[127.0.0.1]:dovecot.lmtp_port...
        dovecot.messages("alice")    # the bytes of each message in alice's Maildir

See also: tests/peers/postfix.py (the same life cycle), ../shared/peers.md.
"""

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

from tests.harness import free_port

DOVECOT = "/usr/sbin/dovecot"
MAIL_USER = "nobody"


def dovecot_available(imap=False):
    """Why a private Dovecot with LMTP (and IMAP, if asked) cannot run here, or None when
    it can."""
    if not os.path.exists(DOVECOT):
        return "dovecot is not installed (apt-get install dovecot-lmtpd)"
    if not os.path.exists("/usr/lib/dovecot/lmtp"):
        return "Dovecot's LMTP server is not installed (apt-get install dovecot-lmtpd)"
    if imap and not os.path.exists("/usr/lib/dovecot/imap"):
        return "Dovecot's IMAP server is not installed (apt-get install dovecot-imapd)"
    if os.geteuid() != 0:
        return "a private Dovecot instance needs root"
    return None


class DovecotError(RuntimeError):
    """Dovecot would not start or stop."""


@dataclass
class DovecotUser:
    """One mailbox: its password (for SASL) and an optional quota ("1B", "10M"): a message
    bigger than the quota is refused after DATA, for that recipient only."""
    password: str = "secret"
    quota: Optional[str] = None


class DovecotInstance:
    """One private Dovecot (see the module docstring)."""

    def __init__(self, workdir: str, users: Dict[str, DovecotUser],
                 lmtp_port: Optional[int] = None, auth_socket=False,
                 quota_tempfail=False, auth_port=None, auth_debug=False,
                 auth_failure_delay=0, imap_port=None, full_addresses=False):
        self.workdir = os.path.abspath(workdir)
        self.users = dict(users)
        self.lmtp_port = lmtp_port or free_port()
        self.lmtp_socket = os.path.join(self.workdir, "lmtp")
        self.auth_socket = os.path.join(self.workdir, "auth") if auth_socket else None
        self.quota_tempfail = quota_tempfail
        self.auth_port = auth_port
        self.auth_debug = auth_debug
        self.auth_failure_delay = auth_failure_delay
        self.imap_port = imap_port
        self.full_addresses = full_addresses
        self.config_path = os.path.join(self.workdir, "dovecot.conf")
        self.passwd_path = os.path.join(self.workdir, "users")
        self.log_path = os.path.join(self.workdir, "dovecot.log")
        self.mail_dir = os.path.join(self.workdir, "mail")
        self.process = None    # type: Optional[subprocess.Popen]

    # -- configuration ------------------------------------------------------------------

    def config(self):
        """dovecot.conf for this instance."""
        mail = pwd.getpwnam(MAIL_USER)
        auth_listener = ""
        if self.auth_socket:
            auth_listener = """
  unix_listener %s {
    mode = 0666
  }""" % self.auth_socket
        if self.auth_port:
            auth_listener += """
  inet_listener auth-inet {
    address = 127.0.0.1
    port = %d
  }""" % self.auth_port
        imap_listener = ""
        if self.imap_port:
            imap_listener = """
service imap-login {
  inet_listener imap {
    address = 127.0.0.1
    port = %d
  }
  inet_listener imaps {
    port = 0
  }
}""" % self.imap_port
        # %n is the user part alone (alice@any.domain is alice), %u the whole address.
        name = "u" if self.full_addresses else "n"
        return """\
# A private test instance: nothing from /etc/dovecot.
base_dir = {work}/run
state_dir = {work}/state
log_path = {work}/dovecot.log
protocols = lmtp{imap}
listen = 127.0.0.1
ssl = no
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = {uid}
last_valid_uid = {uid}
first_valid_gid = {gid}
last_valid_gid = {gid}
auth_username_format = %L{name}
auth_mechanisms = plain login
# A wrong password is answered at once unless asked (the default waits 2 s).
auth_failure_delay = {failure_delay}s
disable_plaintext_auth = no
auth_debug = {auth_debug}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%{name} {passwd}
}}
userdb {{
  driver = passwd-file
  args = username_format=%{name} {passwd}
  default_fields = uid={uid} gid={gid} home={mail}/%{name}
}}
mail_location = maildir:~/Maildir
mail_plugins = quota
plugin {{
  quota = maildir:User quota
}}
quota_full_tempfail = {tempfail}
postmaster_address = postmaster@dovecot.test
hostname = dovecot.test
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {port}
  }}
  unix_listener {socket} {{
    mode = 0666
  }}
}}
# Dovecot slows every login from an address after a failed one (up to 15 s, for 30 s):
# tests fail passwords on purpose, all from 127.0.0.1. The auth process starts unprivileged
# (so it needs the config socket open to it) and cannot reach anvil's penalty socket
# (root's), so it keeps no penalties; it logs that, and that it cannot write base_dir.
service auth {{
  user = dovecot
  drop_priv_before_exec = yes{auth_listener}
}}
service config {{
  unix_listener config {{
    mode = 0666
  }}
}}
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0600
    user = root
  }}
}}{imap_listener}
""".format(work=self.workdir, uid=mail.pw_uid, gid=mail.pw_gid, passwd=self.passwd_path,
           mail=self.mail_dir, port=self.lmtp_port, socket=self.lmtp_socket,
           auth_listener=auth_listener, tempfail="yes" if self.quota_tempfail else "no",
           auth_debug="yes" if self.auth_debug else "no",
           failure_delay=self.auth_failure_delay, name=name,
           imap=" imap" if self.imap_port else "", imap_listener=imap_listener)

    def _write_config(self):
        # Dovecot's users (dovecot, dovenull, nobody) must reach files below the workdir.
        os.makedirs(self.workdir, exist_ok=True)
        os.chmod(self.workdir, 0o755)
        with open(self.config_path, "w") as f:
            f.write(self.config())
        mail = pwd.getpwnam(MAIL_USER)
        lines = []
        for name, user in self.users.items():
            extra = "userdb_quota_rule=*:storage=%s" % user.quota if user.quota else ""
            # name:password:uid:gid:gecos:home:shell:extra fields (uid/gid/home: defaults)
            lines.append("%s:%s::::::%s\n" % (name, user.password, extra))
        with open(self.passwd_path, "w") as f:
            f.writelines(lines)
        os.chmod(self.passwd_path, 0o644)
        os.makedirs(self.mail_dir, exist_ok=True)
        os.chown(self.mail_dir, mail.pw_uid, mail.pw_gid)

    # -- life cycle ---------------------------------------------------------------------

    def start(self, timeout=10.0):
        """Write the config, start Dovecot in the foreground, wait until LMTP greets."""
        reason = dovecot_available(imap=bool(self.imap_port))
        if reason:
            raise DovecotError(reason)
        self._write_config()
        self.process = subprocess.Popen([DOVECOT, "-F", "-c", self.config_path],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        start_new_session=True)
        try:
            self._wait_until_ready(timeout)
        except Exception:
            self.stop()
            raise
        return self

    def _wait_until_ready(self, timeout):
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise DovecotError("dovecot exited with %s: %s\n%s" % (
                    self.process.returncode, self.process.stderr.read().decode(errors="replace"),
                    self.read_log()[-2000:]))
            if self._greets() and (self.auth_socket is None
                                   or os.path.exists(self.auth_socket)) and (
                    self.auth_port is None or self._listens(self.auth_port)) and (
                    self.imap_port is None or self._listens(self.imap_port)):
                return
            if time.monotonic() > deadline:
                raise DovecotError("Dovecot's LMTP did not greet within %.0fs; log:\n%s"
                                   % (timeout, self.read_log()[-2000:]))
            time.sleep(0.05)

    def _greets(self):
        for family, address in ((socket.AF_INET, ("127.0.0.1", self.lmtp_port)),
                                (socket.AF_UNIX, self.lmtp_socket)):
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.settimeout(2)
                try:
                    probe.connect(address)
                    if not probe.recv(512).startswith(b"220"):
                        return False
                except OSError:
                    return False
        return True

    @staticmethod
    def _listens(port):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            return True
        except OSError:
            return False

    def stop(self, timeout=10.0):
        """SIGTERM the master (its children follow it) and wait for the whole group."""
        if self.process is None:
            return
        process, self.process = self.process, None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        process.stderr.close()
        # A child still serving a client (the auth process, for a connected Elemta)
        # outlives the master: end it, so "stopped" means no Dovecot answers any more.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            time.sleep(0.05)

    def remove(self):
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    # -- observation --------------------------------------------------------------------

    def maildir(self, user):
        return os.path.join(self.mail_dir, user, "Maildir")

    def messages(self, user: str) -> List[bytes]:
        """Each message in the user's INBOX (new/ and cur/), oldest first."""
        found = []
        for sub in ("new", "cur"):
            directory = os.path.join(self.maildir(user), sub)
            try:
                names = os.listdir(directory)
            except FileNotFoundError:
                continue
            for name in names:
                path = os.path.join(directory, name)
                found.append((os.stat(path).st_mtime_ns, name, path))
        result = []
        for _, _, path in sorted(found):
            with open(path, "rb") as f:
                result.append(f.read())
        return result

    def read_log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

