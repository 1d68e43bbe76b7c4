"""The metrics the api process reads itself at each scrape, beside what every process
counts (elemta.metrics): the queue by state and the spool's disk space.

Owned by the api process (elemta.api.monitoring registers them). Read at scrape time
rather than kept by the workers: the index and the file system are what every process
agrees on, whoever restarted. A source that cannot be read is logged and left out; the
rest of the scrape goes on. See also elemta.api.spool_status.
"""

import logging

from elemta.api.spool_status import queue_figures, spool_space

log = logging.getLogger("elemta.api")


class QueueCollector:
    """elemta_queue_messages{state} and elemta_queue_oldest_arrival_timestamp_seconds
    {state}, from the queue index."""

    def __init__(self, access):
        self.access = access        # elemta.api.queue_access.QueueAccess

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily
        from elemta.queue.model import STATES
        try:
            figures = queue_figures(self.access)
        except Exception as exc:        # QueueUnavailable: report the rest anyway
            log.error("queue size not reported: cannot read the queue index in %s: %s",
                      self.access.queue_config.spool_dir, exc)
            return []
        counts = GaugeMetricFamily("elemta_queue_messages",
                                   "Messages in the queue, by state.", labels=["state"])
        for state in STATES + tuple(sorted(set(figures.counts) - set(STATES))):
            counts.add_metric([state], figures.counts.get(state, 0))
        # A timestamp, not an age (Prometheus's advice): time() - it is the age, and a
        # state with no message has no sample rather than a made-up one.
        oldest = GaugeMetricFamily(
            "elemta_queue_oldest_arrival_timestamp_seconds",
            "When the oldest message in each state arrived, as a Unix time; no sample "
            "for an empty state.", labels=["state"])
        for state, arrival in sorted(figures.oldest.items()):
            oldest.add_metric([state], arrival)
        return [counts, oldest]


class SpoolSpaceCollector:
    """elemta_spool_filesystem_avail_bytes, _size_bytes and elemta_spool_min_free_bytes."""

    def __init__(self, config):
        self.config = config

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily
        try:
            space = spool_space(self.config)
        except OSError as exc:
            log.error("spool space not reported: %s: %s", self.config.queue.spool_dir,
                      exc.strerror or exc)
            return []
        return [
            GaugeMetricFamily("elemta_spool_filesystem_avail_bytes",
                              "Bytes Elemta may still use on the spool's file system.",
                              value=space.available),
            GaugeMetricFamily("elemta_spool_filesystem_size_bytes",
                              "Size of the spool's file system, in bytes.",
                              value=space.size),
            GaugeMetricFamily("elemta_spool_min_free_bytes",
                              "Free bytes the spool keeps back: with no more free than "
                              "this, new mail is refused (queue.min_free_space).",
                              value=space.reserve)]
