"""A Debian root to install the .deb in, driven from outside: commands, users, mounts.

Used by tests/packages/test_installed_deb.py (make test-packages), which runs inside
`unshare --net --mount --pid --fork` with the root prepared by tests/packages/debian-root.sh.
Everything here runs in that private mount namespace: /proc and /dev/shm are mounted into
the root there, so they vanish with the namespace and the host's are never bound in.

`Unit` reads the installed systemd unit and starts its ExecStart the way systemd would
(sandboxing options reproduced in a mount namespace of the daemon's own, Type=notify's
READY=1 received on a NOTIFY_SOCKET), since a chroot has no systemd.
"""

import os
import re
import resource
import shlex
import socket
import subprocess
import time

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def poll(predicate, timeout, what, interval=0.2):
    """predicate()'s first true value; AssertionError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("%s: not within %gs" % (what, timeout))
        time.sleep(interval)


class Root:
    """The chroot: run commands in it (as root or a user) and read its files."""

    def __init__(self, path):
        self.path = path

    def __call__(self, inside):
        """The host path of `inside`, a path in the root."""
        return os.path.join(self.path, inside.lstrip("/"))

    def mount_kernel_filesystems(self):
        """A fresh /proc, /dev/shm and /dev/pts for the root (this namespace's own, none
        bound from the host; debootstrap made the device nodes in /dev)."""
        subprocess.run(["mount", "-t", "proc", "proc", self("/proc")], check=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "tmpfs",
                        self("/dev/shm")], check=True)
        subprocess.run(["mount", "-t", "devpts", "-o", "newinstance,ptmxmode=0666", "devpts",
                        self("/dev/pts")], check=True)

    def unmount_kernel_filesystems(self):
        for inside in ("/dev/pts", "/dev/shm", "/proc"):
            subprocess.run(["umount", "--lazy", self(inside)], check=False)

    def run(self, command, user=None, input=None, check=True, env=None, timeout=120):
        """Run `command` (a list) in the root as root, or as `user` through a login shell
        (runuser -l: HOME, USER, LOGNAME and the working directory are the user's, as
        when that user types it). Returns the CompletedProcess, text mode."""
        if user is None:
            argv = ["chroot", self.path] + list(command)
        else:
            argv = ["chroot", self.path, "runuser", "-l", user, "-c",
                    " ".join(shlex.quote(word) for word in command)]
        environment = {"PATH": PATH, "LANG": "C.UTF-8", "HOME": "/root", "TERM": "dumb"}
        environment.update(env or {})
        result = subprocess.run(argv, input=input, capture_output=True, text=True,
                                env=environment, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError("%s exited %d\nstdout: %s\nstderr: %s" % (
                " ".join(command), result.returncode, result.stdout, result.stderr))
        return result

    def read(self, inside, default=None):
        try:
            with open(self(inside), errors="replace") as stream:
                return stream.read()
        except FileNotFoundError:
            if default is None:
                raise
            return default

    def write(self, inside, text, mode=0o644, owner=None):
        with open(self(inside), "w") as stream:
            stream.write(text)
        os.chmod(self(inside), mode)
        if owner is not None:
            os.chown(self(inside), *owner)

    def ids(self, user):
        """(uid, gid) of `user` in the root's passwd."""
        for line in self.read("/etc/passwd").splitlines():
            fields = line.split(":")
            if fields[0] == user:
                return int(fields[2]), int(fields[3])
        raise KeyError(user)

    def add_user(self, name):
        self.run(["useradd", "--create-home", "--shell", "/bin/sh", name])


class Process:
    """A process seen through /proc: its title, parent and real and effective ids."""

    def __init__(self, pid):
        self.pid = pid
        with open("/proc/%d/stat" % pid) as stream:
            stat = stream.read()
        after = stat[stat.rindex(")") + 2:].split()
        self.state, self.ppid = after[0], int(after[1])
        with open("/proc/%d/cmdline" % pid, "rb") as stream:
            self.title = stream.read().replace(b"\0", b" ").decode(errors="replace").strip()
        status = {}
        with open("/proc/%d/status" % pid) as stream:
            for line in stream:
                key, _, value = line.partition(":")
                status[key] = value.split()
        self.uids = [int(n) for n in status["Uid"]]
        self.gids = [int(n) for n in status["Gid"]]
        self.groups = [int(n) for n in status.get("Groups", [])]

    @property
    def kind(self):
        """"smtpd" for "elemta: smtpd", None for a process that is not Elemta's."""
        match = re.match(r"elemta: (\w+)", self.title)
        return match.group(1) if match else None

    def __repr__(self):
        return "<%d %r uid=%s>" % (self.pid, self.title, self.uids)


