"""The api process: /metrics for Prometheus and a health check (the REST API comes later).

Runs as the master's `elemta: api` child; see elemta.api.server.
"""
