"""Lease holders: the name a delivery worker writes on the messages it claims, and the
rule that says a holder is gone for certain.

Used by the delivery workers (elemta.delivery.worker names itself with holder_name() and
frees the leases of gone holders through Queue.free_gone_leases) and by
elemta.queue.index, which stores the name as "lease_owner". A name is

    host:pid:start:boot  the host name, the process id, the process's start time (field
                       22 of /proc/<pid>/stat, clock ticks since boot) and the first 8
                       hex digits of the kernel's boot id, so neither a pid the kernel
                       gave to a new process nor a process of a later boot with the same
                       pid and start time (a deterministic boot) is taken for the holder;
    host:pid:start     the older forms (and, without start, the form where /proc cannot
    host:pid           be read): only the pid and the start time can be checked.

holder_gone() answers True only when the holder has certainly ended: the same host name
as ours and another boot, no such process, a different start time (the pid was reused),
or a zombie (exited, not yet reaped by the master). A live process is never gone, however stuck or
stopped (SIGSTOP) it is; a holder on another host, or a name this code cannot read, is
left to the lease's expiry (delivery.lease). Processes in another pid namespace that share
the host name and the spool would be misjudged: run each host's workers in one namespace.
"""

import os
import socket

from elemta.util.procs import stat_fields

_HOST = None
_BOOT = None
_BOOT_ID = "/proc/sys/kernel/random/boot_id"


def _this_host():
    global _HOST
    if _HOST is None:
        _HOST = socket.gethostname()
    return _HOST


def _this_boot():
    """The first 8 hex digits of this boot's id, or "" where it cannot be read."""
    global _BOOT
    if _BOOT is None:
        try:
            with open(_BOOT_ID) as boot_id:
                _BOOT = boot_id.read(8)
        except OSError:
            _BOOT = ""
        if not _is_boot(_BOOT):
            _BOOT = ""
    return _BOOT


def _is_boot(text):
    return len(text) == 8 and all(c in "0123456789abcdef" for c in text)


def process_start(pid):
    """(state letter, start time in clock ticks) of pid from /proc, or None when there is
    no such process (or /proc cannot be read)."""
    fields = stat_fields(pid)
    return None if fields is None else (fields[0], int(fields[19]))


def holder_name(pid=None):
    """This process's lease name (or pid's): host:pid:start:boot, host:pid:start where
    the boot id cannot be read, or host:pid without /proc."""
    pid = os.getpid() if pid is None else pid
    started = process_start(pid)
    if started is None:
        return "%s:%d" % (_this_host(), pid)
    name = "%s:%d:%d" % (_this_host(), pid, started[1])
    return name + ":" + _this_boot() if _this_boot() else name


def holder_pid(name):
    """The pid in a lease name, or None if it names none."""
    parts = (name or "").split(":")
    if len(parts) in (2, 3, 4) and parts[1].isdigit():
        return int(parts[1])
    return None


def holder_gone(name):
    """True only when the process the lease name names has certainly ended (see the
    module docstring); False for a live holder, another host, or an unreadable name."""
    parts = (name or "").split(":")
    if len(parts) not in (2, 3, 4) or parts[0] != _this_host() or not parts[1].isdigit():
        return False
    if len(parts) >= 3 and not parts[2].isdigit():
        return False
    if len(parts) == 4 and not _is_boot(parts[3]):
        return False
    pid = int(parts[1])
    if pid <= 0:
        return False
    if len(parts) == 4 and _this_boot() and parts[3] != _this_boot():
        return True                   # every process of an earlier boot has ended
    started = process_start(pid)
    if started is None:
        return not _pid_exists(pid)
    state, start = started
    if state in ("Z", "X"):           # exited; only its exit status is left
        return True
    return len(parts) >= 3 and start != int(parts[2])


def _pid_exists(pid):
    """kill(pid, 0): ProcessLookupError means no such process; anything else (EPERM: a
    process /proc hides from us) means it may exist."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True
