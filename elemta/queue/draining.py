"""The drain flag: this node takes no new mail while its queue empties.

One file, spool/run/draining, owned by this module (nobody else reads or writes it).
`elemtactl drain` writes it, as the spool's owner (elemta.cli.draincmd), `elemtactl
undrain` removes it; the smtpd workers read it at each new connection (answering 421
4.3.2 while it is there, elemta.smtpd.server) and the api process for its readiness
probe (elemta.api.health), so a load balancer or Kubernetes stops sending. The daemon
removes it when it starts (elemta.cli.elemta): a drain ends with the run of the master
it was made for, so a node restarted on the same spool (a Kubernetes pod replaced on
its volume, an upgrade) takes mail again.

The file holds one JSON object: {"since": time it began, "to": "host:port" the queue is
handed to, or null when the node delivers it itself}. It is written whole and renamed
into place, so a reader never sees half of it.
See also: elemta.queue.wakeup (the run directory), elemta.delivery.handover.
"""

import json
import os
import time
from dataclasses import dataclass
from typing import Optional

from elemta.queue.wakeup import run_dir

FILE_NAME = "draining"
# How long an smtpd worker trusts what it last saw of the flag: one stat a second at
# most, however many connections come.
RECHECK_SECONDS = 1.0


@dataclass(frozen=True)
class Drain:
    """A drain under way."""
    since: float
    to: Optional[str] = None           # "host:port" the queue is handed to, or None


def flag_path(spool_dir):
    return os.path.join(run_dir(spool_dir), FILE_NAME)


def begin(spool_dir, to=None):
    """Start draining (or change where to): write the flag; returns the Drain. A drain
    already under way keeps its start time."""
    drain = Drain(since=getattr(current(spool_dir), "since", None) or time.time(), to=to)
    os.makedirs(run_dir(spool_dir), mode=0o700, exist_ok=True)
    path = flag_path(spool_dir)
    temp = "%s.%d" % (path, os.getpid())
    with open(temp, "w") as f:
        json.dump({"since": drain.since, "to": drain.to}, f)
    os.rename(temp, path)
    return drain


def end(spool_dir):
    """Stop draining: remove the flag. Returns the Drain that ended, or None."""
    drain = current(spool_dir)
    try:
        os.unlink(flag_path(spool_dir))
    except FileNotFoundError:
        return None
    return drain


def current(spool_dir):
    """The Drain under way, or None. A flag that cannot be parsed still means draining
    (whoever wrote it wanted no new mail here), from an unknown time."""
    try:
        with open(flag_path(spool_dir)) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
        return Drain(since=float(data["since"]),
                     to=str(data["to"]) if data.get("to") else None)
    except (ValueError, KeyError, TypeError):
        return Drain(since=0.0)


class DrainWatch:
    """Is this node draining? Asked at every connection; looks at the disk at most once
    a RECHECK_SECONDS."""

    def __init__(self, spool_dir, clock=time.monotonic):
        self.path = flag_path(spool_dir)
        self.clock = clock
        self._checked = None
        self._draining = False

    def draining(self):
        now = self.clock()
        if self._checked is None or now - self._checked >= RECHECK_SECONDS:
            self._draining = os.path.exists(self.path)
            self._checked = now
        return self._draining
