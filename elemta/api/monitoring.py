"""/metrics for Prometheus and /api/v1/health: the api process's routes that need no token.

Owned by the api process. /metrics sums every process's metrics (elemta.metrics
.scrape_registry) and adds the queue size by state, counted in the queue index at each
scrape. See also elemta.metrics, elemta.api.app.
"""

import json
import logging

import gevent
from gevent.lock import Semaphore

from elemta import metrics

log = logging.getLogger("elemta.api")


class QueueCollector:
    """elemta_queue_messages{state}, counted in the queue index when scraped.

    Read at scrape time rather than kept by the workers: the index is the one count every
    process agrees on, whoever restarted."""

    def __init__(self, access):
        self.access = access        # elemta.api.queue_access.QueueAccess

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily
        from elemta.queue.model import STATES
        try:
            counts = self.access.call(lambda queue: queue.count_by_state())
        except Exception as exc:        # QueueUnavailable: report the rest anyway
            log.error("queue size not reported: cannot read the queue index in %s: %s",
                      self.access.queue_config.spool_dir, exc)
            return []
        family = GaugeMetricFamily("elemta_queue_messages",
                                   "Messages in the queue, by state.", labels=["state"])
        for state in STATES + tuple(sorted(set(counts) - set(STATES))):
            family.add_metric([state], counts.get(state, 0))
        return [family]


class MetricsResource:
    """GET /metrics: the Prometheus text (or OpenMetrics, as the scraper asks)."""
    public = True

    def __init__(self, access):
        if metrics.directory() is None:
            log.warning("no metrics directory (%s unset): /metrics shows only the queue",
                        metrics.ENV)
        self.registry = metrics.scrape_registry()
        self.registry.register(QueueCollector(access))
        self._one_scrape_at_a_time = Semaphore()

    def on_get(self, req, resp):
        from prometheus_client.exposition import choose_encoder
        encode, content_type = choose_encoder(req.get_header("Accept") or "")
        # Reading the files and the index blocks: do it in a thread, so the event loop
        # keeps answering (health checks, the REST API) during a long scrape.
        with self._one_scrape_at_a_time:
            resp.data = gevent.get_hub().threadpool.apply(encode, (self.registry,))
        resp.content_type = content_type

    on_head = on_get


class HealthResource:
    """GET /api/v1/health: {"status": "ok"} while the process serves."""
    public = True
    _BODY = json.dumps({"status": "ok"}).encode()

    def on_get(self, req, resp):
        resp.data = self._BODY
        resp.content_type = "application/json"

    on_head = on_get
