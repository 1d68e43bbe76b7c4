"""Asking every live node at once over its REST API, and naming those that do not answer.

Used by elemta.cluster.view, in the api process (in a thread of its own pool: these
calls block) and in elemtactl. Each node is asked in a thread of its own, so the view
waits for the slowest node once (cluster.api_timeout), not for each in turn. A node
that cannot be reached, answers late, refuses the token or answers with a server error
is a NodeFailure, whose text says which and why: the view names it as not answering.
Plain http.client: one short request per node, no session to keep.

The token goes only to API URLs inside cluster.peer_networks (elemta.cluster.trust), and
to the address that was checked: whoever can write to the store cannot collect it by
registering a URL of his own elsewhere. Nor over plain http:// to a node that is not on
this machine's loopback unless cluster.api_plain_http allows it: the token is the root
of every cluster credential, and anyone on the path could read it. https:// is checked
against cluster.peer_ca_file (the cluster CA) when set, else the system's CAs. Still keep the store private (cluster.password_file,
TLS, a network only the nodes reach): it says who the nodes are.
See also: elemta.cluster.registry (who the nodes are), elemta.api.app (what they serve).
"""

import http.client
import ipaddress
import json
import logging
import socket
import ssl
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Tuple
from urllib.parse import urlencode, urlsplit

from elemta import metrics
from elemta.cluster.trust import Untrusted
from elemta.util.text import printable

# Threads asking nodes at once, at most (more nodes wait for a free one).
MAX_THREADS = 32
# An answer larger than this is refused: a page of 1,000 messages fits many times over.
MAX_ANSWER = 64 * 1024 * 1024

log = logging.getLogger("elemta.cluster")


class NodeFailure(Exception):
    """A node did not answer usefully; str() says why."""


class Peers:
    """Requests to the nodes' REST APIs with the cluster's token; trusted: the
    elemta.cluster.trust.PeerNetworks a node's API must be in to get it."""

    def __init__(self, token: bytes, timeout: float, trusted, plain_http="loopback",
                 ca_file=None):
        """plain_http: cluster.api_plain_http; ca_file: cluster.peer_ca_file."""
        self.token = token
        self.timeout = timeout
        self.trusted = trusted
        self.plain_http = plain_http
        self.ca_file = ca_file

    @classmethod
    def of(cls, config, token):
        from elemta.cluster.trust import PeerNetworks
        cluster = config.cluster
        return cls(token, cluster.api_timeout, PeerNetworks.of(config),
                   cluster.api_plain_http, cluster.peer_ca_file)

    def _plain_http_allowed(self, address):
        if self.plain_http == "always":
            return True
        if self.plain_http == "never":
            return False
        try:
            return ipaddress.ip_address(address.split("%")[0]).is_loopback
        except ValueError:
            return False

    def _withhold(self, node, reason, why):
        metrics.count_token_withheld(reason)
        log.warning("cluster: not sending the api token to node %s (%s): %s",
                    printable(node.name), printable(node.api_url), why)
        raise NodeFailure("not sent the api token: %s" % why)

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
            self._withhold(node, "outside_peer_networks", error)
        if url.scheme != "https" and not self._plain_http_allowed(address):
            self._withhold(node, "plain_http", "its api_url is plain http:// to %s, which "
                           "cluster.api_plain_http (%s) does not allow: use https://"
                           % (address, self.plain_http))
        if url.scheme == "https":
            context = ssl.create_default_context(cafile=self.ca_file)
            connection = connection_class(url.hostname, port, timeout=self.timeout,
                                          context=context)
        else:
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
