"""Asking every live node at once over its REST API, and naming those that do not answer.

Used by elemta.cluster.view, in the api process (in a thread of its own pool: these
calls block) and in elemtactl. Each node is asked in a thread of its own, so the view
waits for the slowest node once (cluster.api_timeout), not for each in turn. A node
that cannot be reached, answers late, refuses the token or answers with a server error
is a NodeFailure, whose text says which and why: the view names it as not answering.
Plain http.client: one short request per node, no session to keep.

The token goes only to API URLs inside cluster.peer_networks (elemta.cluster.trust), and
to the address that was checked: whoever can write to the store cannot collect it by
registering a URL of his own elsewhere. Still keep the store private (cluster.password_file,
TLS, a network only the nodes reach): it says who the nodes are.
See also: elemta.cluster.registry (who the nodes are), elemta.api.app (what they serve).
"""

import http.client
import json
import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Tuple
from urllib.parse import urlencode, urlsplit

from elemta.cluster.trust import Untrusted
from elemta.util.text import printable

# Threads asking nodes at once, at most (more nodes wait for a free one).
MAX_THREADS = 32
# An answer larger than this is refused: a page of 1,000 messages fits many times over.
MAX_ANSWER = 64 * 1024 * 1024


class NodeFailure(Exception):
    """A node did not answer usefully; str() says why."""


class Peers:
    """Requests to the nodes' REST APIs with the cluster's token; trusted: the
    elemta.cluster.trust.PeerNetworks a node's API must be in to get it."""

    def __init__(self, token: bytes, timeout: float, trusted):
        self.token = token
        self.timeout = timeout
        self.trusted = trusted

    def request(self, node, method, path, query=None) -> Tuple[int, object]:
        """(status, decoded JSON body) of one request to node (a registry.Node); 2xx and
        4xx but 401/403 are answers, anything else a NodeFailure."""
        url = urlsplit(node.api_url)
        connection_class = (http.client.HTTPSConnection if url.scheme == "https"
                            else http.client.HTTPConnection)
        target = path + ("?" + urlencode(query, doseq=True) if query else "")
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            address = self.trusted.address(url.hostname or "", port)
        except Untrusted as error:
            raise NodeFailure("not sent the api token: %s" % error)
        connection = connection_class(url.hostname, port, timeout=self.timeout)
        # The name stays the Host header's and TLS's; the socket goes to the address
        # that was checked.
        connection._create_connection = lambda _, *args, **kwargs: \
            socket.create_connection((address, port), *args, **kwargs)
        try:
            connection.request(method, target, headers={
                "Authorization": b"Bearer " + self.token, "Accept": "application/json"})
            response = connection.getresponse()
            raw = response.read(MAX_ANSWER + 1)
        except socket.timeout:
            raise NodeFailure("no answer within %gs (cluster.api_timeout)" % self.timeout)
        except (OSError, http.client.HTTPException) as error:
            raise NodeFailure(getattr(error, "strerror", None) or str(error)
                              or type(error).__name__)
        finally:
            connection.close()
        if len(raw) > MAX_ANSWER:
            raise NodeFailure("an answer larger than %d bytes" % MAX_ANSWER)
        try:
            body = json.loads(raw.decode("utf-8")) if raw else None
        except ValueError:
            raise NodeFailure("answered %d with something other than JSON"
                              % response.status)
        if response.status in (401, 403):
            raise NodeFailure("refused our api token (%d): every node needs the same "
                              "api.token or api.token_file" % response.status)
        if response.status >= 500 or response.status < 200:
            raise NodeFailure("answered %d: %s" % (response.status, _error_of(body)))
        return response.status, body

    def each(self, nodes, work: Callable) -> Tuple[Dict[str, object], List[dict]]:
        """work(node) for every node at once: ({name: its result}, [what did not
        answer: {node, api_url, error}])."""
        if not nodes:
            return {}, []
        with ThreadPoolExecutor(min(MAX_THREADS, len(nodes))) as pool:
            futures = [(node, pool.submit(work, node)) for node in nodes]
        results, missing = {}, []
        for node, future in futures:
            try:
                results[node.name] = future.result()
            except NodeFailure as failure:
                missing.append({"node": node.name, "api_url": node.api_url,
                                "error": printable(str(failure))})
        return results, missing


def _error_of(body):
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return printable(body["error"])
    return "no reason given"
