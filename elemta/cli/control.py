"""`elemtactl status`, `reload` and `stop`: talk to the running master by its pid.

Used by elemtactl. The master holds an flock on <spool>/master.lock and writes its pid
there, then `config PATH`, the file it reads (elemta.cli.elemta); a lock nobody holds
means no master runs, whatever pid the file still names. reload is SIGHUP and stop is SIGTERM, as systemctl sends them.
Exit status: 0 done (status: running), 1 no master is running (status: 3, as LSB says),
75 stop: the master is still stopping (elemta.cli.failure).
"""

import fcntl
import os
import signal
import time

from elemta.cli import queuecmd
from elemta.cli.config_finder import find_config
from elemta.cli.failure import EX_NOT_RUNNING, EX_STATUS_NOT_RUNNING, Failure
from elemta.util.procs import children, is_elemta_master

LOCK_NAME = "master.lock"
# What the master writes as its config when it runs on no file (elemta.cli.elemta).
BUILT_IN_DEFAULTS = "(built-in defaults)"
# How long `stop` waits past the configured stop grace for the master to be gone.
STOP_MARGIN = 10.0


class NotRunning(Exception):
    pass


def master_pid(spool_dir):
    """The running master's pid; raises NotRunning."""
    return running_master(spool_dir)[0]


def running_master(spool_dir):
    """(pid, config) of the running master; raises NotRunning. config is the absolute
    path of the file it reads, BUILT_IN_DEFAULTS, or None when the lock does not say
    (a master of an Elemta that did not write it).

    The lock file lies in the spool, which Elemta's user owns: it is opened without
    following links (a FIFO there must not hang root either), and the pid it names is
    signalled only if that process is an Elemta master, so a pid written there by that
    user cannot make root signal another process."""
    from elemta.util.eugid import UnsafePath, open_nofollow
    path = os.path.join(spool_dir, LOCK_NAME)
    try:
        fd = open_nofollow(path, os.O_RDONLY)
    except FileNotFoundError:
        raise NotRunning("no master has run on spool %s" % spool_dir) from None
    except UnsafePath as exc:
        raise NotRunning(str(exc)) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            lines = os.read(fd, 16384).split(b"\n")
            text = lines[0].decode("ascii", "replace").strip()
            if not text.isdigit():
                raise NotRunning("the master on spool %s has not written its pid yet"
                                 % spool_dir) from None
            if not is_elemta_master(int(text)):
                raise NotRunning("%s names pid %s, which is not an Elemta master; not "
                                 "signalling it" % (path, text)) from None
            said = lines[1] if len(lines) > 2 else b""     # a whole line, or not yet
            config = os.fsdecode(said[len(b"config "):]) if said.startswith(
                b"config ") else None
            return int(text), config
        raise NotRunning("elemta is not running (spool %s)" % spool_dir)
    finally:
        os.close(fd)


def _spool(args):
    config = find_config(getattr(args, "config", None))
    return config, os.path.abspath(getattr(args, "spool_dir", None) or
                                   config.queue.spool_dir)


def cmd_status(args):
    """status: is elemta running, with which processes, and how big is the queue."""
    _, spool_dir = _spool(args)
    try:
        pid = master_pid(spool_dir)
    except NotRunning as exc:
        print("elemta: %s" % exc)
        return EX_STATUS_NOT_RUNNING
    kids = {}
    for title in children(pid).values():
        kids[title] = kids.get(title, 0) + 1
    print("elemta is running: master pid %d, spool %s" % (pid, spool_dir))
    for title in sorted(kids):
        print("  %s x%d" % (title, kids[title]))
    try:
        queue = queuecmd.open_queue(args)
    except Failure:
        return 0
    with queue:
        counts = queue.count_by_state()
    print("  queue: " + ", ".join("%s %d" % (state, counts.get(state, 0))
                                  for state in sorted(counts)) if counts else "  queue: empty")
    return 0


def _signal_master(args, command, signum):
    """(config, spool_dir, pid) after sending signum to the master, or None if none runs."""
    config, spool_dir = _spool(args)
    try:
        pid = master_pid(spool_dir)
    except NotRunning as exc:
        print("elemtactl: %s: %s" % (command, exc))
        return None
    os.kill(pid, signum)
    return config, spool_dir, pid


def cmd_reload(args):
    """reload: the master re-reads its configuration (SIGHUP); nothing is refused."""
    running = _signal_master(args, "reload", signal.SIGHUP)
    if running is None:
        return EX_NOT_RUNNING
    print("elemtactl: reload: asked master pid %d to reload its configuration" % running[2])
    return 0


def cmd_stop(args):
    """stop: open sessions finish, then everything exits (SIGTERM); waits for it."""
    running = _signal_master(args, "stop", signal.SIGTERM)
    if running is None:
        return EX_NOT_RUNNING
    config, spool_dir, pid = running
    deadline = time.monotonic() + config.master.stop_grace + STOP_MARGIN
    while time.monotonic() < deadline:
        try:
            master_pid(spool_dir)
        except NotRunning:
            print("elemtactl: stop: elemta stopped (master pid %d)" % pid)
            return 0
        time.sleep(0.1)
    print("elemtactl: stop: master pid %d is still stopping" % pid)
    return os.EX_TEMPFAIL
