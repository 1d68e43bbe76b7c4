"""How the REST API answers when something is wrong: {"error": "..."} and the right status.

Owned by the api process. Falcon's own errors (404 for an unknown route, 405 with Allow for
a wrong method, 400 for an unknown HTTP method) and ours (401, 400 naming the parameter, 404
for an unknown queue id) all go through serialize_error. A queue that cannot be read is a
503; anything else unexpected is logged and answered with a bare 500, never a traceback.
See also elemta.api.app (where these are installed).
"""

import json
import logging

import falcon

from elemta.api.queue_access import QueueUnavailable

log = logging.getLogger("elemta.api")


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode("ascii")


def serialize_error(req, resp, exception):
    """Every falcon.HTTPError as {"error": message}, whatever the client accepts."""
    message = exception.description
    if not message:
        if exception.status == falcon.HTTP_404 or exception.status == 404:
            message = "no such route: %s" % req.path
        elif exception.status == falcon.HTTP_405 or exception.status == 405:
            message = "method %s not allowed on %s (allowed: %s)" % (
                req.method, req.path, (exception.headers or {}).get("Allow", "none"))
        else:
            message = exception.title or "error"
    resp.content_type = falcon.MEDIA_JSON
    resp.data = error_body(message)


def handle_queue_unavailable(req, resp, exception, params):
    resp.status = falcon.HTTP_503
    resp.content_type = falcon.MEDIA_JSON
    resp.data = error_body(str(exception))


def handle_unexpected(req, resp, exception, params):
    """A bug: logged with its traceback for whoever fixes it; the client gets a bare 500.
    (Falcon's HTTPError has its own, more specific handler and never comes here.)"""
    log.error("api: %s %s failed", req.method, req.path, exc_info=exception)
    resp.status = falcon.HTTP_500
    resp.content_type = falcon.MEDIA_JSON
    resp.data = error_body("internal error (see the elemta log)")


def install(app: falcon.App) -> None:
    app.set_error_serializer(serialize_error)
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler(QueueUnavailable, handle_queue_unavailable)
