"""The queue opened for reading only: what `elemtactl queue list`, mailq and `elemtactl
queue summary` need.

A listing of a big queue is mostly start-up and the loop over the listing view; the Queue
facade (elemta.queue.queue) would add the imports of everything it does besides (its
priority rules need the configuration schema), which cost as much as listing thousands of
messages. QueueReader opens the index alone and lists and counts through
elemta.queue.listing, the same code the facade's records_matching, listed_matching and
summarise run.
See also: elemta.queue.queue (every other use of the queue), elemta.cli.queuecmd.
"""

import os
from typing import Iterator

from elemta.queue import listing
from elemta.queue.index import (DEFAULT_MAP_SIZE, INDEX_NAME, Listed, QueueIndex, QueueRecord,
                                index_exists)


class QueueReader:
    """The index of the queue in spool_dir, to list; close() (or `with`) when done."""

    @staticmethod
    def has_index(spool_dir) -> bool:
        """True if spool_dir holds a queue index."""
        return index_exists(os.path.join(spool_dir, INDEX_NAME))

    def __init__(self, spool_dir, map_size=DEFAULT_MAP_SIZE):
        self.spool_dir = spool_dir
        self._index = QueueIndex(os.path.join(spool_dir, INDEX_NAME), map_size)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def records_matching(self, selection: listing.Selection) -> Iterator[QueueRecord]:
        """As Queue.records_matching."""
        return listing.iter_records(self._index, selection)

    def listed_matching(self, selection: listing.Selection) -> Iterator[Listed]:
        """As Queue.listed_matching."""
        return listing.iter_listed(self._index, selection)

    def summarise(self, selection: listing.Selection, by_sender: bool = False
                  ) -> listing.Shape:
        """As Queue.summarise."""
        return listing.summarise(self._index, selection, by_sender=by_sender)

    def close(self):
        self._index.close()
