"""The api process's WSGI application: Falcon routes for the REST API and /metrics.

Owned by the api process (elemta.api.server serves it with gevent.pywsgi). Every route
needs the bearer token (elemta.api.auth) but /metrics and /api/v1/health*. Routes:

    GET    /metrics                         Prometheus (no token)
    GET    /api/v1/health                   what runs, the queue, the disk (no token)
    GET    /api/v1/health/live              200 while the api answers (no token)
    GET    /api/v1/health/ready             200 when mail can come in, else 503 (no token)
    GET    /api/v1/openapi.json             the OpenAPI document (token needed)
    GET    /api/v1/queue                    list, with filters and a cursor
    POST   /api/v1/queue/flush              flush deferred mail (filters narrow it)
    GET    /api/v1/queue/{id}               one message
    DELETE /api/v1/queue/{id}               delete it
    GET    /api/v1/queue/{id}/content       its content, message/rfc822
    POST   /api/v1/queue/{id}/hold|release|flush|requeue
                                            (release?rescan=true: scan it again first)
    POST   /api/v1/queue/{id}/priority      {"priority": N}: set its priority
    GET    /api/v1/stats                    counts and bytes by state, domains by age

And with cluster.store set, /api/v1/cluster/nodes and the /api/v1/cluster/queue routes
(token needed): every node of the cluster at once (elemta.api.cluster_routes).

See also elemta.api.auth, elemta.api.errors, elemta.api.queue_routes, elemta.api.openapi.
"""

import json
import os

import falcon

from elemta.api import cluster_routes, errors, openapi, queue_routes
from elemta.api.auth import RequireBearer, load_token, warn_if_exposed
from elemta.api.health import HealthResource, LiveResource, ReadyResource
from elemta.api.monitoring import MetricsResource
from elemta.api.queue_access import QueueAccess

PREFIX = "/api/v1"
MESSAGE_ACTIONS = ("hold", "release", "flush", "requeue")


class OpenAPIResource:
    """GET /api/v1/openapi.json: the document, encoded once (behind the token, as every
    route but health: issue 5)."""

    def __init__(self):
        self._body = json.dumps(openapi.DOCUMENT, indent=1).encode("ascii")

    def on_get(self, req, resp):
        resp.data = self._body
        resp.content_type = falcon.MEDIA_JSON

    on_head = on_get


def create_app(config, access=None, master_pid=None, registry=None,
               scoreboard=None) -> falcon.App:
    """The WSGI application for config. access: the QueueAccess to share (default: new);
    master_pid: the master whose children health reports (default: our parent);
    registry: the cluster's node Registry (elemta.api.registration), or None;
    scoreboard: the master's (elemta.util.scoreboard), for health to tell a hung child
    from one that serves (None: every child running counts as up)."""
    access = access or QueueAccess(config.queue)
    warn_if_exposed(config)
    app = falcon.App(middleware=[RequireBearer(load_token(config.api))])
    # Spelled out: these defaults moved between Falcon releases.
    app.req_options.keep_blank_qs_values = True
    app.req_options.auto_parse_qs_csv = False
    app.req_options.strip_url_path_trailing_slash = False
    errors.install(app)
    app.add_route("/metrics", MetricsResource(access, config))
    master_pid = master_pid or os.getppid()
    app.add_route(PREFIX + "/health", HealthResource(config, access, master_pid,
                                                            scoreboard))
    app.add_route(PREFIX + "/health/live", LiveResource())
    app.add_route(PREFIX + "/health/ready", ReadyResource(config, access, master_pid,
                                                                 scoreboard))
    app.add_route(PREFIX + "/openapi.json", OpenAPIResource())
    app.add_route(PREFIX + "/queue", queue_routes.QueueList(access))
    app.add_route(PREFIX + "/queue/flush", queue_routes.FlushAll(access))
    app.add_route(PREFIX + "/queue/{queue_id}", queue_routes.QueuedMessage(access))
    app.add_route(PREFIX + "/queue/{queue_id}/content", queue_routes.MessageContent(access))
    for action in MESSAGE_ACTIONS:
        app.add_route(PREFIX + "/queue/{queue_id}/" + action,
                      queue_routes.MessageAction(access, action, config))
    app.add_route(PREFIX + "/queue/{queue_id}/priority",
                  queue_routes.MessagePriority(access))
    app.add_route(PREFIX + "/stats", queue_routes.Stats(access))
    cluster_routes.add_routes(app, config, registry)
    return app
