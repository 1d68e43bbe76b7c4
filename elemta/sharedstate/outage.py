"""One log line per store outage per node, however many processes see it.

Each smtpd worker guards its own store calls (elemta.sharedstate.guard), so each
notices an outage by itself. The node's log should say it once: the first process to
see the store fail creates spool/run/store-outage (O_EXCL: one creator wins) and logs
and counts the outage; the first to see it answer again removes the file and logs the
recovery. The others fall back and recover silently. A worker replaced mid-outage
changes nothing: the file, not a process, holds the outage. The daemon removes a file
left by a previous run when it starts (elemta.cli.elemta), so an outage begun before
a stop never silences the next one.

Owned by this module: nobody else reads or writes the file.
See also: elemta.queue.wakeup (the run directory), elemta.queue.draining (its sibling).
"""

import logging
import os

from elemta.queue.wakeup import run_dir

FILE_NAME = "store-outage"

log = logging.getLogger("elemta.sharedstate")


def flag_path(spool_dir):
    return os.path.join(run_dir(spool_dir), FILE_NAME)


class OutageFlag:
    """The node's outage flag in spool_dir."""

    def __init__(self, spool_dir):
        self.path = flag_path(spool_dir)

    def begin(self):
        """True when this process is the first of the node to see the outage (it says
        so); also when the flag cannot be written (better a line per process than
        none)."""
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            return False
        except OSError as error:
            log.warning("cannot write %s (%s): each process logs the store's outages",
                        self.path, error.strerror or error)
        return True

    def end(self):
        """True when this process is the first of the node to see the store back."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return False
        except OSError:
            pass
        return True


def clear(spool_dir):
    """Forget an outage a previous run left (at the daemon's start). True if there was
    one."""
    return OutageFlag(spool_dir).end()
