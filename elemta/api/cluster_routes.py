"""The REST API's cluster view: /api/v1/cluster/..., every live node's queue as one.

Owned by the api process. Each route asks every node registered in the store
(elemta.cluster.registry) through its own REST API, with this node's api token (the
cluster shares one), and merges the answers (elemta.cluster.view): the same JSON as
`elemtactl --cluster queue ... --json`. An answer lacking some nodes is still a 200,
with "complete": false and "missing" naming each node that did not answer and why.

    GET  /api/v1/cluster/nodes                  the live nodes; which of them answer
    GET  /api/v1/cluster/queue                  merged listing, a page at a time
    GET  /api/v1/cluster/queue/summary          totals per state, and per node
    POST /api/v1/cluster/queue/flush            flush deferred mail on every node
    GET  /api/v1/cluster/queue/{id}             the message, from the node that has it
    POST /api/v1/cluster/queue/{id}/hold|release|flush|requeue

The nodes are asked over the network, which blocks: the work runs in a small thread
pool of these routes' own, so neither the event loop nor the pool the queue routes use
(which answer this node's own part of the question) is held by it.
Without cluster.store every route answers 404: this node is in no cluster.
See also: elemta.api.app, elemta.api.openapi, elemta.cli.clustercmd.
"""

import falcon
from gevent.threadpool import ThreadPool

from elemta.api import params
from elemta.api.queue_routes import no_such_message, reply
from elemta.cluster.peers import Peers
from elemta.cluster.view import ClusterView, NodeRefused, NotFound, StoreUnreachable
from elemta.queue.ids import is_queue_id
from elemta.util.apitoken import read_token
from elemta.util.threads import in_pool

PREFIX = "/api/v1/cluster"
ACTIONS = ("hold", "release", "flush", "requeue")
# Cluster requests under way at once; more wait for a thread.
THREADS = 4


class _ClusterRoute:
    def __init__(self, view, pool):
        self.view, self.pool = view, pool

    @property
    def cluster(self):
        """The ClusterView; a 404 when this node is in no cluster."""
        if self.view is None:
            raise falcon.HTTPNotFound(title="no cluster", description=(
                "this node is in no cluster: cluster.store is not set"))
        return self.view

    def run(self, work, *args):
        """work(*args) in the pool; the view's failures as HTTP errors."""
        try:
            return in_pool(self.pool, work, *args)
        except StoreUnreachable as error:
            raise falcon.HTTPServiceUnavailable(
                title="store unreachable", description="the cluster store cannot be "
                "reached, so the nodes are unknown: %s" % params.printable(str(error), 200))
        except NodeRefused as error:
            raise falcon.HTTPBadRequest(title="refused",
                                        description=params.printable(str(error), 200))

    def found(self, work, queue_id, *args):
        if not is_queue_id(queue_id):
            raise no_such_message(queue_id)
        try:
            return self.run(work, queue_id, *args)
        except NotFound as absent:
            if not absent.missing:
                raise no_such_message(queue_id) from None
            raise falcon.HTTPServiceUnavailable(title="not found yet", description=(
                "no such message on the nodes that answered; not answering: %s" % ", ".join(
                    m["node"] for m in absent.missing)))


def _filters(req):
    """The filters as given, once checked here (a bad one is a 400 naming it)."""
    params.selection(req)
    return {name: req.params[name] for name in params.FILTERS if name in req.params}


class ClusterNodes(_ClusterRoute):
    """GET /api/v1/cluster/nodes: the registered nodes; whether each answers."""

    def on_get(self, req, resp):
        params.check_known(req, ())
        reply(resp, self.run(self.cluster.nodes))


class ClusterSummary(_ClusterRoute):
    """GET /api/v1/cluster/queue/summary: /api/v1/stats of every node, summed."""

    def on_get(self, req, resp):
        params.check_known(req, params.FILTERS)
        reply(resp, self.run(self.cluster.summary, _filters(req)))


class ClusterListing(_ClusterRoute):
    """GET /api/v1/cluster/queue: every node's messages in id order, a page at a time."""

    def on_get(self, req, resp):
        params.check_known(req, params.FILTERS + params.PAGE)
        limit, cursor = params.limit(req), params.cursor(req)
        reply(resp, self.run(self.cluster.page, _filters(req), limit, cursor))


class ClusterFlush(_ClusterRoute):
    """POST /api/v1/cluster/queue/flush: deferred mail due now on every node."""

    def on_post(self, req, resp):
        params.check_known(req, params.FILTERS)
        reply(resp, self.run(self.cluster.flush, _filters(req)))


class ClusterMessage(_ClusterRoute):
    """GET /api/v1/cluster/queue/{id}: the message, from the node that has it."""

    def on_get(self, req, resp, queue_id):
        params.check_known(req, ())
        reply(resp, self.found(self.cluster.show, queue_id))


class ClusterAction(_ClusterRoute):
    """POST /api/v1/cluster/queue/{id}/ACTION on the node that has the message."""

    def __init__(self, view, pool, action):
        super().__init__(view, pool)
        self.action = action

    def on_post(self, req, resp, queue_id):
        params.check_known(req, ())
        reply(resp, self.found(self.cluster.act, queue_id, self.action))


def add_routes(app, config, registry):
    """The cluster routes on app; registry: the store's node Registry, or None (no
    cluster: every route answers 404)."""
    view = None
    if registry is not None:
        token, _ = read_token(config.api)       # none: the nodes refuse us, and say so
        view = ClusterView(registry, Peers.of(config, token or b""))
    pool = ThreadPool(THREADS)
    app.add_route(PREFIX + "/nodes", ClusterNodes(view, pool))
    app.add_route(PREFIX + "/queue", ClusterListing(view, pool))
    app.add_route(PREFIX + "/queue/summary", ClusterSummary(view, pool))
    app.add_route(PREFIX + "/queue/flush", ClusterFlush(view, pool))
    app.add_route(PREFIX + "/queue/{queue_id}", ClusterMessage(view, pool))
    for action in ACTIONS:
        app.add_route(PREFIX + "/queue/{queue_id}/" + action,
                      ClusterAction(view, pool, action))
