"""The queue operations of the cluster view: every live node asked, the answers merged.

Used by the api process's /api/v1/cluster/... routes (elemta.api.cluster_routes) and by
`elemtactl --cluster queue ...` (elemta.cli.clustercmd): one implementation, one JSON
shape. Each node is asked through the same REST route an admin would call on it alone
(/api/v1/stats, /api/v1/queue, ...), with the caller's filters passed through as given.
Every answer says which nodes did not answer: "missing", a list of {node, api_url,
error}, and "complete" (false when a node is missing: the figures are those of the
nodes that answered).

Queue ids are unique across hosts and sort by arrival, so the listings of several
nodes merge into one list in id order, and a page's cursor (the last id) means the
same on every node.
See also: elemta.cluster.peers, elemta.cluster.registry, elemta.api.queue_routes.
"""

from typing import Dict, Iterator, List, Optional

API = "/api/v1"
# Messages per page asked of each node when a listing is read whole (elemtactl).
WHOLE_PAGE = 1000


class StoreUnreachable(Exception):
    """The store holding the node registry did not answer; str() says why."""


class NotFound(Exception):
    """No node that answered has the message; .missing names those that did not."""

    def __init__(self, queue_id, missing):
        super().__init__(queue_id)
        self.queue_id, self.missing = queue_id, missing


