"""/metrics for Prometheus: the api process's route for it (no token needed).

Owned by the api process. /metrics sums every process's metrics (elemta.metrics
.scrape_registry) and adds what the api reads at each scrape (elemta.api.collectors: the
queue by state, the spool's disk space). See also elemta.metrics, elemta.api.app, elemta.api.health (the health routes).
"""

import logging

import gevent
from gevent.lock import Semaphore

from elemta import metrics
from elemta.api.collectors import QueueCollector, SpoolSpaceCollector

log = logging.getLogger("elemta.api")


class MetricsResource:
    """GET /metrics: the Prometheus text (or OpenMetrics, as the scraper asks)."""
    public = True

    def __init__(self, access, config):
        if metrics.directory() is None:
            log.warning("no metrics directory (%s unset): /metrics shows only the queue",
                        metrics.ENV)
        self.registry = metrics.scrape_registry()
        self.registry.register(QueueCollector(access))
        self.registry.register(SpoolSpaceCollector(config))
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