def processes():
    """Every live (not zombie) process of this pid namespace."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                process = Process(int(name))
            except (OSError, ValueError, IndexError, KeyError):
                continue        # ended while we looked
            if process.state != "Z":
                found.append(process)
    return found


def children(pid):
    return [process for process in processes() if process.ppid == pid]


# Unit keys the launcher knows: how the service starts and stops (not sandboxing), and
# the sandboxing it reproduces. Any other key fails the test, so a sandboxing option
# added to the unit later is never left untried.
LIFE_CYCLE = {"Type", "NotifyAccess", "ExecStart", "ExecReload", "KillMode",
              "TimeoutStopSec", "Restart", "RestartSec", "TimeoutStartSec"}
SANDBOXING = {"NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp",
              "ReadWritePaths", "LimitNOFILE"}


class Unit:
    """The installed elemta.service, and the daemon started as systemd would start it."""

    def __init__(self, root, path="/lib/systemd/system/elemta.service"):
        self.root = root
        self.service = {}
        section = None
        for line in root.read(path).splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("["):
                section = line.strip("[]")
            elif section == "Service":
                key, _, value = line.partition("=")
                self.service[key.strip()] = value.strip()
        unknown = set(self.service) - LIFE_CYCLE - SANDBOXING
        assert not unknown, "the unit sets %s, which this test does not reproduce: " \
            "teach tests/packages/rootfs.py Unit what it means" % sorted(unknown)
        self.process = None
        self.notify = None

    def yes(self, key):
        return self.service.get(key, "no").lower() in ("yes", "true", "1", "on")

    def sandbox_script(self):
        """Shell lines for the daemon's own mount namespace: what the unit's ProtectSystem,
        ProtectHome, PrivateTmp and ReadWritePaths make of the file system (systemd.exec(5))."""
        lines = []

        def read_only(inside):
            if os.path.isdir(self.root(inside)):
                where = shlex.quote(self.root(inside))
                lines.append("mount --rbind %s %s && mount -o remount,bind,ro %s"
                             % (where, where, where))

        def hidden(inside):
            if os.path.isdir(self.root(inside)):
                lines.append("mount -t tmpfs -o mode=0755 tmpfs %s"
                             % shlex.quote(self.root(inside)))

        protect_system = self.service.get("ProtectSystem", "no").lower()
        assert protect_system != "strict", "ProtectSystem=strict is not reproduced here"
        if protect_system in ("yes", "true", "full", "strict"):
            for inside in ("/usr", "/boot", "/efi"):
                read_only(inside)
        if protect_system in ("full", "strict"):
            read_only("/etc")
        protect_home = self.service.get("ProtectHome", "no").lower()
        for inside in ("/home", "/root", "/run/user"):
            if protect_home in ("yes", "true", "tmpfs"):
                hidden(inside)
            elif protect_home == "read-only":
                read_only(inside)
        if self.yes("PrivateTmp"):
            for inside in ("/tmp", "/var/tmp"):
                lines.append("mount -t tmpfs -o mode=1777 tmpfs %s"
                             % shlex.quote(self.root(inside)))
        for inside in self.service.get("ReadWritePaths", "").split():
            where = shlex.quote(self.root(inside.lstrip("-")))
            lines.append("mount --bind %s %s && mount -o remount,bind,rw %s"
                         % (where, where, where))
        return lines

    def start(self, log_path, env=None):
        """Start ExecStart as root, sandboxed as the unit says, with systemd's environment;
        return the main pid (ExecStart's, as $MAINPID) once it said READY=1."""
        command = shlex.split(self.service["ExecStart"])
        assert self.service.get("Type") == "notify", "the test expects Type=notify"
        notify_inside = "/run/elemta-test-notify.sock"
        if os.path.exists(self.root(notify_inside)):
            os.unlink(self.root(notify_inside))
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.root(notify_inside))
        self.notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        launcher = self.sandbox_script()
        prefix = ["/usr/bin/setpriv", "--no-new-privs"] if self.yes("NoNewPrivileges") else []
        launcher.append('exec chroot %s "$@"' % shlex.quote(self.root.path))
        environment = {"PATH": PATH, "LANG": "C.UTF-8", "NOTIFY_SOCKET": notify_inside,
                       "INVOCATION_ID": "0" * 32}
        environment.update(env or {})
        limit = self.service.get("LimitNOFILE")

        def limits():
            if limit:
                # Capped at the hard limit we have: without CAP_SYS_RESOURCE (some VMs and
                # containers) even root cannot raise it, as systemd can.
                ceiling = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
                soft, _, hard = limit.partition(":")
                hard = min(int(hard or soft), ceiling)
                resource.setrlimit(resource.RLIMIT_NOFILE, (min(int(soft), hard), hard))

        log = open(log_path, "ab")
        # unshare, sh, chroot and setpriv each exec the next: the pid is ExecStart's.
        self.process = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-ec",
             "\n".join(launcher), "sh"] + prefix + command,
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=environment,
            preexec_fn=limits)
        log.close()
        self.wait_ready(timeout=60)
        return self.process.pid

    def wait_ready(self, timeout):
        """READY=1 from the main pid (NotifyAccess=main: systemd ignores other senders)."""
        deadline = time.monotonic() + timeout
        self.notify.settimeout(0.5)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError("ExecStart exited %d before READY=1"
                                     % self.process.returncode)
            try:
                data, ancillary, _, _ = self.notify.recvmsg(4096, socket.CMSG_SPACE(12))
            except socket.timeout:
                continue
            sender = None
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    sender = int.from_bytes(payload[:4], "little")
            if b"READY=1" in data.split(b"\n") and sender == self.process.pid:
                return
        raise AssertionError("no READY=1 from the main pid within %gs (Type=notify: "
                             "systemd would kill the service)" % timeout)

    def reload(self):
        """ExecReload, with $MAINPID, run in the root."""
        command = self.service["ExecReload"].replace("$MAINPID", str(self.process.pid))
        return self.root.run(shlex.split(command))

    def stop(self):
        """KillMode=mixed: SIGTERM to the main process; its exit status, or None if it
        outlived TimeoutStopSec (systemd would then SIGKILL the whole group)."""
        self.process.terminate()
        try:
            return self.process.wait(timeout=float(self.service.get("TimeoutStopSec", 90)))
        except subprocess.TimeoutExpired:
            return None

    def kill(self):
        """Leave nothing running (a failed test's clean-up)."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for process in processes():
            if process.kind:
                try:
                    os.kill(process.pid, 9)
                except ProcessLookupError:
                    pass
        self.close()

    def close(self):
        """Remove the NOTIFY_SOCKET (not to be mistaken for a leftover of the package)."""
        if self.notify:
            path = self.notify.getsockname()
            self.notify.close()
            os.unlink(path)
            self.notify = None
