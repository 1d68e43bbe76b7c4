"""Can master.user read the files the workers need? Asked by opening them as that user.

Runs in the short-lived CLI processes, not in the daemon: `elemta --check-config` and
`elemtactl config check` (through load_config's check_files), and `elemtactl dkim keygen`
and `user add` on the file they just wrote. Root can read any file, so a check made as
root says nothing about the workers: a child forked here drops to master.user and
master.group with the code the master uses for its children
(elemta.master.drop_privileges) and opens each file, so a key only root can read (or one
behind a directory the workers cannot enter) is reported now, not as 451 on every message.
A unix socket the workers connect to (Dovecot's auth socket) is connected to, not opened.
Without root the files are opened as the caller, and a note says so.
See also: elemta.config.loader.worker_files, elemta.util.daemonfiles.
"""

import errno
import os
import socket
import stat
import sys
from typing import Callable, Dict, Optional, Sequence

# The child runs no code that is not loaded yet: after setuid it may not be able to read
# the interpreter's library (a Python under /root), so everything it uses is imported here.


def master_user_check(prog: str) -> Callable:
    """A FileCheck for elemta.config.load_config: each file opened as master.user."""
    def check(config, files):
        reasons = unreadable_as(config.master, [name for _, name in files], prog)
        return {path: reasons[name] for path, name in files if name in reasons}
    return check


def unreadable_as(master_config, names: Sequence[str], prog: str) -> Dict[str, str]:
    """{file name: why master.user cannot read it} for those of `names` it cannot read."""
    from elemta.master import drop_privileges, resolve_user
    if not names:
        return {}
    try:
        uid, gid = resolve_user(master_config)
    except KeyError:
        uid, gid = None, None       # the missing user or group is reported on its own
    here = {name: why for name, why in ((n, _why_unreadable(n)) for n in names) if why}
    if (uid is None or uid == 0 or (uid, gid) == (os.geteuid(), os.getegid())
            or (master_config.user is None and master_config.group is None)):
        return here         # the workers run as this very user (or root reads anything)
    who = "master.user %s (uid %d, gid %d)" % (master_config.user or uid, uid, gid)
    if os.geteuid() != 0:
        print("%s: note: not root: files opened as uid %d, not as %s"
              % (prog, os.geteuid(), who), file=sys.stderr)
        return here
    reasons = _in_child(lambda: drop_privileges(master_config), names)
    if reasons is None:
        return {name: "could not be checked as %s (the checking process failed)" % who
                for name in names}
    return {name: "%s (as %s)" % (why, who) for name, why in reasons.items()}


def _in_child(become, names: Sequence[str]) -> Optional[Dict[str, str]]:
    """Fork, become() the other user, open each file; {name: why} or None on failure."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(read_end)
            become()
            if os.geteuid() == 0:
                raise PermissionError("still root")
            lines = []
            for index, name in enumerate(names):
                why = _why_unreadable(name)
                if why:
                    lines.append("%d %s\n" % (index, why))
            data = "".join(lines).encode("utf-8", "replace")
            while data:
                data = data[os.write(write_end, data):]
            status = 0
        except BaseException:
            pass
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as stream:
        data = stream.read()
    _, status = os.waitpid(pid, 0)
    if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
        return None
    reasons = {}
    for line in data.decode("utf-8", "replace").splitlines():
        index, _, why = line.partition(" ")
        reasons[names[int(index)]] = why
    return reasons


def _why_unreadable(name: str) -> Optional[str]:
    """Why this process cannot read the file `name` (or connect to it, when it is a unix
    socket such as Dovecot's auth socket), or None if it can."""
    try:
        if stat.S_ISSOCK(os.stat(name).st_mode):
            return _why_unconnectable(name)
    except OSError as error:
        return error.strerror or str(error)
    try:
        # O_NONBLOCK: a FIFO planted under a key's name must not hang the check.
        fd = os.open(name, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as error:
        return error.strerror or str(error)
    try:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            return "is a directory"
        return None
    finally:
        os.close(fd)


def _why_unconnectable(name: str) -> Optional[str]:
    """Why this process cannot connect to the unix socket `name`, or None if it can
    (connecting needs write permission on the socket, as the workers will need)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(5)
        try:
            probe.connect(name)
        except OSError as error:
            if error.errno == errno.ECONNREFUSED:
                return "connection refused (is the server behind it running?)"
            return error.strerror or str(error)
    return None
