"""What the api process tells about the queue and the spool's disk: messages by state,
each state's oldest arrival, the spool file system's space and the reserve below which
the smtpd refuses new mail.

Owned by the api process; read afresh for each /metrics scrape (elemta.api.collectors)
and health request (elemta.api.health), from the queue index and the file system: the
figures every process agrees on, whoever restarted. See also elemta.queue.space.
"""

from dataclasses import dataclass
from typing import Dict

from elemta.queue.space import file_system_bytes, reserve_bytes


@dataclass(frozen=True)
class QueueFigures:
    counts: Dict[str, int]        # state: messages, for the states that have any
    oldest: Dict[str, float]      # state: arrival (Unix time) of its oldest message


def queue_figures(access) -> QueueFigures:
    """Read in the calling thread (blocks); raises QueueUnavailable
    (elemta.api.queue_access) when the index cannot be read."""
    return access.call(lambda queue: QueueFigures(queue.count_by_state(),
                                                  queue.oldest_arrival_by_state()))


@dataclass(frozen=True)
class SpoolSpace:
    available: int    # bytes an unprivileged writer may still use
    size: int         # bytes of the whole file system
    reserve: int      # with available at or below this, MAIL FROM gets 452 4.3.1

    @property
    def refusing(self):
        return self.available <= self.reserve


def spool_space(config) -> SpoolSpace:
    """The spool's file system as the smtpd's room check sees it; raises OSError."""
    available, size = file_system_bytes(config.queue.spool_dir)
    return SpoolSpace(available, size,
                      reserve_bytes(config.queue.min_free_space, config.limits.message_size))
