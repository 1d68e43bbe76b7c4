"""Reading the process table from /proc: which processes a master has, and their titles.

Used by `elemtactl status` (elemta.cli.control) and by the process-model tests.
"""

import os


def children(pid):
    """{child pid: process title} of the children of pid (titles as setproctitle set)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                stat = f.read()
            with open("/proc/%s/cmdline" % entry, "rb") as f:
                title = f.read().split(b"\0")[0].decode("utf-8", "replace").strip()
        except OSError:
            continue
        # The command name in stat may hold spaces and parentheses: read after its last ")".
        if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
            found[int(entry)] = title
    return found
