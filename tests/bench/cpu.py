"""CPU time an MTA spent, from /proc: what the benchmarks charge to Elemta and to Postfix.

A process's charge is its own user and system time plus that of the children it has
reaped (utime + stime + cutime + cstime in /proc/PID/stat). Summed over every live process
of a daemon at one moment, that counts each process once: a child still running counts
itself, one that ended counts in the parent that reaped it (the Elemta master, the Postfix
master). The benchmarks take this before and after a run, while the daemon is idle, and
charge the difference to the run.

    before = tree_cpu_seconds([server.process.pid])       # Elemta: the master's tree
    ... drive it ...
    spent = tree_cpu_seconds([server.process.pid]) - before
    cpu_seconds(postfix.pids())                           # Postfix: its processes

See also: tests/bench/bench_accept.py, tests/bench/bench_relay.py, tests/bench/runs.py.
"""

import os
from typing import Dict, Iterable, List, Set, Tuple

TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def _stat(pid):
    # type: (int) -> Tuple[int, int]
    """(parent pid, clock ticks charged) of a live process; OSError if it is gone."""
    with open("/proc/%d/stat" % pid) as f:
        data = f.read()
    # The command name is in parentheses and may hold spaces or parentheses itself.
    fields = data[data.rindex(")") + 2:].split()
    utime, stime, cutime, cstime = (int(value) for value in fields[11:15])
    return int(fields[1]), utime + stime + cutime + cstime


def _all_processes():
    # type: () -> Dict[int, Tuple[int, int]]
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                found[int(entry)] = _stat(int(entry))
            except (OSError, ValueError, IndexError):
                continue                  # gone meanwhile
    return found


def _charged(processes, pids):
    # type: (Dict[int, Tuple[int, int]], Iterable[int]) -> float
    return sum(processes[pid][1] for pid in set(pids) if pid in processes) / TICKS_PER_SECOND


def _tree(processes, roots):
    # type: (Dict[int, Tuple[int, int]], Iterable[int]) -> Set[int]
    tree = {pid for pid in roots if pid in processes}  # type: Set[int]
    grown = True
    while grown:
        children = {pid for pid, (parent, _) in processes.items()
                    if parent in tree and pid not in tree}
        tree |= children
        grown = bool(children)
    return tree


def cpu_seconds(pids):
    # type: (Iterable[int]) -> float
    """CPU seconds charged to these processes (those still alive)."""
    return _charged(_all_processes(), pids)


def descendants(roots):
    # type: (Iterable[int]) -> List[int]
    """The roots and every live process below them."""
    return sorted(_tree(_all_processes(), roots))


def _title(pid):
    # type: (int) -> str
    """The process's title as ps shows it (setproctitle's, for Elemta), without pids."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            words = f.read().replace(b"\0", b" ").decode("utf-8", "replace").split()
    except OSError:
        return "?"
    return " ".join(word for word in words[:3] if not word.strip("#").isdigit()) or "?"


def tree_cpu_by_title(roots):
    # type: (Iterable[int]) -> Dict[str, float]
    """CPU seconds charged to each kind of process below the roots, by title ("elemta:
    smtpd", "elemta: master"): subtract two of these to see where a run's CPU went. A
    child reaped in between is charged to its parent, as in tree_cpu_seconds."""
    processes = _all_processes()
    by_title = {}  # type: Dict[str, float]
    for pid in _tree(processes, roots):
        title = _title(pid)
        by_title[title] = by_title.get(title, 0.0) + processes[pid][1] / TICKS_PER_SECOND
    return by_title


def print_breakdown(before, after, count):
    """Where Elemta's CPU went in one run, per kind of process, in CPU s per 1,000."""
    spent = {title: after.get(title, 0.0) - before.get(title, 0.0) for title in after}
    for title, seconds in sorted(spent.items(), key=lambda item: -item[1]):
        if seconds > 0:
            print("    %-40s %6.2f CPU s/1000" % (title, 1000.0 * seconds / count))


def tree_cpu_seconds(roots):
    # type: (Iterable[int]) -> float
    """CPU seconds charged to the roots and everything below them, from one reading of
    /proc (so a child reaped in between is counted once)."""
    processes = _all_processes()
    return _charged(processes, _tree(processes, roots))