class ClusterView:
    """The cluster's queue as one: registry (who lives), peers (asking them)."""

    def __init__(self, registry, peers):
        self.registry = registry
        self.peers = peers

    def live_nodes(self):
        try:
            return self.registry.nodes()
        except Exception as error:      # redis.RedisError, OSError: the store failed
            raise StoreUnreachable("%s: %s" % (type(error).__name__, error)) from None

    def _ask(self, method, path, query=None, nodes=None):
        """({name: body} of the nodes answering 200, missing, {name: (status, body)} of
        the other answers)."""
        nodes = self.live_nodes() if nodes is None else nodes
        results, missing = self.peers.each(
            nodes, lambda node: self.peers.request(node, method, path, query))
        ok = {name: body for name, (status, body) in results.items() if status == 200}
        other = {name: answer for name, answer in results.items() if answer[0] != 200}
        return ok, missing, other

    # ---- the operations ---------------------------------------------------------------

    def nodes(self) -> dict:
        """The registered nodes, each asked /api/v1/health/live: whether it answers."""
        nodes = self.live_nodes()
        _, missing, _ = self._ask("GET", API + "/health/live", nodes=nodes)
        silent = {m["node"] for m in missing}
        listed = [dict(node.to_json(), answers=node.name not in silent) for node in nodes]
        return _with_missing({"nodes": listed}, missing)

    def summary(self, query=None) -> dict:
        """/api/v1/stats of every node: totals per state, per node, and qshape's table
        summed."""
        answers, missing, other = self._ask("GET", API + "/stats", query)
        _raise_refusal(other)
        merged = {"states": {}, "messages": 0, "bytes": 0, "bucket_minutes": None,
                  "total": None, "domains": {}, "nodes": {}}
        for name in sorted(answers):
            stats = answers[name]
            merged["nodes"][name] = {key: stats[key] for key in ("states", "messages",
                                                                 "bytes")}
            for state, figures in stats["states"].items():
                into = merged["states"].setdefault(state, {"messages": 0, "bytes": 0})
                into["messages"] += figures["messages"]
                into["bytes"] += figures["bytes"]
            merged["messages"] += stats["messages"]
            merged["bytes"] += stats["bytes"]
            if merged["bucket_minutes"] is None:
                merged["bucket_minutes"] = stats["bucket_minutes"]
                merged["total"] = [0] * len(stats["total"])
            if stats["bucket_minutes"] != merged["bucket_minutes"]:
                continue        # another version's age buckets: its states still count
            merged["total"] = _add(merged["total"], stats["total"])
            for domain, cells in stats["domains"].items():
                merged["domains"][domain] = _add(
                    merged["domains"].get(domain, [0] * len(cells)), cells)
        merged["bucket_minutes"] = merged["bucket_minutes"] or []
        merged["total"] = merged["total"] or []
        return _with_missing(merged, missing)

    def page(self, query: dict, limit: int, cursor: Optional[str] = None) -> dict:
        """One page of the merged listing: the first `limit` messages after cursor, in
        id (arrival) order, each tagged with its node."""
        asked = dict(query, limit=str(limit))
        if cursor:
            asked["cursor"] = cursor
        answers, missing, other = self._ask("GET", API + "/queue", asked)
        _raise_refusal(other)
        messages, more = [], False
        for name, answer in answers.items():
            messages.extend(dict(message, node=name) for message in answer["messages"])
            more = more or answer["next_cursor"] is not None
        messages.sort(key=lambda message: message["queue_id"])
        more = more or len(messages) > limit
        messages = messages[:limit]
        return _with_missing({"messages": messages, "next_cursor": messages[-1][
            "queue_id"] if more and messages else None}, missing)

    def listing(self, query: dict) -> dict:
        """The whole merged listing (every page of every node), for elemtactl."""
        nodes = self.live_nodes()
        pages, missing = self.peers.each(nodes, lambda node: list(
            self._node_listing(node, query)))
        messages = sorted((message for name, listed in pages.items() for message in listed),
                          key=lambda message: message["queue_id"])
        return _with_missing({"messages": messages}, missing)

    def _node_listing(self, node, query) -> Iterator[dict]:
        cursor = None
        while True:
            asked = dict(query, limit=str(WHOLE_PAGE))
            if cursor:
                asked["cursor"] = cursor
            status, answer = self.peers.request(node, "GET", API + "/queue", asked)
            if status != 200:
                raise NodeRefused("node %s answered %d: %s" % (node.name, status,
                                                               _error_text(answer)))
            for message in answer["messages"]:
                yield dict(message, node=node.name)
            cursor = answer["next_cursor"]
            if cursor is None:
                return

    def show(self, queue_id: str) -> dict:
        """The message in full, from the node that has it, tagged with that node."""
        answers, missing, other = self._ask("GET", "%s/queue/%s" % (API, queue_id))
        _raise_refusal(other, ignore=(404,))
        for name, message in sorted(answers.items()):
            return _with_missing(dict(message, node=name), missing)
        raise NotFound(queue_id, missing)

    def act(self, queue_id: str, action: str) -> dict:
        """hold, release, flush or requeue one message on the node that has it."""
        answers, missing, other = self._ask(
            "POST", "%s/queue/%s/%s" % (API, queue_id, action))
        _raise_refusal(other, ignore=(404,))
        for name, result in sorted(answers.items()):
            return _with_missing(dict(result, node=name), missing)
        raise NotFound(queue_id, missing)

    def act_selected(self, action: str, query: dict) -> dict:
        """An action on every message the filters select on every node (elemtactl's
        --all and selections): per node its listing, then the action on each."""
        nodes = self.live_nodes()

        def on_node(node):
            outcomes = []
            for message in list(self._node_listing(node, query)):
                status, result = self.peers.request(node, "POST", "%s/queue/%s/%s" % (
                    API, message["queue_id"], action))
                if status == 200:
                    outcomes.append(dict(result, node=node.name))
            return outcomes
        done, missing = self.peers.each(nodes, on_node)
        results = sorted((r for listed in done.values() for r in listed),
                         key=lambda result: result["queue_id"])
        return _with_missing({"results": results}, missing)

    def flush(self, query=None) -> dict:
        """POST /api/v1/queue/flush on every node: deferred mail (or the selection) due
        now; counts summed and per node."""
        answers, missing, other = self._ask("POST", API + "/queue/flush", query)
        _raise_refusal(other)
        merged = {"flushed": 0, "outcomes": {}, "nodes": {}}
        for name in sorted(answers):
            answer = answers[name]
            merged["nodes"][name] = answer
            merged["flushed"] += answer["flushed"]
            for outcome, count in answer["outcomes"].items():
                merged["outcomes"][outcome] = merged["outcomes"].get(outcome, 0) + count
        return _with_missing(merged, missing)


class NodeRefused(Exception):
    """A node refused the request itself (a 4xx: a filter it does not take); the same
    request would be refused by every node of the same version. Not a NodeFailure: the
    node answered, so it is not named as missing; the refusal goes to the caller
    (Peers.each lets it through)."""


def _raise_refusal(other: Dict[str, tuple], ignore=()):
    for name, (status, body) in sorted(other.items()):
        if status not in ignore:
            raise NodeRefused("node %s answered %d: %s" % (name, status, _error_text(body)))


def _error_text(body):
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return body["error"]
    return "no reason given"


def _add(a: List[int], b: List[int]) -> List[int]:
    return [x + y for x, y in zip(a, b)]


def _with_missing(answer: dict, missing: List[dict]) -> dict:
    answer["complete"] = not missing
    answer["missing"] = sorted(missing, key=lambda m: m["node"])
    return answer
