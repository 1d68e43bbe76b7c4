"""Reading the process table from /proc: which processes a master has, and their titles;
and how a child process ended, in the words the log uses.

Used by `elemtactl status`, `reload` and `stop` (elemta.cli.control) and by the
process-model tests; ended_how by the master and the local agent.
"""

import os


def ended_how(wait_status):
    """A wait status as the log says it: "exit status 1", "signal 9"."""
    code = os.waitstatus_to_exitcode(wait_status)
    return "exit status %d" % code if code >= 0 else "signal %d" % -code


def stat_fields(pid):
    """The fields of /proc/<pid>/stat after the command name, as strings ([0] the state
    letter, [1] the parent pid, [2] the process group, [19] the start time in clock
    ticks), or None when there is no such process (or /proc cannot be read)."""
    try:
        with open("/proc/%s/stat" % pid) as f:
            stat = f.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: read after its last ")".
    return stat[stat.rindex(")") + 2:].split()


def children(pid):
    """{child pid: process title} of the children of pid (titles as setproctitle set)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = stat_fields(entry)
        if fields is None or int(fields[1]) != pid:
            continue
        try:
            with open("/proc/%s/cmdline" % entry, "rb") as f:
                title = f.read().split(b"\0")[0].decode("utf-8", "replace").strip()
        except OSError:
            continue
        found[int(entry)] = title
    return found



def command_line(pid):
    """The argument list of pid ([title] once setproctitle set one), or [] when there
    is no such process."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            data = f.read()
    except OSError:
        return []
    return [w.decode("utf-8", "replace") for w in data.rstrip(b"\0").split(b"\0")]


def is_elemta_master(pid):
    """pid is an Elemta master: titled so, or still starting (the `elemta` program run
    by its interpreter, or `python -m elemta.cli.elemta`, before it sets its title).
    Nothing else that merely names elemta (journalctl -u elemta) passes."""
    words = command_line(pid)
    if not words:
        return False
    if words[0] == "elemta: master" or os.path.basename(words[0]) == "elemta":
        return True
    if not os.path.basename(words[0]).startswith("python"):
        return False
    return (len(words) > 1 and os.path.basename(words[1]) == "elemta") or \
        words[1:3] == ["-m", "elemta.cli.elemta"]
