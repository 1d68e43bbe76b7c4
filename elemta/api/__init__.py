"""The api process: the REST API over the queue (/api/v1) and /metrics for Prometheus.

Runs as the master's `elemta: api` child; see elemta.api.server (life cycle), elemta.api.app
(routes), elemta.api.openapi (the document served at /api/v1/openapi.json).
"""
